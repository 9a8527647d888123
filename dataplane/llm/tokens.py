"""A token-count estimate for answers whose provider reports no usage (sans-I/O, no model files).

The exact tokenizers need their BPE files (tiktoken downloads them at first use, which this
gateway's hosts may not be able to do), and a provider's own tokenizer is often not public.
So this is an estimate, and is documented as one: it mimics what BPE pre-tokenizers do
(cl100k/o200k split text into letter runs, digit groups of up to three, punctuation runs and
whitespace) and charges each piece what such pieces cost on average:

- a run of ASCII letters: one token per 8 letters begun (common words are one token);
- other letters: one per 6.5 begun; CJK, kana and hangul: 0.7 per character;
- digits: one per group of three; punctuation and symbols: one per two characters begun;
- a whitespace run with a line break: one; spaces: one per four beyond the first (a single
  space travels with the next word).

Measured against the exact encoders (the ``bpe-openai`` package, which bundles them, installed
outside the project only for the measurement) on 13 samples (English prose and chat, Python,
JSON, YAML, German, French, Chinese, Japanese, numbers, a log line, Markdown, "hi"): against
o200k_base (GPT-4o and later) mean absolute error 8 %, from -17 % (numbers) to +25 % (Python);
against cl100k_base 12 %, from -39 % (German) to +25 %. bytes/4 gave 21 % (-43 % to +41 %) and
19 %. tests/dataplane/llm/test_tokens.py keeps the samples and the encoders' counts and checks
the estimate stays within those bounds. Chat framing adds `MESSAGE_OVERHEAD` per message and
`REPLY_PRIMING` per request, as OpenAI documents for its chat models. (The provider stand-ins
count words, so they cannot serve as the reference.)

Other providers' tokenizers differ (Claude's counts run 10-30 % above o200k for English), so
budgets charged from an estimate are approximate: the access log marks such usage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from dataplane.llm.usage import TokenUsage
from dataplane.llm.wire import ApiFormat

ASCII_LETTERS_PER_TOKEN: Final = 8.0
OTHER_LETTERS_PER_TOKEN: Final = 6.5
WIDE_TOKENS_PER_CHAR: Final = 0.7
DIGITS_PER_TOKEN: Final = 3
PUNCTUATION_TOKENS_PER_CHAR: Final = 0.5
SPACES_PER_TOKEN: Final = 4
# OpenAI's documented chat framing: tokens per message, and for the reply's priming.
MESSAGE_OVERHEAD: Final = 3
REPLY_PRIMING: Final = 3
_WIDE_FROM: Final = 0x2E80  # CJK radicals onwards: ideographs, kana, hangul
_PIECE: Final = re.compile(r"[^\W\d_]+|\d+|\s+|[^\w\s]+|_+")
# A streamed text's unfinished piece is counted once it grows past this (bounded memory).
_MAX_PENDING: Final = 1024


def _piece_tokens(piece: str) -> float:
    first = piece[0]
    if first.isdigit():
        return math.ceil(len(piece) / DIGITS_PER_TOKEN)
    if first.isspace():
        if "\n" in piece or "\r" in piece:
            return 1
        return math.ceil((len(piece) - 1) / SPACES_PER_TOKEN)
    if first.isalpha():
        if piece.isascii():
            return math.ceil(len(piece) / ASCII_LETTERS_PER_TOKEN)
        wide = sum(1 for char in piece if ord(char) >= _WIDE_FROM)
        narrow = len(piece) - wide
        return math.ceil(wide * WIDE_TOKENS_PER_CHAR) + math.ceil(narrow / OTHER_LETTERS_PER_TOKEN)
    return math.ceil(len(piece) * PUNCTUATION_TOKENS_PER_CHAR)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of a text (0 for the empty text)."""
    if not text:
        return 0
    return max(1, int(sum(_piece_tokens(m.group()) for m in _PIECE.finditer(text))))


class TextTokenCounter:
    """Estimates the tokens of a text that arrives in pieces (a streamed answer) without keeping
    it: only the last, possibly unfinished, piece is held (at most `_MAX_PENDING` characters)."""

    __slots__ = ("_pending", "_total")

    def __init__(self) -> None:
        self._total = 0.0
        self._pending = ""

    def feed(self, text: str) -> None:
        if not text:
            return
        text = self._pending + text
        pieces = [m.group() for m in _PIECE.finditer(text)]
        last = pieces.pop() if pieces else ""
        self._total += sum(_piece_tokens(piece) for piece in pieces)
        if len(last) > _MAX_PENDING:
            self._total += _piece_tokens(last)
            last = ""
        self._pending = last

    def total(self) -> int:
        total = self._total + (_piece_tokens(self._pending) if self._pending else 0)
        return int(total) if total or not self._pending else 1


def _content_text(content: Any) -> Iterable[str]:
    """The texts of a message content in either API (strings, text parts, tool results)."""
    if isinstance(content, str):
        yield content
        return
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, Mapping):
            continue
        for key in ("text", "refusal", "thinking"):
            if isinstance(part.get(key), str):
                yield part[key]
        if "input" in part:  # Anthropic tool_use
            yield json.dumps(part["input"], separators=(",", ":"))
        if "content" in part:  # Anthropic tool_result
            yield from _content_text(part["content"])


def estimate_input_tokens(api: ApiFormat, body: Mapping[str, Any]) -> int:
    """Estimated input tokens of a chat completions (`openai`) or messages (`anthropic`)
    request: message texts, tool calls and definitions, the system prompt, chat framing."""
    total = REPLY_PRIMING
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        total += MESSAGE_OVERHEAD
        total += sum(estimate_tokens(text) for text in _content_text(message.get("content")))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                total += estimate_tokens(str(function.get("name", ""))) + estimate_tokens(
                    str(function.get("arguments", ""))
                )
    if api == "anthropic":
        system = body.get("system")
        total += sum(estimate_tokens(text) for text in _content_text(system))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += estimate_tokens(json.dumps(tools, separators=(",", ":")))
    return total


class OutputTokenEstimate:
    """Estimated output tokens of an answer whose provider reports no usage, from the documents
    the answer carries: a whole response (OpenAI chat completion or Anthropic message) or the
    chunks of a stream (OpenAI deltas, Anthropic content_block_delta events), either API. Texts,
    refusals, thinking and tool-call arguments count; the rest of the framing does not."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = TextTokenCounter()

    def observe(self, document: object) -> None:
        if not isinstance(document, Mapping):
            return
        feed = self._counter.feed
        choices = document.get("choices")
        if isinstance(choices, list):  # OpenAI: a completion's messages, or a chunk's deltas
            for choice in choices:
                if not isinstance(choice, Mapping):
                    continue
                message = choice.get("message") or choice.get("delta")
                if not isinstance(message, Mapping):
                    continue
                for key in ("content", "refusal", "reasoning_content"):
                    value = message.get(key)
                    if isinstance(value, str):
                        feed(value)
                calls = message.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    function = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(function, Mapping):
                        for key in ("name", "arguments"):
                            if isinstance(function.get(key), str):
                                feed(function[key])
            return
        delta = document.get("delta")
        if isinstance(delta, Mapping) and document.get("type") == "content_block_delta":
            for key in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(key), str):
                    feed(delta[key])
            return
        if document.get("type") == "message":  # Anthropic: a whole message
            for text in _content_text(document.get("content")):
                feed(text)

    def total(self) -> int:
        return self._counter.total()


def estimated_usage(input_tokens: int, output_tokens: int) -> TokenUsage:
    """A `TokenUsage` from estimates (no cache figures: they cannot be guessed)."""
    return TokenUsage(input_tokens, output_tokens, input_tokens + output_tokens)
