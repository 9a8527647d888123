"""An incremental text/event-stream parser, sans-I/O: bytes in, events out.

Follows the WHATWG HTML "Server-sent events" interpretation rules (section 9.2.6): lines end at
CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are one line end);
a leading UTF-8 BOM is dropped; `:` starts a comment; `field: value` loses one leading space; `data`
lines join with LF; an empty line dispatches, unless no data was seen; `id` values containing NUL
are ignored and the last event id persists across events; `retry` takes ASCII digits only; an
event cut off by the end of the stream is discarded. The one addition is a bound: an event (its
pending line plus the fields gathered so far) larger than `max_event_bytes` raises
`SseEventTooLarge`, so a hostile upstream cannot make the proxy buffer without end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_MAX_EVENT_BYTES: Final = 4 * 1024 * 1024
_BOM: Final = b"\xef\xbb\xbf"
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class SseError(ValueError):
    """The stream cannot be parsed any further."""


class SseEventTooLarge(SseError):
    """One event grew beyond the configured bound."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """A dispatched event. `id` is the last event id in force when it was dispatched (None if
    the stream never set one); `retry` is the reconnection time (ms) set while it was gathered."""

    event: str
    data: str
    id: str | None
    retry: int | None = None


class SseParser:
    """Feed it bytes as they arrive; each call returns the events those bytes completed."""

    __slots__ = (
        "_buffer",
        "_data",
        "_event_type",
        "_pending_retry",
        "_size",
        "_skip_lf",
        "_started",
        "last_event_id",
        "max_event_bytes",
        "retry",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        # The id resumption sends as Last-Event-ID, and the server's last reconnection time (ms).
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event_type = ""
        self._pending_retry: int | None = None
        self._size = 0
        self._skip_lf = False
        self._started = False

    def feed(self, data: bytes) -> list[SseEvent]:
        """Parse `data`; raises SseEventTooLarge past the bound (the parser is then unusable)."""
        buffer = self._buffer
        buffer += data
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []
            self._started = True
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
        start = 0
        if self._skip_lf and buffer:
            self._skip_lf = False
            if buffer[0] == 0x0A:
                start = 1
        events: list[SseEvent] = []
        end = len(buffer)
        while True:
            match = _LINE_END.search(buffer, start)
            if match is None:
                break
            line_end = match.end()
            if line_end == end and buffer[line_end - 1] == 0x0D:
                # A lone CR so far: the line is over, but an LF in the next chunk belongs to it.
                self._skip_lf = True
            self._line(bytes(buffer[start : match.start()]), events)
            start = line_end
        del buffer[:start]
        if len(buffer) + self._size > self.max_event_bytes:
            raise SseEventTooLarge(f"server-sent event larger than {self.max_event_bytes} bytes")
        return events

    def _line(self, raw: bytes, events: list[SseEvent]) -> None:
        if not raw:
            self._dispatch(events)
            return
        if raw[0] == 0x3A:  # ":" comment
            return
        line = raw.decode("utf-8", "replace")
        colon = line.find(":")
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value.startswith(" "):
                value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(raw) + 1
        elif name == "event":
            self._event_type = value
            self._size += len(raw)
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._pending_retry = int(value)
        if self._size > self.max_event_bytes:
            raise SseEventTooLarge(f"server-sent event larger than {self.max_event_bytes} bytes")

    def _dispatch(self, events: list[SseEvent]) -> None:
        data = self._data
        if data:
            events.append(
                SseEvent(self._event_type or "message", "\n".join(data), self.last_event_id, self._pending_retry)
            )
            self._data = []
        self._event_type = ""
        self._pending_retry = None
        self._size = 0
