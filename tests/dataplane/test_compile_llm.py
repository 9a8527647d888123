"""compile_config for LLM backends: typed, immutable provider settings in failover order, the credential
header each provider type wants, and NACKs that name resource and field."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
import trustme

from dataplane.config.compile import ConfigRejected, ResourceError, compile_config
from dataplane.config.model import (
    DEFAULT_LLM_CONSECUTIVE_FAILURES,
    DEFAULT_LLM_EJECT_FOR,
    DEFAULT_LLM_MAX_REQUEST_BYTES,
    UpstreamCluster,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, TARGET

NAME = "ai/models"


def provider(name: str = "openai", kind: int = pb.LlmProvider.TYPE_OPENAI, **fields: object) -> pb.LlmProvider:
    fields.setdefault("address", pb.SocketAddress(host="api.openai.com", port=443))
    return pb.LlmProvider(name=name, type=kind, **fields)  # type: ignore[arg-type]


def backend(*providers: pb.LlmProvider, **llm: object) -> pb.Backend:
    return pb.Backend(name=NAME, llm=pb.LlmBackend(providers=providers or [provider(api_key="sk")], **llm))  # type: ignore[arg-type]


def cluster_of(*messages: pb.Backend | pb.Target) -> UpstreamCluster:
    return compile_config(resources(*messages), version="v").backends[NAME]


def resources(*messages: pb.Backend | pb.Target) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for message in messages:
        out.setdefault(BACKEND if isinstance(message, pb.Backend) else TARGET, {})[message.name] = message
    return out


def rejected(*messages: pb.Backend | pb.Target) -> dict[tuple[str, str, str], str]:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resources(*messages), version="bad")
    return by_field(caught.value.errors)


def by_field(errors: Iterable[ResourceError]) -> dict[tuple[str, str, str], str]:
    return {(e.type_url.rsplit(".", 1)[-1], e.name, e.field): e.message for e in errors}


def test_defaults_fill_every_field() -> None:
    cluster = cluster_of(backend(provider(api_key="sk-secret-1")))
    assert (cluster.kind, cluster.targets, cluster.mcp, cluster.a2a) == ("llm", (), None, None)
    settings = cluster.llm
    assert settings is not None
    assert (settings.consecutive_failures, settings.eject_for, settings.max_request_bytes, settings.stream_usage) == (
        DEFAULT_LLM_CONSECUTIVE_FAILURES,
        DEFAULT_LLM_EJECT_FOR,
        DEFAULT_LLM_MAX_REQUEST_BYTES,
        True,
    )
    (only,) = settings.providers
    assert (only.models, only.serves_any, only.auth_header, only.authority) == (
        ("*",),
        True,
        ("authorization", "Bearer sk-secret-1"),
        "api.openai.com:443",
    )
    assert "sk-secret-1" not in repr(only)
    with pytest.raises(dataclasses.FrozenInstanceError):
        only.name = "x"  # type: ignore[misc]


def test_providers_are_sorted_by_priority_stably_and_typed() -> None:
    cluster = cluster_of(
        backend(
            provider("b", priority=2, api_key="1"),
            provider("a", pb.LlmProvider.TYPE_ANTHROPIC, priority=1, api_key="2"),
            provider("c", pb.LlmProvider.TYPE_OPENAI_COMPATIBLE, priority=1),
            provider("d", pb.LlmProvider.TYPE_AZURE_OPENAI, api_key="3", azure=pb.LlmAzure(api_version="2024-10-21")),
            aliases=[pb.LlmModelAlias(name="smart", models=["gpt-4o", "claude"])],
            failover=pb.LlmFailover(consecutive_failures=5),
            stream_usage_disabled=True,
        )
    )
    settings = cluster.llm
    assert settings is not None
    assert [(p.name, p.type, p.auth_header) for p in settings.providers] == [
        ("d", "azure", ("api-key", "3")),
        ("a", "anthropic", ("x-api-key", "2")),
        ("c", "openai_compatible", None),
        ("b", "openai", ("authorization", "Bearer 1")),
    ]
    anthropic = settings.providers[1]
    assert (anthropic.headers, anthropic.anthropic_version) == ((("anthropic-version", "2023-06-01"),), "2023-06-01")
    assert (settings.consecutive_failures, settings.eject_for, settings.stream_usage) == (
        5,
        DEFAULT_LLM_EJECT_FOR,
        False,
    )
    assert settings.aliases["smart"] == ("gpt-4o", "claude")


def test_provider_tls_builds_a_context_per_setting(tmp_path: object) -> None:
    ca = trustme.CA()
    tls = pb.UpstreamTls(ca_certificates_pem=ca.cert_pem.bytes(), server_name="llm.internal")
    cluster = cluster_of(
        backend(provider(api_key="k", tls=tls), provider("plain", pb.LlmProvider.TYPE_OPENAI_COMPATIBLE))
    )
    assert cluster.llm is not None
    secure, plain = cluster.llm.providers
    assert secure.ssl_context is not None and secure.server_name == "llm.internal"
    assert plain.ssl_context is None


def test_errors_name_resource_and_field() -> None:
    bad = pb.Backend(
        name=NAME,
        tls=pb.UpstreamTls(),
        llm=pb.LlmBackend(
            providers=[
                provider("bad name", api_key="k"),
                provider("x", 99),
                provider("y", address=pb.SocketAddress(host="", port=0)),
                provider("z", base_path="relative", api_key="a\nb", models=["ok", "not ok"]),
                provider(
                    "h",
                    headers=[
                        pb.HttpHeader(name="Authorization", value="v"),
                        pb.HttpHeader(name="x-a", value="1"),
                        pb.HttpHeader(name="X-A", value="2"),
                    ],
                ),
                provider("az", pb.LlmProvider.TYPE_AZURE_OPENAI),
                provider(
                    "oa",
                    azure=pb.LlmAzure(
                        api_version="2024-10-21", deployments=[pb.LlmAzureDeployment(model="m", deployment="bad dep")]
                    ),
                ),
                provider("oa"),
            ],
            aliases=[pb.LlmModelAlias(name="a"), pb.LlmModelAlias(name="a", models=["m"])],
            failover=pb.LlmFailover(consecutive_failures=5000),
            max_request_bytes=(1 << 30) + 1,
        ),
    )
    errors = rejected(bad)
    where = ("Backend", NAME)
    expected = {
        "tls": "not used by LLM backends",
        "llm.providers[0].name": "invalid provider name 'bad name'",
        "llm.providers[1].type": "unknown Type value 99",
        "llm.providers[2].address.host": "invalid host ''",
        "llm.providers[2].address.port": "0 is not a port",
        "llm.providers[3].base_path": "invalid base path 'relative'",
        "llm.providers[3].api_key": "value not shown",
        "llm.providers[3].models[1]": "invalid model name 'not ok'",
        "llm.providers[4].headers[0].name": "set by the gateway",
        "llm.providers[4].headers[2].name": "appears twice",
        "llm.providers[5].azure": "required for TYPE_AZURE_OPENAI",
        "llm.providers[6].azure": "only applies to TYPE_AZURE_OPENAI",
        "llm.providers[6].azure.deployments[0].deployment": "invalid deployment 'bad dep'",
        "llm.providers[7].name": "used twice",
        "llm.aliases[0].models": "at least one model",
        "llm.aliases[1].name": "defined twice",
        "llm.failover.consecutive_failures": "exceeds 1000",
        "llm.max_request_bytes": "exceeds the limit",
    }
    for field, message in expected.items():
        assert message in errors.get((*where, field), ""), (field, errors)
    assert "a\nb" not in str(errors)


def test_no_providers_and_bad_ejection() -> None:
    errors = rejected(pb.Backend(name=NAME, llm=pb.LlmBackend()))
    assert "at least one provider" in errors[("Backend", NAME, "llm.providers")]
    bad = backend(failover=pb.LlmFailover(eject_for={"seconds": 7200}))
    assert "at most 1h" in rejected(bad)[("Backend", NAME, "llm.failover.eject_for")]


def test_targets_cannot_attach_to_an_llm_backend() -> None:
    target = pb.Target(name=f"{NAME}/h:1", backend=NAME, address=pb.SocketAddress(host="h", port=1))
    assert "its providers are in llm" in rejected(backend(), target)[("Target", f"{NAME}/h:1", "address")]


@pytest.mark.parametrize("base_path", ["/v1/中", "/v1/../admin", "//evil", "/v1\x01", "/v1/a b", "/v1%2Fx"])
def test_a_base_path_no_request_line_can_carry_is_refused(base_path: str) -> None:
    """The control plane never sends these; a hand-written snapshot must not reach the wire."""
    errors = rejected(pb.Backend(name=NAME, llm=pb.LlmBackend(providers=[provider("p", base_path=base_path)])))
    assert "invalid base path" in errors.get(("Backend", NAME, "llm.providers[0].base_path"), ""), errors


@pytest.mark.parametrize("api_key", ["sk-\x01", "sk-\x7f", "sk-é", "sk\n"])
def test_a_key_no_header_can_carry_is_refused_without_showing_it(api_key: str) -> None:
    errors = rejected(pb.Backend(name=NAME, llm=pb.LlmBackend(providers=[provider("p", api_key=api_key)])))
    message = errors.get(("Backend", NAME, "llm.providers[0].api_key"), "")
    assert "control characters" in message and api_key not in message and api_key not in str(errors)
