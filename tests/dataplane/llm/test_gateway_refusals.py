"""Policy outcomes on LLM routes, as the SDKs see them and as the gateway records them: a request the
policy chain refuses (no credential, a spent budget) gets the refusal in the error format of the API
its client speaks, a model the `llm.model` rule denies is an authorization decision in the access
log and the authorization metric like any other, and the tokens a caller used are allocated to it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anthropic
import anyio
import openai
import pytest

from dataplane.observability.access_log import AccessLog, FileSink
from dataplane.observability.metrics import WorkerMetrics
from dataplane.observability.request import Observability
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.dataplane.llm.test_gateway import (
    LLM,
    MESSAGES,
    anthropic_client,
    gateway,
    openai_client,
    provider,
)
from tests.dataplane.policy.test_chain import jwt_authentication, policy, token
from tests.peers.llm_providers.script import Reply, Usage
from tests.peers.llm_providers.standins import serve_openai

pytestmark = pytest.mark.anyio

WITHIN = 20.0


async def test_policy_refusals_come_in_the_clients_error_format() -> None:
    budget = pb.TokenBudget(name="tiny", tokens=5, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    charged = policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))
    with anyio.fail_after(WITHIN):
        async with serve_openai("k") as peer:
            oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "k")
            async with gateway(oa, policies=(charged,)) as (base, _):
                with pytest.raises(openai.AuthenticationError) as no_token:
                    await openai_client(base, key="not-a-jwt").chat.completions.create(model="m", messages=MESSAGES)
                with pytest.raises(anthropic.AuthenticationError) as no_token_anthropic:
                    await anthropic_client(base, key="not-a-jwt").messages.create(
                        model="m", max_tokens=5, messages=MESSAGES
                    )
                alice = openai_client(base, key=token(sub="alice").decode())
                peer.script(Reply(text="spends the budget", usage=Usage(4, 3)))
                await alice.chat.completions.create(model="m", messages=MESSAGES)
                with pytest.raises(openai.RateLimitError) as spent:
                    await alice.chat.completions.create(model="m", messages=MESSAGES)
    body: Any = no_token.value.body
    assert no_token.value.code and body["message"]  # OpenAI's error object, parsed by the SDK
    assert no_token_anthropic.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert spent.value.code and "retry-after" in spent.value.response.headers
    assert len(peer.requests) == 1


async def test_a_denied_model_is_an_authorization_decision_in_the_access_log_and_metrics(tmp_path: Path) -> None:
    rules = pb.Authorization(allow=["llm.model == 'gpt-4o-mini'"])
    guarded = policy("default/models", authentication=jwt_authentication(), authorization=rules)
    log_path = tmp_path / "access.log"
    metrics = WorkerMetrics(gateway="default/gw")
    access_log = AccessLog(FileSink(log_path))
    access_log.start()
    try:
        with anyio.fail_after(WITHIN):
            async with serve_openai("k") as peer:
                oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "k")
                async with gateway(oa, policies=(guarded,)) as (base, server):
                    server._handler.observability = Observability(
                        gateway="default/gw", metrics=metrics, access_log=access_log
                    )
                    client = openai_client(base, key=token(sub="alice").decode())
                    with pytest.raises(openai.PermissionDeniedError):
                        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert await anyio.to_thread.run_sync(access_log.flush, 10.0)
    finally:
        access_log.close()
    (line,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert line["status"] == 403 and line["reason"] == "authorization_denied"
    assert line["decision"]["result"] == "deny" and line["decision"]["policy"] == "default/models"
    assert line["llm"]["model"] == "gpt-4o"
    assert peer.requests == []
    denied = metrics.authorization_decisions.labels("default/gw", "default/models", "deny")._value.get()
    assert denied == 1


async def test_tokens_are_allocated_to_the_caller_and_streams_log_their_time_to_first_token(tmp_path: Path) -> None:
    keys = pb.ApiKeyAuthentication(
        keys=[pb.ApiKeyAuthentication.Key(name="tenant-a", sha256=hashlib.sha256(b"key-a").hexdigest())],
        header="authorization",
    )
    callers = policy("default/callers", authentication=pb.Authentication(api_keys=keys))
    log_path = tmp_path / "access.log"
    metrics = WorkerMetrics(gateway="default/gw")
    access_log = AccessLog(FileSink(log_path))
    access_log.start()
    try:
        with anyio.fail_after(WITHIN):
            async with serve_openai("k") as peer:
                oa = provider("oa", pb.LlmProvider.TYPE_OPENAI, peer.port, "k")
                async with gateway(oa, policies=(callers,)) as (base, server):
                    server._handler.observability = Observability(
                        gateway="default/gw", metrics=metrics, access_log=access_log
                    )
                    client = openai_client(base, key="key-a")
                    peer.script(Reply(text="one", usage=Usage(7, 1)), Reply(text="two three", usage=Usage(5, 2)))
                    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                    async for _ in stream:
                        pass
        assert await anyio.to_thread.run_sync(access_log.flush, 10.0)
    finally:
        access_log.close()
    whole, streamed = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert "time_to_first_token_ms" not in whole["llm"]
    assert streamed["llm"]["time_to_first_token_ms"] > 0 and streamed["llm"]["output_tokens"] == 2

    def allocated(token_type: str) -> float:
        child = metrics.llm_tokens.labels("default/gw", LLM, "tenant-a", "openai", "gpt-4o", token_type)
        return float(child._value.get())

    assert (allocated("input"), allocated("output")) == (12, 3)
