"""The usage meter on realistic response bodies of the OpenAI and Anthropic APIs, fed as a proxy
would see them: whole, split at every byte, cut short, oversized, encoded or not JSON at all."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from typing import Any

import pytest

from dataplane.llm.usage import BodyKind, TokenUsage, UsageMeter, body_kind

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

OPENAI_CHAT = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
}
OPENAI_EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292, -0.0028842222], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
OPENAI_RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "status": "completed",
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "In a peaceful grove...", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 12},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
}
ANTHROPIC_MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "tool_use", "id": "toolu_01", "name": "report", "input": {"usage": {"input_tokens": 9999}}}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 2095,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1800,
        "output_tokens": 503,
    },
}


def sse(*events: Any, event_names: Iterable[str] | None = None, newline: str = "\n") -> bytes:
    """An event stream: each event a JSON object (or raw string) as one ``data:`` line."""
    names = list(event_names) if event_names is not None else [None] * len(events)
    out = []
    for name, event in zip(names, events, strict=True):
        data = event if isinstance(event, str) else json.dumps(event)
        head = f"event: {name}{newline}" if name else ""
        out.append(f"{head}data: {data}{newline}{newline}")
    return "".join(out).encode()


def openai_chunk(content: str | None, *, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": choices,
        "usage": usage,
    }


OPENAI_STREAM = sse(
    openai_chunk(""),
    openai_chunk("Hello"),
    openai_chunk(" there", finish="stop"),
    openai_chunk(None, usage={"prompt_tokens": 400, "completion_tokens": 200, "total_tokens": 600}),
    "[DONE]",
)

ANTHROPIC_EVENTS = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 472,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 28,
                    "output_tokens": 2,
                },
            },
        },
    ),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay, let's"}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 15},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
]
ANTHROPIC_STREAM = sse(*(e for _, e in ANTHROPIC_EVENTS), event_names=(n for n, _ in ANTHROPIC_EVENTS))


def metered(headers: list[tuple[bytes, bytes]], chunks: Iterable[bytes], *, cap: int | None = None) -> UsageMeter:
    meter = UsageMeter.for_response(headers) if cap is None else UsageMeter.for_response(headers, cap=cap)
    for chunk in chunks:
        meter.feed(chunk)
    return meter


def splits(body: bytes) -> Iterable[list[bytes]]:
    """The body in two pieces at every byte boundary, and byte by byte."""
    for at in range(len(body) + 1):
        yield [body[:at], body[at:]]
    yield [body[i : i + 1] for i in range(len(body))]


# --- JSON -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (OPENAI_CHAT, TokenUsage(19, 10, 29, 0, 0)),
        (OPENAI_EMBEDDINGS, TokenUsage(8, 0, 8, 0, 0)),
        (OPENAI_RESPONSE, TokenUsage(36, 87, 123, 12, 0)),
        # Cache writes and reads are input too; the usage-looking object inside the tool input is not read.
        (ANTHROPIC_MESSAGE, TokenUsage(2095 + 100 + 1800, 503, 2095 + 100 + 1800 + 503, 1800, 100)),
    ],
    ids=["openai-chat", "openai-embeddings", "openai-responses", "anthropic-message"],
)
def test_a_whole_json_body_reports_its_usage(document: dict[str, Any], expected: TokenUsage) -> None:
    assert metered(JSON_HEADERS, [json.dumps(document).encode()]).finish() == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # The last "usage" is nested (a tool's input): the top-level one before it is found by a full parse.
        (
            b'{"usage": {"input_tokens": 7, "output_tokens": 3}, "content": [{"input": {"usage": {"x": 1}}}]}',
            TokenUsage(7, 3, 10),
        ),
        # Followed by other members, with whitespace around the colon.
        (b'{"id": "x", "usage" \n:\t{"total_tokens": 4}, "system_fingerprint": "fp"}\n', TokenUsage(0, 0, 4)),
        # A key that only ends in "usage (its quote escaped) is not the usage.
        (b'{"say \\"usage": {"total_tokens": 4}}', None),
        (b'{"usage": null, "choices": []}', None),
        (b'{"note": "the key \\"usage\\" appears in text", "usage": {"total_tokens": 6}}', TokenUsage(0, 0, 6)),
    ],
    ids=["nested-last", "not-last", "escaped-key", "null", "quoted-in-text"],
)
def test_the_top_level_usage_is_found_wherever_the_key_appears(body: bytes, expected: TokenUsage | None) -> None:
    assert json.loads(body) is not None  # every case is valid JSON
    assert metered(JSON_HEADERS, [body]).finish() == expected


def test_a_large_embeddings_answer_is_read_within_the_cap() -> None:
    document = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.0123456] * 1536} for i in range(200)],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 1600, "total_tokens": 1600},
    }
    body = json.dumps(document).encode()
    assert 2_000_000 < len(body) < 4 * 1024 * 1024
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    assert metered(JSON_HEADERS, pieces).finish() == TokenUsage(1600, 0, 1600)


def test_json_split_at_every_byte_boundary_reports_the_same_usage() -> None:
    body = json.dumps(ANTHROPIC_MESSAGE, indent=1).encode()
    expected = TokenUsage(3995, 503, 4498, 1800, 100)
    for chunks in splits(body):
        assert metered(JSON_HEADERS, chunks).finish() == expected


def test_a_json_body_without_usage_or_cut_short_reports_none() -> None:
    error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": None}}
    assert metered(JSON_HEADERS, [json.dumps(error).encode()]).finish() is None
    whole = json.dumps(OPENAI_CHAT).encode()
    cut = metered(JSON_HEADERS, [whole[: len(whole) - 5]])
    assert cut.finish() is None and cut.gave_up is None
    assert metered(JSON_HEADERS, []).finish() is None  # HEAD, 204: no body at all


def test_an_oversized_json_body_is_read_from_its_tail_or_gives_up_and_says_why() -> None:
    """Past the cap only the last 64 KiB are kept: the providers put usage at the end (a large
    embeddings batch), so it is still read there; usage before the tail is not."""
    body = json.dumps(OPENAI_CHAT).encode()
    meter = metered(
        [(b"content-type", b"application/json; charset=utf-8")], [body[:300], body[300:]], cap=len(body) - 1
    )
    assert meter.finish() == TokenUsage(19, 10, 29)
    assert meter.gave_up is not None and "larger than" in meter.gave_up
    vectors = [{"object": "embedding", "index": i, "embedding": [0.125] * 1536} for i in range(40)]
    usage = {"prompt_tokens": 5000, "total_tokens": 5000}
    at_end = json.dumps({"object": "list", "data": vectors, "model": "e", "usage": usage}).encode()
    at_start = json.dumps({"usage": usage, "object": "list", "data": vectors, "model": "e"}).encode()
    pieces = [at_end[i : i + 65536] for i in range(0, len(at_end), 65536)]
    assert metered(JSON_HEADERS, pieces, cap=100_000).finish() == TokenUsage(5000, 0, 5000)
    late = metered(JSON_HEADERS, [at_start], cap=100_000)
    assert late.finish() is None and late.gave_up is not None
    assert metered(JSON_HEADERS, [body], cap=len(body)).finish() == TokenUsage(19, 10, 29)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\xff\xfe garbage \x80\x81",
        b'{"usage": {"prompt_tokens": 5, "completion_tokens": ',  # the usage key, but not JSON
        b'[{"usage": {"total_tokens": 5}}]',  # JSON, but not an object
        b'{"usage": "many"}',
        b'{"usage": {"prompt_tokens": -3, "completion_tokens": "10", "total_tokens": true}}',
        b'{"usage": {"total_tokens": 100000000000000000000000}}',  # beyond any real count
        b"[" * 100_000 + b'"usage"' + b"]" * 100_000,  # nesting past the parser's recursion limit
    ],
    ids=["binary", "truncated", "array", "usage-string", "bad-counts", "huge", "deep"],
)
def test_garbage_reports_no_usage_and_never_raises(body: bytes) -> None:
    for headers in (JSON_HEADERS, SSE_HEADERS):
        assert metered(headers, [body, b"\n\n"]).finish() is None


def test_gzip_and_other_encodings_report_no_usage() -> None:
    body = gzip.compress(json.dumps(OPENAI_CHAT).encode())
    for coding in (b"gzip", b"br", b"deflate"):
        meter = metered([*JSON_HEADERS, (b"content-encoding", coding)], [body])
        assert meter.kind is BodyKind.OTHER and meter.finish() is None
        assert meter.gave_up is not None and coding.decode() in meter.gave_up
    identity = metered([*JSON_HEADERS, (b"content-encoding", b"identity")], [json.dumps(OPENAI_CHAT).encode()])
    assert identity.finish() == TokenUsage(19, 10, 29)


def test_the_content_type_decides() -> None:
    body = json.dumps(OPENAI_CHAT).encode()
    assert body_kind([(b"Content-Type", b"application/vnd.api+json")])[0] is BodyKind.JSON
    assert body_kind([(b"content-type", b"TEXT/EVENT-STREAM")])[0] is BodyKind.EVENT_STREAM
    for headers in ([(b"content-type", b"text/plain")], [(b"content-type", b"application/x-ndjson")], []):
        meter = metered(headers, [body])
        assert meter.finish() is None and meter.gave_up is None  # simply not an LLM body: nothing to say


# --- event streams --------------------------------------------------------------------------------


def test_an_openai_stream_with_include_usage_reports_the_last_chunks_usage() -> None:
    meter = metered(SSE_HEADERS, [OPENAI_STREAM])
    assert meter.finish() == TokenUsage(400, 200, 600)
    assert meter.done


def test_an_openai_stream_split_at_every_byte_boundary_reports_the_same_usage() -> None:
    for newline in ("\n", "\r\n", "\r"):
        body = OPENAI_STREAM.replace(b"\n", newline.encode())
        for chunks in splits(body):
            assert metered(SSE_HEADERS, chunks).finish() == TokenUsage(400, 200, 600), (newline, chunks[:1])


def test_an_openai_stream_without_include_usage_reports_none() -> None:
    body = sse(openai_chunk("Hello"), openai_chunk("!", finish="stop"), "[DONE]")
    meter = metered(SSE_HEADERS, [body])
    assert meter.finish() is None and meter.done


def test_an_anthropic_stream_reports_input_from_message_start_and_cumulative_output() -> None:
    # 472 input + 28 read from the cache; output 15 (the cumulative count of message_delta, not 2 + 15).
    expected = TokenUsage(500, 15, 515, 28, 0)
    assert metered(SSE_HEADERS, [ANTHROPIC_STREAM]).finish() == expected
    for chunks in splits(ANTHROPIC_STREAM.replace(b"\n", b"\r\n")):
        assert metered(SSE_HEADERS, chunks).finish() == expected


def test_an_anthropic_message_delta_with_cumulative_input_replaces_the_start() -> None:
    events = [
        ANTHROPIC_EVENTS[0][1],
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {
                "input_tokens": 900,
                "cache_read_input_tokens": 28,
                "cache_creation_input_tokens": None,
                "output_tokens": 40,
            },
        },
    ]
    assert metered(SSE_HEADERS, [sse(*events)]).finish() == TokenUsage(928, 40, 968, 28, 0)


def test_a_responses_api_stream_reports_the_completed_responses_usage() -> None:
    events = [
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "usage": None}},
        {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "delta": "Hi"},
        {"type": "response.completed", "sequence_number": 2, "response": {**OPENAI_RESPONSE}},
    ]
    body = sse(*events, event_names=[e["type"] for e in events])
    assert metered(SSE_HEADERS, [body]).finish() == TokenUsage(36, 87, 123, 12, 0)


def test_a_stream_cut_before_its_usage_reports_what_it_carried() -> None:
    # Anthropic: message_start went out, the stream broke before message_delta: the input is charged.
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")]
    assert metered(SSE_HEADERS, [cut]).finish() == TokenUsage(500, 2, 502, 28, 0)
    # OpenAI: the usage chunk never came.
    cut = OPENAI_STREAM[: OPENAI_STREAM.index(b'"choices": []')]
    assert metered(SSE_HEADERS, [cut]).finish() is None
    # Cut after the usage chunk's data line but before the blank line ending the event: still counted.
    end = OPENAI_STREAM.index(b"data: [DONE]")
    assert metered(SSE_HEADERS, [OPENAI_STREAM[: end - 1]]).finish() == TokenUsage(400, 200, 600)


def test_stream_comments_other_fields_and_non_json_events_are_ignored() -> None:
    body = (
        b": keep-alive comment\n\n"
        b"retry: 3000\nid: 7\n\n"
        b"event: error\ndata: upstream hiccup, usage unknown\n\n"
        b'data: {"usage": \n'
        b'data: {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'  # data lines joined: one JSON payload
        b'dataset: {"usage": {"total_tokens": 999}}\n\n'  # another field name, not data
        b"data\n\n"
    )
    assert metered(SSE_HEADERS, [body]).finish() == TokenUsage(1, 2, 3)


def test_an_overlong_event_line_is_skipped_and_the_stream_read_on() -> None:
    huge = sse({"type": "message_delta", "usage": {"output_tokens": 5000}, "pad": "x" * 5000})
    body = sse(ANTHROPIC_EVENTS[0][1]) + huge + sse({"type": "ping"})
    expected = TokenUsage(500, 2, 502, 28, 0)
    assert metered(SSE_HEADERS, [body], cap=1024).finish() == expected  # the overlong event did not count
    pieces = [body[i : i + 100] for i in range(0, len(body), 100)]
    assert metered(SSE_HEADERS, pieces, cap=1024).finish() == expected
    assert metered(SSE_HEADERS, pieces, cap=10_000).finish() == TokenUsage(500, 5000, 5500, 28, 0)


def test_finish_twice_and_feeding_after_finish_change_nothing() -> None:
    meter = metered(SSE_HEADERS, [OPENAI_STREAM])
    first = meter.finish()
    meter.feed(sse(openai_chunk(None, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})))
    assert meter.finish() == first == TokenUsage(400, 200, 600)
