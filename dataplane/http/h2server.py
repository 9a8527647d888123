"""Downstream HTTP/2: one reader task per connection, one task per stream.

The reader feeds h2 and routes its events to streams; stream tasks run the proxy
handler and write through the shared h2 state (single-threaded, so no locks). Flow
control is back-pressure in both directions: request DATA is acknowledged (re-opening
the client's window) only when the proxy has forwarded it, and response DATA waits for
the client's window and for the socket's write buffer to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from anyio.abc import TaskGroup
from hyperframe.frame import GoAwayFrame

from dataplane.http.errors import ClientGone
from dataplane.http.h2setup import start_connection
from dataplane.http.limits import ProxyLimits
from dataplane.http.messages import Headers, ProxyRequest
from dataplane.http.proxy import ProxyHandler, send_error
from dataplane.http.stream import ByteStream, ReadTimeout, StreamClosed
from shared.logging import get_logger

log = get_logger("dataplane.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_STATUS = {status: b"%d" % status for status in range(100, 600)}
_NO_TRAILERS: Headers = []


class _Stream:
    """One request stream: its body (BodySource) and its response (ResponseSink)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_head_request",
        "_waiter",
        "done",
        "ended",
        "reset",
        "scope",
        "started",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: Http2Connection, stream_id: int, head_request: bool, ended: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._head_request = head_request
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.trailers: Headers = _NO_TRAILERS
        # ended: the client finished its request; reset: the stream is gone.
        self.ended = ended
        self.reset = False
        self.started = False
        self.done = False
        # Cancelled when the client resets the stream, so the upstream exchange stops too.
        self.scope = anyio.CancelScope()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        self._chunks.append((data, flow_controlled_length))
        self.wake()

    def unconsumed(self) -> int:
        return sum(length for _, length in self._chunks)

    # --- BodySource ------------------------------------------------------------------------
    def take_complete(self) -> bytes | None:
        # Upstream h2 streams send DATA frames apart from HEADERS anyway: nothing to gain here.
        return None

    async def read(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self.reset:
                raise ClientGone("client reset the stream")
            if self.ended:
                return b""
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        data, length = chunks.popleft()
        self._conn.acknowledge(self.stream_id, length)
        return data

    # --- ResponseSink ----------------------------------------------------------------------
    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        self.started = True
        if self._head_request or status == 204 or status == 304:
            body = b""
        fields: Headers = [(b":status", _STATUS.get(status) or b"%d" % status)]
        fields.extend(headers)
        end_now = end and not body
        self._conn.send_headers(self, fields, end_now)
        if body:
            await self._send(body, end)
        elif end:
            self.done = True
        await self._conn.drain_writes()

    async def write(self, data: bytes) -> None:
        if data and not self._head_request:
            await self._send(data, False)
            await self._conn.drain_writes()

    async def end(self, trailers: Headers) -> None:
        self._conn.end_stream(self, trailers)
        self.done = True
        await self._conn.drain_writes()

    async def _send(self, data: bytes, end: bool) -> None:
        conn = self._conn
        while True:
            if self.reset:
                raise ClientGone("client reset the stream")
            window = conn.send_window(self)
            if window <= 0:
                await conn.wait_for_window()
                continue
            if len(data) <= window:
                conn.send_data(self, data, end)
                if end:
                    self.done = True
                return
            conn.send_data(self, data[:window], False)
            data = data[window:]

    def abort(self) -> None:
        self._conn.reset_stream(self, h2.errors.ErrorCodes.INTERNAL_ERROR)


class Http2Connection:
    """Serves one downstream HTTP/2 connection (prior knowledge or ALPN h2)."""

    def __init__(
        self,
        stream: ByteStream,
        handler: ProxyHandler,
        limits: ProxyLimits,
        *,
        listener_key: tuple[str, int],
        server_port: int,
        scheme: bytes,
    ) -> None:
        self.stream = stream
        self._handler = handler
        self._limits = limits
        self._listener_key = listener_key
        self._server_port = server_port
        self._scheme = scheme
        self._client_host = stream.peer_host.encode("latin-1")
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        self._streams: dict[int, _Stream] = {}
        self._window_waiters: list[asyncio.Future[None]] = []
        self._last_stream_id = 0
        self._tasks: TaskGroup | None = None
        # draining: GOAWAY sent, finish open streams then close. closing: stop reading now.
        self.draining = False
        self._closing = False

    @property
    def idle(self) -> bool:
        return not self._streams

    # --- lifecycle ---------------------------------------------------------------------------
    async def serve(self, initial: bytes = b"") -> None:
        limits = self._limits
        conn = self._h2
        start_connection(
            conn,
            client=False,
            stream_window=limits.h2_stream_window,
            connection_window=limits.h2_connection_window,
            max_header_list_size=limits.max_request_head_bytes,
            max_concurrent_streams=limits.h2_max_concurrent_streams,
        )
        self._flush()
        loop = asyncio.get_running_loop()
        stream = self.stream
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                data = initial
                while True:
                    if data and not self._receive(data):
                        break
                    if self._closing or (self.draining and not self._streams):
                        break
                    deadline = loop.time() + limits.keepalive_idle_timeout if not self._streams else None
                    try:
                        data = await stream.receive(deadline)
                    except ReadTimeout:
                        self.drain()
                        break
                    if not data:
                        break
                # The client is gone or the connection is done: nobody can take the answers.
                tasks.cancel_scope.cancel()
        finally:
            self._flush()
            stream.close()

    def drain(self) -> None:
        """Graceful stop: GOAWAY naming the last stream we accept; close after open streams end."""
        if self.draining:
            return
        self.draining = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._flush()
        # Written directly: h2 would refuse to send on open streams after its own GOAWAY.
        try:
            self.stream.write(frame.serialize())
        except StreamClosed:
            return
        if not self._streams:
            self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    # --- reading ------------------------------------------------------------------------------
    def _receive(self, data: bytes) -> bool:
        conn = self._h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from client", reason=str(exc))
            code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.close_connection(error_code=code, additional_data=str(exc)[:200].encode())
            self._flush()
            return False
        streams = self._streams
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.reset:
                    stream.on_data(event.data, event.flow_controlled_length)
                else:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.RequestReceived:
                self._on_request(event)
            elif kind is h2.events.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended = True
                    stream.wake()
            elif kind is h2.events.TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = list(event.headers)
            elif kind is h2.events.StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.reset = True
                    stream.scope.cancel()
                    stream.wake()
                    self._wake_window_waiters()
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                self._wake_window_waiters()
            elif kind is h2.events.ConnectionTerminated:
                # The client will send nothing more. Streams it still wants answered finish;
                # h2 refuses to send after a GOAWAY, so put its state machine back to open.
                conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
                self.draining = True
                if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                    self._closing = True
        self._flush()
        return True

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        conn = self._h2
        if self.draining:
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._last_stream_id = max(self._last_stream_id, stream_id)
        method = path = authority = b""
        fields: Headers = []
        content_length: int | None = None
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"host":
                if not authority:
                    authority = value
                continue
            if name == b"content-length":
                content_length = int(value) if value.isdigit() else None
            fields.append((name, value))
        ended = event.stream_ended is not None
        stream = _Stream(self, stream_id, method == b"HEAD", ended)
        self._streams[stream_id] = stream
        request = ProxyRequest(
            method,
            path,
            authority,
            self._scheme,
            fields,
            None if ended else stream,
            content_length,
            self._client_host,
            self._listener_key,
            self._server_port,
            b"2",
        )
        assert self._tasks is not None
        too_many = len(fields) > self._limits.max_header_count
        self._tasks.start_soon(self._run_stream, stream, request, too_many)

    async def _run_stream(self, stream: _Stream, request: ProxyRequest, too_many_headers: bool) -> None:
        handler = self._handler
        handler.in_flight += 1
        try:
            with stream.scope:
                if too_many_headers:
                    await send_error(stream, 431, f"more than {self._limits.max_header_count} header fields")
                else:
                    await handler.handle(request, stream)
        except ClientGone as exc:
            log.debug("client gone", reason=str(exc))
        finally:
            handler.in_flight -= 1
            self._stream_finished(stream)

    def _stream_finished(self, stream: _Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        if not stream.reset:
            if not stream.done:
                self.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif not stream.ended:
                # Answered before the request ended: tell the client to stop sending (RFC 9113 8.1).
                self.reset_stream(stream, h2.errors.ErrorCodes.NO_ERROR)
        pending = stream.unconsumed()
        if pending:
            # Unread request DATA still counts against the connection window: give it back.
            self._h2.acknowledge_received_data(pending, stream.stream_id)
            self._flush()
        if self.draining and not self._streams:
            self.stream.close()

    # --- writing (called by streams) ------------------------------------------------------------
    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            with contextlib.suppress(StreamClosed):
                self.stream.write(data)

    def _wake_window_waiters(self) -> None:
        waiters = self._window_waiters
        if waiters:
            self._window_waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length:
            self._h2.acknowledge_received_data(length, stream_id)
            self._flush()

    def send_headers(self, stream: _Stream, headers: Headers, end_stream: bool) -> None:
        if stream.reset or self.stream.closed:
            raise ClientGone("client reset the stream")
        try:
            self._h2.send_headers(stream.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client closed the stream") from None
        self._flush()

    def send_window(self, stream: _Stream) -> int:
        conn = self._h2
        try:
            return min(conn.local_flow_control_window(stream.stream_id), conn.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client closed the stream") from None

    async def wait_for_window(self) -> None:
        if self.stream.closed:
            raise ClientGone("client closed the connection")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        await waiter

    def send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        try:
            self._h2.send_data(stream.stream_id, data, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client closed the stream") from None
        self._flush()

    def end_stream(self, stream: _Stream, trailers: Headers) -> None:
        try:
            if trailers:
                self._h2.send_headers(stream.stream_id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream.stream_id)
        except h2.exceptions.StreamClosedError:
            raise ClientGone("client closed the stream") from None
        self._flush()

    async def drain_writes(self) -> None:
        try:
            await self.stream.drain()
        except StreamClosed:
            raise ClientGone("client closed the connection") from None

    def reset_stream(self, stream: _Stream, code: h2.errors.ErrorCodes) -> None:
        if stream.reset:
            return
        stream.reset = True
        try:
            self._h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.ProtocolError:
            return  # already closed on the h2 side
        self._flush()
