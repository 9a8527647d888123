"""HTTP/1.1 message framing on httptools (llhttp): bytes in, typed events out, no I/O.

Both the downstream server (requests) and the upstream client (responses) use it, so
the rules for limits and malformed input live in one place. Events come out of
`next_event()` in order:

    RequestHead | ResponseHead  once per message
    bytes                       body data, never empty
    EndOfMessage                once per message (with trailers of a chunked body)
    ParseFailure                the input is unusable; nothing follows it

Header names are lower-cased once here; the rest of the proxy compares them as bytes.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus

import httptools

_IDLE, _HEAD, _BODY = 0, 1, 2
# Header names the framing or routing reads; every other name costs one failed dict probe.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _EXPECT, _HOST = 1, 2, 3, 4
_SPECIAL = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"host": _HOST,
}

Headers = list[tuple[bytes, bytes]]


class RequestHead:
    """A parsed request line and header block."""

    __slots__ = (
        "authority",
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        authority: bytes | None,
        version: str,
        headers: Headers,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
        expect_continue: bool,
        upgrade: bool,
        host: bytes | None,
    ) -> None:
        self.method = method
        # Origin form ("/path?query"), or b"*"; an absolute-form target is split into
        # `authority` and this.
        self.target = target
        self.authority = authority
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        # The Host header (None when absent).
        self.host = host

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ResponseHead:
    """A parsed status line and header block (final responses only; 1xx are skipped)."""

    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "status", "version")

    def __init__(
        self, status: int, version: str, headers: Headers, keep_alive: bool, content_length: int | None, chunked: bool
    ) -> None:
        self.status = status
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked


class EndOfMessage:
    __slots__ = ("trailers",)

    def __init__(self, trailers: Headers) -> None:
        self.trailers = trailers


# Shared by every message without trailers, so the common case allocates nothing.
END = EndOfMessage([])


class ParseFailure:
    """Why the input cannot be used; `status` is what a server answers (400, 431, ...)."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"ParseFailure({self.status}, {self.reason!r})"


Event = RequestHead | ResponseHead | bytes | EndOfMessage | ParseFailure


class _Abort(Exception):
    """Raised inside a parser callback to stop llhttp; the reason is already recorded."""


def _parse_content_length(value: bytes) -> int | None:
    return int(value) if value.isdigit() else None


def split_target(target: bytes) -> tuple[bytes | None, bytes] | None:
    """Request target -> (authority from absolute form or None, origin-form target); None if invalid."""
    if target[:1] == b"/" or target == b"*":
        return None, target
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = target[target.index(b"//") + 2 :]
        cut = len(rest)
        for mark in (b"/", b"?"):
            index = rest.find(mark)
            if 0 <= index < cut:
                cut = index
        authority, path = rest[:cut], rest[cut:]
        if not authority:
            return None
        if path[:1] == b"?":
            path = b"/" + path
        return authority, path or b"/"
    return None


class _Parser:
    """What requests and responses share: limits, header collection, the event queue."""

    __slots__ = (
        "_chunked",
        "_content_length",
        "_events",
        "_expect",
        "_failed",
        "_head_bytes",
        "_headers",
        "_host",
        "_max_count",
        "_max_head",
        "_parser",
        "_state",
        "_te_seen",
        "_trailers",
    )

    def __init__(self, max_head_bytes: int, max_header_count: int) -> None:
        self._max_head = max_head_bytes
        self._max_count = max_header_count
        self._events: deque[Event] = deque()
        self._state = _IDLE
        self._head_bytes = 0
        self._headers: Headers = []
        self._trailers: Headers | None = None
        self._content_length: int | None = None
        self._chunked = False
        self._expect = False
        self._host: bytes | None = None
        self._te_seen = False
        self._failed: ParseFailure | None = None
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = self._new_parser()

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    # --- consumer side -------------------------------------------------------------------
    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        events = self._events
        return events.popleft() if events else None

    def take_complete_body(self) -> tuple[bytes, Headers] | None:
        """The rest of the current message's body and its trailers, when every byte of it (and its
        end) has already been parsed; None (nothing taken) when more bytes are still to come or the
        body has trailers."""
        events = self._events
        size = 0
        for event in events:
            kind = type(event)
            if kind is bytes:
                size += 1
            elif kind is EndOfMessage:
                if event.trailers:  # type: ignore[union-attr]
                    return None  # trailers travel through the streaming path
                break
            else:
                return None
        else:
            return None
        pieces = [events.popleft() for _ in range(size)]
        end = events.popleft()
        body = pieces[0] if size == 1 else b"".join(pieces)  # type: ignore[arg-type]
        return body, end.trailers  # type: ignore[union-attr,return-value]

    @property
    def in_head(self) -> bool:
        """Bytes of a head have arrived but the head is not complete."""
        return self._state == _HEAD

    @property
    def idle(self) -> bool:
        """Between messages with nothing queued: a fresh head may start."""
        return self._state == _IDLE and not self._events

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _fail(self, status: int, reason: str) -> None:
        if self._failed is None:
            self._failed = ParseFailure(status, reason)
            self._events.append(self._failed)

    def feed(self, data: bytes) -> None:
        """Parse bytes; events queue up for next_event()."""
        if self._failed is not None or not data:
            return
        if self._state != _BODY:
            room = self._max_head - self._head_bytes
            if len(data) > room:
                # Feed only what the head may still use; the rest follows once it is complete.
                self._feed(data[:room])
                if self._failed is None:
                    if self._state == _HEAD:
                        self._fail(431, f"header section larger than {self._max_head} bytes")
                    else:
                        self.feed(data[room:])
                return
        self._feed(data)
        if self._state == _HEAD and self._failed is None:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._fail(431, f"header section larger than {self._max_head} bytes")

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade(data, upgrade.args[0] if upgrade.args else len(data))
        except httptools.HttpParserCallbackError:
            if self._failed is None:
                self._fail(400, "malformed message")
        except httptools.HttpParserError as exc:
            self._fail(self._error_status, f"malformed HTTP/1.1 message: {exc}")

    _error_status = 400

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        raise NotImplementedError

    # --- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._head_bytes = 0
        self._headers = []
        self._trailers = None
        self._content_length = None
        self._chunked = False
        self._expect = False
        self._host = None
        self._te_seen = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if self._state == _BODY:
            trailers = self._trailers
            if trailers is None:
                trailers = self._trailers = []
            if len(trailers) >= self._max_count:
                self._fail(431, f"more than {self._max_count} trailer fields")
                raise _Abort
            trailers.append((name, value))
            return
        headers = self._headers
        if len(headers) >= self._max_count:
            self._fail(431, f"more than {self._max_count} header fields")
            raise _Abort
        headers.append((name, value))
        special = _SPECIAL.get(name)
        if special is None:
            return
        if special == _CONTENT_LENGTH:
            self._content_length = _parse_content_length(value)
        elif special == _TRANSFER_ENCODING:
            # Only a final "chunked" frames the body (RFC 9112 6.3); anything else is not chunked.
            self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            self._te_seen = True
        elif special == _EXPECT:
            self._expect = value.lower() == b"100-continue"
        else:
            if self._host is not None:
                self._fail(400, "more than one Host header")
                raise _Abort
            self._host = value

    def on_body(self, body: bytes) -> None:
        if body:
            self._events.append(body)

    def on_message_complete(self) -> None:
        self._state = _IDLE
        self._head_bytes = 0
        trailers = self._trailers
        self._events.append(END if trailers is None else EndOfMessage(trailers))


class RequestParser(_Parser):
    """Requests of one downstream connection, pipelined ones included (handled one at a time)."""

    __slots__ = ("_upgrade_head", "_url")

    def __init__(self, max_head_bytes: int = 64 * 1024, max_header_count: int = 128) -> None:
        self._url = b""
        self._upgrade_head: RequestHead | None = None
        super().__init__(max_head_bytes, max_header_count)

    def _new_parser(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        # llhttp may hand the target over in pieces when it spans reads.
        self._url += url

    def on_message_begin(self) -> None:
        _Parser.on_message_begin(self)
        self._url = b""

    def on_headers_complete(self) -> None:
        self._state = _BODY
        parser = self._parser
        method = parser.get_method()
        split = split_target(self._url)
        if split is None:
            if method == b"CONNECT":
                split = (self._url, b"")
            else:
                self._fail(400, f"invalid request target {self._url[:100]!r}")
                raise _Abort
        version = parser.get_http_version()
        if self._te_seen and not self._chunked:
            self._fail(400, "request Transfer-Encoding must end with chunked")
            raise _Abort
        if self._host is None and version == "1.1" and split[0] is None:
            self._fail(400, "missing Host header")
            raise _Abort
        upgrade = parser.should_upgrade()
        head = RequestHead(
            method,
            split[1],
            split[0],
            version,
            self._headers,
            parser.should_keep_alive(),
            self._content_length,
            self._chunked,
            self._expect,
            upgrade,
            self._host,
        )
        if upgrade:
            self._upgrade_head = head
        self._events.append(head)

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        # llhttp stops at an Upgrade (or CONNECT) request and treats what follows as another
        # protocol. We do not switch protocols: the request is served as plain HTTP/1.1, and
        # the bytes after it are parsed as the next request. A body llhttp skipped cannot be
        # recovered, so such a request is refused.
        head = self._upgrade_head
        self._upgrade_head = None
        if head is not None and head.has_body:
            self._fail(501, "protocol upgrade with a request body is not supported")
            return
        self._state = _IDLE
        self._parser = self._new_parser()
        rest = data[offset:]
        if rest:
            self.feed(rest)


class ResponseParser(_Parser):
    """Responses on one upstream connection. Call `expect(head_request)` before each request."""

    __slots__ = ("_head_done", "_head_request", "_informational", "_until_eof", "reusable")

    _error_status = 502

    def __init__(self, max_head_bytes: int = 64 * 1024, max_header_count: int = 128) -> None:
        self._head_request = False
        self._informational = False
        self._until_eof = False
        self._head_done = False
        # False once the connection can no longer carry another exchange safely.
        self.reusable = True
        super().__init__(max_head_bytes, max_header_count)

    def _new_parser(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self)

    def expect(self, head_request: bool) -> None:
        self._head_request = head_request
        self._until_eof = False

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail(502, "upstream switched protocols (101), which is not supported")
                raise _Abort
            self._informational = True
            return
        self._state = _BODY
        keep_alive = parser.should_keep_alive()
        content_length = self._content_length
        chunked = self._chunked
        self._events.append(
            ResponseHead(status, parser.get_http_version(), self._headers, keep_alive, content_length, chunked)
        )
        if self._head_request:
            # llhttp cannot be told that a HEAD response has no body; end the message here
            # and never reuse the connection (we cannot prove nothing followed the head).
            self._state = _IDLE
            self.reusable = False
            self._head_done = True
            self._events.append(END)
            raise _Abort
        self._until_eof = not chunked and content_length is None and status not in (204, 304)
        if not keep_alive:
            self.reusable = False

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._state = _IDLE
            return
        _Parser.on_message_complete(self)

    def _feed(self, data: bytes) -> None:
        if self._head_done:
            return  # bytes after a HEAD response: the connection is discarded anyway
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(502, "upstream switched protocols, which is not supported")
        except httptools.HttpParserCallbackError:
            if self._failed is None and not self._head_done:
                self._fail(502, "invalid upstream response")
        except httptools.HttpParserError as exc:
            self._fail(502, f"invalid upstream response: {exc}")

    def feed_eof(self) -> None:
        """The upstream closed: ends a read-until-close body, else it is a truncated response."""
        if self._failed is not None or self._head_done:
            return
        self.reusable = False
        if self._state == _BODY and self._until_eof:
            self._state = _IDLE
            self._events.append(END)
        elif self._state != _IDLE:
            self._fail(502, "upstream closed the connection mid-response")

    @property
    def started(self) -> bool:
        """Some byte of the current response has been parsed."""
        return self._state != _IDLE or bool(self._events) or self._informational


# --- serialization ---------------------------------------------------------------------------
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES: dict[int, bytes] = {status.value: _status_line(status.value) for status in HTTPStatus}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else _status_line(status)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
