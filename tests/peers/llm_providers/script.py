"""What a stand-in answers and how it misbehaves: scripted replies, faults and holds (pure data), and
the text helpers every provider shares (the echo, word "tokens", how a stream splits text)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

_PIECE = re.compile(r"\s*\S+|\s+$")


@dataclass(frozen=True)
class Usage:
    """Token counts as the provider reports them. ``input_tokens`` is the provider's main input field
    (OpenAI ``prompt_tokens``, which already includes ``cached_tokens``; Anthropic ``input_tokens``,
    which does not include the cache reads and writes)."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0  # OpenAI prompt_tokens_details.cached_tokens, Anthropic cache_read_input_tokens
    cache_creation_tokens: int = 0  # Anthropic cache_creation_input_tokens (OpenAI: ignored)


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model makes; ``arguments`` given as a mapping are sent as compact JSON."""

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None  # None: a deterministic one (call_<n>_<i> / toolu_<n>_<i>)

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass(frozen=True)
class Reply:
    """One scripted model answer. ``text=None`` with no tool calls means the default echo; with tool
    calls it means no text at all. ``usage=None`` counts words (see ``count_tokens``). ``stop`` overrides
    the finish/stop reason (in the provider's own words). ``pieces`` overrides how a stream splits the
    text."""

    text: str | None = None
    tool_calls: Sequence[ToolCall] = ()
    usage: Usage | None = None
    stop: str | None = None
    pieces: Sequence[str] | None = None


@dataclass(frozen=True)
class Fault:
    """Answer the request with this error status (the body shaped as the provider does)."""

    status: int
    retry_after: float | None = None
    message: str | None = None
    error_type: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamFault:
    """Break the next response after ``after_events`` events (stream) or bytes (whole body): either cut
    the connection (``error_type`` None) or send the provider's in-stream error event and end cleanly."""

    after_events: int
    error_type: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Garbage:
    """Answer with these raw bytes instead of a provider payload."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"


class Hold:
    """Holds one response until the test calls ``release``: before anything is sent (``after_events``
    0) or after that many stream events. ``reached`` is set once the response is waiting."""

    def __init__(self, after_events: int = 0) -> None:
        self.after_events = after_events
        self.reached = anyio.Event()
        self._released = anyio.Event()

    def release(self) -> None:
        self._released.set()

    async def wait(self) -> None:
        """Called by the stand-in at the hold point."""
        self.reached.set()
        await self._released.wait()


def count_tokens(text: str) -> int:
    """The stand-ins' "tokens": whitespace-separated words (deterministic, not a real tokenizer)."""
    return len(text.split())


def split_text(text: str) -> list[str]:
    """How a stream splits text: word by word, each piece carrying its leading whitespace."""
    return _PIECE.findall(text) or ([text] if text else [])


def split_arguments(arguments: str, size: int = 8) -> list[str]:
    """How a stream splits tool-call arguments: fixed-size slices of the JSON text."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text of its text parts (and, Anthropic, of its
    tool results), joined with single spaces."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "tool_result":
                texts.append(content_text(part.get("content", "")))
    return " ".join(t for t in texts if t)


def last_user_text(messages: Any, roles: tuple[str, ...] = ("user", "tool")) -> str:
    """The text of the last message whose role is in ``roles`` ('' when there is none)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") in roles:
            return content_text(message.get("content"))
    return ""


def all_text(messages: Any) -> str:
    """Every message's text, for counting input words."""
    if not isinstance(messages, list):
        return content_text(messages)
    return " ".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))


@dataclass(frozen=True)
class Answer:
    """A reply made concrete for one request: the text (maybe cut short by max tokens), its stream
    pieces, the tool calls, the usage and whether max tokens stopped it."""

    text: str | None
    pieces: list[str]
    tool_calls: Sequence[ToolCall]
    usage: Usage
    truncated: bool
    stop: str | None


def resolve_answer(reply: Reply | None, echo_of: str, input_words: int, max_tokens: int | None) -> Answer:
    """The concrete answer: the scripted one or the echo, truncated to ``max_tokens`` words when given."""
    reply = reply or Reply()
    text = reply.text
    if text is None and not reply.tool_calls:
        text = f"echo: {echo_of}"
    pieces = list(reply.pieces) if reply.pieces is not None else split_text(text or "")
    truncated = False
    if max_tokens is not None and text is not None and not reply.tool_calls and len(pieces) > max_tokens:
        pieces, truncated = pieces[:max_tokens], True
        text = "".join(pieces)
    usage = reply.usage
    if usage is None:
        output = count_tokens(text or "") + sum(count_tokens(f"{c.name} {c.arguments_json}") for c in reply.tool_calls)
        usage = Usage(input_tokens=max(input_words, 1), output_tokens=max(output, 1))
    return Answer(text, pieces, reply.tool_calls, usage, truncated, reply.stop)
