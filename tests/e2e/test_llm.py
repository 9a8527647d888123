"""The LLM gateway example as kagent uses it: `agentgate run` on the shipped examples/llm (its provider
base URLs pointed at in-process OpenAI and Anthropic stand-ins, the key Secrets run.sh writes), called the
way kagent's runtime calls the ModelConfig of deploy/examples/llm: the official openai SDK with that
ModelConfig's baseUrl, model and key, chat and streams, tool calls, failover, refusals, the model list and
the access log on the process's own output. And deploy/examples/llm renders, validates and translates,
saying what the folder example says."""

from __future__ import annotations

import copy
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import openai
import pytest
import yaml

from controlplane.model import SourceRef, object_from_manifest, validate
from controlplane.translate import translate
from tests.conftest import free_port
from tests.e2e.harness import AGENTGATE, REPO, LoggedProcess, logged_process
from tests.peers.llm_providers.script import Reply, ToolCall, Usage
from tests.peers.llm_providers.standins import AnthropicStandIn, OpenAIStandIn, serve_anthropic, serve_openai
from tests.test_deploy import (
    DEPLOY,
    GATEWAY_GROUP,
    OUR_GROUP,
    check_object,
    group_of,
    named,
    render,
)

pytestmark = pytest.mark.anyio

EXAMPLE = REPO / "examples" / "llm"
DEPLOY_EXAMPLE = "examples/llm"  # under deploy/
KAGENT_MANIFEST = DEPLOY / DEPLOY_EXAMPLE / "kagent.yaml"
# Written by run.sh, never committed: skipped if a checkout has them, written afresh by the test.
GENERATED = frozenset({"provider-keys.yaml", "caller-keys.yaml"})
OPENAI_KEY = "sk-proj-provider-key-of-the-gateway-0123"
ANTHROPIC_KEY = "sk-ant-provider-key-of-the-gateway-0123"
# kagent.dev/v1alpha2 as kagent's Go types declare it (go/api/v1alpha2/modelconfig_types.go): what a
# ModelConfig of provider OpenAI may set; kagent's CRD refuses or prunes anything else.
KAGENT_SPEC_FIELDS = frozenset(
    {"model", "provider", "apiKeySecret", "apiKeySecretKey", "apiKeyPassthrough", "defaultHeaders", "openAI", "tls"}
)
KAGENT_OPENAI_FIELDS = frozenset({
    "baseUrl", "organization", "temperature", "maxTokens", "topP", "frequencyPenalty", "presencePenalty", "seed",
    "n", "timeout", "reasoningEffort", "tokenExchange",
})  # fmt: skip
# A tool as kagent's runtime declares one (every parameter schema an object with properties and required).
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "k8s_get_resources",
            "description": "List resources of a kind in a namespace",
            "parameters": {
                "type": "object",
                "properties": {"resource_type": {"type": "string"}, "namespace": {"type": "string"}},
                "required": ["resource_type"],
            },
        },
    }
]
SYSTEM = {"role": "system", "content": "You help platform engineers."}


def model_config() -> dict[str, Any]:
    """The kagent ModelConfig of deploy/examples/llm, as committed."""
    docs = [d for d in yaml.safe_load_all(KAGENT_MANIFEST.read_text()) if d]
    [config] = [d for d in docs if d["kind"] == "ModelConfig"]
    return config


def example_documents() -> dict[str, list[dict[str, Any]]]:
    """examples/llm as committed, per file (run.sh's generated Secrets left out)."""
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
        for path in sorted(EXAMPLE.glob("*.yaml"))
        if path.name not in GENERATED
    }


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }


def write_example(folder: Path, gateway_port: int, urls: dict[str, str], callers: dict[str, str]) -> None:
    """The committed example with only its listener port and provider base URLs changed, plus the two
    Secrets run.sh writes (provider keys; one gateway key per calling namespace)."""
    namespace = ""
    for name, documents in example_documents().items():
        for doc in documents:
            if doc["kind"] == "Gateway":
                for listener in doc["spec"]["listeners"]:
                    listener["port"] = gateway_port
            elif doc["kind"] == "Backend":
                namespace = doc["metadata"]["namespace"]
                providers = doc["spec"]["llm"]["providers"]
                assert [(p["name"], p["type"]) for p in providers] == [("openai", "openai"), ("anthropic", "anthropic")]
                for provider in providers:
                    provider["baseUrl"] = urls[provider["type"]]
        (folder / name).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    keys = _secret("provider-keys", namespace, {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY})
    (folder / "provider-keys.yaml").write_text(yaml.safe_dump(keys))
    (folder / "caller-keys.yaml").write_text(yaml.safe_dump(_secret("llm-callers", namespace, callers)))


@dataclass
class Gateway:
    """The running example and its providers, shared by the module's tests (one process start)."""

    run: LoggedProcess
    openai: OpenAIStandIn
    anthropic: AnthropicStandIn
    port: int
    kagent_key: str  # what kagent reads from the ModelConfig's apiKeySecret: tenant-a's gateway key
    other_key: str  # tenant-b's

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        """An OpenAI client built as kagent's runtime builds it from the ModelConfig: its baseUrl (on this
        gateway's address), its key, no other settings."""
        base = urlsplit(model_config()["spec"]["openAI"]["baseUrl"])
        return openai.AsyncOpenAI(api_key=key or self.kagent_key, base_url=f"http://127.0.0.1:{self.port}{base.path}")

    def marks(self) -> tuple[int, int, int]:
        return self.run.mark(), len(self.openai.requests), len(self.anthropic.requests)

    async def access_lines(self, count: int, start: int) -> list[dict[str, Any]]:
        """The next `count` access-log lines of the process (one JSON line per request, on stdout)."""
        return await self.run.wait_for_count(lambda line: line.get("logger") == "access", count, start=start)

    def assert_keys_kept(self, openai_start: int, anthropic_start: int) -> None:
        """Every provider request since the marks carried the gateway's provider key, never the caller's."""
        for request in self.openai.requests[openai_start:]:
            assert request.headers["authorization"] == f"Bearer {OPENAI_KEY}"
            assert self.kagent_key not in f"{request.headers} {request.body!r}"
        for request in self.anthropic.requests[anthropic_start:]:
            assert request.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in request.headers
            assert self.kagent_key not in f"{request.headers} {request.body!r}"


def _conditions(body: Any) -> Iterator[dict[str, Any]]:
    """Every status condition in a status body, however nested (route parents, listeners)."""
    if isinstance(body, dict):
        if {"type", "status", "reason"} <= body.keys():
            yield body
        for value in body.values():
            yield from _conditions(value)
    elif isinstance(body, list):
        for value in body:
            yield from _conditions(value)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    folder = tmp_path_factory.mktemp("llm")
    port = free_port()
    callers = {"tenant-a": secrets.token_urlsafe(32), "tenant-b": secrets.token_urlsafe(32)}
    async with serve_openai(OPENAI_KEY) as oa, serve_anthropic(ANTHROPIC_KEY) as an:
        write_example(folder, port, {"openai": oa.url, "anthropic": an.url}, callers)
        # The access log goes to stdout (the default); the harness reads stderr, so stdout joins it.
        command = [
            "sh", "-c", 'exec "$0" "$@" 1>&2', *AGENTGATE, "run", "--config", str(folder),
            "--xds-port", str(free_port()), "--admin-port", "-1", "--metrics-port", "-1", "--readiness-port", "-1",
            "--controlplane-metrics-port", "-1", "--drain-timeout", "5", "--access-log", "stdout",
        ]  # fmt: skip
        async with logged_process("run", command) as run:
            await run.wait_for("worker ready", within=30)
            yield Gateway(run, oa, an, port, callers["tenant-a"], callers["tenant-b"])
            assert not any(callers["tenant-a"] in line for line in run.raw), "the caller's key reached a log"


async def test_the_committed_example_is_accepted(gateway: Gateway) -> None:
    expected = {("Backend", "models"), ("Policy", "llm-callers"), ("HTTPRoute", "llm")}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, name in expected:
        seen[(kind, name)] = await gateway.run.wait_for(
            lambda line, kind=kind, name=name: (
                line.get("event") == "status" and line.get("kind") == kind and line.get("name") == name
            )
        )
    for (kind, name), line in seen.items():
        conditions = list(_conditions(line["status"]))
        assert conditions, f"{kind} {name}: no conditions"
        for condition in conditions:
            assert condition["status"] == "True", f"{kind} {name}: {condition}"


async def test_chat_and_stream_as_kagent_sends_them(gateway: Gateway) -> None:
    model = model_config()["spec"]["model"]
    mark, oa_start, an_start = gateway.marks()
    client = gateway.client()
    try:
        with anyio.fail_after(30):
            gateway.openai.script(Reply(text="Three pods are running.", usage=Usage(11, 4)))
            completion = await client.chat.completions.create(
                model=model, messages=[SYSTEM, {"role": "user", "content": "What runs in tenant-a?"}]
            )
            gateway.openai.script(Reply(text="one two three", usage=Usage(6, 3)))
            stream = await client.chat.completions.create(
                model=model,
                messages=[SYSTEM, {"role": "user", "content": "Count to three"}],
                stream=True,
                stream_options={"include_usage": True},  # as kagent's runtime asks
            )
            chunks = [chunk async for chunk in stream]
            lines = await gateway.access_lines(2, mark)
    finally:
        await client.close()
    assert completion.choices[0].message.content == "Three pods are running."
    assert completion.usage is not None and completion.usage.total_tokens == 15
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (6, 3)

    first, second = gateway.openai.requests[oa_start:]
    assert first.path == second.path == "/v1/chat/completions"
    assert first.json["model"] == second.json["model"] == "gpt-4o"  # the alias resolved at the gateway
    assert second.json["stream"] is True and second.json["stream_options"] == {"include_usage": True}
    gateway.assert_keys_kept(oa_start, an_start)
    assert len(gateway.anthropic.requests) == an_start

    first_tokens = []
    for line, (tokens_in, tokens_out) in zip(lines, [(11, 4), (6, 3)], strict=True):
        assert line["status"] == 200 and line["path"] == "/v1/chat/completions" and line["principal"] == "tenant-a"
        first_tokens.append(line["llm"].pop("time_to_first_token_ms", None))
        assert line["llm"] == {
            "provider": "openai", "model": model, "provider_model": "gpt-4o", "input_tokens": tokens_in,
            "output_tokens": tokens_out,
        }  # fmt: skip
    whole, streamed = first_tokens
    assert whole is None and streamed is not None and streamed > 0  # streams only


async def test_a_tool_call_round_trip(gateway: Gateway) -> None:
    """A tool call, then the tool's result sent back: non-streamed, and streamed as kagent's agents do."""
    model = model_config()["spec"]["model"]
    mark, oa_start, an_start = gateway.marks()
    question = {"role": "user", "content": "List the pods"}
    call = ToolCall("k8s_get_resources", {"resource_type": "pod", "namespace": "tenant-a"}, id="call_pods")
    client = gateway.client()
    try:
        with anyio.fail_after(30):
            gateway.openai.script(Reply(tool_calls=[call]))
            asked = await client.chat.completions.create(
                model=model, messages=[SYSTEM, question], tools=TOOLS, tool_choice="auto"
            )
            gateway.openai.script(Reply(tool_calls=[call]))
            stream = await client.chat.completions.create(
                model=model, messages=[SYSTEM, question], tools=TOOLS, tool_choice="auto",
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            streamed: dict[int, dict[str, str]] = {}
            finish = None
            async for chunk in stream:
                if not chunk.choices:
                    continue
                for delta in chunk.choices[0].delta.tool_calls or ():
                    entry = streamed.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] = delta.id or entry["id"]
                    if delta.function is not None:
                        entry["name"] = delta.function.name or entry["name"]
                        entry["arguments"] += delta.function.arguments or ""
                finish = chunk.choices[0].finish_reason or finish
            gateway.openai.script(Reply(text="pod/web-1 and pod/web-2"))
            answered = await client.chat.completions.create(
                model=model,
                tools=TOOLS,
                messages=[
                    SYSTEM,
                    question,
                    {"role": "assistant", "content": None, "tool_calls": [{
                        "id": "call_pods", "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments_json},
                    }]},
                    {"role": "tool", "tool_call_id": "call_pods", "content": "web-1 web-2"},
                ],
            )  # fmt: skip
            lines = await gateway.access_lines(3, mark)
    finally:
        await client.close()
    message = asked.choices[0].message
    assert asked.choices[0].finish_reason == "tool_calls" and message.tool_calls is not None
    [made] = message.tool_calls
    assert (made.id, made.function.name, made.function.arguments) == ("call_pods", call.name, call.arguments_json)  # type: ignore[union-attr]
    assert finish == "tool_calls"
    assert streamed == {0: {"id": "call_pods", "name": call.name, "arguments": call.arguments_json}}
    assert answered.choices[0].message.content == "pod/web-1 and pod/web-2"

    requests = gateway.openai.requests[oa_start:]
    assert [r.json["tools"] for r in requests] == [TOOLS] * 3
    assert requests[2].json["messages"][-1] == {"role": "tool", "tool_call_id": "call_pods", "content": "web-1 web-2"}
    gateway.assert_keys_kept(oa_start, an_start)
    assert all(line["status"] == 200 and line["llm"]["provider"] == "openai" for line in lines)
    assert all(line["llm"]["output_tokens"] > 0 for line in lines)


async def test_failover_to_anthropic_when_openai_answers_503(gateway: Gateway) -> None:
    model = model_config()["spec"]["model"]
    mark, oa_start, an_start = gateway.marks()
    client = gateway.client()
    try:
        with anyio.fail_after(30):
            gateway.openai.fail_next(1, 503)
            gateway.anthropic.script(Reply(text="Claude answers.", usage=Usage(9, 3)))
            completion = await client.chat.completions.create(
                model=model, messages=[SYSTEM, {"role": "user", "content": "Who answers?"}]
            )
            gateway.openai.fail_next(1, 503)
            gateway.anthropic.script(Reply(text="streamed from Claude", usage=Usage(8, 3)))
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Stream it"}], stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [chunk async for chunk in stream]
            # Two failures in a row are under the example's consecutiveFailures (3): OpenAI is still first.
            gateway.openai.script(Reply(text="OpenAI again", usage=Usage(4, 2)))
            again = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
            lines = await gateway.access_lines(3, mark)
    finally:
        await client.close()
    assert completion.choices[0].message.content == "Claude answers."
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        9, 3,
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed from Claude"
    assert again.choices[0].message.content == "OpenAI again"

    tried = gateway.openai.requests[oa_start:]
    assert [r.status for r in tried] == [503, 503, 200]
    failed_over = gateway.anthropic.requests[an_start:]
    assert [r.path for r in failed_over] == ["/v1/messages", "/v1/messages"]
    assert [r.json["model"] for r in failed_over] == ["claude-sonnet-4-5"] * 2  # the alias's second model
    assert failed_over[0].json["system"] == SYSTEM["content"] and failed_over[1].json["stream"] is True
    gateway.assert_keys_kept(oa_start, an_start)

    assert [line["llm"]["provider"] for line in lines] == ["anthropic", "anthropic", "openai"]
    assert [line["llm"]["provider_model"] for line in lines] == ["claude-sonnet-4-5"] * 2 + ["gpt-4o"]
    assert [(line["llm"]["input_tokens"], line["llm"]["output_tokens"]) for line in lines] == [(9, 3), (8, 3), (4, 2)]
    assert all(line["status"] == 200 and line["llm"]["model"] == model for line in lines)


async def test_a_model_the_rule_refuses_gets_403_in_openais_shape(gateway: Gateway) -> None:
    """gpt-4o is served (the alias smart uses it) but the example's CEL rule allows only the aliases."""
    mark, oa_start, an_start = gateway.marks()
    client = gateway.client()
    stranger = gateway.client(key="not-a-key-of-this-gateway")
    try:
        with anyio.fail_after(30):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.AuthenticationError) as unknown:
                await stranger.chat.completions.create(model="smart", messages=[{"role": "user", "content": "hi"}])
            lines = await gateway.access_lines(2, mark)
    finally:
        await client.close()
        await stranger.close()
    assert refused.value.status_code == 403
    body = refused.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "gpt-4o" in body["error"]["message"]
    assert unknown.value.status_code == 401
    assert len(gateway.openai.requests) == oa_start and len(gateway.anthropic.requests) == an_start
    denied, unauthenticated = lines
    assert denied["status"] == 403 and denied["llm"] == {"model": "gpt-4o"} and denied["principal"] == "tenant-a"
    assert unauthenticated["status"] == 401 and "principal" not in unauthenticated


async def test_models_lists_the_aliases(gateway: Gateway) -> None:
    mark, oa_start, an_start = gateway.marks()
    client = gateway.client()
    try:
        with anyio.fail_after(30):
            listed = [model.id async for model in client.models.list()]
            [line] = await gateway.access_lines(1, mark)
    finally:
        await client.close()
    assert listed == ["claude-haiku-4-5", "claude-sonnet-4-5", "fast", "gpt-4o", "gpt-4o-mini", "smart"]
    assert model_config()["spec"]["model"] in listed
    assert (line["status"], line["path"], line["principal"]) == (200, "/v1/models", "tenant-a")
    assert len(gateway.openai.requests) == oa_start and len(gateway.anthropic.requests) == an_start  # the gateway's own


async def test_another_namespace_has_its_own_key_and_budget(gateway: Gateway) -> None:
    """tenant-b's key works too, and its line names tenant-b: the budget key (source.identity) tells them apart."""
    mark, oa_start, an_start = gateway.marks()
    client = gateway.client(key=gateway.other_key)
    try:
        with anyio.fail_after(30):
            gateway.openai.script(Reply(text="fast answer", usage=Usage(2, 2)))
            answer = await client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
            [line] = await gateway.access_lines(1, mark)
    finally:
        await client.close()
    assert answer.choices[0].message.content == "fast answer"
    assert gateway.openai.requests[oa_start].json["model"] == "gpt-4o-mini"
    assert gateway.other_key not in str(gateway.openai.requests[oa_start].headers)
    assert len(gateway.anthropic.requests) == an_start
    assert line["principal"] == "tenant-b" and line["llm"]["model"] == "fast"


# --- deploy/examples/llm ---------------------------------------------------------------------------


def deploy_documents() -> tuple[dict[str, Any], ...]:
    return render(DEPLOY_EXAMPLE)


def test_deploy_manifests_render_and_are_valid() -> None:
    docs = deploy_documents()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("Backend", "models"), ("HTTPRoute", "llm"), ("ModelConfig", "agentgate-llm"), ("Namespace", "llm"),
        ("Namespace", "tenant-a"), ("Policy", "llm-callers"),
    ]  # fmt: skip
    for doc in docs:
        if group_of(doc) == "kagent.dev":  # kagent's CRD is not installable here: the fields it has
            spec = doc["spec"]
            assert doc["apiVersion"] == "kagent.dev/v1alpha2"
            assert set(spec) <= KAGENT_SPEC_FIELDS and set(spec["openAI"]) <= KAGENT_OPENAI_FIELDS
            assert spec["provider"] == "OpenAI" and spec["apiKeySecret"] and spec["apiKeySecretKey"]
        else:
            check_object(doc)


def test_the_model_config_points_at_the_gateway_service_and_route() -> None:
    docs = deploy_documents()
    [config] = [d for d in docs if d["kind"] == "ModelConfig"]
    [route] = [d for d in docs if d["kind"] == "HTTPRoute"]
    service = named(tuple(yaml.safe_load_all((DEPLOY / "base" / "dataplane-service.yaml").read_text())), "Service")[
        ("agentgate-system", "agentgate")
    ]
    url = urlsplit(config["spec"]["openAI"]["baseUrl"])
    assert (url.scheme, url.hostname, url.port) == (
        "http", "agentgate.agentgate-system.svc.cluster.local", service["spec"]["ports"][0]["port"],
    )  # fmt: skip
    prefixes = {m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]}
    assert url.path in prefixes
    assert route["spec"]["parentRefs"] == [
        {"name": "agentgate", "namespace": "agentgate-system", "sectionName": "http"}
    ]
    assert config == model_config()


def test_deploy_says_what_the_example_the_e2e_tests_run_says() -> None:
    """Same providers, aliases, failover, rules and budget: the e2e tests above prove the cluster version too."""
    deployed = {(d["kind"], d["metadata"]["name"]): d for d in deploy_documents()}
    local = {(d["kind"], d["metadata"]["name"]): d for docs in example_documents().values() for d in docs}
    assert deployed[("Backend", "models")]["spec"] == local[("Backend", "models")]["spec"]
    assert deployed[("Policy", "llm-callers")]["spec"] == local[("Policy", "llm-callers")]["spec"]
    assert deployed[("HTTPRoute", "llm")]["spec"]["rules"] == local[("HTTPRoute", "llm")]["spec"]["rules"]


def test_deploy_manifests_are_accepted_by_the_translator() -> None:
    """On the base's Gateway, with the Secrets the README creates: every status condition a good one."""
    docs = [
        copy.deepcopy(d)
        for path in (DEPLOY / "base" / "gatewayclass.yaml", DEPLOY / "base" / "gateway.yaml")
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    docs += [copy.deepcopy(d) for d in deploy_documents() if group_of(d) in ("", OUR_GROUP, GATEWAY_GROUP)]
    docs += [
        _secret("provider-keys", "llm", {"openai": "sk-test", "anthropic": "sk-ant-test"}),
        _secret("llm-callers", "llm", {"tenant-a": secrets.token_urlsafe(32)}),
    ]
    objects = []
    for doc in docs:
        obj, errors = object_from_manifest(doc, SourceRef("deploy/examples/llm"))
        assert obj is not None and not errors, [str(e) for e in errors]
        assert validate(obj) == [], [str(e) for e in validate(obj)]
        objects.append(obj)
    result = translate(objects)
    assert "agentgate-system/agentgate" in result.snapshots
    seen = set()
    for status in result.statuses:
        for condition in _conditions(status.status):
            good = "False" if condition["type"] == "Conflicted" else "True"
            assert condition["status"] == good, f"{status.kind} {status.namespace}/{status.name}: {condition}"
        seen.add((status.kind, status.name))
    assert {("HTTPRoute", "llm"), ("Backend", "models"), ("Policy", "llm-callers")} <= seen
