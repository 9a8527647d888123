"""The LLM gateway in front of providers that misbehave, through the real proxy: a byte-scripted provider
(tests/peers/llm_providers/raw.py) sends what the stand-ins never would (a stalled error body, a 201 or a
302, a document of the wrong shape, a stream whose body end is lost or comes too early), and clients send
fields of the wrong type. Each answer is an HTTP error or a stream error event in the client's format,
never a dropped connection, a hang or an answer marked whole when it is not; usage is charged as reported."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest

from dataplane.llm.errors import stream_error_event
from dataplane.llm.handler import MAX_TRANSLATED_ANSWER
from dataplane.llm.wire import ApiFormat
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.dataplane.llm.test_gateway import MESSAGES, anthropic_client, gateway, openai_client, provider
from tests.dataplane.llm.test_gateway_resilience import WITHIN, budget_policy, remaining, resilience
from tests.dataplane.policy.test_chain import seconds, token
from tests.peers.llm_providers.raw import LAST_CHUNK, RawProvider, chunk, event, head, serve_raw, whole
from tests.peers.llm_providers.script import Reply
from tests.peers.llm_providers.standins import serve_openai

pytestmark = pytest.mark.anyio

OPENAI, ANTHROPIC = pb.LlmProvider.TYPE_OPENAI, pb.LlmProvider.TYPE_ANTHROPIC
CHAT, MESSAGES_PATH = "/v1/chat/completions", "/v1/messages"
UNREADABLE_EVENT = "the provider sent an event the gateway cannot read"
ALICE = {"authorization": "Bearer " + token(sub="alice").decode()}

START = event(
    {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1000, "output_tokens": 1},
    }},
    "message_start",
)  # fmt: skip
BLOCK = event(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start"
)
DELTA = event(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}, "content_block_delta"
)
BLOCK_STOP = event({"type": "content_block_stop", "index": 0}, "content_block_stop")
MESSAGE_DELTA = event(
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}, "message_delta"
)
STOP = event({"type": "message_stop"}, "message_stop")
DONE = event(b"[DONE]")


def oa_chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return event({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]})


def stream(*events: bytes, last: bytes = LAST_CHUNK) -> bytes:
    """A chunked event stream, one event a chunk; `last=b""` leaves its end out."""
    return head() + b"".join(chunk(e) for e in events) + last


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 5, "messages": MESSAGES, **fields}


@asynccontextmanager
async def raw_behind_gateway(kind: int, **options: Any) -> AsyncIterator[tuple[RawProvider, str, Any]]:
    """A raw provider named p, the gateway in front of it: (provider, gateway URL, proxy server)."""
    async with serve_raw() as peer, gateway(provider("p", kind, peer.port, "k"), **options) as (base, server):
        yield peer, base, server


async def post(url: str, **options: Any) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(url, **options)


def error_message(answer: httpx.Response) -> str:
    """The message of an error body, in either client's format (both keep it at error.message)."""
    return str(answer.json()["error"]["message"])


async def test_a_stalled_error_body_still_fails_over() -> None:
    """A 503 whose body stops after its head: only its status is needed, so the body is read for the
    idle bound (5 s at most) and the next provider answers."""
    with anyio.fail_after(WITHIN):
        async with serve_raw() as one, serve_openai("k") as two:
            one.script(head(503, "application/json", length=100) + b'{"error":', then="stall")
            two.script(Reply(text="from two"))
            providers = (
                provider("one", OPENAI, one.port, "k", priority=0),
                provider("two", OPENAI, two.port, "k", priority=1),
            )
            bounded = resilience(stream_idle_timeout=seconds(0.3))
            async with gateway(*providers, policies=(bounded,)) as (base, _):
                answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
                await one.requests[0].ended.wait()  # the stalled answer's connection was closed
    assert answer.choices[0].message.content == "from two"


async def test_a_client_gone_mid_stream_is_charged_what_the_provider_reported() -> None:
    """The client leaving cancels the relay: message_start's usage (1000 in, 1 out) is charged, not
    an estimate of the few tokens the request and "hi" make."""
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(ANTHROPIC, policies=(budget_policy(),)) as (peer, base, server):
            peer.script(stream(START, BLOCK, DELTA, last=b""), then="stall")
            body, seen = request(stream=True), b""
            async with (
                httpx.AsyncClient() as http,
                http.stream("POST", f"{base}{MESSAGES_PATH}", json=body, headers=ALICE) as answer,
            ):
                async for piece in answer.aiter_bytes():
                    seen += piece
                    if DELTA in seen:
                        break  # leaving the block closes the connection mid-answer
            # The gateway closes the provider's connection, then charges without yielding in between.
            await peer.requests[0].ended.wait()
            left = remaining(server)
    assert 10_000 - left == 1001


async def test_a_stream_past_the_request_deadline_is_charged_what_the_provider_reported() -> None:
    """The same for a translated stream cut by the request's deadline."""
    with anyio.fail_after(WITHIN):
        policies = (budget_policy(), resilience(request_timeout=seconds(0.5)))
        async with raw_behind_gateway(ANTHROPIC, policies=policies) as (peer, base, server):
            peer.script(stream(START, BLOCK, DELTA, last=b""), then="stall")
            client = openai_client(base, key=token(sub="alice").decode())
            chunks = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError) as cut:
                async for _ in chunks:
                    pass
            await client.models.list()  # the same connection: the stream above has been settled
            left = remaining(server)
    assert "timed out" in str(cut.value)
    assert 10_000 - left == 1001


@pytest.mark.parametrize(
    ("kind", "path", "events"),
    [
        (ANTHROPIC, MESSAGES_PATH, (START, BLOCK, DELTA, BLOCK_STOP, MESSAGE_DELTA, STOP)),
        (OPENAI, CHAT, (oa_chunk("hi"), oa_chunk(finish="stop"), DONE)),
    ],
    ids=["message_stop", "done"],
)
async def test_a_stream_ended_by_message_stop_is_not_marked_cut_when_the_body_end_is_lost(
    kind: int, path: str, events: tuple[bytes, ...]
) -> None:
    """The answer is whole at message_stop / [DONE]: a provider closing before its last chunk has
    lost nothing, so the client gets the provider's events exactly, with no error event after."""
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(kind) as (peer, base, _):
            peer.script(stream(*events, last=b""), then="close")
            answer = await post(f"{base}{path}", json=request(stream=True))
    assert answer.status_code == 200
    assert answer.content == b"".join(events)


async def test_an_anthropic_stream_without_message_stop_ends_with_an_error_event() -> None:
    """A body that ends cleanly before message_stop is an unfinished answer, as a cut one is."""
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(ANTHROPIC) as (peer, base, _):
            peer.script(stream(START, BLOCK, DELTA))
            client = anthropic_client(base)
            with pytest.raises(anthropic.APIError) as cut:
                async with client.messages.stream(model="claude-x", max_tokens=5, messages=MESSAGES) as events:
                    async for _ in events.text_stream:
                        pass
    assert "ended before the answer was complete" in str(cut.value)


WRONG_TYPES: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"stop": 5}),
    (CHAT, {"tools": 5}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": "ab"}}]}),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": "x"}}),
    (CHAT, {"tool_choice": {"type": "function", "function": "f"}}),
    (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": 3}]}),
    (MESSAGES_PATH, {"stop_sequences": 5}),
    (MESSAGES_PATH, {"tools": 5}),
    (MESSAGES_PATH, {"tools": [{"name": "f", "input_schema": "ab"}]}),
    (MESSAGES_PATH, {"tool_choice": {"type": ["x"]}}),
    (MESSAGES_PATH, {"messages": [{"role": "user", "content": [{"type": "image", "source": "x"}]}]}),
]


@pytest.mark.parametrize(("path", "fields"), WRONG_TYPES, ids=[f"{p[4:]}-{json.dumps(f)}" for p, f in WRONG_TYPES])
async def test_fields_of_the_wrong_type_get_400_not_a_dropped_connection(path: str, fields: dict[str, Any]) -> None:
    """A field the translation cannot read is the client's fault: a 400 in its format, and nothing
    reaches the provider (of the other API, so the request is translated)."""
    kind = ANTHROPIC if path == CHAT else OPENAI
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(kind) as (peer, base, _):
            answer = await post(f"{base}{path}", json=request(**fields))
    assert answer.status_code == 400
    assert "cannot be carried to provider p" in error_message(answer)
    assert peer.requests == []


async def test_a_deeply_nested_body_gets_400() -> None:
    """Nesting past the parser's recursion limit is malformed JSON, not a crash of the request."""
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(OPENAI) as (peer, base, _):
            answer = await post(f"{base}{CHAT}", content=b"[" * 200_000)
    assert answer.status_code == 400
    assert "could not parse the JSON body" in error_message(answer)
    assert peer.requests == []


WRONG_SHAPES: list[tuple[int, bytes]] = [
    *[(ANTHROPIC, d) for d in (b"[]", b"null", b'"x"', b'{"content":"hi"}', b'{"content":[1]}')],
    # A number no JSON writer may write (it would go out as `Infinity` in the tool call's arguments).
    (ANTHROPIC, b'{"content":[{"type":"tool_use","id":"t","name":"f","input":{"x":1e400}}]}'),
    *[(OPENAI, d) for d in (b"[]", b'{"choices":[{"message":5}]}', b'{"choices":"x"}', b'{"choices":[]}')],
]


@pytest.mark.parametrize(
    ("kind", "document"),
    WRONG_SHAPES,
    ids=[f"{'anthropic' if k == ANTHROPIC else 'openai'}-{d.decode()}" for k, d in WRONG_SHAPES],
)
async def test_a_provider_answer_of_the_wrong_shape_gets_502(kind: int, document: bytes) -> None:
    """JSON that is not an answer of the provider's API cannot be translated: a 502, not a crash."""
    path = CHAT if kind == ANTHROPIC else MESSAGES_PATH
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(kind) as (peer, base, _):
            peer.script(whole(document))
            answer = await post(f"{base}{path}", json=request())
    assert answer.status_code == 502
    assert error_message(answer) == "the provider answered with a body that is not a valid answer of its API"


@pytest.mark.parametrize(
    ("kind", "events"),
    [
        (ANTHROPIC, (START, BLOCK, DELTA, event({"type": "content_block_delta", "index": 0, "delta": "x"}), STOP)),
        (OPENAI, (oa_chunk("hi"), event({"id": "c1", "choices": [{"index": 0, "delta": "x"}]}), DONE)),
    ],
    ids=["anthropic-event", "openai-chunk"],
)
async def test_a_provider_answer_of_the_wrong_shape_ends_the_stream_with_an_error_event(
    kind: int, events: tuple[bytes, ...]
) -> None:
    """An event of the wrong shape in a translated stream ends it with an error event in the
    client's format (the SDK raises), not with a dropped connection."""
    path = CHAT if kind == ANTHROPIC else MESSAGES_PATH
    api: ApiFormat = "openai" if kind == ANTHROPIC else "anthropic"
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(kind) as (peer, base, _):
            peer.script(stream(*events))
            answer = await post(f"{base}{path}", json=request(stream=True))
    assert answer.status_code == 200
    assert answer.content.endswith(stream_error_event(api, UNREADABLE_EVENT))


async def test_a_large_embeddings_answer_is_charged_its_usage() -> None:
    """An embeddings answer past the usage reader's 4 MiB cap still carries its usage at its end."""
    vector = [0.0123456789] * 1536
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(300)]
    usage = {"prompt_tokens": 5000, "total_tokens": 5000}
    document = json.dumps({"object": "list", "data": data, "model": "e", "usage": usage}).encode()
    assert len(document) > 4 * 1024 * 1024
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(OPENAI, policies=(budget_policy(),)) as (peer, base, server):
            peer.script(whole(document))
            client = openai_client(base, key=token(sub="alice").decode())
            answer = await client.embeddings.create(model="e", input=["x"] * 300)
            await client.models.list()  # the same connection: the answer above has been settled
            left = remaining(server)
    assert len(answer.data) == 300 and answer.usage.total_tokens == 5000
    assert 10_000 - left == 5000


@pytest.mark.parametrize("status", [201, 204, 302])
async def test_a_provider_redirect_or_odd_success_status_gets_502(status: int) -> None:
    """Only a 200 is an answer: a 201, a 204 or a redirect is not passed on as one."""
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(OPENAI) as (peer, base, _):
            peer.script(whole(b"" if status == 204 else b"<html>moved</html>", status, "text/html"))
            answer = await post(f"{base}{CHAT}", json=request())
    assert answer.status_code == 502
    assert error_message(answer) == f"provider p answered HTTP {status}, not an answer"


def _no_constants(name: str) -> float:
    raise AssertionError(f"{name} is not JSON")


@pytest.mark.parametrize(
    ("kind", "document", "expected"),
    [
        (
            ANTHROPIC,
            b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text",'
            b'"text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":1e400,"output_tokens":2}}',
            {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2},
        ),
        (
            OPENAI,
            b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
            b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1e400,'
            b'"completion_tokens":2,"total_tokens":1e400}}',
            {"input_tokens": 0, "output_tokens": 2, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        ),
    ],
    ids=["anthropic-to-openai", "openai-to-anthropic"],
)
async def test_infinite_usage_becomes_valid_json(kind: int, document: bytes, expected: dict[str, int]) -> None:
    """1e400 parses as infinity; a translated answer carrying it would be `Infinity`, which no JSON
    parser but Python's accepts. A count that is no JSON integer becomes 0."""
    path = CHAT if kind == ANTHROPIC else MESSAGES_PATH
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(kind) as (peer, base, _):
            peer.script(whole(document))
            answer = await post(f"{base}{path}", json=request())
    usage = json.loads(answer.content, parse_constant=_no_constants)["usage"]
    assert answer.status_code == 200
    assert {name: usage[name] for name in expected} == expected


@pytest.mark.parametrize("failure", ["cut", "too large"])
async def test_a_translated_answer_that_cannot_be_delivered_is_still_charged(failure: str) -> None:
    """The client gets a 502, yet the provider spent the tokens: a cut answer is charged the
    estimate, one too large to translate the usage it carries at its end."""
    usage = b',"usage":{"input_tokens":700,"output_tokens":300}}'
    if failure == "cut":
        answer, then = head(200, "application/json", length=4000) + b'{"id":"msg_1","content":[', "close"
    else:
        text = b"x" * (MAX_TRANSLATED_ANSWER + 1)
        document = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"' + text + b'"}]' + usage
        answer, then = whole(document), "keep"
    with anyio.fail_after(WITHIN):
        async with raw_behind_gateway(ANTHROPIC, policies=(budget_policy(),)) as (peer, base, server):
            peer.script(answer, then=then)
            client = openai_client(base, key=token(sub="alice").decode())
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(model="claude-x", messages=MESSAGES)
            await client.models.list()  # same connection: the charge above has been made
            charged = 10_000 - remaining(server)
    assert failed.value.status_code == 502
    if failure == "cut":
        assert "cut off" in failed.value.message and 0 < charged < 50  # an estimate of the input
    else:
        assert "too large to translate" in failed.value.message and charged == 1000
