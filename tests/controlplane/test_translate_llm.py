"""LLM Backends from YAML: field validation (errors name the field), translation to a Backend whose
`llm` carries every provider with defaults filled and keys read from Secrets, and a round trip of the
golden cases through the data plane's compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.model import KubeObject, SourceRef, object_from_manifest, validate
from controlplane.translate import translate
from dataplane.config.compile import compile_config
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.config_rules import LLM_MODEL_NAME, LLM_PROVIDER_NAME
from shared.resources import BACKEND, ROUTE, TARGET
from tests.controlplane.test_translate_a2a import route_to
from tests.controlplane.test_translate_golden import load_objects

GOLDEN = Path(__file__).parent / "golden"
OUR_REF = {"group": "agentgate.dev", "kind": "Backend", "name": "models"}
KEY_REF = {"name": "llm-keys", "key": "openai"}


def manifest(kind: str, name: str, body: dict[str, Any]) -> KubeObject:
    api_version = "agentgate.dev/v1alpha1" if kind == "Backend" else "v1"
    doc = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "default"}, **body}
    obj, errors = object_from_manifest(doc, SourceRef("llm.yaml"))
    assert obj is not None, errors
    return obj


def llm_backend(*providers: dict[str, Any], **llm: Any) -> KubeObject:
    if not providers:
        providers = ({"name": "openai", "type": "openai", "apiKeyRef": KEY_REF},)
    return manifest("Backend", "models", {"spec": {"llm": {"providers": list(providers), **llm}}})


def keys(**data: str) -> KubeObject:
    return manifest("Secret", "llm-keys", {"stringData": data or {"openai": "sk-test"}})


def errors_of(obj: KubeObject) -> dict[str, str]:
    return {error.field: error.message for error in validate(obj)}


def test_valid_specs_have_no_errors() -> None:
    assert validate(llm_backend()) == []
    full = llm_backend(
        {"name": "openai", "type": "openai", "apiKeyRef": KEY_REF, "models": ["gpt-4o", "*"], "priority": 0},
        {
            "name": "azure-east",
            "type": "azure",
            "baseUrl": "https://east.openai.azure.com/",
            "apiKeyRef": KEY_REF,
            "azure": {"apiVersion": "2024-12-01-preview", "deployments": {"gpt-4o": "prod.4o"}},
        },
        {
            "name": "claude",
            "type": "anthropic",
            "apiKeyRef": KEY_REF,
            "headers": [{"name": "anthropic-beta", "value": "x"}],
        },
        {
            "name": "vllm",
            "type": "openaiCompatible",
            "host": "10.0.0.5",
            "port": 8000,
            "path": "/v1",
            "tls": {"insecureSkipVerify": True},
        },
        {
            "name": "ollama",
            "type": "openaiCompatible",
            "baseUrl": "http://[::1]:11434/v1",
            "models": ["llama3:8b", "meta-llama/Llama-3.1-8B"],
        },
        aliases={"smart": ["gpt-4o", "claude-sonnet-4-5"], "fast": "gpt-4o-mini"},
        failover={"consecutiveFailures": 1, "ejectFor": "1m"},
        maxRequestBytes=1024,
        streamUsage=False,
    )
    assert validate(full) == []


@pytest.mark.parametrize(
    ("provider", "field", "message"),
    [
        (
            {"name": "a b", "type": "openai", "apiKeyRef": KEY_REF},
            "spec.llm.providers[0].name",
            "invalid provider name",
        ),
        (
            {"name": "x", "type": "OpenAI", "apiKeyRef": KEY_REF},
            "spec.llm.providers[0].type",
            "must be one of openai, anthropic, azure, openaiCompatible",
        ),
        ({"name": "x", "type": "openai"}, "spec.llm.providers[0].apiKeyRef", "required for type openai"),
        ({"name": "x", "type": "openaiCompatible"}, "spec.llm.providers[0]", "baseUrl (or host and port) is required"),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "ftp://h"},
            "spec.llm.providers[0].baseUrl",
            "http:// or https://",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "https://u:p@h/v1"},
            "spec.llm.providers[0].baseUrl",
            "credentials",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "https://h/v1?x=1"},
            "spec.llm.providers[0].baseUrl",
            "query",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "https://h:99999"},
            "spec.llm.providers[0].baseUrl",
            "bad port",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "http://h", "tls": {}},
            "spec.llm.providers[0].tls",
            "cleartext",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "HTTP://h/v1", "tls": {}},
            "spec.llm.providers[0].tls",
            "cleartext",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "baseUrl": "https://h", "port": 1},
            "spec.llm.providers[0].port",
            "cannot be combined with baseUrl",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "port": 1},
            "spec.llm.providers[0].port",
            "only applies together with host",
        ),
        (
            {"name": "x", "type": "openaiCompatible", "host": "h", "port": 0},
            "spec.llm.providers[0].port",
            "out of range",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "models": ["gpt 4o"]},
            "spec.llm.providers[0].models[0]",
            "invalid model name",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "models": ["a", "a"]},
            "spec.llm.providers[0].models[1]",
            "listed twice",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "priority": -1},
            "spec.llm.providers[0].priority",
            "out of range",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "headers": [{"name": "X-Api-Key", "value": "k"}]},
            "spec.llm.providers[0].headers[0].name",
            "set by the gateway",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "headers": [{"name": "a", "value": "é"}]},
            "spec.llm.providers[0].headers[0].value",
            "ASCII",
        ),
        (
            {"name": "x", "type": "azure", "baseUrl": "https://h", "apiKeyRef": KEY_REF},
            "spec.llm.providers[0].azure",
            "required for type azure",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "azure": {"apiVersion": "2024-10-21"}},
            "spec.llm.providers[0].azure",
            "only applies to type azure",
        ),
        (
            {"name": "x", "type": "azure", "baseUrl": "https://h", "apiKeyRef": KEY_REF, "azure": {"apiVersion": "v1"}},
            "spec.llm.providers[0].azure.apiVersion",
            "invalid api-version",
        ),
        (
            {"name": "x", "type": "azure", "baseUrl": "https://h", "apiKeyRef": KEY_REF, "azure": {}},
            "spec.llm.providers[0].azure.apiVersion",
            "required",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": {"name": "k"}},
            "spec.llm.providers[0].apiKeyRef.key",
            "required",
        ),
        (
            {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "timeout": "1s"},
            "spec.llm.providers[0].timeout",
            "unknown field",
        ),
    ],
)
def test_provider_errors_name_the_field(provider: dict[str, Any], field: str, message: str) -> None:
    backend = llm_backend(provider)
    errors = errors_of(backend)
    assert field in errors, errors
    assert message in errors[field]
    shown = [str(error) for error in validate(backend) if error.field == field]
    assert shown[0].startswith(f"llm.yaml: Backend default/models: {field}: ")


@pytest.mark.parametrize(
    ("llm", "field", "message"),
    [
        ({"aliases": {"smart": []}}, "spec.llm.aliases.smart", "must not be empty"),
        ({"aliases": {"smart": ["bad model"]}}, "spec.llm.aliases.smart[0]", "invalid model name"),
        ({"aliases": {"smart": 3}}, "spec.llm.aliases.smart", "must be a list"),
        ({"failover": {"ejectFor": "0s"}}, "spec.llm.failover.ejectFor", "greater than zero"),
        ({"failover": {"ejectFor": "2h"}}, "spec.llm.failover.ejectFor", "at most 1h"),
        ({"failover": {"consecutiveFailures": 0}}, "spec.llm.failover.consecutiveFailures", "out of range"),
        ({"failover": {"after": 3}}, "spec.llm.failover.after", "unknown field"),
        ({"maxRequestBytes": 0}, "spec.llm.maxRequestBytes", "out of range"),
        ({"streamUsage": "yes"}, "spec.llm.streamUsage", "true or false"),
        ({"retries": 1}, "spec.llm.retries", "unknown field"),
    ],
)
def test_backend_level_errors_name_the_field(llm: dict[str, Any], field: str, message: str) -> None:
    errors = errors_of(llm_backend(**llm))
    assert field in errors, errors
    assert message in errors[field]


def test_duplicate_names_tls_and_missing_providers() -> None:
    twice = llm_backend(
        {"name": "a", "type": "openai", "apiKeyRef": KEY_REF}, {"name": "a", "type": "anthropic", "apiKeyRef": KEY_REF}
    )
    assert "already used by spec.llm.providers[0]" in errors_of(twice)["spec.llm.providers[1].name"]
    with_tls = manifest(
        "Backend",
        "models",
        {"spec": {"tls": {}, "llm": {"providers": [{"name": "a", "type": "openai", "apiKeyRef": KEY_REF}]}}},
    )
    assert "set it per provider" in errors_of(with_tls)["spec.tls"]
    assert (
        "must not be empty"
        in errors_of(manifest("Backend", "m", {"spec": {"llm": {"providers": []}}}))["spec.llm.providers"]
    )


def test_name_rules_accept_what_providers_and_clients_write() -> None:
    # One rule each (shared/config_rules.py) for the validator and the proxy's compiler.
    for model in ("gpt-4o", "claude-sonnet-4-5", "meta-llama/Llama-3.1-8B-Instruct", "llama3:8b"):
        assert LLM_MODEL_NAME.fullmatch(model)
    for model in ("", "gpt 4o", 'say"hi', "x" * 257):
        assert not LLM_MODEL_NAME.fullmatch(model)
    assert LLM_PROVIDER_NAME.fullmatch("openai-eu_1") and not LLM_PROVIDER_NAME.fullmatch("-openai")


# --- translation ------------------------------------------------------------------------------


def backend_of(*objects: KubeObject) -> pb.Backend:
    snapshot = translate([*route_to(OUR_REF), *objects]).snapshots["default/web"]
    assert not snapshot.get(TARGET)
    message = snapshot[BACKEND]["default/models"]
    assert isinstance(message, pb.Backend) and message.WhichOneof("kind") == "llm"
    return message


def test_public_providers_get_their_default_addresses_and_keys_from_secrets() -> None:
    backend = backend_of(
        llm_backend(
            {"name": "openai", "type": "openai", "apiKeyRef": KEY_REF},
            {"name": "claude", "type": "anthropic", "apiKeyRef": {"name": "llm-keys", "key": "anthropic"}},
        ),
        keys(openai="sk-openai\n", anthropic="sk-ant"),
    )
    openai_provider, claude = backend.llm.providers
    assert (openai_provider.address.host, openai_provider.address.port, openai_provider.base_path) == (
        "api.openai.com",
        443,
        "/v1",
    )
    assert openai_provider.HasField("tls") and openai_provider.api_key == "sk-openai"
    assert list(openai_provider.models) == ["*"] and openai_provider.type == pb.LlmProvider.TYPE_OPENAI
    assert (claude.address.host, claude.base_path, claude.api_key) == ("api.anthropic.com", "", "sk-ant")
    assert [(h.name, h.value) for h in claude.headers] == [("anthropic-version", "2023-06-01")]
    assert not backend.llm.stream_usage_disabled and not backend.llm.HasField("failover")


def test_host_port_providers_are_cleartext_unless_tls_is_given() -> None:
    backend = backend_of(
        llm_backend(
            {"name": "vllm", "type": "openaiCompatible", "host": "vllm.local", "port": 8000},
            {
                "name": "secure",
                "type": "openaiCompatible",
                "host": "s.local",
                "port": 8443,
                "path": "/api/",
                "tls": {"sni": "s.example.com"},
            },
        )
    )
    vllm, secure = backend.llm.providers
    assert (vllm.HasField("tls"), vllm.base_path, vllm.api_key) == (False, "/v1", "")
    assert (secure.tls.server_name, secure.base_path) == ("s.example.com", "/api")


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        ([], "spec.llm.providers[0].apiKeyRef: Secret default/llm-keys not found"),
        ([{"other": "x"}], "spec.llm.providers[0].apiKeyRef: Secret default/llm-keys has no key 'openai'"),
        ([{"openai": "two\nlines"}], "must hold one line of ASCII text (value not shown)"),
    ],
)
def test_unusable_api_key_fails_the_backend(secrets: list[dict[str, str]], expected: str) -> None:
    objects = [*route_to(OUR_REF), llm_backend(), *(keys(**data) for data in secrets)]
    result = translate(objects)
    assert result.snapshots["default/web"][BACKEND] == {}
    status = next(s for s in result.statuses if s.kind == "Backend")
    condition = status.status["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidApiKeyRef")
    assert expected in condition["message"] and "two" not in condition["message"]
    rule = result.snapshots["default/web"][ROUTE]["default/r/0"]
    assert isinstance(rule, pb.Route) and rule.direct_response_status == 500


# --- round trip through the data plane ----------------------------------------------------------


@pytest.mark.parametrize("case", ["llm-backend", "llm-invalid"])
def test_golden_snapshots_compile_in_the_data_plane(case: str) -> None:
    result = translate(load_objects(GOLDEN / case / "input.yaml"))
    for resources in result.snapshots.values():
        config = compile_config(resources, version="v1")
        clusters = [cluster for cluster in config.backends.values() if cluster.kind == "llm"]
        assert clusters and all(cluster.llm is not None and cluster.llm.providers for cluster in clusters)


def test_backend_golden_compiles_to_the_settings_written() -> None:
    result = translate(load_objects(GOLDEN / "llm-backend" / "input.yaml"))
    backends = compile_config(result.snapshots["default/web"], version="v1").backends
    models = backends["default/models"].llm
    assert models is not None
    assert [(p.name, p.type, p.priority) for p in models.providers] == [
        ("openai", "openai", 0),
        ("azure", "azure", 1),
        ("anthropic", "anthropic", 2),
    ]
    assert dict(models.aliases) == {"fast": ("gpt-4o-mini",), "smart": ("gpt-4o", "claude-sonnet-4-5")}
    assert (models.consecutive_failures, models.eject_for, models.max_request_bytes, models.stream_usage) == (
        2,
        45.0,
        1048576,
        True,
    )
    openai_provider, azure, claude = models.providers
    assert openai_provider.auth_header == ("authorization", "Bearer sk-test-openai")
    assert openai_provider.headers == (("openai-organization", "org-test"),) and openai_provider.ssl_context is not None
    assert (azure.auth_header, azure.deployment("gpt-4o"), azure.deployment("other")) == (
        ("api-key", "azure-test-key"),
        "prod-gpt-4o",
        "other",
    )
    assert (claude.auth_header, claude.anthropic_version) == (("x-api-key", "sk-ant-test"), "2023-06-01")
    local = backends["default/local"].llm
    assert local is not None and not local.stream_usage
    assert [(p.name, p.authority, p.base_path, p.ssl_context is not None) for p in local.providers] == [
        ("vllm", "vllm.models.svc.cluster.local:8000", "/v1", False),
        ("ollama", "ollama.example.com:11434", "/api/v1", True),
        ("claude-proxy", "127.0.0.1:9300", "/anthropic", False),
    ]
    assert local.providers[2].anthropic_version == "2026-10-21"


def test_fields_written_without_a_value_are_absent_as_in_a_cluster() -> None:
    """`apiKeyRef:` or `priority:` with nothing after it is YAML null: the API server prunes it, so
    the folder source does too (it used to reach the translator and stop the control plane)."""
    from controlplane.sources.folder import _parse_file

    text = b"""\
apiVersion: agentgate.dev/v1alpha1
kind: Backend
metadata: {name: models, namespace: default}
spec:
  maxRequestBytes:
  llm:
    maxRequestBytes:
    failover: {consecutiveFailures: , ejectFor: }
    providers:
    - name: local
      type: openaiCompatible
      baseUrl: http://vllm:8000/v1
      priority:
      apiKeyRef:
      azure:
"""
    (document,) = _parse_file("llm.yaml", text).documents
    assert document.obj is not None and validate(document.obj) == []
    backend = backend_of(document.obj)
    (local,) = backend.llm.providers
    assert (local.address.host, local.priority, local.api_key) == ("vllm", 0, "")


def test_a_translation_failure_keeps_the_published_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    """A translator bug on one reconcile must not stop the control plane or withdraw config."""
    import controlplane.app
    from controlplane.app import ControlPlane, ControlPlaneSettings
    from controlplane.sources.folder import FolderState

    plane = ControlPlane(ControlPlaneSettings(metrics_port=-1))
    state = FolderState((*route_to(OUR_REF), llm_backend(), keys()), ())
    assert plane.reconcile(state).gateways == ("default/web",)
    published = plane.cache.get_snapshot("default/web")

    def broken(objects: object) -> None:
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(controlplane.app, "translate", broken)
    report = plane.reconcile(state)
    assert report.errors == (
        "translation failed, previous snapshots kept: TypeError: 'NoneType' object is not subscriptable",
    )
    assert plane.cache.get_snapshot("default/web") is published and plane.errors == report.errors


@pytest.mark.parametrize("value", ["v\x01", "v\x7f", "v\r\nx: y"])
def test_header_values_with_control_characters_are_refused(value: str) -> None:
    provider = {"name": "x", "type": "openai", "apiKeyRef": KEY_REF, "headers": [{"name": "x-a", "value": value}]}
    assert "control characters" in errors_of(llm_backend(provider))["spec.llm.providers[0].headers[0].value"]
