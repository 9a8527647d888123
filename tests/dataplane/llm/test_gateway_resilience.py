"""The LLM gateway under a policy's timeouts and retries, and its usage estimate, through the real proxy
with the official SDK clients in front of the provider stand-ins: a provider that answers too late is
left for the next one, a round where every provider failed is run again only as the policy says, a
request past its deadline or a stream gone idle ends in the client's format, a provider that reports
no usage is charged an estimate, and large answers pass through without being held."""

from __future__ import annotations

from typing import Any

import anyio
import openai
import pytest

from dataplane.config.policy import RetrySettings
from dataplane.llm import handler as llm_handler
from dataplane.llm.errors import gateway_error
from dataplane.llm.handler import _Failure, _retry_delay
from dataplane.policy.resilience import RetryState
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.dataplane.llm.test_gateway import LLM, MESSAGES, config, gateway, openai_client, provider
from tests.dataplane.peers.config import listener
from tests.dataplane.policy.test_chain import RULE, jwt_authentication, policy, seconds, token
from tests.peers.llm_providers.script import Reply, Usage
from tests.peers.llm_providers.standins import serve_anthropic, serve_openai

pytestmark = pytest.mark.anyio

# Bounds every test: a hang fails instead of stalling the suite.
WITHIN = 20.0


def two_providers(first: int, second: int) -> tuple[pb.LlmProvider, pb.LlmProvider]:
    return (
        provider("one", pb.LlmProvider.TYPE_OPENAI, first, "k1", priority=0),
        provider("two", pb.LlmProvider.TYPE_OPENAI, second, "k2", priority=1),
    )


def resilience(**fields: Any) -> pb.Policy:
    return policy("default/resilience", resilience=pb.Resilience(**fields))


def retry(attempts: int, *on: int, backoff: float = 0.01) -> pb.Retry:
    return pb.Retry(attempts=attempts, on=list(on), backoff_base=seconds(backoff), backoff_max=seconds(backoff))


async def test_a_provider_slower_than_the_per_try_timeout_is_left_for_the_next() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_openai("k1") as first, serve_openai("k2") as second:
            bounded = resilience(per_try_timeout=seconds(0.3))
            async with gateway(*two_providers(first.port, second.port), policies=(bounded,)) as (base, server):
                hold = first.hold_next()
                second.script(Reply(text="from two"))
                try:
                    answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
                finally:
                    hold.release()
                health = server._handler.llm.health(LLM)
    assert answer.choices[0].message.content == "from two"
    assert hold.reached.is_set() and len(second.requests) == 1
    assert health.failures("one") == 1  # the slow try counts against its provider


async def test_the_only_provider_slower_than_the_per_try_timeout_gives_504() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_openai("k1") as peer:
            bounded = resilience(per_try_timeout=seconds(0.2))
            oa = provider("one", pb.LlmProvider.TYPE_OPENAI, peer.port, "k1")
            async with gateway(oa, policies=(bounded,)) as (base, _):
                hold = peer.hold_next()
                try:
                    with pytest.raises(openai.APIStatusError) as failed:
                        await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
                finally:
                    hold.release()
    assert failed.value.status_code == 504
    assert "sent no response within 0.2s" in failed.value.message


@pytest.mark.parametrize("with_retry", [True, False])
async def test_a_round_of_failures_is_retried_only_as_the_policy_says(with_retry: bool) -> None:
    policies = (resilience(retry=retry(2, pb.Retry.ON_5XX)),) if with_retry else ()
    with anyio.fail_after(WITHIN):
        async with (
            serve_openai("k1") as first,
            serve_openai("k2") as second,
            gateway(*two_providers(first.port, second.port), policies=policies) as (base, _),
        ):
            client = openai_client(base)
            first.fail_next(1, 503)
            second.fail_next(1, 502)
            first.script(Reply(text="second round"))
            if with_retry:
                answer = await client.chat.completions.create(model="m", messages=MESSAGES)
                assert answer.choices[0].message.content == "second round"
            else:
                with pytest.raises(openai.APIStatusError) as failed:
                    await client.chat.completions.create(model="m", messages=MESSAGES)
                assert failed.value.status_code == 502  # the last provider's error, in OpenAI's shape
    assert len(first.requests) == (2 if with_retry else 1) and len(second.requests) == 1


async def test_a_429_is_retried_after_its_retry_after_only_when_that_is_short() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_openai("k1") as peer:
            oa = provider("one", pb.LlmProvider.TYPE_OPENAI, peer.port, "k1")
            policies = (resilience(retry=retry(1, pb.Retry.ON_5XX, backoff=0.5)),)
            async with gateway(oa, policies=policies) as (base, _):
                client = openai_client(base)
                peer.fail_next(1, 429, retry_after=0.1)
                peer.script(Reply(text="after the wait"))
                answer = await client.chat.completions.create(model="m", messages=MESSAGES)
                assert answer.choices[0].message.content == "after the wait"
                peer.fail_next(1, 429, retry_after=30)
                with pytest.raises(openai.RateLimitError) as limited:
                    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "30"  # passed on at once, not waited out
    assert len(peer.requests) == 3


async def test_the_request_timeout_ends_a_waiting_request_and_a_stream_in_the_clients_format() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_openai("k1") as peer:
            oa = provider("one", pb.LlmProvider.TYPE_OPENAI, peer.port, "k1")
            # Long enough for the stream's first events to arrive on a loaded machine; the holds make
            # the deadline, not the provider, end both requests.
            async with gateway(oa, policies=(resilience(request_timeout=seconds(2.0)),)) as (base, _):
                client = openai_client(base)
                hold = peer.hold_next()
                try:
                    with pytest.raises(openai.APIStatusError) as waited:
                        await client.chat.completions.create(model="m", messages=MESSAGES)
                finally:
                    hold.release()
                peer.script(Reply(text="one two three four"))
                hold = peer.hold_next(after_events=2)
                seen: list[str] = []
                try:
                    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                    with pytest.raises(openai.APIError) as cut:
                        async for chunk in stream:
                            seen += [chunk.choices[0].delta.content or ""] if chunk.choices else []
                finally:
                    hold.release()
    assert waited.value.status_code == 504 and waited.value.code == "timeout"
    assert "timed out" in str(cut.value) and seen  # what came before the deadline was delivered


async def test_a_stream_idle_past_the_policy_is_cut_with_an_error_event() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_anthropic("sk") as peer:
            an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, peer.port, "sk")
            async with gateway(an, policies=(resilience(stream_idle_timeout=seconds(0.3)),)) as (base, _):
                peer.script(Reply(text="one two three", usage=Usage(5, 3)))
                hold = peer.hold_next(after_events=3)
                try:
                    stream = await openai_client(base).chat.completions.create(
                        model="claude-x", messages=MESSAGES, stream=True
                    )
                    with pytest.raises(openai.APIError) as cut:
                        async for _ in stream:
                            pass
                finally:
                    hold.release()
    assert "ended before the answer was complete" in str(cut.value)


def budget_policy() -> pb.Policy:
    budget = pb.TokenBudget(name="daily", tokens=10_000, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    return policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))


def remaining(server: Any) -> int:
    chain = server._handler._policy_table.for_request(f"{listener(0).name}", RULE, LLM)
    return int(chain.budgets[0].limiter.status("alice").remaining)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_reporting_no_usage_is_charged_an_estimate_of_input_and_output(stream: bool) -> None:
    long_answer = " ".join(["word"] * 40)
    with anyio.fail_after(WITHIN):
        async with serve_openai("k") as peer:
            peer.omit_usage = True
            compatible = provider("vllm", pb.LlmProvider.TYPE_OPENAI_COMPATIBLE, peer.port, "k")
            async with gateway(compatible, policies=(budget_policy(),)) as (base, server):
                client = openai_client(base, key=token(sub="alice").decode())
                peer.script(Reply(text=long_answer))
                if stream:
                    chunks = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
                else:
                    answer = await client.chat.completions.create(model="m", messages=MESSAGES)
                    text = answer.choices[0].message.content or ""
                    assert answer.usage is None  # passed through as the provider sent it
                await client.models.list()  # same connection: the charge above has been made
                left = remaining(server)
    assert text == long_answer
    # Input: priming 3 + one message 3 + "hello there" 2; output: 40 words and 39 spaces, about 40.
    charged = 10_000 - left
    assert 8 + 35 <= charged <= 8 + 45, charged


async def test_large_answers_pass_through_whole_and_their_usage_is_read() -> None:
    inputs = [f"text number {n}" for n in range(400)]  # about 1.5 MB of floats
    with anyio.fail_after(WITHIN):
        async with serve_openai("k") as peer:
            oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "k")
            async with gateway(oa, policies=(budget_policy(),)) as (base, server):
                client = openai_client(base, key=token(sub="alice").decode())
                answer = await client.embeddings.create(model="text-embedding-3-small", input=inputs)
                await client.models.list()
                left = remaining(server)
    assert [item.index for item in answer.data] == list(range(400))
    assert answer.usage.prompt_tokens > 0 and 10_000 - left == answer.usage.total_tokens


async def test_a_translated_answer_over_the_cap_is_a_502_in_the_clients_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(llm_handler, "MAX_TRANSLATED_ANSWER", 64)
    with anyio.fail_after(WITHIN):
        async with serve_anthropic("sk") as peer:
            an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, peer.port, "sk")
            async with gateway(an) as (base, _):
                peer.script(Reply(text=" ".join(["long"] * 200)))
                with pytest.raises(openai.APIStatusError) as failed:
                    await openai_client(base).chat.completions.create(model="claude-x", messages=MESSAGES)
    assert failed.value.status_code == 502 and "too large to translate" in failed.value.message


# --- the retry decision, without sockets -------------------------------------------------------------


def failure(cause: Any, retry_after: float | None = None) -> _Failure:
    return _Failure(cause, gateway_error("openai", 503, "x"), retry_after)


def state(attempts: int = 1, deadline: float | None = None) -> RetryState:
    settings = RetrySettings(attempts, backoff_base=0.1, backoff_max=1.0, on=frozenset({"5xx"}))
    return RetryState(settings, deadline=deadline, rand=lambda: 0.5)


def test_retry_delay_follows_the_policy() -> None:
    assert _retry_delay(state(), failure(503), 0.0) == pytest.approx(0.05)
    assert _retry_delay(state(), failure(400), 0.0) is None  # not a condition the policy names
    assert _retry_delay(state(0), failure(503), 0.0) is None  # no retries
    assert _retry_delay(RetryState(None), failure(503), 0.0) is None  # no policy
    spent = state()
    assert _retry_delay(spent, failure(503), 0.0) is not None
    assert _retry_delay(spent, failure(503), 0.0) is None  # one retry, used


def test_a_429_waits_its_retry_after_within_the_longest_backoff_and_the_deadline() -> None:
    assert _retry_delay(state(), failure(429), 0.0) == pytest.approx(0.05)
    assert _retry_delay(state(), failure(429, 0.8), 0.0) == pytest.approx(0.8)
    assert _retry_delay(state(), failure(429, 5.0), 0.0) is None  # longer than backoff_max
    assert _retry_delay(state(deadline=0.5), failure(429, 0.8), 0.0) is None  # past the deadline
    assert _retry_delay(state(), failure("connect-failure"), 0.0) == pytest.approx(0.05)  # 5xx covers it


async def test_a_config_update_keeps_the_providers_warm_connections() -> None:
    with anyio.fail_after(WITHIN):
        async with serve_openai("k") as peer:
            oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "k")
            async with gateway(oa) as (base, server):
                client = openai_client(base)
                await client.chat.completions.create(model="m", messages=MESSAGES)
                (before,) = [pool for pool in server.pools.pools() if "#llm/" in pool.cluster.name]
                port = int(base.rsplit(":", 1)[1])
                await server.apply(config(port, oa, max_request_bytes=1 << 20))  # a new config, same provider
                await client.chat.completions.create(model="m", messages=MESSAGES)
                (after,) = [pool for pool in server.pools.pools() if "#llm/" in pool.cluster.name]
                assert after is before and not before.closed


async def test_a_translated_stream_hands_its_provider_connection_back() -> None:
    """Anthropic's message_stop ends the client's stream before the provider's body ends: the
    gateway still reads that end so the next request reuses the connection."""
    with anyio.fail_after(WITHIN):
        async with serve_anthropic("k") as peer:
            an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, peer.port, "k")
            async with gateway(an) as (base, server):
                client = openai_client(base)
                for _ in range(3):
                    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
                    assert text.startswith("echo:")
                (pool,) = [pool for pool in server.pools.pools() if "#llm/" in pool.cluster.name]
                assert pool.connection_count == 1


async def test_a_request_one_provider_cannot_carry_goes_to_the_next_that_can() -> None:
    """`n: 2` has no Anthropic form: the failover list moves on to the OpenAI provider (the
    Anthropic one is not charged a failure); with no such provider the client gets the 400."""
    with anyio.fail_after(WITHIN):
        async with serve_anthropic("ka") as claude, serve_openai("ko") as gpt:
            an = provider("an", pb.LlmProvider.TYPE_ANTHROPIC, claude.port, "ka", priority=0)
            oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, gpt.port, "ko", priority=1)
            async with gateway(an, oa) as (base, server):
                gpt.script(Reply(text="two answers"))
                answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES, n=2)
                health = server._handler.llm.health(LLM)
            async with gateway(an) as (base, _):
                with pytest.raises(openai.BadRequestError) as refused:
                    await openai_client(base).chat.completions.create(model="m", messages=MESSAGES, n=2)
    assert answer.choices[0].message.content == "two answers"
    assert not claude.requests and len(gpt.requests) == 1 and health.failures("an") == 0
    assert "only one choice can be asked of an Anthropic model" in refused.value.message


async def test_a_provider_refusing_the_gateways_key_is_skipped_and_never_shown_to_the_client() -> None:
    """A 401/403 from a provider is about the gateway's key, not the client's: the next provider
    serves; with none left the client gets a 502 that names the provider but not the key."""
    with anyio.fail_after(WITHIN):
        async with serve_openai("k1") as first, serve_openai("k2") as second:
            wrong = provider("one", pb.LlmProvider.TYPE_OPENAI, first.port, "sk-wrong-0123456789", priority=0)
            right = provider("two", pb.LlmProvider.TYPE_OPENAI, second.port, "k2", priority=1)
            async with gateway(wrong, right) as (base, server):
                second.script(Reply(text="from two"))
                answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
                health = server._handler.llm.health(LLM)
            async with gateway(wrong) as (base, _):
                with pytest.raises(openai.APIStatusError) as refused:
                    await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "from two" and health.failures("one") == 1
    assert refused.value.status_code == 502
    assert "provider one refused the gateway's credentials (HTTP 401)" in refused.value.message
    assert "0123456789"[-4:] not in str(refused.value.body) and "sk-wrong" not in str(refused.value.body)
