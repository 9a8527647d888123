"""What the LLM modules share about the wire: the two API formats and server-sent events.

`SseParser` is an incremental event-stream parser (sans-I/O): fed bytes as they arrive, split
anywhere (inside a line, between CR and LF), it returns the complete events, keeping at most
`cap` bytes of an unfinished event. The usage meter (usage.py) has its own reader because it
only looks for one key and must never hold anything back; translators need every event whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

# The API a client speaks (and so the shape of every answer it gets): OpenAI's chat
# completions family, or Anthropic's messages.
ApiFormat = Literal["openai", "anthropic"]

# Bytes of one unfinished event (its lines so far) kept at most.
DEFAULT_EVENT_CAP: Final = 1024 * 1024
_COMPACT: Final = (",", ":")
# One encoder for every document (json.dumps with options builds a new one per call). NaN and
# infinities raise (ValueError): what the gateway writes is JSON any parser reads.
_ENCODER: Final = json.JSONEncoder(separators=_COMPACT, ensure_ascii=False, allow_nan=False)
_ASCII_ENCODER: Final = json.JSONEncoder(separators=_COMPACT, allow_nan=False)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its `event` field ("" when absent) and its data lines joined by LF."""

    event: str
    data: str


class SseTooLarge(ValueError):
    """An event grew past the parser's cap: the stream cannot be followed any further. `events`
    are the ones the same chunk completed before it (they still count: usage, text)."""

    def __init__(self, message: str, events: list[SseEvent] | None = None) -> None:
        super().__init__(message)
        self.events: list[SseEvent] = events if events is not None else []


class SseParser:
    """Splits an event stream into events (WHATWG rules: LF, CR or CRLF line ends, `:` comments,
    one optional space after the colon, an event dispatched at a blank line). Fields other than
    `event` and `data` (id, retry) are ignored."""

    __slots__ = ("_after_cr", "_cap", "_data", "_event", "_line", "_size")

    def __init__(self, cap: int = DEFAULT_EVENT_CAP) -> None:
        self._cap = cap
        self._line = bytearray()
        self._after_cr = False
        self._event = ""
        self._data: list[str] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """True while part of an event has been seen but not dispatched."""
        return bool(self._line or self._data or self._event)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events `chunk` completes; raises SseTooLarge past the cap."""
        pos = 0
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[0] == 0x0A:
                pos = 1
        if b"\r" in chunk:
            return self._feed_lines(chunk, pos)
        if b"\n" not in chunk:  # no line ends here: the open line grows
            if chunk:
                self._grow(chunk)
            return []
        # LF line ends only (what providers send): split the chunk at once, one pass per line.
        lines = (chunk[pos:] if pos else chunk).split(b"\n")
        tail = lines.pop()  # the line left open (b"" when the chunk ends a line)
        held = b""
        if lines and self._line:  # the line the last chunk left open ends here
            held = bytes(self._line)
            self._line.clear()
            self._size -= len(held)
            lines[0] = held + lines[0]
        events: list[SseEvent] = []
        for line in lines:
            if self._size + len(line) > self._cap:
                self._line += held  # as the line-by-line scanner leaves it
                self._size += len(line)
                raise SseTooLarge(f"an event larger than {self._cap} bytes", events)
            held = b""
            event = self._line_done(line)
            if event is not None:
                events.append(event)
        if tail:
            try:
                self._grow(tail)
            except SseTooLarge as exc:
                exc.events = events
                raise
        return events

    def _feed_lines(self, chunk: bytes, pos: int) -> list[SseEvent]:
        """`feed` for chunks holding a CR (CR or CRLF line ends): line by line."""
        events: list[SseEvent] = []
        try:
            self._scan_lines(chunk, pos, events)
        except SseTooLarge as exc:
            exc.events = events
            raise
        return events

    def _scan_lines(self, chunk: bytes, pos: int, events: list[SseEvent]) -> None:
        size = len(chunk)
        while pos < size:
            lf = chunk.find(b"\n", pos)
            cr = chunk.find(b"\r", pos, lf if lf >= 0 else size)
            end = cr if cr >= 0 else lf
            if end < 0:
                self._grow(chunk[pos:])
                break
            self._grow(chunk[pos:end])
            line = bytes(self._line)
            self._line.clear()
            self._size -= len(line)
            pos = end + 1
            if end == cr:
                if pos == size:
                    self._after_cr = True
                elif chunk[pos] == 0x0A:
                    pos += 1
            event = self._line_done(line)
            if event is not None:
                events.append(event)

    def _grow(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self._cap:
            raise SseTooLarge(f"an event larger than {self._cap} bytes")
        self._line += piece

    def _line_done(self, line: bytes) -> SseEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = SseEvent(self._event, "\n".join(self._data))
            self._event = ""
            self._data = []
            self._size = 0
            return event
        if line[0] == 0x3A:  # comment
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            self._data.append(text)
            self._size += len(value) + 1
        elif name == b"event":
            self._event = text
        return None


def json_text(document: Any) -> str:
    """Compact JSON as text (a tool call's arguments are a JSON document inside a string)."""
    return _ENCODER.encode(document)


def json_bytes(document: Any) -> bytes:
    """Compact JSON, UTF-8 (non-ASCII kept as is, like the providers send it)."""
    text = _ENCODER.encode(document)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (a provider's "\\ud800"): escaped, as JSON allows
        return _ASCII_ENCODER.encode(document).encode()


def sse_data(document: Any) -> bytes:
    """One OpenAI-style event: a data line only."""
    return b"data: " + json_bytes(document) + b"\n\n"


def sse_named(name: str, document: Any) -> bytes:
    """One Anthropic-style event: its type as the event name, then the data."""
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(document) + b"\n\n"


OPENAI_DONE: Final = b"data: [DONE]\n\n"
_USAGE_OBJECT: Final = (b'"usage":{', b'"usage": {')  # every other chunk has "usage":null


def drop_usage_chunks(events: bytes) -> bytes:
    """Whole OpenAI stream events without the usage-only chunk (no choices, a usage object): the
    one the gateway asked the provider for on behalf of a client that did not ask for it. Other
    chunks without choices (Azure's prompt_filter_results) stay."""
    if _USAGE_OBJECT[0] not in events and _USAGE_OBJECT[1] not in events:
        return events
    kept = []
    for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
        line = event.lstrip(b"\n")
        if line.startswith(b"data:") and (_USAGE_OBJECT[0] in line or _USAGE_OBJECT[1] in line):
            try:
                document = json.loads(line[5:])
            except ValueError:
                document = None
            if isinstance(document, dict) and document.get("choices") == [] and isinstance(document.get("usage"), dict):
                continue
        kept.append(event)
    return b"\n\n".join(kept)
