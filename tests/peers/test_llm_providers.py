"""The LLM provider stand-ins speak each provider's wire format: every endpoint driven by the official
SDK clients (``openai`` 3.x, ``anthropic`` 2.x) directly, non-streamed and streamed, with tool calls,
errors (the SDK's exception class, status and message), retries and usage as the SDK parses it. Raw
bodies are also validated strictly against the SDKs' pydantic types (the SDKs themselves parse
leniently)."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from pydantic import TypeAdapter

from tests.peers.llm_providers import (
    AnthropicStandIn,
    AzureOpenAIStandIn,
    OpenAIStandIn,
    Reply,
    ToolCall,
    Usage,
    serve_anthropic,
    serve_azure_openai,
    serve_openai,
)

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
AZURE_VERSION = "2024-10-21"


@pytest.fixture
async def openai_peer() -> AsyncIterator[OpenAIStandIn]:
    async with serve_openai() as peer:
        yield peer


@pytest.fixture
async def anthropic_peer() -> AsyncIterator[AnthropicStandIn]:
    async with serve_anthropic() as peer:
        yield peer


@pytest.fixture
async def azure_peer() -> AsyncIterator[AzureOpenAIStandIn]:
    async with serve_azure_openai(deployments={"chat-deploy": "gpt-4o-2024-11-20", "embed-deploy": "te3"}) as peer:
        yield peer


@pytest.fixture
async def oai(openai_peer: OpenAIStandIn) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=openai_peer.url, api_key=openai_peer.api_key, max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(anthropic_peer: AnthropicStandIn) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=anthropic_peer.url, api_key=anthropic_peer.api_key, max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def azure(azure_peer: AzureOpenAIStandIn) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=azure_peer.url, api_key=azure_peer.api_key, api_version=AZURE_VERSION, max_retries=0
    )
    async with client:
        yield client


async def raw_post(url: str, body: bytes | dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        if isinstance(body, bytes):
            return await http.post(url, content=body, headers=headers)
        return await http.post(url, json=body, headers=headers)


async def sse_lines(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[str]:
    """The raw event-stream lines of a streamed answer."""
    async with httpx.AsyncClient(timeout=10) as http, http.stream("POST", url, json=body, headers=headers) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        return [line async for line in reply.aiter_lines()]


# ---------------------------------------------------------------- OpenAI


async def test_openai_chat_echoes_with_counted_usage(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.model, reply.id, reply.created) == ("gpt-4o-mini", "chatcmpl-standin000001", 1_700_000_001)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (2, 3, 5)
    assert reply._request_id == "req_standin000001"
    sent = openai_peer.last_request
    assert (sent.method, sent.path, sent.headers["authorization"]) == (
        "POST",
        "/v1/chat/completions",
        "Bearer sk-openai-standin",
    )
    with anyio.fail_after(5):
        await sent.done.wait()  # the client may have read the answer before the server's last write returned
    assert sent.json["messages"] == USER and sent.outcome == "complete"
    raw = await oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)
    ChatCompletion.model_validate_json(raw.http_response.text, strict=True)


async def test_openai_stream_carries_usage_only_when_asked(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    openai_peer.script(Reply("one two three", usage=Usage(11, 7, cached_tokens=4)), "four five")
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 4

    plain = await oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    chunks = [chunk async for chunk in plain]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "four five"
    assert all(c.usage is None and c.choices for c in chunks)

    body = {"model": "gpt-4o", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    lines = await sse_lines(f"{openai_peer.url}/chat/completions", body, {"authorization": "Bearer sk-openai-standin"})
    data = [line.removeprefix("data: ") for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line) and data[-1] == "[DONE]"
    for payload in data[:-1]:
        ChatCompletionChunk.model_validate_json(payload, strict=True)
    assert '"usage":null' in data[0] and '"choices":[]' in data[-2]


async def test_openai_tool_calls_in_both_modes(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    calls = [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Tokyo, Japan"}, id="call_x")]
    openai_peer.script(Reply(tool_calls=calls), Reply(tool_calls=calls))
    reply = await oai.chat.completions.create(model="gpt-4o", messages=USER, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == [
        ("call_0001_0", "get_weather", '{"city":"Paris"}'),
        ("call_x", "get_weather", '{"city":"Tokyo, Japan"}'),
    ]
    async with oai.chat.completions.stream(model="gpt-4o", messages=USER, tools=[WEATHER_TOOL]) as stream:
        deltas = [event async for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = await stream.get_final_completion()
    assert len(deltas) > 2  # the arguments arrive in pieces
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [
        ("call_0002_0", "get_weather", '{"city":"Paris"}'),
        ("call_x", "get_weather", '{"city":"Tokyo, Japan"}'),
    ]
    assert openai_peer.last_request.json["tools"] == [WEATHER_TOOL]


async def test_openai_max_tokens_truncates_with_length(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "a b c d e"}], max_completion_tokens=3
    )
    assert reply.choices[0].message.content == "echo: a b"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_openai_embeddings_float_and_base64(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input=["a cat", "a dog"], encoding_format="float"
    )
    assert [e.index for e in floats.data] == [0, 1] and len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 4 and floats.model == "text-embedding-3-small"
    encoded = await oai.embeddings.create(model="text-embedding-3-small", input="a cat", encoding_format="base64")
    raw = base64.b64decode(str(encoded.data[0].embedding))
    assert list(struct.unpack("<8f", raw)) == floats.data[0].embedding
    decoded = await oai.embeddings.create(model="text-embedding-3-small", input="a cat", dimensions=4)
    assert openai_peer.last_request.json["encoding_format"] == "base64"  # the SDK asks for base64 and decodes it
    assert len(decoded.data[0].embedding) == 4 and decoded.data[0].embedding == floats.data[0].embedding[:4]
    response = await oai.embeddings.with_raw_response.create(model="m", input=[[1, 2, 3]], encoding_format="float")
    CreateEmbeddingResponse.model_validate_json(response.http_response.text, strict=True)


async def test_openai_models(oai: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in oai.models.list()] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    model = await oai.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "openai")
    async with serve_openai(models=["only-this"]) as restricted:
        client = openai.AsyncOpenAI(base_url=restricted.url, api_key=restricted.api_key, max_retries=0)
        async with client:
            assert [m.id async for m in client.models.list()] == ["only-this"]
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert missing.value.code == "model_not_found" and "`gpt-4o` does not exist" in missing.value.message


async def test_openai_responses_api(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="gpt-4o", input="hello responses")
    assert response.output_text == "echo: hello responses" and response.status == "completed"
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (2, 3)
    openai_peer.script(Reply("streamed answer", usage=Usage(5, 2)))
    async with oai.responses.stream(model="gpt-4o", input=[{"role": "user", "content": "hi"}]) as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 2
    assert final.output_text == "streamed answer"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (5, 2)
    raw = await oai.responses.with_raw_response.create(model="gpt-4o", input="x")
    Response.model_validate_json(raw.http_response.text, strict=True)


async def test_openai_credentials_are_checked(openai_peer: OpenAIStandIn) -> None:
    async with openai.AsyncOpenAI(base_url=openai_peer.url, api_key="sk-wrong-key-1234", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as wrong:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert wrong.value.type == "invalid_request_error" and "Incorrect API key provided" in wrong.value.message
    assert wrong.value.request_id is not None
    missing = await raw_post(f"{openai_peer.url}/chat/completions", {"model": "gpt-4o", "messages": USER}, {})
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert "didn't provide an API key" in missing.json()["error"]["message"]


async def test_openai_error_statuses_and_bodies(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    openai_peer.fail_next(1, 429, retry_after=0.25)
    with pytest.raises(openai.RateLimitError) as limited:
        await oai.chat.completions.create(model="gpt-4o", messages=USER)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "requests"
    headers = limited.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("0.25", "250")
    for status, error in (
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
        (400, openai.BadRequestError),
    ):
        openai_peer.fail_next(1, status, message=f"scripted {status}")
        with pytest.raises(error) as failed:
            await oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
        assert (
            failed.value.status_code == status and failed.value.message == f"Error code: {status} - scripted {status}"
        )
    with pytest.raises(openai.BadRequestError) as no_messages:
        await oai.chat.completions.create(model="gpt-4o", messages=[])
    assert no_messages.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as no_model:
        await oai.chat.completions.create(model="", messages=USER)
    assert "model" in no_model.value.message
    with pytest.raises(openai.BadRequestError) as options:
        await oai.chat.completions.create(model="gpt-4o", messages=USER, stream_options={"include_usage": True})
    assert options.value.param == "stream_options"
    auth = {"authorization": "Bearer sk-openai-standin", "content-type": "application/json"}
    bad_json = await raw_post(f"{openai_peer.url}/chat/completions", b"{not json", auth)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    unknown = await raw_post(f"{openai_peer.url}/nope", {}, auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"


async def test_openai_sdk_retries_on_the_standin_statuses(openai_peer: OpenAIStandIn) -> None:
    openai_peer.fail_next(1, 429, retry_after=0.001)
    openai_peer.fail_next(1, 503, retry_after=0.001)
    async with openai.AsyncOpenAI(base_url=openai_peer.url, api_key=openai_peer.api_key, max_retries=2) as client:
        with anyio.fail_after(5):
            reply = await client.chat.completions.create(model="gpt-4o", messages=USER)
    assert reply.choices[0].message.content == "echo: hello there"
    assert [r.status for r in openai_peer.requests] == [429, 503, 200]
    assert [r.headers["x-stainless-retry-count"] for r in openai_peer.requests] == ["0", "1", "2"]


async def test_openai_stream_cut_and_error_event(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    openai_peer.cut_next(after_events=2)
    received: list[str] = []
    stream = await oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received == ["", "echo:"]
    with anyio.fail_after(5):
        await openai_peer.last_request.done.wait()
    assert openai_peer.last_request.outcome == "cut"

    openai_peer.fail_stream_next(after_events=1, message="stream broke")
    stream = await oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    with pytest.raises(openai.APIError) as broken:
        async for _ in stream:
            pass
    assert broken.value.message == "stream broke" and broken.value.type == "server_error"

    openai_peer.cut_next(after_events=10)  # a JSON answer is cut after that many bytes
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="gpt-4o", messages=USER)


async def test_openai_hold_garbage_and_missing_usage(openai_peer: OpenAIStandIn, oai: openai.AsyncOpenAI) -> None:
    hold = openai_peer.hold_next()
    replies: list[str | None] = []

    async def ask() -> None:
        reply = await oai.chat.completions.create(model="gpt-4o", messages=USER)
        replies.append(reply.choices[0].message.content)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ask)
        with anyio.fail_after(5):
            await hold.reached.wait()
        assert replies == [] and openai_peer.last_request.outcome == "pending"
        hold.release()
    assert replies == ["echo: hello there"]

    first_chunk = openai_peer.hold_next(after_events=1)
    stream = await oai.chat.completions.create(model="gpt-4o", messages=USER, stream=True)
    with anyio.fail_after(5):
        first = await anext(aiter(stream))
        await first_chunk.reached.wait()
    assert first.choices[0].delta.role == "assistant"
    first_chunk.release()
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "echo: hello there"

    openai_peer.garbage_next(b"<html>bad gateway</html>", status=502, content_type="text/html")
    with pytest.raises(openai.InternalServerError) as garbage:
        await oai.chat.completions.create(model="gpt-4o", messages=USER)
    assert garbage.value.body == "<html>bad gateway</html>"

    openai_peer.omit_usage = True
    bare = await oai.chat.completions.create(model="gpt-4o", messages=USER)
    assert bare.usage is None
    stream = await oai.chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None and chunk.choices for chunk in chunks)


# ---------------------------------------------------------------- Anthropic


async def test_anthropic_message_echoes(anthropic_peer: AnthropicStandIn, claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello there"
    assert (message.model, message.id, message.stop_reason) == ("claude-sonnet-4-5", "msg_standin000001", "end_turn")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 3)
    assert message._request_id == "req_standin000001"
    sent = anthropic_peer.last_request
    assert sent.headers["authorization"] == "Bearer sk-ant-standin" and "anthropic-version" in sent.headers
    assert sent.json["system"] == "be brief"
    raw = await claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=8, messages=USER)
    Message.model_validate_json(raw.http_response.text, strict=True)
    legacy = await raw_post(
        f"{anthropic_peer.url}/v1/messages",
        {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": USER},
        {"x-api-key": "sk-ant-standin", "anthropic-version": "2023-06-01"},
    )
    assert legacy.status_code == 200 and legacy.json()["content"][0]["text"] == "echo: hello there"


async def test_anthropic_stream_events_and_usage(
    anthropic_peer: AnthropicStandIn, claude: anthropic.AsyncAnthropic
) -> None:
    anthropic_peer.script(Reply("alpha beta gamma", usage=Usage(21, 9, cached_tokens=5, cache_creation_tokens=2)))
    async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=USER) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ["alpha", " beta", " gamma"]
    assert final.content[0].type == "text" and final.content[0].text == "alpha beta gamma"
    assert final.stop_reason == "end_turn"
    usage = final.usage
    assert (usage.input_tokens, usage.output_tokens) == (21, 9)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (5, 2)

    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": USER, "stream": True}
    headers = {"x-api-key": "sk-ant-standin", "anthropic-version": "2023-06-01"}
    lines = await sse_lines(f"{anthropic_peer.url}/v1/messages", body, headers)
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * 3,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    events = TypeAdapter(RawMessageStreamEvent)
    for line in lines:
        if line.startswith("data: ") and '"ping"' not in line:
            events.validate_json(line.removeprefix("data: "), strict=True)


async def test_anthropic_tool_use_in_both_modes(
    anthropic_peer: AnthropicStandIn, claude: anthropic.AsyncAnthropic
) -> None:
    calls = [ToolCall("get_weather", {"city": "Paris", "units": "metric"})]
    anthropic_peer.script(Reply("Let me check.", tool_calls=calls), Reply(tool_calls=calls))
    tools: Any = [
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    ]
    message = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=USER, tools=tools)
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    tool_use = message.content[1]
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == ("toolu_standin0001_0", "get_weather", calls[0].arguments)
    async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=USER, tools=tools) as stream:
        json_deltas = [
            e async for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = await stream.get_final_message()
    assert len(json_deltas) > 2 and json_deltas[0].delta.type == "input_json_delta"
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris", "units": "metric"}
    result = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "22C"}]}]
    answer = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=USER + result)  # type: ignore[arg-type]
    assert answer.content[0].type == "text" and answer.content[0].text == "echo: 22C"


async def test_anthropic_errors(anthropic_peer: AnthropicStandIn, claude: anthropic.AsyncAnthropic) -> None:
    async with anthropic.AsyncAnthropic(base_url=anthropic_peer.url, api_key="sk-ant-wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await wrong.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=USER)
    assert denied.value.type == "authentication_error" and denied.value.api_message == "invalid x-api-key"
    anthropic_peer.fail_next(1, 529)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=USER)
    assert overloaded.value.status_code == 529 and overloaded.value.type == "overloaded_error"
    assert overloaded.value.request_id == "req_standin000002"  # the second request this stand-in saw
    assert (
        isinstance(overloaded.value.body, dict) and overloaded.value.body["request_id"] == overloaded.value.request_id
    )
    anthropic_peer.fail_next(1, 429, retry_after=2)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=USER, stream=True)
    assert limited.value.type == "rate_limit_error" and limited.value.response.headers["retry-after"] == "2"
    anthropic_peer.fail_next(1, 500)
    with pytest.raises(anthropic.InternalServerError) as internal:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=USER)
    assert internal.value.type == "api_error"

    url, key = f"{anthropic_peer.url}/v1/messages", {"x-api-key": "sk-ant-standin"}
    no_version = await raw_post(url, {"model": "m", "max_tokens": 8, "messages": USER}, key)
    assert no_version.status_code == 400
    assert no_version.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    versioned = {**key, "anthropic-version": "2023-06-01"}
    no_max = await raw_post(url, {"model": "m", "messages": USER}, versioned)
    assert no_max.status_code == 400 and no_max.json()["error"]["message"] == "max_tokens: Field required"
    no_key = await raw_post(url, {"model": "m", "max_tokens": 8, "messages": USER}, {"anthropic-version": "2023-06-01"})
    assert no_key.status_code == 401 and no_key.json()["type"] == "error"
    async with serve_anthropic(models=["claude-haiku-4-5"]) as restricted:
        client = anthropic.AsyncAnthropic(base_url=restricted.url, api_key=restricted.api_key, max_retries=0)
        async with client:
            with pytest.raises(anthropic.NotFoundError) as unknown:
                await client.messages.create(model="claude-nope", max_tokens=8, messages=USER)
    assert unknown.value.type == "not_found_error" and unknown.value.api_message == "model: claude-nope"


async def test_anthropic_sdk_retries_overloaded(anthropic_peer: AnthropicStandIn) -> None:
    anthropic_peer.fail_next(2, 529, retry_after=0.001)
    async with anthropic.AsyncAnthropic(
        base_url=anthropic_peer.url, api_key=anthropic_peer.api_key, max_retries=2
    ) as c:
        with anyio.fail_after(5):
            message = await c.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello there"
    assert [r.status for r in anthropic_peer.requests] == [529, 529, 200]


async def test_anthropic_stream_faults(anthropic_peer: AnthropicStandIn, claude: anthropic.AsyncAnthropic) -> None:
    anthropic_peer.fail_stream_next(after_events=3)
    async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=USER) as stream:
        with pytest.raises(anthropic.APIStatusError) as broken:
            async for _ in stream:
                pass
    assert broken.value.type == "overloaded_error" and broken.value.api_message == "Overloaded"

    anthropic_peer.cut_next(after_events=4)
    seen: list[str] = []
    async with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=USER) as stream:
        with pytest.raises(anthropic.APIConnectionError):
            async for event in stream:
                seen.append(event.type)
    assert seen[:2] == ["message_start", "content_block_start"] and "message_stop" not in seen
    with anyio.fail_after(5):
        await anthropic_peer.last_request.done.wait()
    assert anthropic_peer.last_request.outcome == "cut"

    anthropic_peer.omit_usage = True
    bare = await raw_post(
        f"{anthropic_peer.url}/v1/messages",
        {"model": "m", "max_tokens": 8, "messages": USER},
        {"x-api-key": "sk-ant-standin", "anthropic-version": "2023-06-01"},
    )
    assert "usage" not in bare.json()


async def test_anthropic_count_tokens_models_and_truncation(claude: anthropic.AsyncAnthropic) -> None:
    counted = await claude.messages.count_tokens(model="claude-sonnet-4-5", messages=USER, system="one two")
    assert counted.input_tokens == 4
    models = [m.id async for m in claude.models.list()]
    assert models == ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]
    cut = await claude.messages.create(model="claude-sonnet-4-5", max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.content[0].type == "text" and cut.content[0].text == "echo: hello"


# ---------------------------------------------------------------- Azure OpenAI


async def test_azure_deployment_chat(azure_peer: AzureOpenAIStandIn, azure: openai.AsyncAzureOpenAI) -> None:
    reply = await azure.chat.completions.create(model="chat-deploy", messages=USER)
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.model == "gpt-4o-2024-11-20"
    assert reply.usage is not None and reply.usage.total_tokens == 5
    sent = azure_peer.last_request
    assert sent.path == "/openai/deployments/chat-deploy/chat/completions"
    assert sent.query == {"api-version": AZURE_VERSION}
    assert sent.headers["api-key"] == "azure-standin-key" and "authorization" not in sent.headers
    raw = await azure.chat.completions.with_raw_response.create(model="chat-deploy", messages=USER)
    assert "prompt_filter_results" in raw.http_response.json()

    azure_peer.script(Reply("streamed here", usage=Usage(3, 2)))
    stream = await azure.chat.completions.create(
        model="chat-deploy", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices == [] and chunks[0].id == ""  # Azure's prompt-filter chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed here"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2

    vectors = await azure.embeddings.create(model="embed-deploy", input="a cat", encoding_format="float")
    assert vectors.model == "te3" and len(vectors.data[0].embedding) == 8
    assert azure_peer.last_request.path == "/openai/deployments/embed-deploy/embeddings"


async def test_azure_v1_api_and_errors(azure_peer: AzureOpenAIStandIn, azure: openai.AsyncAzureOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=azure_peer.v1_url, api_key=azure_peer.api_key, max_retries=0) as v1:
        reply = await v1.chat.completions.create(model="chat-deploy", messages=USER)
        assert (reply.model, azure_peer.last_request.path) == ("gpt-4o-2024-11-20", "/openai/v1/chat/completions")
        assert [m.id async for m in v1.models.list()] == ["gpt-4o-2024-11-20", "te3"]
    with pytest.raises(openai.NotFoundError) as unknown:
        await azure.chat.completions.create(model="nope", messages=USER)
    assert unknown.value.code == "DeploymentNotFound"
    azure_peer.fail_next(1, 429, retry_after=1)
    with pytest.raises(openai.RateLimitError) as limited:
        await azure.chat.completions.create(model="chat-deploy", messages=USER)
    assert limited.value.code == "429" and limited.value.response.headers["retry-after-ms"] == "1000"
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=azure_peer.url, api_key="wrong", api_version=AZURE_VERSION, max_retries=0
    )
    async with client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="chat-deploy", messages=USER)
    assert denied.value.code == "401" and "Access denied" in denied.value.message
    no_version = await raw_post(
        f"{azure_peer.url}/openai/deployments/chat-deploy/chat/completions",
        {"messages": USER},
        {"api-key": azure_peer.api_key},
    )
    assert no_version.status_code == 404 and no_version.json() == {
        "error": {"code": "404", "message": "Resource not found"}
    }


async def test_a_held_answer_does_not_hold_the_shutdown() -> None:
    """Leaving the block closes open exchanges: a test that never releases a hold still ends, and the
    client waiting on it sees a connection error."""
    outcomes: list[str] = []

    async def ask(client: openai.AsyncOpenAI) -> None:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
        except openai.APIConnectionError:
            outcomes.append("connection error")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks, serve_openai() as peer:
            client = openai.AsyncOpenAI(base_url=peer.url, api_key=peer.api_key, max_retries=0)
            hold = peer.hold_next()
            tasks.start_soon(ask, client)
            (request,) = await peer.wait_for_requests(1)
            await hold.reached.wait()
            assert request.path == "/v1/chat/completions" and request.outcome == "pending"
        await client.close()
    assert outcomes == ["connection error"]


async def test_malformed_http_gets_a_400(openai_peer: OpenAIStandIn) -> None:
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", openai_peer.port) as raw:
            await raw.send(b"NOT A REQUEST LINE\r\n\r\n")
            answer = b""
            while b"}" not in answer:
                answer += await raw.receive()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request" in answer
