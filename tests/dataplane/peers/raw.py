"""Raw-socket HTTP/1.1 helpers for tests that need exact bytes on the wire."""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream


async def read_response(stream: ByteStream, buffer: bytearray) -> bytes:
    """Read one content-length framed response from `stream` (extra bytes stay in `buffer`)."""
    while True:
        head, sep, rest = bytes(buffer).partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) >= length:
                response = head + sep + rest[:length]
                del buffer[: len(response)]
                return response
        buffer += await stream.receive()


async def read_until_closed(stream: ByteStream) -> bytes:
    """Everything the peer sends until it closes the connection."""
    received = b""
    while True:
        try:
            received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return received
