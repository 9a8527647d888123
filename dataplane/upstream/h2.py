"""A multiplexed HTTP/2 connection to an upstream, driven from the protocol's callbacks.

Frames are parsed in `data_received` and dispatched to the streams right there, so the
connection needs no reader task of its own. Each stream is an `Http2Exchange`; its
received DATA is acknowledged (re-opening the upstream's send window) only when the
proxy has taken it, so a slow client slows the upstream instead of filling our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from dataplane.http.errors import ProxyError, RetryableUpstreamError, UpstreamProtocolError, UpstreamReset
from dataplane.http.h1codec import ResponseHead
from dataplane.http.h2setup import start_connection
from dataplane.http.limits import ProxyLimits
from dataplane.upstream.exchange import Headers, UpstreamRequest

if TYPE_CHECKING:
    from dataplane.upstream.pool import Http2Pool

_NO_TRAILERS: Headers = []


class Http2Exchange:
    """One stream: the request we send and the response we receive."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_head",
        "_request_ended",
        "_response_ended",
        "_trailers",
        "_waiter",
        "closed",
        "stream_id",
    )

    def __init__(self, conn: Http2Upstream, stream_id: int, request_ended: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._head: ResponseHead | None = None
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._error: ProxyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._request_ended = request_ended
        self._response_ended = False
        self._trailers = _NO_TRAILERS
        self.closed = False

    # --- called by the connection -------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _on_head(self, headers: Headers) -> None:
        status = 0
        content_length: int | None = None
        fields: Headers = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value) if value.isdigit() else 0
                continue
            if name == b"content-length" and value.isdigit():
                content_length = int(value)
            fields.append((name, value))
        if status < 200:
            self._fail(UpstreamProtocolError(f"invalid :status from upstream {self._conn.authority}"))
            self._conn.reset(self, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        self._head = ResponseHead(status, "2", fields, True, content_length, False)
        self._wake()

    def _on_data(self, data: bytes, flow_controlled_length: int) -> None:
        self._chunks.append((data, flow_controlled_length))
        self._wake()

    def _on_end(self) -> None:
        self._response_ended = True
        self._wake()
        if self._head is None:
            self._fail(UpstreamProtocolError(f"upstream {self._conn.authority} ended the stream without a response"))

    def _fail(self, error: ProxyError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    # --- Exchange --------------------------------------------------------------------------
    async def send_data(self, data: bytes) -> None:
        conn = self._conn
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            window = conn.send_window(self.stream_id)
            if window <= 0:
                await conn.wait_for_window()
                continue
            piece = view[:window]
            view = view[window:]
            conn.send_data(self.stream_id, bytes(piece), end_stream=False)
            await conn.drain()

    async def end_request(self, trailers: Headers) -> None:
        if self._error is not None:
            raise self._error
        self._conn.end_stream(self.stream_id, trailers)
        self._request_ended = True
        if self._response_ended and not self._chunks:
            self._conn.stream_closed(self)

    async def response(self) -> ResponseHead:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    def take_body(self) -> tuple[bytes, bool]:
        chunks = self._chunks
        if chunks:
            parts: list[bytes] = []
            acknowledged = 0
            while chunks:
                data, length = chunks.popleft()
                parts.append(data)
                acknowledged += length
            self._conn.acknowledge(self.stream_id, acknowledged)
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        else:
            body = b""
        if self._response_ended and self._error is None:
            self._finish_response()
            return body, True
        return body, False

    async def read(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._response_ended:
                self._finish_response()
                return b""
            await self._wait()
        data, length = chunks.popleft()
        self._conn.acknowledge(self.stream_id, length)
        return data

    def _finish_response(self) -> None:
        if self._request_ended:
            self._conn.stream_closed(self)

    @property
    def trailers(self) -> Headers:
        return self._trailers

    @property
    def complete(self) -> bool:
        return self._response_ended and not self._chunks

    def abort(self) -> None:
        if self.closed:
            return
        if not (self._response_ended and self._request_ended):
            self._conn.reset(self, h2.errors.ErrorCodes.CANCEL)
        self._conn.stream_closed(self)


class Http2Upstream(asyncio.Protocol):
    """The connection: h2 state, its streams and write back-pressure."""

    def __init__(self, pool: Http2Pool, authority: str, scheme: bytes, limits: ProxyLimits) -> None:
        self._pool = pool
        self.authority = authority
        self._authority_bytes = authority.encode("idna") if not authority.isascii() else authority.encode()
        self._scheme = scheme
        self._limits = limits
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        )
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Http2Exchange] = {}
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._window_waiters: list[asyncio.Future[None]] = []
        # GOAWAY received (or sent): no new streams; close when the last one ends.
        self.goaway = False
        self.closed = False
        self.idle_since = asyncio.get_running_loop().time()
        # Resolved by the upstream's first SETTINGS: until then its stream limit is unknown.
        self.settings_received: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        limits = self._limits
        conn = self._h2
        start_connection(
            conn,
            client=True,
            stream_window=limits.h2_stream_window,
            connection_window=limits.h2_connection_window,
            max_header_list_size=limits.max_response_head_bytes,
        )
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._close_with(UpstreamProtocolError(f"HTTP/2 protocol error from upstream {self.authority}: {exc}"))
            return
        streams = self._streams
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.flow_controlled_length)
                else:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_head(event.headers)
            elif kind is h2.events.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()
            elif kind is h2.events.TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._trailers = list(event.headers)
            elif kind is h2.events.StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._on_reset(stream, event.error_code)
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                self._wake_window_waiters()
                if kind is h2.events.RemoteSettingsChanged:
                    if not self.settings_received.done():
                        self.settings_received.set_result(None)
                    self._pool.capacity_changed()
            elif kind is h2.events.ConnectionTerminated:
                self._on_goaway(event)
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if not self.settings_received.done():
            self.settings_received.set_exception(
                UpstreamReset(f"upstream {self.authority} closed the connection before its HTTP/2 SETTINGS")
            )
        error = UpstreamReset(f"upstream {self.authority} closed the HTTP/2 connection")
        for stream in list(self._streams.values()):
            stream._fail(error)
        self._wake_window_waiters()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        self._pool.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- events ------------------------------------------------------------------------------
    def _on_reset(self, stream: Http2Exchange, error_code: int) -> None:
        if error_code == h2.errors.ErrorCodes.REFUSED_STREAM and stream._head is None:
            stream._fail(RetryableUpstreamError(f"upstream {self.authority} refused the stream"))
        else:
            name = h2.errors.ErrorCodes(error_code).name if error_code in h2.errors.ErrorCodes else str(error_code)
            stream._fail(UpstreamReset(f"upstream {self.authority} reset the stream ({name})"))
        stream.closed = True
        self._forget(stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last:
                # Not processed by the upstream (RFC 9113 6.8): safe to send again.
                stream._fail(RetryableUpstreamError(f"upstream {self.authority} sent GOAWAY before the stream"))
                stream.closed = True
                self._forget(stream)
        if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
            self._close_with(UpstreamReset(f"upstream {self.authority} sent GOAWAY ({event.error_code})"))
            return
        # h2 stops accepting frames after a GOAWAY; the streams it still lets finish need them.
        self._h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        self._pool.retire(self)
        if not self._streams:
            self.close()

    def _close_with(self, error: ProxyError) -> None:
        for stream in list(self._streams.values()):
            stream._fail(error)
            stream.closed = True
        self._streams.clear()
        self.goaway = True
        self.close()

    def _wake_window_waiters(self) -> None:
        waiters = self._window_waiters
        if waiters:
            self._window_waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # --- used by streams and the pool ----------------------------------------------------------
    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self.closed:
            self._transport.write(data)

    @property
    def has_capacity(self) -> bool:
        if self.goaway or self.closed:
            return False
        limit = min(self._h2.remote_settings.max_concurrent_streams, self._limits.h2_max_concurrent_streams)
        return len(self._streams) < limit

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def open_stream(self, request: UpstreamRequest) -> Http2Exchange:
        conn = self._h2
        stream_id = conn.get_next_available_stream_id()
        headers: Headers = [
            (b":method", request.method),
            (b":scheme", self._scheme),
            (b":authority", request.authority),
            (b":path", request.target),
        ]
        headers.extend(request.headers)
        end_stream = not request.has_body
        exchange = Http2Exchange(self, stream_id, end_stream)
        try:
            conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamProtocolError(f"cannot send the request to upstream {self.authority}: {exc}") from None
        self._streams[stream_id] = exchange
        self._flush()
        return exchange

    def send_window(self, stream_id: int) -> int:
        conn = self._h2
        try:
            return min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            raise UpstreamReset(f"upstream {self.authority} closed the stream") from None

    async def wait_for_window(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters.append(waiter)
        await waiter
        if self.closed:
            raise UpstreamReset(f"upstream {self.authority} closed the HTTP/2 connection")

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        try:
            self._h2.send_data(stream_id, data, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamReset(f"cannot send to upstream {self.authority}: {exc}") from None
        self._flush()

    def end_stream(self, stream_id: int, trailers: Headers) -> None:
        try:
            if trailers:
                self._h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamReset(f"cannot send to upstream {self.authority}: {exc}") from None
        self._flush()

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.closed:
            raise UpstreamReset(f"upstream {self.authority} closed the HTTP/2 connection")

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            self._h2.acknowledge_received_data(length, stream_id)
            self._flush()

    def reset(self, stream: Http2Exchange, code: h2.errors.ErrorCodes) -> None:
        if not self.closed and not stream.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed on the h2 side
                self._h2.reset_stream(stream.stream_id, code)
            self._flush()

    def stream_closed(self, stream: Http2Exchange) -> None:
        if stream.closed:
            return
        stream.closed = True
        self._forget(stream)

    def _forget(self, stream: Http2Exchange) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            if not self._streams:
                self.idle_since = asyncio.get_running_loop().time()
                if self.goaway:
                    self.close()
            self._pool.capacity_changed()

    def close(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if not self.closed and not self.goaway:
                try:
                    self._h2.close_connection()
                    self._flush()
                except h2.exceptions.ProtocolError:
                    pass
            transport.close()
