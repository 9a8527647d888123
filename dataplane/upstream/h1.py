"""One keep-alive HTTP/1.1 connection to an upstream, which is also the exchange it carries.

Reusing the connection object as the `Exchange` keeps the per-request cost to state
resets: no per-request objects beyond the request head itself. The connection returns to
its pool only when the request was fully sent, the response fully read, and nothing
about the connection is in doubt (keep-alive agreed, no stray bytes, no EOF).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataplane.http.errors import RetryableUpstreamError, UpstreamProtocolError, UpstreamReset
from dataplane.http.h1codec import (
    END,
    LAST_CHUNK,
    EndOfMessage,
    ParseFailure,
    ResponseHead,
    ResponseParser,
    chunk,
    last_chunk,
)
from dataplane.http.stream import ByteStream, StreamClosed
from dataplane.upstream.exchange import Headers, UpstreamRequest

if TYPE_CHECKING:
    from dataplane.upstream.pool import Http1Pool


class Http1Upstream:
    """A pooled connection. Between `begin()` and the end of the response it is in use."""

    __slots__ = (
        "_chunked",
        "_failure",
        "_head",
        "_in_use",
        "_parser",
        "_pool",
        "_request_ended",
        "_response_ended",
        "_stream",
        "_trailers",
        "authority",
        "idle_since",
        "reused",
    )

    def __init__(self, stream: ByteStream, pool: Http1Pool, authority: str, max_head_bytes: int) -> None:
        self._stream = stream
        self._pool = pool
        self._parser = ResponseParser(max_head_bytes)
        self.authority = authority
        self.idle_since = 0.0
        # True when this connection served an earlier exchange (a stale-close candidate).
        self.reused = False
        self._in_use = False
        self._head: ResponseHead | None = None
        self._failure: ParseFailure | None = None
        self._trailers: Headers = END.trailers
        self._chunked = False
        self._request_ended = True
        self._response_ended = True

    @property
    def usable(self) -> bool:
        """Fit for another exchange: open, quiet (no unsolicited bytes) and keep-alive."""
        stream = self._stream
        parser = self._parser
        return not stream.eof and not stream.has_data and parser.reusable and parser.idle

    def lease(self) -> None:
        """The pool hands the connection to one exchange."""
        self._in_use = True

    # --- request side --------------------------------------------------------------------
    def begin(self, request: UpstreamRequest, body: bytes | None = None) -> None:
        """Write the request head; a body, if any, follows through send_data/end_request.

        With ``body`` the whole request goes out in one write (one syscall, one segment for a small
        message) and the request side is complete: no send_data/end_request follows.
        """
        self._in_use = True
        self._head = None
        self._failure = None
        self._trailers = END.trailers
        self._response_ended = False
        self._request_ended = not request.has_body or body is not None
        chunked = self._chunked = request.has_body and request.content_length is None
        self._parser.expect(request.method == b"HEAD")
        parts = [request.method, b" ", request.target, b" HTTP/1.1\r\nhost: ", request.authority, b"\r\n"]
        for name, value in request.headers:
            parts.append(b"%b: %b\r\n" % (name, value))
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        if body is not None:
            if chunked:
                if body:
                    parts.append(chunk(body))
                parts.append(LAST_CHUNK)
            else:
                parts.append(body)
        try:
            self._stream.write(b"".join(parts))
        except StreamClosed:
            self.abort()
            raise self._closed_error() from None

    @property
    def write_paused(self) -> bool:
        """The connection's write buffer is above its high-water mark (see ``drain``)."""
        return self._stream.write_paused

    async def drain(self) -> None:
        """Wait until the written request left the write buffer (back-pressure after ``begin`` with a body)."""
        try:
            await self._stream.drain()
        except StreamClosed:
            raise UpstreamReset(f"upstream {self.authority} closed the connection during the request") from None

    async def send_data(self, data: bytes) -> None:
        stream = self._stream
        try:
            stream.write(chunk(data) if self._chunked else data)
            if stream.write_paused:
                await stream.drain()
        except StreamClosed:
            raise UpstreamReset(f"upstream {self.authority} closed the connection during the request body") from None

    async def end_request(self, trailers: Headers) -> None:
        if self._chunked:
            try:
                self._stream.write(last_chunk(trailers))
            except StreamClosed:
                raise UpstreamReset(f"upstream {self.authority} closed the connection during the request") from None
        self._request_ended = True
        if self._response_ended:
            self._finish()

    # --- response side -------------------------------------------------------------------
    def _closed_error(self) -> UpstreamReset:
        how = "reset" if self._stream.error is not None else "closed"
        if self.reused and not self._parser.started:
            return RetryableUpstreamError(f"upstream {self.authority} {how} a reused connection before responding")
        return UpstreamReset(f"upstream {self.authority} {how} the connection without a complete response")

    def _invalid(self, failure: ParseFailure) -> UpstreamProtocolError:
        self.abort()
        return UpstreamProtocolError(f"invalid response from upstream {self.authority}: {failure.reason}")

    async def response(self, deadline: float | None = None) -> ResponseHead:
        """The response head; with ``deadline`` (loop time), ReadTimeout if no byte comes by then.

        A deadline here costs one timer per wait, where a cancel scope around the call costs far more.
        """
        head = self._head
        if head is not None:
            return head
        parser = self._parser
        stream = self._stream
        while True:
            event = parser.next_event()
            if event is None:
                data = await stream.receive(deadline)
                if data:
                    parser.feed(data)
                    continue
                if not parser.started:
                    error = self._closed_error()
                    self.abort()
                    raise error
                parser.feed_eof()
                continue
            if type(event) is ResponseHead:
                self._head = event
                return event
            if type(event) is ParseFailure:
                raise self._invalid(event)
            raise self._invalid(ParseFailure(502, "body bytes before a response head"))

    def take_body(self) -> tuple[bytes, bool]:
        parser = self._parser
        body = b""
        while True:
            event = parser.next_event()
            if event is None:
                return body, False
            if type(event) is bytes:
                body = event if not body else body + event
            elif type(event) is EndOfMessage:
                self._trailers = event.trailers
                self._response_done()
                return body, True
            else:
                self._failure = event  # type: ignore[assignment]
                return body, False

    async def read(self) -> bytes:
        failure = self._failure
        if failure is not None:
            raise self._invalid(failure)
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is None:
                data = await self._stream.receive()
                if data:
                    parser.feed(data)
                    continue
                parser.feed_eof()
                event = parser.next_event()
                if event is None:
                    error = self._closed_error()
                    self.abort()
                    raise error
            if type(event) is bytes:
                return event
            if type(event) is EndOfMessage:
                self._trailers = event.trailers
                self._response_done()
                return b""
            if type(event) is ParseFailure:
                raise self._invalid(event)
            raise self._invalid(ParseFailure(502, "a second response head"))

    @property
    def trailers(self) -> Headers:
        return self._trailers

    @property
    def complete(self) -> bool:
        return self._response_ended

    # --- ending ----------------------------------------------------------------------------
    def _response_done(self) -> None:
        self._response_ended = True
        if self._request_ended:
            self._finish()

    def _finish(self) -> None:
        if not self._in_use:
            return
        self._in_use = False
        head = self._head
        if head is not None and head.keep_alive and self.usable:
            self.reused = True
            self._pool.release(self)
        else:
            self._stream.close()
            self._pool.discard(self)

    def abort(self) -> None:
        if not self._in_use:
            return
        self._in_use = False
        self._response_ended = True
        self._stream.abort()
        self._pool.discard(self)

    def close(self) -> None:
        """Close an idle connection (the pool has already forgotten it)."""
        self._stream.close()
