"""A byte-scripted HTTP/1.1 provider, for the answers the stand-ins cannot give.

The stand-ins (standins.py) speak the providers' APIs through h11, which only writes well-formed
HTTP and well-formed answers. A gateway must also survive a provider that misbehaves: an error
body that stalls after its head, a 201/204/302 instead of an answer, a JSON document that is not
an object, an event of the wrong shape, a chunked body whose end never comes after message_stop or
[DONE]. Those need exact bytes, so here each request is answered by the next scripted bytes, and
what the connection does after them (`then`) is scripted too.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc

from tests.conftest import free_port

# keep: serve the next request on the connection; close: close it at once (the body's end is lost);
# stall: send nothing more until the gateway closes the connection (or the provider stops).
Then = Literal["keep", "close", "stall"]

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
_READ_SIZE = 65536
LAST_CHUNK = b"0\r\n\r\n"


@dataclass
class RawRequest:
    """A request as received; `ended` is set once the connection that carried it is closed."""

    line: str
    headers: dict[str, str]
    body: bytes
    ended: anyio.Event = field(default_factory=anyio.Event, repr=False)


class RawProvider:
    """Answers each request with the next scripted bytes; a request with none left gets a 500."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[RawRequest] = []
        self._scripts: deque[tuple[bytes, Then]] = deque()

    def script(self, data: bytes, then: Then = "keep") -> None:
        self._scripts.append((data, then))

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        served: list[RawRequest] = []
        try:
            buffer = b""
            while True:
                request, buffer = await _read_request(stream, buffer)
                if request is None:
                    return
                served.append(request)
                self.requests.append(request)
                data, then = self._scripts.popleft() if self._scripts else (_NO_SCRIPT, "close")
                await stream.send(data)
                if then == "close":
                    return
                if then == "stall":
                    while await stream.receive(_READ_SIZE):  # discarded: only the close is awaited
                        pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            for request in served:
                request.ended.set()


async def _read_request(stream: anyio.abc.SocketStream, buffer: bytes) -> tuple[RawRequest | None, bytes]:
    """The next request (None when it is over a cap), its head and body read up to the caps."""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            return None, b""
        buffer += await stream.receive(_READ_SIZE)
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for header in lines:
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY:
        return None, b""
    while len(buffer) < length:
        buffer += await stream.receive(_READ_SIZE)
    return RawRequest(line, headers, buffer[:length]), buffer[length:]


@asynccontextmanager
async def serve_raw() -> AsyncIterator[RawProvider]:
    """A RawProvider listening on 127.0.0.1 until the block ends (its connections are then closed)."""
    provider = RawProvider()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=provider.port)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, provider._serve)
        try:
            yield provider
        finally:
            tasks.cancel_scope.cancel()


def head(status: int = 200, content_type: str = "text/event-stream", *, length: int | None = None) -> bytes:
    """A response head: with a Content-Length when `length` is given, else chunked."""
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n{framing}\r\n\r\n".encode()


def whole(document: bytes, status: int = 200, content_type: str = "application/json") -> bytes:
    """A whole answer with its Content-Length."""
    return head(status, content_type, length=len(document)) + document


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def event(document: Any, name: str | None = None) -> bytes:
    """One event-stream event (named, as Anthropic sends them, or a bare data line, as OpenAI)."""
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return (b"event: %b\n" % name.encode() if name else b"") + b"data: " + data + b"\n\n"


_NO_SCRIPT = whole(b'{"error":{"message":"the raw provider has no script left"}}', 500)
