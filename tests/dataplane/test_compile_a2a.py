"""compile_config for A2A backends: typed, immutable agent settings over ordinary address targets,
and NACKs that name resource and field."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
import trustme

from dataplane.config.a2a import MAX_A2A_REQUEST_BYTES, compile_a2a_settings
from dataplane.config.compile import ConfigRejected, ResourceError, compile_config
from dataplane.config.model import DEFAULT_A2A_MAX_REQUEST_BYTES, A2aBackendSettings, UpstreamCluster
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, TARGET

BACKEND_NAME = "agents/planner"


def a2a_backend(name: str = BACKEND_NAME, **a2a: object) -> pb.Backend:
    return pb.Backend(name=name, a2a=pb.A2aBackend(**a2a))  # type: ignore[arg-type]


def address(host: str = "127.0.0.1", port: int = 9101, weight: int = 0, backend: str = BACKEND_NAME) -> pb.Target:
    return pb.Target(
        name=f"{backend}/{host}:{port}", backend=backend, weight=weight, address=pb.SocketAddress(host=host, port=port)
    )


def resources(*messages: pb.Backend | pb.Target) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for message in messages:
        out.setdefault(BACKEND if isinstance(message, pb.Backend) else TARGET, {})[message.name] = message
    return out


def cluster_of(*messages: pb.Backend | pb.Target, name: str = BACKEND_NAME) -> UpstreamCluster:
    return compile_config(resources(*messages), version="v").backends[name]


def rejected(*messages: pb.Backend | pb.Target) -> dict[tuple[str, str, str], str]:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resources(*messages), version="bad")
    return by_field(caught.value.errors)


def by_field(errors: Iterable[ResourceError]) -> dict[tuple[str, str, str], str]:
    return {(e.type_url.rsplit(".", 1)[-1], e.name, e.field): e.message for e in errors}


def test_defaults_fill_every_field() -> None:
    cluster = cluster_of(a2a_backend(), address())
    assert cluster.kind == "a2a"
    assert cluster.a2a == A2aBackendSettings(
        agent_name=BACKEND_NAME, base_path="/", max_request_bytes=DEFAULT_A2A_MAX_REQUEST_BYTES, signed_cards="strip"
    )
    assert DEFAULT_A2A_MAX_REQUEST_BYTES == 4 * 1024 * 1024
    assert cluster.mcp is None


def test_settings_compile_to_a_frozen_dataclass() -> None:
    cluster = cluster_of(
        a2a_backend(
            agent_name="research/researcher",
            base_path="/a2a/v1/",
            max_request_bytes=1024,
            signed_cards=pb.A2aBackend.SIGNED_CARDS_PRESERVE,
        ),
        address(),
    )
    settings = cluster.a2a
    assert settings == A2aBackendSettings("research/researcher", "/a2a/v1", 1024, "preserve")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.agent_name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("base_path", "normalized"), [("", "/"), ("/", "/"), ("//", "/"), ("/agent", "/agent"), ("/a/b//", "/a/b")]
)
def test_base_path_has_no_trailing_slash_unless_root(base_path: str, normalized: str) -> None:
    settings = cluster_of(a2a_backend(base_path=base_path), address()).a2a
    assert settings is not None and settings.base_path == normalized


@pytest.mark.parametrize("signed", [pb.A2aBackend.SIGNED_CARDS_UNSPECIFIED, pb.A2aBackend.SIGNED_CARDS_STRIP])
def test_unspecified_signed_cards_means_strip(signed: int) -> None:
    settings = cluster_of(a2a_backend(signed_cards=signed), address()).a2a
    assert settings is not None and settings.signed_cards == "strip"


def test_targets_are_ordinary_weighted_address_targets() -> None:
    cluster = cluster_of(a2a_backend(), address(port=9101, weight=3), address(port=9102))
    assert [(t.host, t.port, t.weight) for t in cluster.targets] == [("127.0.0.1", 9101, 3), ("127.0.0.1", 9102, 1)]
    assert cluster.pick_target(lambda: 0.0) is cluster.targets[0]
    assert cluster.pick_target(lambda: 0.99) is cluster.targets[1]
    assert cluster.targets[0].authority == "127.0.0.1:9101"


def test_backend_settings_apply_like_http_backends() -> None:
    ca = trustme.CA()
    backend = a2a_backend(agent_name="planner")
    backend.protocol = pb.UPSTREAM_PROTOCOL_HTTP2
    backend.tls.ca_certificates_pem = ca.cert_pem.bytes()
    backend.tls.server_name = "planner.example.com"
    backend.pool.max_connections = 7
    cluster = cluster_of(backend, address(host="planner.internal", port=443))
    assert (cluster.protocol, cluster.server_name, cluster.max_connections) == ("http2", "planner.example.com", 7)
    assert cluster.ssl_context is not None
    assert cluster.a2a is not None and cluster.a2a.agent_name == "planner"


def test_backend_without_targets_compiles() -> None:
    cluster = cluster_of(a2a_backend())
    assert cluster.targets == () and cluster.pick_target() is None
    assert cluster.a2a is not None


@pytest.mark.parametrize(
    ("a2a", "field", "message"),
    [
        ({"agent_name": "a b"}, "a2a.agent_name", "invalid agent name 'a b'"),
        ({"agent_name": "a/b/c"}, "a2a.agent_name", "'namespace/name' or 'name'"),
        ({"agent_name": "-planner"}, "a2a.agent_name", "starting and ending with a letter or digit"),
        ({"agent_name": "x" * 254}, "a2a.agent_name", "at most 253 characters"),
        ({"base_path": "agent"}, "a2a.base_path", "must start with '/'"),
        ({"base_path": "/a?b=1"}, "a2a.base_path", "no query"),
        ({"max_request_bytes": MAX_A2A_REQUEST_BYTES + 1}, "a2a.max_request_bytes", "exceeds the limit"),
        ({"signed_cards": 9}, "a2a.signed_cards", "unknown SignedCards value 9"),
    ],
)
def test_bad_values_nack_naming_the_field(a2a: dict[str, object], field: str, message: str) -> None:
    errors = rejected(a2a_backend(**a2a), address())
    assert message in errors[("Backend", BACKEND_NAME, field)]
    assert len(errors) == 1, errors


def test_empty_agent_name_falls_back_to_the_backend_key_and_says_so() -> None:
    # A Service's key ("ns/svc:port") is no agent name; the control plane always sends one.
    errors = rejected(a2a_backend(name="agents/svc:9000"), address(backend="agents/svc:9000"))
    message = errors[("Backend", "agents/svc:9000", "a2a.agent_name")]
    assert "the backend name 'agents/svc:9000' was used" in message


def test_every_problem_is_reported_together_and_the_message_names_the_resource() -> None:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(
            resources(
                a2a_backend(agent_name="bad name", base_path="nope", signed_cards=5),
                address(port=0),
            ),
            version="bad",
        )
    fields = sorted(error.field for error in caught.value.errors)
    assert fields == ["a2a.agent_name", "a2a.base_path", "a2a.signed_cards", "address.port"]
    assert f"Backend {BACKEND_NAME}: a2a.base_path: invalid path 'nope'" in str(caught.value)


def test_mcp_server_target_under_an_a2a_backend_is_refused() -> None:
    server = pb.Target(
        name=f"{BACKEND_NAME}/x",
        backend=BACKEND_NAME,
        mcp=pb.McpServer(name="x", stdio=pb.McpStdioTransport(command="server")),
    )
    errors = rejected(a2a_backend(), server)
    assert "is not an MCP backend" in errors[("Target", f"{BACKEND_NAME}/x", "mcp")]


def test_http_backends_carry_no_a2a_settings() -> None:
    http = pb.Backend(name="agents/web", http=pb.HttpBackend())
    cluster = cluster_of(http, address(backend="agents/web"), name="agents/web")
    assert (cluster.kind, cluster.a2a) == ("http", None)


def test_compile_a2a_settings_reports_through_the_reporter() -> None:
    reported: list[tuple[str, str]] = []
    settings = compile_a2a_settings(
        lambda field, message: reported.append((field, message)),
        "ns/agent",
        pb.A2aBackend(max_request_bytes=MAX_A2A_REQUEST_BYTES),
    )
    assert reported == []
    assert settings == A2aBackendSettings("ns/agent", "/", MAX_A2A_REQUEST_BYTES, "strip")
    assert compile_a2a_settings(lambda f, m: reported.append((f, m)), "ns/agent", pb.A2aBackend(base_path="x")) is None
    assert [field for field, _ in reported] == ["a2a.base_path"]
