"""MCP Backends from YAML: field validation, translation to Backend/Target resources, and a
round trip through the data plane's compile (what the control plane emits, a proxy accepts)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from controlplane.model import KubeObject, SourceRef, object_from_manifest, validate
from controlplane.translate import translate
from dataplane.config.compile import compile_config
from dataplane.config.model import McpSseTarget, McpStdioTarget, McpStreamableHttpTarget
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, TARGET
from tests.controlplane.test_translate_golden import load_objects

GOLDEN = Path(__file__).parent / "golden"
KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()


def manifest(kind: str, name: str, body: dict[str, Any], **metadata: Any) -> KubeObject:
    api_version = "agentgate.dev/v1alpha1" if kind == "Backend" else "v1"
    doc = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "default", **metadata}}
    doc.update(body)
    obj, errors = object_from_manifest(doc, SourceRef("mcp.yaml"))
    assert obj is not None, errors
    return obj


def mcp_backend(**mcp: Any) -> KubeObject:
    mcp.setdefault("sessionKeyRef", {"name": "keys", "key": "current"})
    mcp.setdefault("targets", [{"name": "local", "stdio": {"command": "server"}}])
    return manifest("Backend", "tools", {"spec": {"mcp": mcp}})


def errors_of(obj: KubeObject) -> dict[str, str]:
    return {error.field: error.message for error in validate(obj)}


def test_valid_spec_has_no_errors() -> None:
    backend = mcp_backend(
        prefixMode="Never",
        failureMode="FailOpen",
        maxBodyBytes=1024,
        sessionIdleTimeout="5m",
        previousSessionKeyRefs=[{"name": "keys", "key": "old"}],
        targets=[
            {"name": "a_b-C9", "static": {"host": "10.0.0.1", "port": 80, "path": "/mcp", "tls": {}}},
            {"name": "sse", "protocol": "SSE", "static": {"host": "sse.example.com", "port": 3001}},
            {"name": "io", "stdio": {"command": "npx", "args": ["-y", "x"], "env": {"A_B": "1"}, "workingDir": "/"}},
        ],
    )
    assert validate(backend) == []


@pytest.mark.parametrize(
    ("mcp", "field", "message"),
    [
        ({"targets": []}, "spec.mcp.targets", "must not be empty"),
        ({"targets": [{"name": "a.b", "stdio": {"command": "x"}}]}, "spec.mcp.targets[0].name", "invalid MCP target"),
        ({"targets": [{"name": "a__b", "stdio": {"command": "x"}}]}, "spec.mcp.targets[0].name", "separator"),
        ({"targets": [{"name": "x" * 64, "stdio": {"command": "x"}}]}, "spec.mcp.targets[0].name", "at most 63"),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x"}}, {"name": "a", "stdio": {"command": "y"}}]},
            "spec.mcp.targets[1].name",
            "already used by spec.mcp.targets[0]",
        ),
        ({"targets": [{"name": "a"}]}, "spec.mcp.targets[0]", "exactly one of static, stdio"),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x"}, "static": {"host": "h", "port": 1}}]},
            "spec.mcp.targets[0]",
            "only one of",
        ),
        (
            {"targets": [{"name": "a", "protocol": "HTTP", "static": {"host": "h", "port": 1}}]},
            "spec.mcp.targets[0].protocol",
            "StreamableHTTP, SSE",
        ),
        (
            {"targets": [{"name": "a", "protocol": "SSE", "stdio": {"command": "x"}}]},
            "spec.mcp.targets[0].protocol",
            "only applies to static",
        ),
        ({"targets": [{"name": "a", "static": {"port": 1}}]}, "spec.mcp.targets[0].static.host", "required"),
        (
            {"targets": [{"name": "a", "static": {"host": "h", "port": 0}}]},
            "spec.mcp.targets[0].static.port",
            "out of range",
        ),
        (
            {"targets": [{"name": "a", "static": {"host": "h", "port": 1, "path": "mcp"}}]},
            "spec.mcp.targets[0].static.path",
            "absolute path",
        ),
        (
            {
                "targets": [
                    {"name": "a", "static": {"host": "h", "port": 1, "headers": [{"name": "x y", "value": "v"}]}}
                ]
            },
            "spec.mcp.targets[0].static.headers[0].name",
            "invalid value",
        ),
        (
            {"targets": [{"name": "a", "static": {"host": "h", "port": 1, "tls": {"sni": "Not A Host"}}}]},
            "spec.mcp.targets[0].static.tls.sni",
            "not a valid hostname",
        ),
        ({"targets": [{"name": "a", "stdio": {}}]}, "spec.mcp.targets[0].stdio.command", "required"),
        ({"targets": [{"name": "a", "stdio": {"command": ""}}]}, "spec.mcp.targets[0].stdio.command", "empty"),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x", "args": [1]}}]},
            "spec.mcp.targets[0].stdio.args[0]",
            "must be a string",
        ),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x", "env": {"A-B": "1"}}}]},
            "spec.mcp.targets[0].stdio.env",
            "invalid variable name",
        ),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x", "env": {"A": 1}}}]},
            "spec.mcp.targets[0].stdio.env.A",
            "must be a string",
        ),
        (
            {"targets": [{"name": "a", "stdio": {"command": "x", "workingDir": "tmp"}}]},
            "spec.mcp.targets[0].stdio.workingDir",
            "absolute path",
        ),
        ({"prefixMode": "always"}, "spec.mcp.prefixMode", "Conditional, Always, Never"),
        ({"failureMode": "Closed"}, "spec.mcp.failureMode", "FailClosed, FailOpen"),
        ({"sessionKeyRef": None}, "spec.mcp.sessionKeyRef", "required"),
        ({"sessionKeyRef": {"name": "keys"}}, "spec.mcp.sessionKeyRef.key", "required"),
        (
            {"sessionKeyRef": {"name": "keys", "key": "k", "namespace": "x"}},
            "spec.mcp.sessionKeyRef.namespace",
            "unknown",
        ),
        ({"previousSessionKeyRefs": [{"key": "k"}]}, "spec.mcp.previousSessionKeyRefs[0].name", "required"),
        ({"maxBodyBytes": -1}, "spec.mcp.maxBodyBytes", "out of range"),
        ({"maxBodyBytes": "1Mi"}, "spec.mcp.maxBodyBytes", "must be an integer"),
        ({"sessionIdleTimeout": "0s"}, "spec.mcp.sessionIdleTimeout", "greater than zero"),
        ({"sessionIdleTimeout": "forever"}, "spec.mcp.sessionIdleTimeout", "invalid duration"),
        ({"prefix": "Always"}, "spec.mcp.prefix", "unknown field"),
    ],
)
def test_mcp_errors_name_the_field(mcp: dict[str, Any], field: str, message: str) -> None:
    if mcp.get("sessionKeyRef", "") is None:
        backend = manifest(
            "Backend", "tools", {"spec": {"mcp": {"targets": [{"name": "a", "stdio": {"command": "x"}}]}}}
        )
    else:
        backend = mcp_backend(**mcp)
    errors = errors_of(backend)
    assert field in errors, errors
    assert message in errors[field]
    shown = [str(error) for error in validate(backend) if error.field == field]
    assert shown[0].startswith(f"mcp.yaml: Backend default/tools: {field}: ")


def test_backend_tls_is_rejected_for_mcp() -> None:
    backend = manifest("Backend", "tools", {"spec": {"tls": {}, "mcp": mcp_backend().spec["mcp"]}})
    assert "set it per target" in errors_of(backend)["spec.tls"]


def test_static_and_mcp_cannot_be_combined() -> None:
    spec = {"static": {"host": "h", "port": 1}, "mcp": mcp_backend().spec["mcp"]}
    assert "only one of static, mcp" in errors_of(manifest("Backend", "tools", {"spec": spec}))["spec"]


def keys_secret(**data: str) -> KubeObject:
    return manifest("Secret", "keys", {"stringData": data or {"current": KEY_B64}})


def route_to(*refs: dict[str, Any]) -> list[KubeObject]:
    gateway_class = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": "agentgate"},
        "spec": {"controllerName": "agentgate.dev/gateway-controller"},
    }
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
    }
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": list(refs)}]},
    }
    objects = []
    for doc in (gateway_class, gateway, route):
        obj, errors = object_from_manifest(doc)
        assert obj is not None, errors
        objects.append(obj)
    return objects


OUR_REF = {"group": "agentgate.dev", "kind": "Backend", "name": "tools"}


def test_translation_builds_backend_and_targets() -> None:
    backend = mcp_backend(
        targets=[
            {
                "name": "b",
                "static": {"host": "h.example.com", "port": 8080, "headers": [{"name": "X-A", "value": "1"}]},
            },
            {"name": "a", "stdio": {"command": "server", "env": {"Z": "1", "A": "2"}}},
        ]
    )
    result = translate([*route_to(OUR_REF), backend, keys_secret()])
    snapshot = result.snapshots["default/web"]
    message = snapshot[BACKEND]["default/tools"]
    assert isinstance(message, pb.Backend)
    assert message.WhichOneof("kind") == "mcp"
    assert message.mcp.prefix_mode == pb.McpBackend.PREFIX_MODE_CONDITIONAL
    assert message.mcp.failure_mode == pb.McpBackend.FAILURE_MODE_FAIL_CLOSED
    assert [(k.id, k.key) for k in message.mcp.session_keys] == [("keys/current", KEY)]
    assert sorted(snapshot[TARGET]) == ["default/tools/a", "default/tools/b"]
    http = snapshot[TARGET]["default/tools/b"]
    assert isinstance(http, pb.Target)
    assert http.mcp.WhichOneof("transport") == "streamable_http"
    assert http.mcp.streamable_http.path == "/mcp"
    assert [(h.name, h.value) for h in http.mcp.streamable_http.headers] == [("X-A", "1")]
    stdio = snapshot[TARGET]["default/tools/a"]
    assert isinstance(stdio, pb.Target)
    assert [e.name for e in stdio.mcp.stdio.env] == ["A", "Z"]  # sorted: a stable resource version


def test_raw_key_bytes_in_secret_data_are_accepted() -> None:
    secret = manifest("Secret", "keys", {"data": {"current": base64.b64encode(KEY).decode()}})
    result = translate([*route_to(OUR_REF), mcp_backend(), secret])
    message = result.snapshots["default/web"][BACKEND]["default/tools"]
    assert isinstance(message, pb.Backend)
    assert message.mcp.session_keys[0].key == KEY


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (None, "spec.mcp.sessionKeyRef: Secret default/keys not found"),
        ({"other": KEY_B64}, "spec.mcp.sessionKeyRef: Secret default/keys has no key 'current'"),
        ({"current": base64.b64encode(b"x" * 16).decode()}, "must hold 32 bytes"),
    ],
)
def test_unusable_session_key_fails_the_backend(secret: dict[str, str] | None, expected: str) -> None:
    objects = [*route_to(OUR_REF), mcp_backend()]
    if secret is not None:
        objects.append(keys_secret(**secret))
    result = translate(objects)
    assert result.snapshots["default/web"][BACKEND] == {}
    status = next(s for s in result.statuses if s.kind == "Backend")
    condition = status.status["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSessionKeyRef")
    assert expected in condition["message"]


def test_service_with_mcp_app_protocol() -> None:
    service = manifest(
        "Service",
        "tools",
        {"spec": {"ports": [{"port": 3000, "appProtocol": "kgateway.dev/mcp"}]}},
        annotations={"kgateway.dev/mcp-path": "/custom"},
    )
    secret = manifest("Secret", "agentgate-mcp-session-key", {"stringData": {"current": KEY_B64}})
    result = translate([*route_to({"name": "tools", "port": 3000}), service, secret])
    snapshot = result.snapshots["default/web"]
    backend = snapshot[BACKEND]["default/tools:3000"]
    assert isinstance(backend, pb.Backend)
    assert [k.id for k in backend.mcp.session_keys] == ["agentgate-mcp-session-key/current"]
    target = snapshot[TARGET]["default/tools:3000/tools"]
    assert isinstance(target, pb.Target)
    transport = target.mcp.streamable_http
    assert (transport.address.host, transport.address.port, transport.path) == (
        "tools.default.svc.cluster.local",
        3000,
        "/custom",
    )


def test_service_with_bad_path_annotation_is_not_usable() -> None:
    service = manifest(
        "Service",
        "tools",
        {"spec": {"ports": [{"port": 3000, "appProtocol": "kgateway.dev/mcp"}]}},
        annotations={"kgateway.dev/mcp-path": "mcp"},
    )
    secret = manifest("Secret", "agentgate-mcp-session-key", {"stringData": {"current": KEY_B64}})
    result = translate([*route_to({"name": "tools", "port": 3000}), service, secret])
    assert result.snapshots["default/web"][BACKEND] == {}
    route = next(s for s in result.statuses if s.kind == "HTTPRoute")
    resolved = route.status["parents"][0]["conditions"][1]
    assert resolved["reason"] == "BackendNotFound"
    assert "kgateway.dev/mcp-path 'mcp' is not an absolute path" in resolved["message"]


@pytest.mark.parametrize("case", ["mcp-federation", "mcp-service", "mcp-invalid"])
def test_golden_snapshots_compile_in_the_data_plane(case: str) -> None:
    """Whatever the translator emits for MCP, a proxy accepts and compiles to typed settings."""
    result = translate(load_objects(GOLDEN / case / "input.yaml"))
    for resources in result.snapshots.values():
        config = compile_config(resources, version="v1")
        mcp = [cluster for cluster in config.backends.values() if cluster.kind == "mcp"]
        assert mcp, "every case routes to at least one usable MCP backend"
        for cluster in mcp:
            assert cluster.mcp is not None and cluster.mcp.targets
            assert all(len(key.key) == 32 for key in cluster.mcp.session_keys)


def test_federation_golden_compiles_to_each_transport() -> None:
    result = translate(load_objects(GOLDEN / "mcp-federation" / "input.yaml"))
    config = compile_config(result.snapshots["default/web"], version="v1")
    settings = config.backends["default/tools"].mcp
    assert settings is not None
    assert (settings.prefix_mode, settings.failure_mode, settings.prefix_names) == ("always", "fail_open", True)
    assert (settings.max_body_bytes, settings.session_idle_timeout) == (1048576, 600.0)
    assert [key.key_id for key in settings.session_keys] == ["mcp-keys/current", "mcp-keys/previous"]
    by_name = {target.name: target for target in settings.targets}
    assert isinstance(by_name["git"], McpStdioTarget)
    assert isinstance(by_name["legacy-files"], McpSseTarget)
    search = by_name["web_search"]
    assert isinstance(search, McpStreamableHttpTarget)
    assert search.ssl_context is not None and search.server_name == "search.example.com"
    assert search.headers == (("authorization", "Bearer gateway-token"),)


def test_same_key_listed_twice_is_refused() -> None:
    backend = mcp_backend(previousSessionKeyRefs=[{"name": "keys", "key": "current"}])
    result = translate([*route_to(OUR_REF), backend, keys_secret()])
    status = next(s for s in result.statuses if s.kind == "Backend")
    message = status.status["conditions"][0]["message"]
    assert message == "spec.mcp.previousSessionKeyRefs[0]: Secret key keys/current is listed twice"
