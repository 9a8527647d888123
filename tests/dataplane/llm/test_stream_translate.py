"""Streamed translation, event by event, both ways. Every emitted event is parsed with the SDKs' own
stream event types, and the SDKs' own accumulators rebuild the whole answer from them. A sample
stream is fed split at every byte boundary and must give the same output as fed whole."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from dataplane.llm.stream_translate import CUT_MESSAGE, AnthropicToOpenAIStream, OpenAIToAnthropicStream
from dataplane.llm.usage import TokenUsage
from dataplane.llm.wire import SseParser, SseTooLarge, drop_usage_chunks, sse_data, sse_named

ANTHROPIC_EVENT = TypeAdapter(RawMessageStreamEvent)


def anthropic_stream(*, with_stop: bool = True) -> bytes:
    """What Anthropic sends for a text answer followed by a tool call (CRLF line ends, a ping)."""
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5},
                },
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check. é✓"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 17},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    if not with_stop:
        events = events[:-2]
    return b"".join(sse_named(name, payload).replace(b"\n", b"\r\n") for name, payload in events)


def openai_stream(*, with_done: bool = True, with_usage: bool = True) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            "usage": None,
        }

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check. é✓"}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
    ]
    body = b"".join(sse_data(c) for c in chunks)
    if with_usage:
        usage = {
            "prompt_tokens": 30,
            "completion_tokens": 12,
            "total_tokens": 42,
            "prompt_tokens_details": {"cached_tokens": 10},
        }
        body += sse_data(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o",
                "choices": [],
                "usage": usage,
            }
        )
    return body + (b"data: [DONE]\n\n" if with_done else b"")


def events_of(body: bytes) -> list[tuple[str, str]]:
    parser = SseParser()
    return [(e.event, e.data) for e in parser.feed(body)]


def feed_split(translator: Any, body: bytes, cuts: list[int]) -> bytes:
    out = bytearray()
    start = 0
    for cut in [*cuts, len(body)]:
        out += translator.feed(body[start:cut])
        start = cut
    return bytes(out + translator.close())


def openai_chunks(output: bytes) -> tuple[list[ChatCompletionChunk], bool]:
    chunks = []
    done = False
    for _, data in events_of(output):
        if data == "[DONE]":
            done = True
            continue
        chunks.append(ChatCompletionChunk.model_validate(json.loads(data), strict=True))
    return chunks, done


# --------------------------------------------------------------------- Anthropic -> OpenAI


def test_anthropic_stream_becomes_chat_chunks_that_rebuild_the_answer() -> None:
    translator = AnthropicToOpenAIStream(created=1700000000, include_usage=True)
    output = feed_split(translator, anthropic_stream(), [])
    chunks, done = openai_chunks(output)
    assert done and translator.finished and translator.error is None
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    completion = state.get_final_completion()
    choice = completion.choices[0]
    assert (completion.id, completion.model) == ("msg_1", "claude-sonnet-4-5")
    assert (choice.message.content, choice.finish_reason) == ("Let me check. é✓", "tool_calls")
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 17, 47)
    assert translator.usage() == TokenUsage(30, 17, 47, 5, 0)


def test_without_include_usage_there_is_no_usage_chunk_but_usage_is_still_read() -> None:
    translator = AnthropicToOpenAIStream(created=1, include_usage=False)
    chunks, done = openai_chunks(feed_split(translator, anthropic_stream(), []))
    assert done and all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    assert "usage" not in json.loads(
        events_of(feed_split(AnthropicToOpenAIStream(created=1, include_usage=False), anthropic_stream(), []))[0][1]
    )
    assert translator.usage() == TokenUsage(30, 17, 47, 5, 0)


def test_anthropic_stream_split_at_every_byte_gives_the_same_output() -> None:
    body = anthropic_stream()
    whole = feed_split(AnthropicToOpenAIStream(created=1, include_usage=True), body, [])
    for cut in range(1, len(body)):
        assert feed_split(AnthropicToOpenAIStream(created=1, include_usage=True), body, [cut]) == whole, cut
    one_by_one = AnthropicToOpenAIStream(created=1, include_usage=True)
    assert feed_split(one_by_one, body, list(range(1, len(body)))) == whole


def test_cut_anthropic_stream_ends_with_an_error_event_and_keeps_the_usage_seen() -> None:
    translator = AnthropicToOpenAIStream(created=1, include_usage=True)
    output = feed_split(translator, anthropic_stream(with_stop=False), [])
    *_, (_, last) = events_of(output)
    error = json.loads(last)["error"]
    assert error["message"] == CUT_MESSAGE and error["type"] == "server_error"
    assert b"[DONE]" not in output and not translator.finished and translator.ended
    assert translator.usage() == TokenUsage(30, 1, 31, 5, 0)  # message_start's count: all that was reported
    assert translator.feed(b"event: ping\ndata: {}\n\n") == b""


def test_upstream_error_event_becomes_an_openai_error() -> None:
    body = anthropic_stream(with_stop=False).split(b"event: content_block_start")[0]
    body += sse_named("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    translator = AnthropicToOpenAIStream(created=1, include_usage=True)
    *_, (_, last) = events_of(feed_split(translator, body, []))
    assert json.loads(last)["error"]["message"] == "Overloaded"
    assert translator.error == "Overloaded"


def test_an_event_past_the_cap_ends_the_stream() -> None:
    translator = AnthropicToOpenAIStream(created=1, include_usage=True, cap=64)
    output = translator.feed(b"event: content_block_delta\ndata: " + b"x" * 100)
    assert json.loads(events_of(output)[0][1])["error"]["message"].startswith("the provider sent an event larger")
    assert translator.ended and translator.close() == b""
    # The events the same chunk completed before the oversized one still count (here, the usage).
    start = anthropic_stream().split(b"\r\n\r\n")[0] + b"\r\n\r\n"  # message_start: 25 in + 5 cached
    translator = AnthropicToOpenAIStream(created=1, include_usage=True, cap=1024)
    output = translator.feed(start + b"event: content_block_delta\ndata: " + b"x" * 2000)
    assert [json.loads(data).get("error") is not None for _, data in events_of(output)] == [False, True]
    assert translator.usage() is not None and translator.usage().input_tokens == 30  # type: ignore[union-attr]


# --------------------------------------------------------------------- OpenAI -> Anthropic


def anthropic_events(output: bytes) -> list[Any]:
    events = []
    for name, data in events_of(output):
        event = ANTHROPIC_EVENT.validate_python(json.loads(data), strict=True)
        assert event.type == name
        events.append(event)
    return events


def test_openai_stream_becomes_anthropic_events_that_rebuild_the_message() -> None:
    translator = OpenAIToAnthropicStream()
    events = anthropic_events(feed_split(translator, openai_stream(), []))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    assert (snapshot.id, snapshot.model, snapshot.stop_reason) == ("chatcmpl-1", "gpt-4o", "tool_use")
    assert [block.type for block in snapshot.content] == ["text", "tool_use", "tool_use"]
    assert snapshot.content[0].text == "Let me check. é✓"  # type: ignore[union-attr]
    assert (snapshot.content[1].id, snapshot.content[1].input) == ("call_1", {"city": "Paris"})  # type: ignore[union-attr]
    assert (snapshot.content[2].name, snapshot.content[2].input) == ("get_time", {})  # type: ignore[union-attr]
    assert (snapshot.usage.input_tokens, snapshot.usage.output_tokens, snapshot.usage.cache_read_input_tokens) == (
        20,
        12,
        10,
    )
    assert translator.usage() == TokenUsage(30, 12, 42, 10, 0)


def test_openai_stream_split_at_every_byte_gives_the_same_output() -> None:
    body = openai_stream()
    whole = feed_split(OpenAIToAnthropicStream(), body, [])
    for cut in range(1, len(body)):
        assert feed_split(OpenAIToAnthropicStream(), body, [cut]) == whole, cut


def test_a_finished_stream_without_done_still_ends_cleanly() -> None:
    translator = OpenAIToAnthropicStream()
    events = anthropic_events(feed_split(translator, openai_stream(with_done=False, with_usage=False), []))
    assert events[-1].type == "message_stop" and translator.finished


@pytest.mark.parametrize("cut_after", [1, 3, 6])
def test_cut_openai_stream_ends_with_an_anthropic_error_event(cut_after: int) -> None:
    body = openai_stream()
    frames = body.split(b"\n\n")
    translator = OpenAIToAnthropicStream()
    output = feed_split(translator, b"\n\n".join(frames[:cut_after]) + b"\n\n", [])
    name, data = events_of(output)[-1]
    assert name == "error"
    assert json.loads(data) == {"type": "error", "error": {"type": "api_error", "message": CUT_MESSAGE}}
    assert not translator.finished


def test_openai_error_payload_becomes_an_anthropic_error_event() -> None:
    body = openai_stream().split(b"\n\n")[0] + b"\n\n"
    body += sse_data(
        {"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    )
    translator = OpenAIToAnthropicStream()
    name, data = events_of(feed_split(translator, body, []))[-1]
    assert name == "error" and json.loads(data)["error"]["message"] == "Rate limit reached"


# --------------------------------------------------------------------- the SSE parser


def test_parser_handles_every_line_ending_comments_and_multiline_data() -> None:
    body = b": comment\r\nevent: a\rdata: one\ndata:two\r\n\r\ndata: x\n\nid: 7\nretry: 5\n\n"
    parser = SseParser()
    events = [event for cut in range(len(body)) for event in parser.feed(body[cut : cut + 1])]
    assert [(e.event, e.data) for e in events] == [("a", "one\ntwo"), ("", "x")]
    assert not parser.pending


def test_parser_cap_bounds_one_event() -> None:
    parser = SseParser(cap=10)
    assert parser.feed(b"data: 1234\n") == []
    with pytest.raises(SseTooLarge):
        parser.feed(b"data: 12345678\n")
    for end in (b"\n", b"\r\n"):  # the events a chunk completed before the overflow are kept
        with pytest.raises(SseTooLarge) as overflow:
            SseParser(cap=10).feed(b"data: a" + end + end + b"data: 0123456789" + end)
        assert [(e.event, e.data) for e in overflow.value.events] == [("", "a")]


def _parse_pieces(pieces: list[bytes], cap: int) -> list[tuple[str, str] | str]:
    parser = SseParser(cap)
    seen: list[tuple[str, str] | str] = []
    for piece in pieces:
        try:
            seen.extend((e.event, e.data) for e in parser.feed(piece))
        except SseTooLarge as exc:
            seen.extend((e.event, e.data) for e in exc.events)  # completed before it, in the same chunk
            seen.append("too large")
            break
    return seen


def test_parser_lf_fast_path_matches_the_line_by_line_scanner() -> None:
    """LF-only chunks take a split-at-once path; CRLF ones go line by line: on the same streams,
    cut anywhere and under any cap, both must see the same events and the same overflow."""
    import random

    atoms = [b"data: ", b"data:", b"event: ", b": c", b"id: 1", b"\n", b"\n\n", b"x", b" ", b'{"a":1}', b"\xc3\xa9"]
    rng = random.Random(8)
    for _ in range(2000):
        body = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 8))))
        cap = rng.choice([8, 16, 30, 1 << 20])
        lf = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        crlf = [piece.replace(b"\n", b"\r\n") for piece in lf]
        assert _parse_pieces(lf, cap) == _parse_pieces(crlf, cap), (body, cuts, cap)


def test_a_lone_surrogate_in_provider_text_is_escaped_not_a_crash() -> None:
    """JSON lets a provider send "\\ud800"; UTF-8 cannot carry it, so the gateway escapes it."""
    events = [
        (
            "message_start",
            {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 1}}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a\ud800b"}},
        ),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    body = b"".join(
        b"event: " + name.encode() + b"\ndata: " + json.dumps(doc).encode() + b"\n\n" for name, doc in events
    )
    chunks, done = openai_chunks(feed_split(AnthropicToOpenAIStream(created=1, include_usage=False), body, []))
    assert done and chunks[1].choices[0].delta.content == "a\ud800b"
    assert sse_data({"text": "\ud800"}) == b'data: {"text":"\\ud800"}\n\n'


def test_only_the_usage_only_chunk_is_dropped_for_a_client_that_did_not_ask() -> None:
    azure_filter = b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'
    text = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    done = b"data: [DONE]\n\n"
    assert drop_usage_chunks(azure_filter + text + usage + done) == azure_filter + text + done
    assert drop_usage_chunks(usage) == b""
    spaced = b'data: {"choices": [], "usage": {"total_tokens": 2}}\n\n'  # any JSON spacing
    assert drop_usage_chunks(text + b"\n" + spaced + done) == text + done
    assert drop_usage_chunks(text) == text  # nothing to drop: the bytes as they came
    crlf = (text + usage + done).replace(b"\n", b"\r\n")
    assert events_of(drop_usage_chunks(crlf)) == events_of(text + done)
