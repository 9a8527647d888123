"""The LLM gateway through the real proxy (in-process) in front of the provider stand-ins, called with the
official openai and anthropic SDK clients: chat and streams passed through and translated both ways, keys kept
at the gateway, failover with ejection, refusals in the client's format, a cut stream charged to a budget."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import openai
import pytest

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.http.server import ProxyServer
from dataplane.llm.wire import DEFAULT_EVENT_CAP
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.peers.config import listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.policy.test_chain import RULE, jwt_authentication, policy, token
from tests.peers.llm_providers.script import Reply, ToolCall, Usage
from tests.peers.llm_providers.standins import serve_anthropic, serve_openai

pytestmark = pytest.mark.anyio

LLM = "default/llm"
CLIENT_TOKEN = "client-secret-token"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def provider(name: str, kind: int, port: int, key: str, **fields: Any) -> pb.LlmProvider:
    base = "/v1" if kind != pb.LlmProvider.TYPE_ANTHROPIC else ""
    return pb.LlmProvider(
        name=name, type=kind, address=pb.SocketAddress(host="127.0.0.1", port=port), api_key=key, base_path=base,
        **fields,
    )  # fmt: skip


def oa_provider(port: int) -> pb.LlmProvider:
    return provider("oa", pb.LlmProvider.TYPE_OPENAI, port, "sk-gw")


def an_provider(port: int) -> pb.LlmProvider:
    return provider("an", pb.LlmProvider.TYPE_ANTHROPIC, port, "sk-ant")


def config(port: int, *providers: pb.LlmProvider, policies: tuple[pb.Policy, ...] = (), **llm: Any) -> RuntimeConfig:
    messages: list[Any] = [
        listener(port),
        pb.Backend(name=LLM, llm=pb.LlmBackend(providers=providers, **llm)),
        route(RULE, backends=[(LLM, 1)]),
        *policies,
    ]
    kinds = {pb.Listener: LISTENER, pb.Backend: BACKEND, pb.Target: TARGET, pb.Route: ROUTE, pb.Policy: POLICY}
    resources: dict[str, dict[str, Any]] = {kind: {} for kind in kinds.values()}
    for message in messages:
        resources[kinds[type(message)]][message.name] = message
    return compile_config(resources, version="v1")


@asynccontextmanager
async def gateway(*providers: pb.LlmProvider, **options: Any) -> AsyncIterator[tuple[str, ProxyServer]]:
    port = free_port()
    async with running_proxy(config(port, *providers, **options)) as server:
        try:
            yield f"http://127.0.0.1:{port}", server
        finally:  # SDK clients close in this event loop
            while _CLIENTS:
                await _CLIENTS.pop().close()


_CLIENTS: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


def openai_client(base: str, key: str = CLIENT_TOKEN) -> openai.AsyncOpenAI:
    # A bounded client: a hung answer fails the test in 20 s (the SDKs wait 600 s by default).
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20.0)
    _CLIENTS.append(client)
    return client


def anthropic_client(base: str, key: str = CLIENT_TOKEN) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0, timeout=20.0)
    _CLIENTS.append(client)
    return client


async def test_chat_and_stream_through_an_openai_provider_with_the_gateway_key() -> None:
    async with serve_openai("sk-gw") as peer, gateway(oa_provider(peer.port)) as (base, _):
        client = openai_client(base)
        peer.script(Reply(text="hi back", usage=Usage(3, 2)))
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.choices[0].message.content == "hi back"
        assert completion.usage is not None and completion.usage.total_tokens == 5
        peer.script(Reply(text="one two three"))
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "one two three"
    first, second = peer.requests
    for recorded in (first, second):
        assert recorded.headers["authorization"] == "Bearer sk-gw"
        assert CLIENT_TOKEN not in str(recorded.headers)
    assert second.json["stream_options"] == {"include_usage": True}  # asked for usage by the gateway


async def test_the_usage_chunk_reaches_only_clients_that_asked_for_it_and_is_charged_either_way() -> None:
    """The gateway asks every OpenAI stream for usage; a client that did not ask never sees the
    extra chunk without choices (a client reading choices[0] would break on it)."""
    budget = pb.TokenBudget(name="daily", tokens=1000, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    charged = policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))
    async with serve_openai("sk-gw") as peer, gateway(oa_provider(peer.port), policies=(charged,)) as (base, server):
        client = openai_client(base, key=token(sub="alice").decode())
        chunks: dict[bool, list[Any]] = {}
        for asked in (False, True):
            peer.script(Reply(text="one two three", usage=Usage(10, 3)))
            options: Any = {"include_usage": True} if asked else openai.NOT_GIVEN
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, stream_options=options
            )
            chunks[asked] = [chunk async for chunk in stream]
        chain = server._handler._policy_table.for_request(f"{listener(0).name}", RULE, LLM)
        assert chain is not None
        remaining = chain.budgets[0].limiter.status("alice").remaining  # type: ignore[attr-defined]
    assert all(chunk.choices for chunk in chunks[False])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[False]) == "one two three"
    (last,) = [chunk for chunk in chunks[True] if not chunk.choices]
    assert last.usage is not None and last.usage.total_tokens == 13
    assert remaining == 1000 - 2 * 13  # both streams charged


async def test_a_passed_through_event_past_the_cap_ends_the_stream_with_an_error() -> None:
    """A provider event is held until it is whole, so one event is bounded (1 MiB)."""
    async with serve_openai("sk-gw") as peer, gateway(oa_provider(peer.port)) as (base, _):
        peer.script(Reply(text="big", pieces=["x" * (2 * DEFAULT_EVENT_CAP)]))
        stream = await openai_client(base).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as failed:
            async for _ in stream:
                pass
    assert "larger than the gateway accepts" in str(failed.value)


async def test_the_openai_client_through_an_anthropic_provider_translated() -> None:
    async with serve_anthropic("sk-ant") as peer, gateway(an_provider(peer.port)) as (base, _):
        client = openai_client(base)
        peer.script(Reply(text="bonjour", usage=Usage(4, 1)))
        completion = await client.chat.completions.create(
            model="claude-x", messages=[{"role": "system", "content": "be brief"}, *MESSAGES]
        )
        assert completion.choices[0].message.content == "bonjour"
        assert completion.usage is not None and completion.usage.prompt_tokens == 4
        peer.script(Reply(tool_calls=[ToolCall("lookup", {"q": "x"})]))
        tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        completion = await client.chat.completions.create(model="claude-x", messages=MESSAGES, tools=tools)
        call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert (call.function.name, call.function.arguments, completion.choices[0].finish_reason) == (  # type: ignore[union-attr]
            "lookup", '{"q":"x"}', "tool_calls",
        )  # fmt: skip
        peer.script(Reply(text="a b c"))
        stream = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "a b c"
    first = peer.requests[0]
    assert first.path == "/v1/messages" and first.json["system"] == "be brief"
    assert first.headers["x-api-key"] == "sk-ant" and "authorization" not in first.headers


async def test_the_anthropic_client_through_an_openai_provider() -> None:
    async with serve_openai("sk-gw") as peer, gateway(oa_provider(peer.port)) as (base, _):
        client = anthropic_client(base)
        peer.script(Reply(text="hey", usage=Usage(2, 1)))
        message = await client.messages.create(model="gpt-4o", max_tokens=50, messages=MESSAGES)
        assert message.content[0].text == "hey"  # type: ignore[union-attr]
        assert message.usage.input_tokens == 2
        peer.script(Reply(text="x y"))
        async with client.messages.stream(model="gpt-4o", max_tokens=50, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
        assert text == "x y"
    assert peer.requests[0].path == "/v1/chat/completions"
    assert peer.requests[0].headers["authorization"] == "Bearer sk-gw"
    assert "x-api-key" not in peer.requests[0].headers


@pytest.mark.parametrize("status", [503, 429])
async def test_failover_to_the_next_provider_and_the_first_is_ejected(status: int) -> None:
    async with serve_openai("k1") as first, serve_openai("k2") as second:
        providers = (
            provider("one", pb.LlmProvider.TYPE_OPENAI, first.port, "k1", priority=0),
            provider("two", pb.LlmProvider.TYPE_OPENAI, second.port, "k2", priority=1),
        )
        async with gateway(*providers, failover=pb.LlmFailover(consecutive_failures=1)) as (base, _):
            client = openai_client(base)
            first.fail_next(1, status)
            second.script(Reply(text="from two"), Reply(text="again two"))
            answer = await client.chat.completions.create(model="m", messages=MESSAGES)
            assert answer.choices[0].message.content == "from two"
            answer = await client.chat.completions.create(model="m", messages=MESSAGES)
            assert answer.choices[0].message.content == "again two"
    assert len(first.requests) == 1 and len(second.requests) == 2  # the first was ejected for the second request


async def test_refusals_in_the_clients_format() -> None:
    async with serve_openai("sk") as peer:
        oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "sk", models=["gpt-4o"])
        async with gateway(oa) as (base, _):
            with pytest.raises(openai.NotFoundError) as not_found:
                await openai_client(base).chat.completions.create(model="nope", messages=MESSAGES)
            assert not_found.value.code == "model_not_found"
            with pytest.raises(anthropic.NotFoundError) as not_found_anthropic:
                await anthropic_client(base).messages.create(model="nope", max_tokens=5, messages=MESSAGES)
            assert not_found_anthropic.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
            async with httpx.AsyncClient() as http:
                bad = await http.post(f"{base}/v1/chat/completions", content=b"{not json")
                bad_anthropic = await http.post(f"{base}/v1/messages", content=b"[1,")
                no_model = await http.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES})
                not_json = [  # Python's parser takes these; JSON has no such values
                    await http.post(f"{base}/v1/chat/completions", content=b'{"model":"gpt-4o","temperature":' + v)
                    for v in (b"NaN}", b"Infinity}", b"1e400}")
                ]
                nested = await http.post(f"{base}/v1/chat/completions", content=b"[" * 100_000)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert [(r.status_code, r.json()["error"]["code"]) for r in not_json] == [(400, "invalid_json")] * 3
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "invalid_json"
    assert bad_anthropic.status_code == 400 and bad_anthropic.json()["type"] == "error"
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert peer.requests == []


async def test_models_lists_served_models_and_aliases() -> None:
    async with serve_openai("sk") as peer:
        oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "sk", models=["gpt-4o"])
        aliases = [pb.LlmModelAlias(name="smart", models=["gpt-4o"])]
        async with gateway(oa, aliases=aliases) as (base, _):
            listed = [model.id async for model in openai_client(base).models.list()]
            peer.script(Reply(text="via alias"))
            answer = await openai_client(base).chat.completions.create(model="smart", messages=MESSAGES)
    assert listed == ["gpt-4o", "smart"]
    assert answer.choices[0].message.content == "via alias" and peer.requests[0].json["model"] == "gpt-4o"


async def test_a_cut_stream_ends_cleanly_and_its_usage_so_far_is_charged() -> None:
    budget = pb.TokenBudget(name="daily", tokens=1000, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    charged = policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))
    async with serve_anthropic("sk-ant") as peer:
        an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, peer.port, "sk-ant")
        async with gateway(an, policies=(charged,)) as (base, server):
            client = openai_client(base, key=token(sub="alice").decode())
            peer.script(Reply(text="one two three four five six", usage=Usage(40, 6)))
            peer.cut_next(after_events=3)
            stream = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
            seen: list[str] = []
            with pytest.raises(openai.APIError) as cut:
                async for chunk in stream:
                    seen += [chunk.choices[0].delta.content or ""] if chunk.choices else []
            chain = server._handler._policy_table.for_request(f"{listener(0).name}", RULE, LLM)
            assert chain is not None
            remaining = chain.budgets[0].limiter.status("alice").remaining  # type: ignore[attr-defined]
    assert "ended before the answer was complete" in str(cut.value)
    assert remaining == 1000 - 41  # message_start's usage (40 in, 1 out), seen before the cut


def test_a_passed_through_stream_is_written_up_to_its_last_whole_event() -> None:
    from dataplane.llm.handler import _events_end

    assert _events_end(b"") == _events_end(b"data: {") == _events_end(b"data: x\n") == 0
    assert _events_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert _events_end(b"data: a\r\n\r\ndata: b\n") == len(b"data: a\r\n\r\n")
