"""A2A SSE streams relayed event by event, sans-I/O: upstream bytes in, client bytes and event facts out.

``A2aStreamRelay.feed`` takes upstream chunks as they arrive and returns the bytes of every event they
complete, exactly as the agent sent them (comments such as keep-alive pings included), holding back only
the incomplete tail of the current event. So the client never sees half an event, nothing is buffered
beyond one event (bounded by ``max_event_bytes``), and the gateway can always end a stream cleanly: on
any failure the client's stream is at an event boundary and gets one final, well-formed error event.

Each event's ``data`` is inspected (``inspect=True``) for access logs and metrics: on the JSON-RPC binding it
is one JSON-RPC response whose ``result`` is a 1.0 ``StreamResponse`` (``task`` / ``message`` /
``statusUpdate`` / ``artifactUpdate``) or a 0.3 object tagged by ``kind`` (``task``, ``message``,
``status-update``, ``artifact-update``); on the HTTP+JSON binding it is the ``StreamResponse`` itself, or
an AIP-193 ``{"error": ...}`` object. Task states are normalised to the 0.3 spelling (``TASK_STATE_INPUT_REQUIRED``
-> ``input-required``) so logs read the same for both versions.

When the stream ends (``finish``), the relay decides whether the client still needs an error event:

- the agent's connection failed or timed out (the handler passes the ``A2aError``): that error;
- the agent closed cleanly before any final event (a terminal or interrupted task state, a 0.3
  ``final: true``, a lone message, or an error), or mid-event: ``A2aAgentUnavailable`` "ended the stream
  before the task reached a final state" (without inspection, only a cut-off event counts);
- an event was not JSON, not a JSON-RPC response, or too large: ``A2aInvalidAgentResponse``, and ``feed``
  reports ``closed`` so the handler stops reading the agent.

The error event is ``event: error`` with, on JSON-RPC, a JSON-RPC error response carrying the request's
id (what a2a-sdk servers emit and its client raises as a typed error), on REST an AIP-193 body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from dataplane.a2a.errors import (
    A2aAgentUnavailable,
    A2aError,
    A2aInvalidAgentResponse,
    Binding,
    RequestId,
    agent_unavailable,
)
from dataplane.mcp.jsonrpc import decode_json
from dataplane.mcp.sse import SseEventTooLarge, SseParser

DEFAULT_MAX_EVENT_BYTES: Final = 4 * 1024 * 1024
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
TERMINAL_STATES: Final = frozenset({"completed", "canceled", "failed", "rejected"})
INTERRUPTED_STATES: Final = frozenset({"input-required", "auth-required"})
_FINAL_STATES: Final = TERMINAL_STATES | INTERRUPTED_STATES
# 1.0 StreamResponse members (camelCase and the snake_case ProtoJSON also allows) -> 0.3 kinds.
_MEMBERS: Final = (
    ("task", "task"),
    ("message", "message"),
    ("statusUpdate", "status-update"),
    ("status_update", "status-update"),
    ("artifactUpdate", "artifact-update"),
    ("artifact_update", "artifact-update"),
)
_KINDS: Final = frozenset({"task", "message", "status-update", "artifact-update"})


def is_event_stream(content_type: str | bytes | None) -> bool:
    """Whether an answer is an SSE stream (a streaming request may also get one JSON error object)."""
    if content_type is None:
        return False
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return text.partition(";")[0].strip().lower() == "text/event-stream"


def normal_state(state: Any) -> str:
    """A task state in the 0.3 spelling: ``TASK_STATE_AUTH_REQUIRED`` -> ``auth-required``; "" if absent."""
    if type(state) is not str:
        return ""
    if state.startswith("TASK_STATE_"):
        state = state[11:]
    return state.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class StreamEventInfo:
    """What one event says, for logs: ``kind`` is a 0.3 kind, ``error`` or ``unknown``; empty when absent."""

    kind: str
    task_id: str = ""
    context_id: str = ""
    state: str = ""
    final: bool = False
    error_code: int | None = None


def _text(obj: dict[str, Any], camel: str, snake: str) -> str:
    value = obj.get(camel, obj.get(snake))
    return value if type(value) is str else ""


def _state_of(obj: dict[str, Any]) -> str:
    status = obj.get("status")
    return normal_state(status.get("state")) if type(status) is dict else ""


def describe_result(result: Any) -> StreamEventInfo:
    """The facts of one stream result (1.0 StreamResponse or 0.3 kind-tagged object)."""
    if type(result) is not dict:
        return StreamEventInfo("unknown")
    kind = result.get("kind")
    body: Any = result
    if kind not in _KINDS:
        kind = "unknown"
        for member, member_kind in _MEMBERS:
            if type(result.get(member)) is dict:
                kind, body = member_kind, result[member]
                break
    if kind == "unknown":
        return StreamEventInfo("unknown")
    if kind == "task":
        state = _state_of(body)
        return StreamEventInfo(
            kind, _text(body, "id", "id"), _text(body, "contextId", "context_id"), state, state in _FINAL_STATES
        )
    task_id = _text(body, "taskId", "task_id")
    context_id = _text(body, "contextId", "context_id")
    if kind == "message":
        return StreamEventInfo(kind, task_id, context_id)
    if kind == "status-update":
        state = _state_of(body)
        return StreamEventInfo(kind, task_id, context_id, state, body.get("final") is True or state in _FINAL_STATES)
    return StreamEventInfo(kind, task_id, context_id)


@dataclass(slots=True)
class RelayOutput:
    """What one ``feed`` produced: ``data`` to write to the client now (may be empty), the events it
    completed, and ``closed`` when the relay ended the stream itself (``data`` then ends with the error
    event; stop reading the agent and close)."""

    data: bytes
    events: list[StreamEventInfo] = field(default_factory=list)
    closed: bool = False


class A2aStreamRelay:
    """One streamed answer, relayed event by event (see the module docstring)."""

    __slots__ = (
        "_closed",
        "_line_start",
        "_parser",
        "_pending",
        "_scanned",
        "_skip_lf",
        "agent",
        "binding",
        "context_id",
        "event_count",
        "final_seen",
        "inspect",
        "last_state",
        "max_event_bytes",
        "request_id",
        "task_id",
    )

    def __init__(
        self,
        *,
        binding: Binding,
        agent: str,
        request_id: RequestId | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        inspect: bool = True,
    ) -> None:
        self.binding: Binding = binding
        self.agent = agent
        self.request_id = request_id
        self.max_event_bytes = max_event_bytes
        self.inspect = inspect
        # Facts so far, for the access log.
        self.event_count = 0
        self.task_id = ""
        self.context_id = ""
        self.last_state = ""
        self.final_seen = False
        self._parser = SseParser(max_event_bytes)
        self._pending = bytearray()
        # Forwarded bytes leave _pending, so offsets are into the current event's bytes.
        self._line_start = 0  # where the line being scanned starts
        self._scanned = 0  # no line end between _line_start and here (a long line is scanned once)
        self._skip_lf = False  # the last line ended with a CR at the end of a chunk
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, chunk: bytes) -> RelayOutput:
        """Take one upstream chunk; return the complete events' bytes and facts."""
        if self._closed:
            return RelayOutput(b"", closed=True)
        pending = self._pending
        pending += chunk
        end = len(pending)
        pos = self._line_start
        block_ends: list[int] = []  # where each completed event ends (after its empty line)
        while pos < end:
            if self._skip_lf:
                self._skip_lf = False
                if pending[pos] == 0x0A:
                    pos += 1
                    self._line_start = pos
                    if pos == 1:  # the CR before it ended an event already forwarded: this LF is its last byte
                        block_ends.append(1)
                    continue
            match = _LINE_END.search(pending, max(pos, self._scanned))
            if match is None:
                self._scanned = end
                break
            if match.end() == end and pending[end - 1] == 0x0D:
                self._skip_lf = True  # an LF in the next chunk belongs to this line end
            if match.start() == self._line_start:  # an empty line: the event is complete
                block_ends.append(match.end())
            pos = self._line_start = match.end()
        if not block_ends:
            if end > self.max_event_bytes:
                return self._fail(b"", [], self._too_large())
            return RelayOutput(b"")
        forwarded = block_ends[-1]
        data = bytes(pending[:forwarded])
        del pending[:forwarded]
        self._line_start -= forwarded
        self._scanned = max(0, self._scanned - forwarded)
        events: list[StreamEventInfo] = []
        start = 0
        for block_end in block_ends:  # event by event, so a bad one cuts the output right before it
            try:
                parsed = self._parser.feed(data[start:block_end])
            except SseEventTooLarge:
                return self._fail(data[:start], events, self._too_large())
            if self.inspect:
                for sse_event in parsed:
                    info = self._inspect(sse_event.data)
                    if info is None:
                        return self._fail(data[:start], events, self._garbage())
                    events.append(info)
            else:
                self.event_count += len(parsed)
            start = block_end
        if len(pending) > self.max_event_bytes:
            return self._fail(data, events, self._too_large())
        return RelayOutput(data, events)

    def finish(self, error: A2aError | None = None) -> bytes:
        """The agent's stream ended (``error`` when it failed): the closing bytes the client still needs,
        usually none. Call once; the relay is closed afterwards."""
        if self._closed:
            return b""
        self._closed = True
        cut_short = not self.final_seen if self.inspect else bool(self._pending.strip())
        if error is None and cut_short:
            error = A2aAgentUnavailable(
                f"Agent {self.agent!r} ended the stream before the task reached a final state",
                metadata={"agent": self.agent},
            )
        if error is None:
            return b""
        error.request_id = self.request_id
        return error.sse_event(self.binding)

    def fail(self, error: A2aError | None = None) -> bytes:
        """The agent's connection broke (or timed out): the final error event for the client."""
        return self.finish(error or agent_unavailable(self.agent, detail="connection lost"))

    def _fail(self, data: bytes, events: list[StreamEventInfo], error: A2aError) -> RelayOutput:
        self._closed = True
        error.request_id = self.request_id
        return RelayOutput(data + error.sse_event(self.binding), events, closed=True)

    def _too_large(self) -> A2aInvalidAgentResponse:
        return A2aInvalidAgentResponse(
            f"Agent {self.agent!r} sent a stream event larger than {self.max_event_bytes} bytes",
            metadata={"agent": self.agent},
        )

    def _garbage(self) -> A2aInvalidAgentResponse:
        expected = "a JSON-RPC response" if self.binding == "jsonrpc" else "a JSON object"
        return A2aInvalidAgentResponse(
            f"Agent {self.agent!r} sent a stream event that is not {expected}", metadata={"agent": self.agent}
        )

    def _inspect(self, data: str) -> StreamEventInfo | None:
        """The facts of one event's data; None when it is not what the binding carries."""
        try:
            value = decode_json(data)
        except ValueError:
            return None
        if type(value) is not dict:
            return None
        error = value.get("error")
        if error is not None:
            if type(error) is not dict:
                return None
            code = error.get("code")
            info = StreamEventInfo("error", final=True, error_code=code if type(code) is int else None)
        elif self.binding == "jsonrpc":
            if "result" not in value:
                return None
            info = describe_result(value["result"])
        else:
            info = describe_result(value)
        if info.kind == "message" and not self.task_id:
            info = StreamEventInfo("message", info.task_id, info.context_id, final=True)
        self.event_count += 1
        self.task_id = info.task_id or self.task_id
        self.context_id = info.context_id or self.context_id
        self.last_state = info.state or self.last_state
        self.final_seen = self.final_seen or info.final
        return info

    def log_fields(self) -> dict[str, Any]:
        """Access-log fields for the stream so far."""
        return {
            "a2a_events": self.event_count,
            "a2a_task_id": self.task_id,
            "a2a_context_id": self.context_id,
            "a2a_task_state": self.last_state,
        }


__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "INTERRUPTED_STATES",
    "TERMINAL_STATES",
    "A2aStreamRelay",
    "RelayOutput",
    "StreamEventInfo",
    "describe_result",
    "is_event_stream",
    "normal_state",
]
