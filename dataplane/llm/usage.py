"""The token usage an LLM response reports, read from its body as it streams through (sans-I/O).

The caller shows each body chunk to a `UsageMeter` (`feed`) and calls `finish` once the body ended
or was cut; the meter never holds bytes back from anyone, it only looks (and, for JSON, keeps a
bounded copy). `finish` returns a `TokenUsage`, or None when the body carried none.

What is understood:

- JSON bodies (``application/json``, ``*+json``): OpenAI chat completions, completions and
  embeddings (``usage.prompt_tokens``, ``completion_tokens``, ``total_tokens``; embeddings have no
  completion), the OpenAI Responses API (``usage.input_tokens``, ``output_tokens``,
  ``total_tokens``), Anthropic messages (``usage.input_tokens``, ``output_tokens``,
  ``cache_creation_input_tokens``, ``cache_read_input_tokens``). A copy of at most ``cap`` bytes is
  kept and parsed at the end; past it (``gave_up`` says so) only the last 64 KiB are kept, and a
  top-level ``usage`` found there is read (the providers put it last: a large embeddings batch).
- Event streams (``text/event-stream``), parsed event by event with a line buffer bounded by
  ``cap``: OpenAI chat chunks (the last one before ``data: [DONE]`` carries the usage when the
  request set ``stream_options.include_usage``), Anthropic events (``message_start`` carries
  ``message.usage`` with the input, ``message_delta`` the cumulative ``usage``), and the Responses
  API's terminal events (``response.usage``). Only payloads naming ``"usage"`` are parsed, payloads
  that are not JSON are ignored, and a later value replaces an earlier one field by field (the
  providers' stream counts are cumulative). A stream cut short reports what it carried so far.
- Anything else, and any ``content-encoding`` but identity (a gzip body is not inflated here),
  reports no usage.

Input tokens are every input token: Anthropic reports cache writes and reads apart from
``input_tokens``, so they are added; OpenAI's ``prompt_tokens`` already include its cached tokens.
The total is the reported ``total_tokens``, else input plus output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

# Bytes of a JSON body (or of one event-stream line or event) kept at most: past it, no usage.
JSON_CAP: Final = 4 * 1024 * 1024
# Past the cap, the last bytes of a JSON body are kept: the providers put `usage` at the end.
_JSON_TAIL: Final = 64 * 1024
# A count above this is no real usage (and would overflow Redis' 64-bit counters once added up).
MAX_TOKEN_COUNT: Final = 1 << 53
_USAGE_KEY: Final = b'"usage"'
_NULL_USAGE: Final = (b'"usage":null', b'"usage": null')  # every OpenAI chunk but the last one
_DONE: Final = b"[DONE]"
_MESSAGE_STOP: Final = b'"message_stop"'  # Anthropic's last event (its type)
_WHITESPACE: Final = b" \t\r\n"
_DECODER: Final = json.JSONDecoder()
_UNKNOWN: Final = object()


class BodyKind(StrEnum):
    JSON = "json"
    EVENT_STREAM = "event-stream"
    OTHER = "other"  # nothing the meter reads


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one response used. ``cached_input_tokens`` (read from a prompt cache) and
    ``cache_write_input_tokens`` (written to one, Anthropic) are included in ``input_tokens``."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0


def body_kind(headers: Iterable[tuple[bytes, bytes]]) -> tuple[BodyKind, str | None]:
    """What a body with these response headers is to the meter, and why it cannot be read when it
    looks like one that could (an encoded body); None when there is nothing to say."""
    content_type = b""
    encoding = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            if not content_type:
                content_type = value
        elif lowered == b"content-encoding":
            encoding = value
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        kind = BodyKind.EVENT_STREAM
    elif media == b"application/json" or media.endswith(b"+json"):
        kind = BodyKind.JSON
    else:
        return BodyKind.OTHER, None
    coding = encoding.strip().lower()
    if coding and coding != b"identity":
        return BodyKind.OTHER, f"content-encoding {coding.decode('latin-1')} is not read for usage"
    return kind, None


class _Counts:
    """The usage fields seen so far; a later value replaces an earlier one."""

    __slots__ = ("cache_read", "cache_write", "cached", "input", "output", "total")

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.total: int | None = None
        self.cache_write: int | None = None  # Anthropic: apart from input_tokens
        self.cache_read: int | None = None  # Anthropic: apart from input_tokens
        self.cached: int | None = None  # OpenAI: *_tokens_details.cached_tokens, within the input

    def add(self, usage: Mapping[str, Any]) -> None:
        value = usage.get("prompt_tokens")
        if value is None:
            value = usage.get("input_tokens")
        if (count := _count(value)) is not None:
            self.input = count
        value = usage.get("completion_tokens")
        if value is None:
            value = usage.get("output_tokens")
        if (count := _count(value)) is not None:
            self.output = count
        if (count := _count(usage.get("total_tokens"))) is not None:
            self.total = count
        if (count := _count(usage.get("cache_creation_input_tokens"))) is not None:
            self.cache_write = count
        if (count := _count(usage.get("cache_read_input_tokens"))) is not None:
            self.cache_read = count
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        if isinstance(details, dict) and (count := _count(details.get("cached_tokens"))) is not None:
            self.cached = count

    def result(self) -> TokenUsage | None:
        if self.input is self.output is self.total is self.cache_write is self.cache_read is None:
            return None
        cache_write = self.cache_write or 0
        cache_read = self.cache_read
        input_tokens = (self.input or 0) + cache_write + (cache_read or 0)
        output_tokens = self.output or 0
        total = self.total if self.total is not None else input_tokens + output_tokens
        cached = cache_read if cache_read is not None else (self.cached or 0)
        return TokenUsage(input_tokens, output_tokens, total, cached, cache_write)


def _count(value: object) -> int | None:
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKEN_COUNT else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKEN_COUNT:
        return int(value)
    return None


def _is_message_stop(document: object) -> bool:
    """Anthropic's last event: the answer is whole."""
    return isinstance(document, dict) and document.get("type") == "message_stop"


def usage_object(document: object) -> Mapping[str, Any] | None:
    """The ``usage`` object of a parsed body or event: top-level (OpenAI, Anthropic message and
    ``message_delta``), under ``message`` (Anthropic ``message_start``) or under ``response``
    (Responses API ``response.completed``, ``.incomplete``, ``.failed``)."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if isinstance(usage, dict):
        return usage
    for name in ("message", "response"):
        inner = document.get(name)
        if isinstance(inner, dict):
            usage = inner.get("usage")
            if isinstance(usage, dict):
                return usage
    return None


def _parse(payload: bytes | bytearray) -> object:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError too)
        return None


def json_body_usage(body: bytes | bytearray, *, whole: bool = True) -> Mapping[str, Any] | None:
    """The top-level ``usage`` of a JSON body. The providers put it at or near the end, so the last
    ``"usage"`` key is tried first from the tail alone (an embeddings answer of a few MB would block
    the event loop for tens of ms in a full parse); the full parse is the fallback, for a `whole`
    body only (not for the last bytes of one)."""
    at = body.rfind(_USAGE_KEY)
    if at < 0:
        return None
    usage = _tail_usage(body, at)
    if usage is not _UNKNOWN:
        return usage  # type: ignore[return-value]
    return usage_object(_parse(body)) if whole else None


def _tail_usage(body: bytes | bytearray, at: int) -> object:
    """The value of the ``"usage"`` key at ``at`` when the text after it proves the key a member of
    the top-level object: it follows ``{`` or ``,`` (so it is a key, not inside a string, where
    quotes are escaped) and what follows its value, behind an opened object, parses whole (so that
    text closes exactly one object). _UNKNOWN when that cannot be shown."""
    before = at - 1
    while before >= 0 and body[before] in _WHITESPACE:
        before -= 1
    if before < 0 or body[before] not in b"{,":
        return _UNKNOWN
    try:
        tail = body[at + len(_USAGE_KEY) :].decode()
        colon = _skip_whitespace(tail, 0)
        if tail[colon : colon + 1] != ":":
            return _UNKNOWN
        value, end = _DECODER.raw_decode(tail, _skip_whitespace(tail, colon + 1))
        json.loads('{"_":0' + tail[end:])
    except (ValueError, RecursionError):
        return _UNKNOWN
    return value if isinstance(value, dict) else None


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


class UsageMeter:
    """Reads one response body for its token usage. ``gave_up`` says why a body that could have
    carried usage will report none (over ``cap``, an encoded body); ``done`` is True once an OpenAI
    stream's ``[DONE]`` was seen."""

    __slots__ = (
        "_after_cr",
        "_body",
        "_cap",
        "_counts",
        "_data",
        "_data_size",
        "_discarding",
        "_event_broken",
        "_line",
        "_observer",
        "_tail",
        "done",
        "gave_up",
        "kind",
    )

    def __init__(
        self,
        kind: BodyKind,
        *,
        cap: int = JSON_CAP,
        gave_up: str | None = None,
        observer: Callable[[object], None] | None = None,
    ) -> None:
        self.kind = kind
        # Shown every parsed document carrying no usage (a JSON body, a stream's payloads), for
        # an estimate when the provider reports none. Set, it costs a parse of every event.
        self._observer = observer
        self.gave_up = gave_up
        self.done = False
        self._cap = cap
        self._counts = _Counts()
        # JSON: the copy of the body (None once it outgrew the cap).
        self._body: bytearray | None = bytearray() if kind is BodyKind.JSON else None
        self._tail = b""  # JSON past the cap: its last _JSON_TAIL bytes
        # Event stream: the unterminated line, the current event's data lines, and the state of both.
        self._line = bytearray()
        self._after_cr = False  # the last chunk ended in CR: a LF opening the next one is the same break
        self._discarding = False  # skipping the rest of a line longer than the cap
        self._data: list[bytes] = []
        self._data_size = 0
        self._event_broken = False  # the current event lost a line to the cap: it is skipped

    @classmethod
    def for_response(
        cls,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        cap: int = JSON_CAP,
        observer: Callable[[object], None] | None = None,
    ) -> UsageMeter:
        """A meter for a body with these response headers (one of kind OTHER reads nothing)."""
        kind, reason = body_kind(headers)
        return cls(kind, cap=cap, gave_up=reason, observer=observer)

    def feed(self, data: bytes) -> None:
        """Look at the next piece of the body. Never raises for what the body holds."""
        kind = self.kind
        if kind is BodyKind.EVENT_STREAM:
            self._feed_events(data)
        elif kind is BodyKind.JSON:
            body = self._body
            if body is None:  # past the cap: only the tail is kept
                self._tail = data[-_JSON_TAIL:] if len(data) >= _JSON_TAIL else (self._tail + data)[-_JSON_TAIL:]
                return
            if len(body) + len(data) > self._cap:
                self._tail = (bytes(body[-_JSON_TAIL:]) + data)[-_JSON_TAIL:]
                self._body = None
                self.gave_up = f"JSON body larger than {self._cap} bytes: no usage in its last {_JSON_TAIL} bytes"
                return
            body += data

    def finish(self) -> TokenUsage | None:
        """The body ended (or was cut): its usage, or None. Later calls return the same."""
        kind = self.kind
        if kind is BodyKind.JSON:
            body, tail = self._body, self._tail
            self._body, self._tail = None, b""
            # Past the cap (body None) only the last bytes are left to read.
            usage = json_body_usage(body) if body is not None else json_body_usage(tail, whole=False)
            if usage is None and body is not None and self._observer is not None:
                self._observer(_parse(body))
            if usage is not None:
                self._counts.add(usage)
        elif kind is BodyKind.EVENT_STREAM:
            # An event the stream was cut inside still counts for what its complete data lines hold.
            if self._line and not self._discarding:
                line = bytes(self._line)
                self._line.clear()
                self._line_done(line)
            self._dispatch()
            self.kind = BodyKind.OTHER  # read no more
        return self._counts.result()

    # ---------------------------------------------------------------------------- event streams

    def _feed_events(self, data: bytes) -> None:
        size = len(data)
        pos = 0
        if self._after_cr:
            self._after_cr = False
            if size and data[0] == 0x0A:
                pos = 1
        lf = data.find(b"\n", pos)
        cr = data.find(b"\r", pos)
        while pos < size:
            # Each search runs again only once passed: a chunk is scanned about once for each.
            if 0 <= lf < pos:
                lf = data.find(b"\n", pos)
            if 0 <= cr < pos:
                cr = data.find(b"\r", pos)
            if lf < 0 and cr < 0:
                self._partial(data[pos:])
                return
            end = lf if cr < 0 or 0 <= lf < cr else cr
            self._end_line(data[pos:end])
            pos = end + 1
            if end == cr:  # CR, or CR LF: one line break
                if pos == size:
                    self._after_cr = True
                elif data[pos] == 0x0A:
                    pos += 1

    def _partial(self, piece: bytes) -> None:
        """A line continues in the next chunk."""
        if self._discarding:
            return
        if len(self._line) + len(piece) > self._cap:
            self._line.clear()
            self._discarding = True
            return
        self._line += piece

    def _end_line(self, piece: bytes) -> None:
        if self._discarding:
            self._discarding = False
            self._event_broken = True
            return
        if self._line:
            if len(self._line) + len(piece) > self._cap:
                self._line.clear()
                self._event_broken = True
                return
            self._line += piece
            piece = bytes(self._line)
            self._line.clear()
        elif len(piece) > self._cap:
            self._event_broken = True
            return
        self._line_done(piece)

    def _line_done(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data"):
            value = line[4:]
            if value:
                if value[0] != 0x3A:  # "data" followed by something but a colon is another field name
                    return
                value = value[2:] if value[1:2] == b" " else value[1:]
            if self._data_size + len(value) > self._cap:
                self._event_broken = True
                return
            self._data.append(value)
            self._data_size += len(value) + 1
        # Other fields (event, id, retry) and comments do not matter: each payload names its own type.

    def _dispatch(self) -> None:
        data = self._data
        if not data and not self._event_broken:
            return
        broken = self._event_broken
        self._data = []
        self._data_size = 0
        self._event_broken = False
        if broken or not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if _USAGE_KEY not in payload:
            if payload.strip() == _DONE or (_MESSAGE_STOP in payload and _is_message_stop(_parse(payload))):
                self.done = True
            elif self._observer is not None:
                self._observer(_parse(payload))
            return
        observer = self._observer
        if (_NULL_USAGE[0] in payload or _NULL_USAGE[1] in payload) and payload.count(_USAGE_KEY) == 1:
            if observer is not None:  # an OpenAI chunk before the last: only its text matters
                observer(_parse(payload))
            return
        document = _parse(payload)
        usage = usage_object(document)
        if usage is not None:
            self._counts.add(usage)
        elif observer is not None:
            observer(document)


__all__ = [
    "JSON_CAP",
    "MAX_TOKEN_COUNT",
    "BodyKind",
    "TokenUsage",
    "UsageMeter",
    "body_kind",
    "json_body_usage",
    "usage_object",
]
