"""What the protocol handlers and the forwarding logic exchange, independent of HTTP/1.1 or HTTP/2.

A connection handler (h1server, h2server) turns its wire format into a `ProxyRequest`
with a `BodySource`, and gives the proxy a `ResponseSink` that writes its wire format.
Header names are lower-case bytes everywhere.
"""

from __future__ import annotations

from typing import Protocol

Headers = list[tuple[bytes, bytes]]


class BodySource(Protocol):
    """A request body read piece by piece; the next piece is only read when asked (back-pressure)."""

    async def read(self) -> bytes:
        """The next piece; b"" at the end. Raises ClientGone or RequestRejected."""
        ...

    def take_complete(self) -> bytes | None:
        """All the body not read yet, if all of it has already arrived (it is then consumed, as if
        read to its end); None, consuming nothing, while more is to come."""
        ...

    @property
    def trailers(self) -> Headers: ...


class ResponseSink(Protocol):
    """Where the proxy writes one response."""

    # True once the response head went out: errors after that can only abort the stream.
    started: bool

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        """Send the head, then `body`; `end` means the response is complete.

        `content_length` is set when `headers` already carry the framing (a content-length).
        """
        ...

    async def write(self, data: bytes) -> None:
        """Send body bytes now (flushed: an event stream goes out event by event)."""
        ...

    async def end(self, trailers: Headers) -> None: ...

    def abort(self) -> None:
        """The response cannot be completed: h1 closes the connection, h2 resets the stream."""
        ...


class ProxyRequest:
    """One downstream request as the forwarding logic sees it."""

    __slots__ = (
        "authority",
        "body",
        "client_host",
        "content_length",
        "headers",
        "listener_key",
        "method",
        "scheme",
        "server_port",
        "target",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        scheme: bytes,
        headers: Headers,
        body: BodySource | None,
        content_length: int | None,
        client_host: bytes,
        listener_key: tuple[str, int],
        server_port: int,
        version: bytes,
    ) -> None:
        self.method = method
        # Origin form: "/path?query" (or "*").
        self.target = target
        self.authority = authority
        self.scheme = scheme
        self.headers = headers
        # None: the request has no body.
        self.body = body
        self.content_length = content_length
        self.client_host = client_host
        # The (address, port) of the listener group the request arrived on.
        self.listener_key = listener_key
        # The port the request arrived on (the bound one, also for port-0 listeners).
        self.server_port = server_port
        # b"1.0", b"1.1" or b"2": the downstream protocol, for header conversions.
        self.version = version


async def read_whole_body(request: ProxyRequest, limit: int) -> bytes | None:
    """The request's whole body (b"" without one); None, having read no more than `limit` + one
    piece, when it is longer than `limit` bytes. Handlers that must see a body before forwarding it
    (MCP, A2A, LLM) read it here and answer their own 413."""
    source = request.body
    if source is None:
        return b""
    if request.content_length is not None and request.content_length > limit:
        return None
    whole = source.take_complete()
    if whole is not None:
        return whole if len(whole) <= limit else None
    chunks: list[bytes] = []
    size = 0
    while True:
        data = await source.read()
        if not data:
            return b"".join(chunks)
        size += len(data)
        if size > limit:
            return None
        chunks.append(data)
