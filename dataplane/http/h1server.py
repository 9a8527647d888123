"""Downstream HTTP/1.1: one task per connection, serving its requests one at a time.

The fast path of a small keep-alive request is: one receive (head parsed in the same
call), the proxy handler, and one write holding the response head and body. Pipelined
requests queue in the parser and are served in order. Timeouts are deadlines on the
single read the connection is waiting for, so an idle connection costs one timer.
"""

from __future__ import annotations

import asyncio
import contextlib

import anyio

from dataplane.http.errors import ClientGone, RequestRejected
from dataplane.http.h1codec import (
    LAST_CHUNK,
    EndOfMessage,
    ParseFailure,
    RequestHead,
    RequestParser,
    chunk,
    last_chunk,
    status_line,
)
from dataplane.http.limits import ProxyLimits
from dataplane.http.messages import Headers, ProxyRequest
from dataplane.http.proxy import ProxyHandler, send_error
from dataplane.http.stream import ByteStream, ReadTimeout, StreamClosed
from shared.logging import get_logger

log = get_logger("dataplane.http1")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_TRAILERS: Headers = []


class Http1Sink:
    """Writes one response at a time on the connection; reset for each request."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_request",
        "_http11",
        "_no_body",
        "_stream",
        "aborted",
        "done",
        "keep_alive",
        "started",
    )

    def __init__(self, stream: ByteStream, conn: Http1Connection) -> None:
        self._stream = stream
        self._conn = conn
        self._head_request = False
        self._http11 = True
        self._chunked = False
        self._no_body = False
        self.keep_alive = True
        self.started = False
        self.done = False
        self.aborted = False

    def reset(self, head_request: bool, http11: bool, keep_alive: bool) -> None:
        self._head_request = head_request
        self._http11 = http11
        self.keep_alive = keep_alive
        self.started = False
        self.done = False
        self.aborted = False

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        self.started = True
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(b"%b: %b\r\n" % (name, value))
        conn = self._conn
        # A complete answer before the request body was read (an error, an early reply):
        # the unread rest cannot be told from the next request, so the connection ends.
        keep_alive = self.keep_alive and not conn.draining and not (end and not conn.body_finished)
        chunked = False
        no_body = self._head_request or status == 204 or status == 304 or status < 200
        if no_body:
            body = b""
        elif content_length is None:
            if end:
                parts.append(b"content-length: %d\r\n" % len(body))
            elif self._http11:
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        if not keep_alive:
            parts.append(b"connection: close\r\n\r\n")
        elif not self._http11:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if body:
            parts.append(chunk(body) if chunked else body)
        if end:
            if chunked:
                parts.append(LAST_CHUNK)
            self.done = True
        self.keep_alive = keep_alive
        self._chunked = chunked
        self._no_body = no_body
        stream = self._stream
        try:
            stream.write(b"".join(parts))
            if stream.write_paused:
                await stream.drain()
        except StreamClosed:
            raise ClientGone("client closed the connection") from None

    async def write(self, data: bytes) -> None:
        if self._no_body or not data:
            return
        stream = self._stream
        try:
            stream.write(chunk(data) if self._chunked else data)
            if stream.write_paused:
                await stream.drain()
        except StreamClosed:
            raise ClientGone("client closed the connection") from None

    async def end(self, trailers: Headers) -> None:
        self.done = True
        if self._chunked:
            try:
                self._stream.write(last_chunk(trailers))
            except StreamClosed:
                raise ClientGone("client closed the connection") from None

    def abort(self) -> None:
        """An error after the head went out: the only honest signal left is closing."""
        self.aborted = True
        self._stream.abort()


class Http1Body:
    """The body of the request being served, read from the connection on demand."""

    __slots__ = ("_conn", "_continue", "finished", "trailers")

    def __init__(self, conn: Http1Connection) -> None:
        self._conn = conn
        self._continue = False
        self.finished = True
        self.trailers: Headers = _NO_TRAILERS

    def reset(self, expect_continue: bool) -> None:
        self._continue = expect_continue
        self.finished = False
        self.trailers = _NO_TRAILERS

    def take_complete(self) -> bytes | None:
        """The whole (remaining) body when it has already arrived with the head, so the proxy can
        send the upstream request in one write; None when more is to come (then `read` streams)."""
        if self.finished or self._continue:
            return None
        taken = self._conn._parser.take_complete_body()
        if taken is None:
            return None
        self.finished = True
        self.trailers = taken[1]
        return taken[0]

    async def read(self) -> bytes:
        if self.finished:
            return b""
        conn = self._conn
        if self._continue:
            # The client waits for this before sending the body (RFC 9110 10.1.1).
            self._continue = False
            if not conn.sink.started:
                try:
                    conn.stream.write(_CONTINUE)
                except StreamClosed:
                    raise ClientGone("client closed the connection") from None
        event = await conn.next_body_event()
        if type(event) is bytes:
            return event
        if type(event) is EndOfMessage:
            self.finished = True
            self.trailers = event.trailers
            return b""
        if type(event) is ParseFailure:
            raise RequestRejected(event.status, event.reason)
        raise ClientGone("client closed the connection during the request body")


class Http1Connection:
    """Serves one downstream HTTP/1.1 connection until it closes, times out or drains."""

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
        self._parser = RequestParser(limits.max_request_head_bytes, limits.max_header_count)
        self._loop = asyncio.get_running_loop()
        self.sink = Http1Sink(stream, self)
        self._body = Http1Body(self)
        # Waiting for a request head (nothing in progress): drain() may close at once.
        self.idle = True
        self.draining = False

    @property
    def body_finished(self) -> bool:
        """The current request's body (if any) has been read to its end."""
        return self._body.finished

    def drain(self) -> None:
        """Stop after the request in progress (its response says `connection: close`)."""
        self.draining = True
        if self.idle:
            self.stream.close()

    def abort(self) -> None:
        self.stream.abort()

    async def serve(self, initial: bytes = b"") -> None:
        parser = self._parser
        if initial:
            parser.feed(initial)
        # A client that goes away mid-request cancels the request (and so its upstream
        # exchange) instead of leaving it to finish for nobody.
        scope = anyio.CancelScope()
        self.stream.on_lost = scope.cancel
        try:
            with scope:
                await self._serve_loop(parser, first=True)
        finally:
            self.stream.on_lost = None
            self.stream.close()

    async def _serve_loop(self, parser: RequestParser, first: bool) -> None:
        while True:
            event = parser.next_event()
            if event is None:
                event = await self._read_head(first)
                if event is None:
                    return
            first = False
            if type(event) is not RequestHead:
                if type(event) is ParseFailure:
                    await self._reject(event.status, event.reason)
                return
            self.idle = False
            if not await self._serve_request(event):
                return
            self.idle = True
            if self.draining:
                return

    async def _read_head(self, first: bool) -> RequestHead | ParseFailure | None:
        """Read until a head (or a failure) is parsed; None when the client closed or idled out."""
        parser = self._parser
        stream = self.stream
        limits = self._limits
        loop = self._loop
        # A new connection gets the header timeout to send its first byte, an idle
        # keep-alive connection the keep-alive timeout; once a head has started, the header
        # timeout counts from its first byte (slowloris).
        now = loop.time()
        deadline = now + (limits.header_read_timeout if first else limits.keepalive_idle_timeout)
        # Part of a head may already be here (read while telling HTTP/1.1 from HTTP/2).
        head_deadline = now + limits.header_read_timeout if parser.in_head else None
        while True:
            try:
                data = await stream.receive(deadline if head_deadline is None else head_deadline)
            except ReadTimeout:
                if head_deadline is not None:
                    await self._reject(408, f"request header not received within {limits.header_read_timeout:g}s")
                return None
            if not data:
                return None
            if head_deadline is None:
                head_deadline = loop.time() + limits.header_read_timeout
            parser.feed(data)
            event = parser.next_event()
            if event is not None:
                return event  # type: ignore[return-value]

    async def next_body_event(self) -> bytes | EndOfMessage | ParseFailure | None:
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is not None:
                return event  # type: ignore[return-value]
            try:
                data = await self.stream.receive(self._loop.time() + self._limits.body_idle_timeout)
            except ReadTimeout:
                raise RequestRejected(408, f"no request body data for {self._limits.body_idle_timeout:g}s") from None
            if not data:
                return None
            parser.feed(data)

    async def _serve_request(self, head: RequestHead) -> bool:
        """Serve one request; True when the connection may carry another."""
        http11 = head.version == "1.1"
        authority = head.authority or head.host or b""
        body = None
        if head.has_body:
            body = self._body
            body.reset(head.expect_continue)
        else:
            # llhttp ends a bodiless message in the same feed as its head.
            end = self._parser.next_event()
            if type(end) is not EndOfMessage:
                await self._reject(400, "malformed request")
                return False
        request = ProxyRequest(
            head.method,
            head.target,
            authority,
            self._scheme,
            head.headers,
            body,
            head.content_length,
            self._client_host,
            self._listener_key,
            self._server_port,
            b"1.1" if http11 else b"1.0",
        )
        sink = self.sink
        # After CONNECT a client would start tunnelling: the refusal ends the connection.
        keep_alive = head.keep_alive and not self.draining and head.method != b"CONNECT"
        sink.reset(head.method == b"HEAD", http11, keep_alive)
        handler = self._handler
        handler.in_flight += 1
        try:
            await handler.handle(request, sink)
        except ClientGone as exc:
            log.debug("client gone", reason=str(exc))
            return False
        finally:
            handler.in_flight -= 1
        if sink.aborted or not sink.done:
            return False
        if body is not None and not body.finished:
            return False  # the unread rest of the body would be taken for the next request
        return sink.keep_alive

    async def _reject(self, status: int, reason: str) -> None:
        """Answer input we cannot serve, then the connection closes."""
        log.debug("request rejected", status=status, reason=reason, client=self._client_host.decode("latin-1"))
        sink = self.sink
        sink.reset(False, True, False)
        with contextlib.suppress(ClientGone):
            await send_error(sink, status, reason)
