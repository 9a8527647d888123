"""The LLM gateway's provider shapes through the real proxy (in-process), called with the official
openai and anthropic SDK clients: Azure OpenAI (deployment paths, api-version, its api-key header,
its v1 API), embeddings (OpenAI, Azure, refused for Anthropic), OpenAI-compatible servers with and
without a key, aliases per provider type, and provider errors (400, 429 with Retry-After) reaching
each client as its own SDK's exception. Assertions read what the stand-ins recorded, so the wire
shape each provider gets is checked, not only the client's view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest

from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.dataplane.llm.test_gateway import (
    CLIENT_TOKEN,
    LLM,
    MESSAGES,
    an_provider,
    anthropic_client,
    gateway,
    oa_provider,
    openai_client,
    provider,
)
from tests.dataplane.peers.config import listener
from tests.dataplane.policy.test_chain import RULE, jwt_authentication, policy, token
from tests.peers.llm_providers._http import RecordedRequest
from tests.peers.llm_providers.script import Reply, Usage
from tests.peers.llm_providers.standins import (
    OpenAIStandIn,
    ProviderStandIn,
    serve_anthropic,
    serve_azure_openai,
    serve_openai,
)

pytestmark = pytest.mark.anyio

API_VERSION = "2024-10-21"
AZURE_KEY = "azure-gw-key"


def az_provider(port: int, deployments: dict[str, str], **fields: Any) -> pb.LlmProvider:
    """An Azure OpenAI provider: model -> deployment, paths from the resource root (no /v1)."""
    mapped = [pb.LlmAzureDeployment(model=m, deployment=d) for m, d in sorted(deployments.items())]
    built = provider(
        "az", pb.LlmProvider.TYPE_AZURE_OPENAI, port, AZURE_KEY,
        azure=pb.LlmAzure(api_version=API_VERSION, deployments=mapped), **fields,
    )  # fmt: skip
    built.base_path = ""
    return built


def compat_provider(port: int, key: str = "", **fields: Any) -> pb.LlmProvider:
    return provider("local", pb.LlmProvider.TYPE_OPENAI_COMPATIBLE, port, key, **fields)


class KeylessOpenAICompatible(OpenAIStandIn):
    """An OpenAI-compatible server started without a key (vLLM without --api-key, Ollama): it takes
    any request, so what matters is what the gateway sends it."""

    provider = "openai-compatible"

    def _check_credentials(self, request: RecordedRequest) -> None:
        return None


@asynccontextmanager
async def serve_keyless() -> AsyncIterator[KeylessOpenAICompatible]:
    peer = KeylessOpenAICompatible("")
    async with peer.serve():
        yield peer


def assert_only_gateway_credential(recorded: RecordedRequest, name: str, value: str) -> None:
    """The provider got the gateway's credential in its own header and nothing of the client's."""
    assert recorded.headers[name] == value
    others = {"authorization", "x-api-key", "api-key"} - {name}
    assert not others & set(recorded.headers), recorded.headers
    assert CLIENT_TOKEN not in str(recorded.headers)


async def stream_text(stream: Any) -> str:
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


# ---------------------------------------------------------------- Azure OpenAI


async def test_azure_chat_and_stream_with_the_openai_client() -> None:
    async with (
        serve_azure_openai(AZURE_KEY, deployments={"prod-4o": "gpt-4o"}) as peer,
        gateway(az_provider(peer.port, {"gpt-4o": "prod-4o"})) as (base, _),
    ):
        client = openai_client(base)
        peer.script(Reply(text="hi from azure", usage=Usage(3, 3)))
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        peer.script(Reply(text="streamed from azure"))
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = await stream_text(stream)
    assert completion.choices[0].message.content == "hi from azure"
    assert completion.model == "gpt-4o" and completion.usage is not None and completion.usage.total_tokens == 6
    assert text == "streamed from azure"  # Azure's choice-less prompt-filter chunk passed through harmlessly
    first, second = peer.requests
    for recorded in (first, second):
        assert recorded.path == "/openai/deployments/prod-4o/chat/completions"
        assert recorded.query == {"api-version": API_VERSION}
        assert_only_gateway_credential(recorded, "api-key", AZURE_KEY)
    assert second.json["stream"] is True and second.json["stream_options"] == {"include_usage": True}


async def test_the_anthropic_client_through_an_azure_provider_translated() -> None:
    async with (
        serve_azure_openai(AZURE_KEY, deployments={"prod-4o": "gpt-4o"}) as peer,
        gateway(az_provider(peer.port, {"gpt-4o": "prod-4o"})) as (base, _),
    ):
        client = anthropic_client(base)
        peer.script(Reply(text="translated", usage=Usage(5, 1)))
        message = await client.messages.create(model="gpt-4o", max_tokens=40, system="terse", messages=MESSAGES)
        peer.script(Reply(text="s t r"))
        async with client.messages.stream(model="gpt-4o", max_tokens=40, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert message.content[0].text == "translated"  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 1)
    assert text == "s t r" and final.stop_reason == "end_turn"
    first, second = peer.requests
    for recorded in (first, second):
        assert recorded.path == "/openai/deployments/prod-4o/chat/completions"
        assert recorded.query == {"api-version": API_VERSION}
        assert_only_gateway_credential(recorded, "api-key", AZURE_KEY)
        assert recorded.json["max_completion_tokens"] == 40 and "max_tokens" not in recorded.json
    assert first.json["messages"][0] == {"role": "system", "content": "terse"}


async def test_azure_v1_api_as_an_openai_type_provider() -> None:
    """Azure's /openai/v1 API needs no api-version: an OpenAI-type provider with that base path, the
    key as a Bearer token, the body's model naming the deployment."""
    async with serve_azure_openai(
        AZURE_KEY, deployments={"prod-4o": "gpt-4o", "emb": "text-embedding-3-small"}
    ) as peer:
        azure_v1 = provider("azv1", pb.LlmProvider.TYPE_OPENAI, peer.port, AZURE_KEY)
        azure_v1.base_path = "/openai/v1"
        async with gateway(azure_v1) as (base, _):
            client = openai_client(base)
            peer.script(Reply(text="v1 answer"))
            completion = await client.chat.completions.create(model="prod-4o", messages=MESSAGES)
            vectors = await client.embeddings.create(model="emb", input="embed me")
    assert completion.choices[0].message.content == "v1 answer" and completion.model == "gpt-4o"
    assert vectors.model == "text-embedding-3-small" and len(vectors.data) == 1
    chat, embed = peer.requests
    assert (chat.path, chat.query, chat.json["model"]) == ("/openai/v1/chat/completions", {}, "prod-4o")
    assert (embed.path, embed.query, embed.json["model"]) == ("/openai/v1/embeddings", {}, "emb")
    for recorded in (chat, embed):
        assert_only_gateway_credential(recorded, "authorization", f"Bearer {AZURE_KEY}")


# ---------------------------------------------------------------- embeddings


async def test_openai_embeddings_of_a_string_and_a_list_and_their_usage_is_charged() -> None:
    budget = pb.TokenBudget(name="daily", tokens=1000, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    charged = policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))
    async with (
        serve_openai("sk-gw", embedding_dimensions=4) as peer,
        gateway(oa_provider(peer.port), policies=(charged,)) as (base, server),
    ):
        client = openai_client(base, key=token(sub="alice").decode())
        one = await client.embeddings.create(model="text-embedding-3-small", input="three little words")
        many = await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c d e f"])
        # Requests on one connection are served one at a time: once this answer is in, both
        # embeddings requests have been settled (charged), whatever the scheduling.
        [_ async for _ in client.models.list()]
        chain = server._handler._policy_table.for_request(f"{listener(0).name}", RULE, LLM)
        assert chain is not None
        remaining = chain.budgets[0].limiter.status("alice").remaining  # type: ignore[attr-defined]
    assert [len(item.embedding) for item in one.data] == [4]
    assert [item.index for item in many.data] == [0, 1] and all(len(i.embedding) == 4 for i in many.data)
    assert (one.usage.prompt_tokens, one.usage.total_tokens) == (3, 3)
    assert (many.usage.prompt_tokens, many.usage.total_tokens) == (6, 6)
    assert remaining == 1000 - 3 - 6  # the gateway read each answer's usage
    first, second = peer.requests
    assert first.path == second.path == "/v1/embeddings"
    assert (first.json["input"], second.json["input"]) == ("three little words", ["a b", "c d e f"])
    assert_only_gateway_credential(first, "authorization", "Bearer sk-gw")


async def test_azure_embeddings_go_to_the_deployment() -> None:
    async with (
        serve_azure_openai(AZURE_KEY, deployments={"emb-small": "text-embedding-3-small"}) as peer,
        gateway(az_provider(peer.port, {"text-embedding-3-small": "emb-small"})) as (base, _),
    ):
        client = openai_client(base)
        vectors = await client.embeddings.create(model="text-embedding-3-small", input=["x", "y z"])
    assert vectors.model == "text-embedding-3-small" and len(vectors.data) == 2
    assert vectors.usage.prompt_tokens == 3
    recorded = peer.last_request
    assert recorded.path == "/openai/deployments/emb-small/embeddings"
    assert recorded.query == {"api-version": API_VERSION}
    assert_only_gateway_credential(recorded, "api-key", AZURE_KEY)


async def test_embeddings_of_an_anthropic_only_backend_are_a_clear_client_error() -> None:
    async with serve_anthropic("sk-ant") as peer, gateway(an_provider(peer.port)) as (base, _):
        with pytest.raises(openai.NotFoundError) as refused:
            await openai_client(base).embeddings.create(model="claude-x", input="hello")
    assert refused.value.status_code == 404 and refused.value.code == "model_not_found"
    assert "claude-x" in refused.value.message
    assert peer.requests == []  # Anthropic has no embeddings API: nothing was sent


async def test_embeddings_skip_anthropic_providers_of_a_mixed_backend() -> None:
    async with serve_anthropic("sk-ant") as an_peer, serve_openai("sk-gw") as oa_peer:
        first = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, an_peer.port, "sk-ant", priority=0)
        second = provider("oa", pb.LlmProvider.TYPE_OPENAI, oa_peer.port, "sk-gw", priority=1)
        async with gateway(first, second) as (base, _):
            client = openai_client(base)
            vectors = await client.embeddings.create(model="any-model", input="hello")
            an_peer.script(Reply(text="chat still goes first to anthropic"))
            chat = await client.chat.completions.create(model="any-model", messages=MESSAGES)
    assert len(vectors.data) == 1 and chat.choices[0].message.content == "chat still goes first to anthropic"
    assert [r.path for r in oa_peer.requests] == ["/v1/embeddings"]
    assert [r.path for r in an_peer.requests] == ["/v1/messages"]


# ---------------------------------------------------------------- OpenAI-compatible servers


async def test_an_openai_compatible_server_with_a_key_and_both_clients() -> None:
    extra = [pb.HttpHeader(name="x-tenant", value="team-a")]
    async with (
        serve_openai("vllm-key") as peer,
        gateway(compat_provider(peer.port, "vllm-key", headers=extra)) as (base, _),
    ):
        peer.script(Reply(text="from vllm", usage=Usage(2, 2)))
        completion = await openai_client(base).chat.completions.create(model="llama-3", messages=MESSAGES)
        peer.script(Reply(text="translated from vllm", usage=Usage(2, 3)))
        message = await anthropic_client(base).messages.create(model="llama-3", max_tokens=64, messages=MESSAGES)
        peer.script(Reply(text="p q"))
        async with anthropic_client(base).messages.stream(model="llama-3", max_tokens=8, messages=MESSAGES) as s:
            text = "".join([piece async for piece in s.text_stream])
    assert completion.choices[0].message.content == "from vllm"
    assert message.content[0].text == "translated from vllm" and message.usage.output_tokens == 3  # type: ignore[union-attr]
    assert text == "p q"
    _, translated, streamed = peer.requests
    for recorded in peer.requests:
        assert recorded.path == "/v1/chat/completions" and recorded.headers["x-tenant"] == "team-a"
        assert_only_gateway_credential(recorded, "authorization", "Bearer vllm-key")
    for recorded, limit in ((translated, 64), (streamed, 8)):  # this type takes the classic field
        assert recorded.json["max_tokens"] == limit and "max_completion_tokens" not in recorded.json
    assert streamed.json["stream_options"] == {"include_usage": True}


async def test_an_openai_compatible_server_without_a_key_gets_no_credential() -> None:
    async with serve_keyless() as peer, gateway(compat_provider(peer.port)) as (base, _):
        peer.script(Reply(text="ollama says hi"), Reply(text="o k"))
        completion = await openai_client(base).chat.completions.create(model="qwen2.5", messages=MESSAGES)
        stream = await openai_client(base).chat.completions.create(model="qwen2.5", messages=MESSAGES, stream=True)
        text = await stream_text(stream)
        vectors = await openai_client(base).embeddings.create(model="nomic-embed", input="hello")
    assert completion.choices[0].message.content == "ollama says hi" and text == "o k" and len(vectors.data) == 1
    assert [r.path for r in peer.requests] == ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings"]
    for recorded in peer.requests:
        assert not {"authorization", "x-api-key", "api-key"} & set(recorded.headers)
        assert CLIENT_TOKEN not in str(recorded.headers)


# ---------------------------------------------------------------- aliases per provider type


@asynccontextmanager
async def standin_for(kind: str, served_model: str) -> AsyncIterator[tuple[ProviderStandIn, pb.LlmProvider]]:
    """A stand-in of `kind` and the provider config pointing at it, serving `served_model` only."""
    if kind == "anthropic":
        async with serve_anthropic("sk-ant", models=[served_model]) as an_peer:
            yield an_peer, an_provider(an_peer.port)
    elif kind == "azure":
        async with serve_azure_openai(AZURE_KEY, deployments={"the-deployment": served_model}) as az_peer:
            yield az_peer, az_provider(az_peer.port, {served_model: "the-deployment"})
    else:
        async with serve_openai("sk-gw", models=[served_model]) as oa_peer:
            kinds = {"openai": pb.LlmProvider.TYPE_OPENAI, "openai_compatible": pb.LlmProvider.TYPE_OPENAI_COMPATIBLE}
            yield oa_peer, provider("p", kinds[kind], oa_peer.port, "sk-gw")


@pytest.mark.parametrize("kind", ["openai", "anthropic", "azure", "openai_compatible"])
async def test_an_alias_resolves_to_the_provider_model(kind: str) -> None:
    async with standin_for(kind, "real-model") as (peer, configured):
        aliases = [pb.LlmModelAlias(name="smart", models=["real-model"])]
        async with gateway(configured, aliases=aliases) as (base, _):
            peer.script(Reply(text="via alias"), Reply(text="via alias too"))
            completion = await openai_client(base).chat.completions.create(model="smart", messages=MESSAGES)
            message = await anthropic_client(base).messages.create(model="smart", max_tokens=9, messages=MESSAGES)
    assert completion.choices[0].message.content == "via alias"
    assert message.content[0].text == "via alias too"  # type: ignore[union-attr]
    assert len(peer.requests) == 2
    for recorded in peer.requests:
        assert recorded.json["model"] == "real-model"
        if kind == "azure":
            assert recorded.path == "/openai/deployments/the-deployment/chat/completions"


async def test_an_alias_fails_over_across_provider_types() -> None:
    """An alias of an Anthropic model then an OpenAI one: the overloaded first provider's turn is
    taken by the second, each asked for its own model."""
    async with serve_anthropic("sk-ant") as an_peer, serve_openai("sk-gw") as oa_peer:
        an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, an_peer.port, "sk-ant", models=["claude-x"])
        oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, oa_peer.port, "sk-gw", models=["gpt-4o"])
        aliases = [pb.LlmModelAlias(name="smart", models=["claude-x", "gpt-4o"])]
        async with gateway(an, oa, aliases=aliases) as (base, _):
            an_peer.fail_next(1, 529)
            oa_peer.script(Reply(text="the second model answered"))
            message = await anthropic_client(base).messages.create(model="smart", max_tokens=9, messages=MESSAGES)
    assert message.content[0].text == "the second model answered"  # type: ignore[union-attr]
    assert an_peer.last_request.json["model"] == "claude-x" and oa_peer.last_request.json["model"] == "gpt-4o"


# ---------------------------------------------------------------- provider errors


async def _openai_chat(base: str) -> Any:
    return await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)


async def _anthropic_messages(base: str) -> Any:
    return await anthropic_client(base).messages.create(model="m", max_tokens=9, messages=MESSAGES)


@pytest.mark.parametrize("kind", ["openai", "anthropic", "azure"])
async def test_a_providers_400_reaches_each_client_as_its_bad_request_error(kind: str) -> None:
    wording = "Invalid value for 'temperature': must be at most 2."
    async with standin_for(kind, "m") as (peer, configured), gateway(configured) as (base, _):
        peer.fail_next(2, 400, message=wording)
        with pytest.raises(openai.BadRequestError) as from_openai:
            await _openai_chat(base)
        with pytest.raises(anthropic.BadRequestError) as from_anthropic:
            await _anthropic_messages(base)
    assert from_openai.value.status_code == 400 and wording in from_openai.value.message
    assert from_openai.value.type == "invalid_request_error"
    assert from_anthropic.value.status_code == 400
    body: Any = from_anthropic.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert wording in body["error"]["message"]
    assert len(peer.requests) == 2  # a 400 is the request's fault: no other try


@pytest.mark.parametrize("kind", ["openai", "anthropic", "azure"])
async def test_a_429_of_the_only_provider_keeps_its_retry_after(kind: str) -> None:
    async with standin_for(kind, "m") as (peer, configured), gateway(configured) as (base, _):
        peer.fail_next(2, 429, retry_after=7, message="Rate limit reached for requests")
        with pytest.raises(openai.RateLimitError) as from_openai:
            await _openai_chat(base)
        with pytest.raises(anthropic.RateLimitError) as from_anthropic:
            await _anthropic_messages(base)
    for error in (from_openai.value, from_anthropic.value):
        assert error.status_code == 429
        assert error.response.headers["retry-after"] == "7"
        assert error.response.headers["retry-after-ms"] == "7000"
        assert "Rate limit reached for requests" in error.message
    body: Any = from_anthropic.value.body
    assert body["error"]["type"] == "rate_limit_error"
    assert len(peer.requests) == 2


# ---------------------------------------------------------------- Anthropic, natively


async def test_the_anthropic_client_through_an_anthropic_provider_natively() -> None:
    async with serve_anthropic("sk-ant") as peer, gateway(an_provider(peer.port)) as (base, _):
        client = anthropic_client(base)
        peer.script(Reply(text="native", usage=Usage(6, 1)))
        beta = {"anthropic-beta": "prompt-caching-2024-07-31"}
        message = await client.messages.create(model="claude-x", max_tokens=30, messages=MESSAGES, extra_headers=beta)
        peer.script(Reply(text="n a t"))
        async with client.messages.stream(model="claude-x", max_tokens=30, messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert message.content[0].text == "native" and message.usage.input_tokens == 6  # type: ignore[union-attr]
    assert text == "n a t" and final.usage.output_tokens > 0
    first, second = peer.requests
    for recorded in (first, second):
        assert recorded.path == "/v1/messages" and recorded.headers["anthropic-version"] == "2023-06-01"
        assert_only_gateway_credential(recorded, "x-api-key", "sk-ant")
    assert first.headers["anthropic-beta"] == "prompt-caching-2024-07-31" and first.json["max_tokens"] == 30
    assert second.json["stream"] is True
