"""A scriptable HTTP/1.1 upstream on h11: each test passes the handler that plays the backend.

It is a real server on a real socket; the handler sees the request as h11 parsed it and
answers through `H1Exchange` (whole responses, streamed ones, or raw bytes for the
tests that need a misbehaving upstream).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener

Headers = list[tuple[bytes, bytes]]


class PeerRequest:
    def __init__(self, method: bytes, target: bytes, headers: Headers, http_version: bytes) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class H1Exchange:
    """One request as the handler sees it."""

    def __init__(
        self, peer: H1Peer, conn: h11.Connection, stream: ByteStream, request: PeerRequest, connection_number: int
    ) -> None:
        self.peer = peer
        self._conn = conn
        self.stream = stream
        self.request = request
        self.connection_number = connection_number
        self.body_done = False
        # Set by a handler that closed or broke the connection on purpose.
        self.closed = False

    async def receive_body_chunk(self) -> bytes:
        """The next piece of the request body; b"" at its end."""
        if self.body_done:
            return b""
        event = await self.peer.next_event(self._conn, self.stream)
        if isinstance(event, h11.Data):
            self.request.body += bytes(event.data)
            return bytes(event.data)
        self.body_done = True
        return b""

    async def read_body(self) -> bytes:
        while await self.receive_body_chunk():
            pass
        return self.request.body

    async def send_head(self, status: int, headers: Headers) -> None:
        await self.stream.send(self._conn.send(h11.Response(status_code=status, headers=headers)))

    async def send(self, data: bytes) -> None:
        await self.stream.send(self._conn.send(h11.Data(data=data)))

    async def end(self) -> None:
        await self.stream.send(self._conn.send(h11.EndOfMessage()))

    async def respond(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        fields = list(headers or [])
        if not any(name.lower() == b"content-length" for name, _ in fields):
            fields.append((b"content-length", b"%d" % len(body)))
        await self.send_head(status, fields)
        if body:
            await self.send(body)
        await self.end()

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, bypassing HTTP (for broken-upstream tests)."""
        self.closed = True
        await self.stream.send(data)


Handler = Callable[[H1Exchange], Awaitable[None]]


async def echo(exchange: H1Exchange) -> None:
    """Answer with what arrived: method, target, headers and body, as JSON."""
    body = await exchange.read_body()
    request = exchange.request
    payload = {
        "method": request.method.decode(),
        "target": request.target.decode(),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
        "body": body.decode("latin-1"),
        "connection": exchange.connection_number,
    }
    await exchange.respond(200, json.dumps(payload).encode(), [(b"content-type", b"application/json")])


class H1Peer:
    """`async with H1Peer(handler) as peer:` serves on 127.0.0.1:peer.port."""

    def __init__(self, handler: Handler = echo, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self._ssl_context = ssl_context
        self.port = 0
        self.connections = 0
        self.requests: list[PeerRequest] = []
        self._tasks: TaskGroup | None = None

    async def __aenter__(self) -> H1Peer:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)
        served = TLSListener(listener, self._ssl_context, standard_compatible=False) if self._ssl_context else listener
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(served.serve, self._serve)
        self._listener = served
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        result = await self._tasks.__aexit__(exc_type, exc, tb)
        await self._listener.aclose()
        return result

    async def next_event(self, conn: h11.Connection, stream: ByteStream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            conn.receive_data(data)

    async def _serve(self, stream: ByteStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self.next_event(conn, stream)
                if not isinstance(event, h11.Request):
                    return
                request = PeerRequest(
                    bytes(event.method),
                    bytes(event.target),
                    [(bytes(k).lower(), bytes(v)) for k, v in event.headers.raw_items()],
                    bytes(event.http_version),
                )
                self.requests.append(request)
                exchange = H1Exchange(self, conn, stream, request, number)
                await self.handler(exchange)
                if exchange.closed or conn.our_state is not h11.DONE:
                    return
                if not exchange.body_done:
                    await exchange.read_body()
                if conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.EndOfStream, anyio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            await anyio.aclose_forcefully(stream)
