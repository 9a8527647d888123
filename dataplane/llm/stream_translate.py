"""Streamed answers translated event by event between Anthropic and OpenAI (sans-I/O).

Each translator is fed the upstream body in whatever pieces the network delivers (`feed`
returns the bytes to send the client now) and told when the upstream ended (`close` returns
the last bytes). Nothing is held back beyond the unfinished event (bounded by the parser's cap).

- `AnthropicToOpenAIStream`: message_start -> a first chunk with the assistant role; text
  deltas -> content deltas; a tool_use block -> a tool call (id, name) then its input_json
  deltas as argument deltas; message_delta -> the chunk with finish_reason; message_stop ->
  the usage chunk (when the client asked for it, `include_usage`) and ``data: [DONE]``. ping,
  thinking and signature deltas have no OpenAI counterpart and are dropped.
- `OpenAIToAnthropicStream`: the first chunk -> message_start; content deltas -> a text block;
  each new tool call index -> a tool_use block and its argument deltas -> input_json_delta;
  finish_reason closes the open block; the end (``[DONE]``, or the body's end after a
  finish_reason) -> message_delta (stop_reason, usage) and message_stop. A tool call's
  arguments arriving after a later call started cannot be carried (Anthropic blocks do not
  reopen) and are dropped.

A stream that ends early (no message_stop / finish_reason), an upstream error event, or an
event past the cap ends the client's stream with one error event in the client's format, so
its SDK raises instead of waiting or accepting a truncated answer. `usage()` gives the tokens
the upstream reported so far (read by the one usage reader, dataplane.llm.usage), which is
what a cut stream is still charged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from dataplane.llm.errors import error_from_document, stream_error_event
from dataplane.llm.translate import TRANSLATION_FAULTS, anthropic_usage, finish_reason, openai_usage, stop_reason
from dataplane.llm.usage import BodyKind, TokenUsage, UsageMeter
from dataplane.llm.wire import (
    DEFAULT_EVENT_CAP,
    OPENAI_DONE,
    SseEvent,
    SseParser,
    SseTooLarge,
    json_bytes,
    sse_data,
    sse_named,
)

# json.loads without its per-call argument handling (the data is always a str here).
_decode: Final = json.JSONDecoder().decode
# The parts of an OpenAI chunk around its delta, after the (per-stream) id/object/created/model.
_CHOICE_OPEN: Final = b',"choices":[{"index":0,"delta":'
_NOT_FINISHED: Final = b',"finish_reason":null,"logprobs":null}]'
_FINISHED_TAIL: Final = b',"logprobs":null}]'
_TEXT_OPEN: Final = b'{"content":'
_NULL_USAGE: Final = b',"usage":null'

CUT_MESSAGE: Final = "the provider's stream ended before the answer was complete"
TOO_LARGE_MESSAGE: Final = "the provider sent an event larger than the gateway accepts"


class _StreamTranslator:
    """What both directions share: parsing, the usage reader, the error ending."""

    __slots__ = ("_client", "_meter", "_observer", "_parser", "_usage", "ended", "error", "finished")

    def __init__(self, client: Any, cap: int, observer: Callable[[object], None] | None = None) -> None:
        self._client = client
        # Shown each upstream document that carries no usage (for an output estimate).
        self._observer = observer
        self._parser = SseParser(cap)
        self._meter = UsageMeter(BodyKind.EVENT_STREAM)
        self._usage: TokenUsage | None = None
        # finished: the answer completed normally; ended: nothing more is sent (either way).
        self.finished = False
        self.ended = False
        self.error: str | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Translate the next piece of the upstream body; returns what to send the client now."""
        if self.ended:
            return b""
        too_large = False
        try:
            events = self._parser.feed(chunk)
        except SseTooLarge as exc:
            events, too_large = exc.events, True  # the events before it still count
        out = []
        for event in events:
            try:
                out.append(self._event(event))
            except TRANSLATION_FAULTS:
                out.append(self._fail("the provider sent an event the gateway cannot read"))
            if self.ended:
                break
        if too_large and not self.ended:
            out.append(self._fail(TOO_LARGE_MESSAGE))
        return b"".join(out)

    def close(self) -> bytes:
        """The upstream body ended (or was cut): the client's last bytes."""
        if self.ended:
            return b""
        return self._end_of_input()

    def usage(self) -> TokenUsage | None:
        """Tokens the upstream reported so far; reading it ends usage counting."""
        if self._usage is None:
            self._usage = self._meter.finish()
        return self._usage

    def _count(self, data: str) -> None:
        self._meter.feed(b"data: " + data.encode() + b"\n\n")

    def _fail(self, message: str, status: int = 502) -> bytes:
        self.ended = True
        self.error = message
        return stream_error_event(self._client, message, status=status)

    def _upstream_error(self, document: dict[str, Any]) -> bytes:
        self.ended = True
        inner = document.get("error")
        self.error = str(inner.get("message", "")) if isinstance(inner, dict) else "upstream error"
        return error_from_document(self._client, document, 502)

    def _event(self, event: SseEvent) -> bytes:
        raise NotImplementedError

    def _end_of_input(self) -> bytes:
        raise NotImplementedError


def _parse(data: str) -> dict[str, Any] | None:
    try:
        document = _decode(data)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


class AnthropicToOpenAIStream(_StreamTranslator):
    """An Anthropic messages stream -> OpenAI chat.completion.chunk events."""

    __slots__ = ("_base", "_close", "_created", "_head", "_include_usage", "_tools", "_upstream_usage")

    def __init__(self, *, created: int, include_usage: bool, cap: int = DEFAULT_EVENT_CAP) -> None:
        super().__init__("openai", cap)
        self._created = created
        self._include_usage = include_usage
        self._base: dict[str, Any] = {"id": "", "object": "chat.completion.chunk", "created": created, "model": ""}
        # Every chunk is `_head` + its delta + its finish_reason + `_close`: the fields around the
        # delta are encoded once per stream (again when message_start names the id and model).
        self._head = b""
        self._close = (_NULL_USAGE if include_usage else b"") + b"}\n\n"
        self._encode_head()
        # Anthropic content block index -> OpenAI tool call index.
        self._tools: dict[int, int] = {}
        self._upstream_usage: dict[str, Any] = {}

    def _encode_head(self) -> None:
        self._head = b"data: " + json_bytes(self._base)[:-1] + _CHOICE_OPEN  # the base object left open

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        """One chat.completion.chunk event: the bytes sse_data gives for the whole document."""
        end = _NOT_FINISHED if finish is None else b',"finish_reason":' + json_bytes(finish) + _FINISHED_TAIL
        return b"".join((self._head, json_bytes(delta), end, self._close))

    def _text_chunk(self, text: Any) -> bytes:
        """`_chunk({"content": text})`, the string encoded directly (most events are text deltas)."""
        if type(text) is not str:
            return self._chunk({"content": text})
        return b"".join((self._head, _TEXT_OPEN, json_bytes(text), b"}", _NOT_FINISHED, self._close))

    def _event(self, event: SseEvent) -> bytes:
        document = _parse(event.data)
        if document is None:
            return b""
        kind = document.get("type") or event.event
        if kind == "content_block_delta":
            delta = document.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._text_chunk(delta.get("text", ""))
            if delta.get("type") == "input_json_delta" and document.get("index") in self._tools:
                call = {
                    "index": self._tools[document["index"]],
                    "function": {"arguments": delta.get("partial_json", "")},
                }
                return self._chunk({"tool_calls": [call]})
            return b""
        if kind == "content_block_start":
            block = document.get("content_block") or {}
            if block.get("type") != "tool_use":
                return b""
            position = len(self._tools)
            self._tools[document.get("index", position)] = position
            call = {
                "index": position,
                "id": block.get("id", ""),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""},
            }
            return self._chunk({"tool_calls": [call]})
        if kind == "message_start":
            message = document.get("message") or {}
            self._base["id"] = message.get("id", "")
            self._base["model"] = message.get("model", "")
            self._encode_head()
            if isinstance(message.get("usage"), dict):
                self._upstream_usage.update(message["usage"])
                self._count(event.data)
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            if isinstance(document.get("usage"), dict):
                usage = document["usage"]
                self._upstream_usage.update({k: v for k, v in usage.items() if v is not None})
                self._count(event.data)
            reason = (document.get("delta") or {}).get("stop_reason")
            return self._chunk({}, finish_reason(reason))
        if kind == "message_stop":
            self.finished = self.ended = True
            out = b""
            if self._include_usage:
                out = sse_data({**self._base, "choices": [], "usage": openai_usage(self._upstream_usage)})
            return out + OPENAI_DONE
        if kind == "error":
            return self._upstream_error(document)
        return b""  # ping, content_block_stop, thinking

    def _end_of_input(self) -> bytes:
        return self._fail(CUT_MESSAGE)


class OpenAIToAnthropicStream(_StreamTranslator):
    """An OpenAI chat.completion.chunk stream -> Anthropic messages events."""

    __slots__ = ("_blocks", "_open", "_started", "_stop", "_tools", "_upstream_usage", "model")

    def __init__(
        self, *, model: str = "", cap: int = DEFAULT_EVENT_CAP, observer: Callable[[object], None] | None = None
    ) -> None:
        super().__init__("anthropic", cap, observer)
        self.model = model
        self._started = False
        self._blocks = 0  # Anthropic content blocks opened so far
        self._open: int | None = None  # index of the open block
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> Anthropic block index
        self._stop: str | None = None
        self._upstream_usage: dict[str, Any] = {}

    def _start_block(self, block: dict[str, Any]) -> bytes:
        out = self._stop_block()
        self._open = self._blocks
        self._blocks += 1
        return out + sse_named(
            "content_block_start", {"type": "content_block_start", "index": self._open, "content_block": block}
        )

    def _stop_block(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return sse_named("content_block_stop", {"type": "content_block_stop", "index": index})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return sse_named("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def _event(self, event: SseEvent) -> bytes:
        if event.data.strip() == "[DONE]":
            return self._finish()
        document = _parse(event.data)
        if document is None:
            return b""
        if isinstance(document.get("error"), dict):
            return self._upstream_error(document)
        out = bytearray()
        if not self._started:
            self._started = True
            message = {
                "id": document.get("id", ""),
                "type": "message",
                "role": "assistant",
                "model": document.get("model") or self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out += sse_named("message_start", {"type": "message_start", "message": message})
        if isinstance(document.get("usage"), dict):
            self._upstream_usage = document["usage"]
            self._count(event.data)
        elif self._observer is not None:
            self._observer(document)
        for choice in document.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if isinstance(text, str) and text:
                if self._open is None or self._open in self._tools.values():
                    out += self._start_block({"type": "text", "text": ""})
                out += self._delta(self._open or 0, {"type": "text_delta", "text": text})
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                out += self._stop_block()
                self._stop = stop_reason(choice["finish_reason"])
        return bytes(out)

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        position = call.get("index", 0)
        function = call.get("function") or {}
        out = b""
        if position not in self._tools:
            block = {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""), "input": {}}
            out = self._start_block(block)
            assert self._open is not None
            self._tools[position] = self._open
        index = self._tools[position]
        arguments = function.get("arguments")
        if arguments and index == self._open:
            out += self._delta(index, {"type": "input_json_delta", "partial_json": arguments})
        return out

    def _finish(self) -> bytes:
        if self._stop is None:
            return self._fail(CUT_MESSAGE)
        self.finished = self.ended = True
        out = self._stop_block()
        usage = anthropic_usage(self._upstream_usage)
        delta = {"type": "message_delta", "delta": {"stop_reason": self._stop, "stop_sequence": None}, "usage": usage}
        return out + sse_named("message_delta", delta) + sse_named("message_stop", {"type": "message_stop"})

    def _end_of_input(self) -> bytes:
        # Some OpenAI-compatible servers end without [DONE]: a finish_reason already seen is an end.
        return self._finish()
