"""A scriptable HTTP/2 upstream on h2 (prior knowledge on cleartext, ALPN h2 with TLS).

Each stream runs the test's handler in its own task, like a real multiplexing server.
`goaway_after` makes the server send GOAWAY after that many streams, to exercise the
proxy's pool; `max_concurrent_streams` is advertised in SETTINGS.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.tls import TLSListener

Headers = list[tuple[bytes, bytes]]


class H2Request:
    def __init__(self, headers: Headers) -> None:
        self.pseudo = {k: v for k, v in headers if k.startswith(b":")}
        self.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
        self.method = self.pseudo.get(b":method", b"")
        self.target = self.pseudo.get(b":path", b"")
        self.authority = self.pseudo.get(b":authority", b"")
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class H2Exchange:
    def __init__(self, connection: _H2ServerConnection, stream_id: int, request: H2Request, ended: bool) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.request = request
        self.connection_number = connection.number
        self._send, self._receive = anyio.create_memory_object_stream[bytes](100)
        if ended:
            self._send.close()

    async def receive_body_chunk(self) -> bytes:
        try:
            data = await self._receive.receive()
        except anyio.EndOfStream:
            return b""
        self.request.body += data
        await self._connection.acknowledge(self.stream_id, len(data))
        return data

    async def read_body(self) -> bytes:
        while await self.receive_body_chunk():
            pass
        return self.request.body

    async def send_head(self, status: int, headers: Headers, end: bool = False) -> None:
        await self._connection.send_headers(self.stream_id, [(b":status", b"%d" % status), *headers], end)

    async def send(self, data: bytes, end: bool = False) -> None:
        await self._connection.send_data(self.stream_id, data, end)

    async def end(self, trailers: Headers | None = None) -> None:
        if trailers:
            await self._connection.send_headers(self.stream_id, trailers, True)
        else:
            await self._connection.send_data(self.stream_id, b"", True)

    async def respond(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        fields = list(headers or [])
        fields.append((b"content-length", b"%d" % len(body)))
        await self.send_head(status, fields, end=not body)
        if body:
            await self.send(body, end=True)


Handler = Callable[[H2Exchange], Awaitable[None]]


async def echo(exchange: H2Exchange) -> None:
    body = await exchange.read_body()
    request = exchange.request
    payload = {
        "method": request.method.decode(),
        "target": request.target.decode(),
        "authority": request.authority.decode(),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
        "body": body.decode("latin-1"),
        "connection": exchange.connection_number,
        "stream": exchange.stream_id,
    }
    await exchange.respond(200, json.dumps(payload).encode(), [(b"content-type", b"application/json")])


class _H2ServerConnection:
    def __init__(self, peer: H2Peer, stream: ByteStream, number: int) -> None:
        self.peer = peer
        self.stream = stream
        self.number = number
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.exchanges: dict[int, H2Exchange] = {}
        self.lock = anyio.Lock()
        self.window_changed = anyio.Event()
        self.streams_seen = 0

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self.lock:
                await self.stream.send(data)

    async def acknowledge(self, stream_id: int, length: int) -> None:
        try:
            self.conn.acknowledge_received_data(length, stream_id)
        except h2.exceptions.ProtocolError:
            return
        await self.flush()

    async def send_headers(self, stream_id: int, headers: Headers, end: bool) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end)
        await self.flush()

    async def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        while True:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if len(data) <= window:
                self.conn.send_data(stream_id, data, end_stream=end)
                await self.flush()
                return
            if window > 0:
                self.conn.send_data(stream_id, data[:window])
                data = data[window:]
                await self.flush()
            else:
                await self.window_changed.wait()

    async def serve(self) -> None:
        settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.peer.max_concurrent_streams}
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        self.conn.initiate_connection()
        await self.flush()
        async with anyio.create_task_group() as tasks:
            while True:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        self.streams_seen += 1
                        exchange = H2Exchange(
                            self, event.stream_id, H2Request(event.headers), event.stream_ended is not None
                        )
                        self.peer.requests.append(exchange.request)
                        self.exchanges[event.stream_id] = exchange
                        tasks.start_soon(self._run, exchange)
                    elif isinstance(event, h2.events.DataReceived):
                        exchange = self.exchanges.get(event.stream_id)
                        if exchange is not None:
                            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                                await exchange._send.send(event.data)
                    elif isinstance(event, h2.events.StreamEnded):
                        exchange = self.exchanges.get(event.stream_id)
                        if exchange is not None:
                            exchange._send.close()
                    elif isinstance(event, h2.events.StreamReset):
                        exchange = self.exchanges.pop(event.stream_id, None)
                        if exchange is not None:
                            exchange._send.close()
                        self.peer.resets += 1
                    elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        self.window_changed.set()
                        self.window_changed = anyio.Event()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        break
                await self.flush()
            tasks.cancel_scope.cancel()

    async def _run(self, exchange: H2Exchange) -> None:
        try:
            await self.peer.handler(exchange)
        except (h2.exceptions.ProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        finally:
            exchange._send.close()
            exchange._receive.close()
        goaway_after = self.peer.goaway_after
        if goaway_after and self.streams_seen >= goaway_after:
            self.conn.close_connection(last_stream_id=exchange.stream_id)
            await self.flush()


class H2Peer:
    """`async with H2Peer(handler) as peer:` serves HTTP/2 on 127.0.0.1:peer.port."""

    def __init__(
        self,
        handler: Handler = echo,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_concurrent_streams: int = 100,
        goaway_after: int = 0,
    ) -> None:
        self.handler = handler
        self._ssl_context = ssl_context
        self.max_concurrent_streams = max_concurrent_streams
        self.goaway_after = goaway_after
        self.port = 0
        self.connections = 0
        self.resets = 0
        self.requests: list[H2Request] = []
        self._tasks: TaskGroup | None = None

    async def __aenter__(self) -> H2Peer:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)
        served = TLSListener(listener, self._ssl_context, standard_compatible=False) if self._ssl_context else listener
        self._listener = served
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(served.serve, self._serve)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()
        result = await self._tasks.__aexit__(exc_type, exc, tb)
        await self._listener.aclose()
        return result

    async def _serve(self, stream: ByteStream) -> None:
        self.connections += 1
        try:
            await _H2ServerConnection(self, stream, self.connections).serve()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await anyio.aclose_forcefully(stream)
