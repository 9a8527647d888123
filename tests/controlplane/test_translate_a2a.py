"""A2A Backends and kgateway.dev/a2a Services from YAML: field validation, translation to
Backend/Target resources, a round trip through the data plane's compile, and the shipped
examples/a2a folder loaded the way `agentgate run --config examples/a2a` loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.model import KubeObject, SourceRef, object_from_manifest, validate
from controlplane.sources.folder import FolderSource
from controlplane.translate import translate
from dataplane.config.a2a import agent_name_problem
from dataplane.config.compile import compile_config
from dataplane.config.model import A2aBackendSettings
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, ROUTE, TARGET
from tests.controlplane.test_translate_golden import load_objects

GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "a2a"
OUR_REF = {"group": "agentgate.dev", "kind": "Backend", "name": "planner"}


def manifest(kind: str, name: str, body: dict[str, Any], **metadata: Any) -> KubeObject:
    api_version = "agentgate.dev/v1alpha1" if kind == "Backend" else "v1"
    doc = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "default", **metadata}}
    doc.update(body)
    obj, errors = object_from_manifest(doc, SourceRef("a2a.yaml"))
    assert obj is not None, errors
    return obj


def a2a_backend(spec_extra: dict[str, Any] | None = None, **a2a: Any) -> KubeObject:
    if "serviceRef" not in a2a:
        a2a.setdefault("static", {"host": "127.0.0.1", "port": 9101})
    return manifest("Backend", "planner", {"spec": {"a2a": a2a, **(spec_extra or {})}})


def errors_of(obj: KubeObject) -> dict[str, str]:
    return {error.field: error.message for error in validate(obj)}


def route_to(*refs: dict[str, Any]) -> list[KubeObject]:
    docs = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "agentgate"},
            "spec": {"controllerName": "agentgate.dev/gateway-controller"},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": list(refs)}]},
        },
    ]
    objects = []
    for doc in docs:
        obj, errors = object_from_manifest(doc)
        assert obj is not None, errors
        objects.append(obj)
    return objects


# --- validation -------------------------------------------------------------------------------


def test_valid_specs_have_no_errors() -> None:
    assert validate(a2a_backend()) == []
    full = a2a_backend(
        {"protocol": "HTTP2", "tls": {"sni": "planner.example.com"}, "connectTimeout": "1s"},
        agentName="team-a/planner.v2",
        basePath="/a2a",
        maxRequestBytes=1024,
        signedCards="Preserve",
        static={"hosts": [{"host": "a.example.com", "port": 443, "weight": 2}, {"host": "10.0.0.2", "port": 443}]},
    )
    assert validate(full) == []
    assert validate(a2a_backend(serviceRef={"name": "planner", "port": 8000}, agentName="planner")) == []


@pytest.mark.parametrize(
    ("a2a", "field", "message"),
    [
        ({"agentName": "a b"}, "spec.a2a.agentName", "invalid agent name 'a b'"),
        ({"agentName": "ns/a/b"}, "spec.a2a.agentName", "'namespace/name' or 'name'"),
        ({"agentName": ""}, "spec.a2a.agentName", "must not be empty"),
        ({"agentName": "x" * 254}, "spec.a2a.agentName", "at most 253"),
        ({"agentName": 7}, "spec.a2a.agentName", "must be a string"),
        ({"basePath": "a2a"}, "spec.a2a.basePath", "absolute path"),
        ({"basePath": "/a/../b"}, "spec.a2a.basePath", "must not contain '/../'"),
        ({"maxRequestBytes": 0}, "spec.a2a.maxRequestBytes", "out of range 1..1073741824"),
        ({"maxRequestBytes": "4Mi"}, "spec.a2a.maxRequestBytes", "must be an integer"),
        ({"signedCards": "strip"}, "spec.a2a.signedCards", "must be one of Strip, Preserve"),
        ({"signed": "Strip"}, "spec.a2a.signed", "unknown field"),
        ({"static": {"host": "h", "port": 0}}, "spec.a2a.static.port", "out of range"),
        ({"static": {"port": 1}}, "spec.a2a.static.host", "required"),
        ({"static": {"host": "h", "port": 1, "path": "/x"}}, "spec.a2a.static.path", "unknown field"),
        ({"serviceRef": {"port": 80}}, "spec.a2a.serviceRef.name", "required"),
        ({"serviceRef": {"name": "svc"}}, "spec.a2a.serviceRef.port", "required"),
        ({"serviceRef": {"name": "Svc_1", "port": 80}}, "spec.a2a.serviceRef.name", "invalid value"),
        ({"serviceRef": {"name": "s", "port": 80, "namespace": "x"}}, "spec.a2a.serviceRef.namespace", "unknown"),
        (
            {"static": {"host": "h", "port": 1}, "serviceRef": {"name": "s", "port": 80}},
            "spec.a2a",
            "only one of static, serviceRef",
        ),
    ],
)
def test_a2a_errors_name_the_field(a2a: dict[str, Any], field: str, message: str) -> None:
    backend = a2a_backend(**a2a)
    errors = errors_of(backend)
    assert field in errors, errors
    assert message in errors[field]
    shown = [str(error) for error in validate(backend) if error.field == field]
    assert shown[0].startswith(f"a2a.yaml: Backend default/planner: {field}: ")


def test_an_address_is_required() -> None:
    backend = manifest("Backend", "planner", {"spec": {"a2a": {"agentName": "planner"}}})
    assert "exactly one of static, serviceRef is required" in errors_of(backend)["spec.a2a"]
    # `a2a:` with no value is pruned, as the API server prunes nulls: no kind of backend is left.
    assert "is required" in errors_of(manifest("Backend", "planner", {"spec": {"a2a": None}}))["spec"]


def test_static_and_a2a_cannot_be_combined() -> None:
    spec = {"static": {"host": "h", "port": 1}, "a2a": {"static": {"host": "h", "port": 1}}}
    assert "only one of static, a2a" in errors_of(manifest("Backend", "planner", {"spec": spec}))["spec"]


@pytest.mark.parametrize("name", ["planner", "default/planner", "a", "a.b_c-d/E9", "x" * 253])
def test_agent_names_both_planes_accept(name: str) -> None:
    # One rule (shared/config_rules.py) for the validator and the proxy's compiler.
    assert validate(a2a_backend(agentName=name)) == []
    assert agent_name_problem(name) is None


@pytest.mark.parametrize("name", ["/planner", "a/b/c", "-x", "x" * 254, "名前"])
def test_agent_names_both_planes_refuse(name: str) -> None:
    assert validate(a2a_backend(agentName=name)) != []
    assert agent_name_problem(name) is not None


# --- translation ------------------------------------------------------------------------------


def test_defaults_are_filled_and_targets_are_addresses() -> None:
    result = translate([*route_to(OUR_REF), a2a_backend()])
    snapshot = result.snapshots["default/web"]
    backend = snapshot[BACKEND]["default/planner"]
    assert isinstance(backend, pb.Backend)
    assert backend.WhichOneof("kind") == "a2a"
    assert (backend.a2a.agent_name, backend.a2a.base_path, backend.a2a.max_request_bytes) == ("default/planner", "/", 0)
    assert backend.a2a.signed_cards == pb.A2aBackend.SIGNED_CARDS_STRIP
    target = snapshot[TARGET]["default/planner/127.0.0.1:9101"]
    assert isinstance(target, pb.Target)
    assert (target.address.host, target.address.port, target.backend) == ("127.0.0.1", 9101, "default/planner")


def test_service_ref_resolves_to_the_service_address() -> None:
    service = manifest("Service", "planner-svc", {"spec": {"ports": [{"port": 8000}]}})
    backend = a2a_backend(serviceRef={"name": "planner-svc", "port": 8000})
    snapshot = translate([*route_to(OUR_REF), backend, service]).snapshots["default/web"]
    assert list(snapshot[TARGET]) == ["default/planner/planner-svc.default.svc.cluster.local:8000"]


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        ([], "spec.a2a.serviceRef: Service default/planner-svc not found"),
        (
            [{"ports": [{"port": 80}, {"port": 81}]}],
            "spec.a2a.serviceRef: Service default/planner-svc has no port 8000 (ports: 80, 81)",
        ),
    ],
)
def test_unusable_service_ref_fails_the_backend(services: list[dict[str, Any]], expected: str) -> None:
    objects = [*route_to(OUR_REF), a2a_backend(serviceRef={"name": "planner-svc", "port": 8000})]
    objects += [manifest("Service", "planner-svc", {"spec": spec}) for spec in services]
    result = translate(objects)
    assert result.snapshots["default/web"][BACKEND] == {}
    status = next(s for s in result.statuses if s.kind == "Backend")
    condition = status.status["conditions"][0]
    assert (condition["status"], condition["reason"], condition["message"]) == ("False", "BackendNotFound", expected)
    route = next(s for s in result.statuses if s.kind == "HTTPRoute")
    assert route.status["parents"][0]["conditions"][1]["status"] == "False"
    rule = result.snapshots["default/web"][ROUTE]["default/r/0"]
    assert isinstance(rule, pb.Route) and rule.direct_response_status == 500


def test_service_with_a2a_app_protocol() -> None:
    service = manifest(
        "Service",
        "agent",
        {"spec": {"ports": [{"port": 8443, "appProtocol": "kgateway.dev/a2a"}]}},
        annotations={"kgateway.dev/a2a-path": "/api/a2a/agent"},
    )
    snapshot = translate([*route_to({"name": "agent", "port": 8443}), service]).snapshots["default/web"]
    backend = snapshot[BACKEND]["default/agent:8443"]
    assert isinstance(backend, pb.Backend)
    assert (backend.a2a.agent_name, backend.a2a.base_path) == ("default/agent", "/api/a2a/agent")
    target = snapshot[TARGET]["default/agent:8443/agent.default.svc.cluster.local:8443"]
    assert isinstance(target, pb.Target) and target.address.port == 8443


def test_service_without_path_annotation_serves_the_agent_at_root() -> None:
    service = manifest("Service", "agent", {"spec": {"ports": [{"port": 80, "appProtocol": "kgateway.dev/a2a"}]}})
    backend = translate([*route_to({"name": "agent", "port": 80}), service]).snapshots["default/web"][BACKEND]
    message = backend["default/agent:80"]
    assert isinstance(message, pb.Backend) and message.a2a.base_path == "/"


# --- round trip through the data plane ----------------------------------------------------------


@pytest.mark.parametrize("case", ["a2a-backend", "a2a-service", "a2a-invalid"])
def test_golden_snapshots_compile_in_the_data_plane(case: str) -> None:
    """Whatever the translator emits for A2A, a proxy accepts and compiles to typed settings."""
    result = translate(load_objects(GOLDEN / case / "input.yaml"))
    for resources in result.snapshots.values():
        config = compile_config(resources, version="v1")
        agents = [cluster for cluster in config.backends.values() if cluster.kind == "a2a"]
        assert agents, "every case routes to at least one usable A2A backend"
        for cluster in agents:
            assert isinstance(cluster.a2a, A2aBackendSettings) and cluster.targets


def test_backend_golden_compiles_to_the_settings_written() -> None:
    result = translate(load_objects(GOLDEN / "a2a-backend" / "input.yaml"))
    backends = compile_config(result.snapshots["default/web"], version="v1").backends
    researcher = backends["default/researcher"]
    assert researcher.a2a == A2aBackendSettings("research/researcher", "/a2a/v1", 1048576, "preserve")
    assert (researcher.protocol, researcher.server_name) == ("http2", "researcher.example.com")
    assert researcher.ssl_context is not None
    assert [(t.host, t.weight) for t in researcher.targets] == [
        ("researcher-a.example.com", 3),
        ("researcher-b.example.com", 1),
    ]
    assert backends["default/planner"].a2a == A2aBackendSettings("default/planner", "/", 4 * 1024 * 1024, "strip")


# --- the shipped example folder -----------------------------------------------------------------


def test_example_folder_loads_translates_and_compiles_without_errors() -> None:
    state = FolderSource(EXAMPLE).load()
    assert state.errors == ()
    assert len(list(EXAMPLE.glob("*.yaml"))) == 4
    result = translate(state.objects)
    for status in result.statuses:
        conditions = status.status.get("conditions") or [
            c for parent in status.status.get("parents", []) for c in parent["conditions"]
        ]
        assert conditions and all(c["status"] == "True" for c in conditions), status
    assert list(result.snapshots) == ["default/agents"]
    config = compile_config(result.snapshots["default/agents"], version="v1")
    agents = {
        name: (cluster.a2a, [t.authority for t in cluster.targets])
        for name, cluster in config.backends.items()
        if cluster.kind == "a2a"
    }
    assert agents == {
        "default/planner": (A2aBackendSettings("planner", "/", 4 * 1024 * 1024, "strip"), ["127.0.0.1:9101"]),
        "default/researcher": (A2aBackendSettings("researcher", "/", 4 * 1024 * 1024, "strip"), ["127.0.0.1:9102"]),
        "default/summarizer:9103": (
            A2aBackendSettings("default/summarizer", "/", 4 * 1024 * 1024, "strip"),
            ["localhost:9103"],
        ),
    }


def test_example_routes_rewrite_agent_prefixes_and_route_by_host() -> None:
    result = translate(FolderSource(EXAMPLE).load().objects)
    routes = result.snapshots["default/agents"][ROUTE]
    by_backend: dict[str, list[tuple[str, list[str], str]]] = {}
    for route in routes.values():
        assert isinstance(route, pb.Route)
        prefix = route.matches[0].path.value if route.matches else "/"
        rewrite = next(
            (f.url_rewrite.path.replace_prefix_match for f in route.filters if f.HasField("url_rewrite")), ""
        )
        by_backend.setdefault(route.backends[0].backend, []).append((prefix, list(route.hostnames), rewrite))
    assert {name: sorted(entries) for name, entries in by_backend.items()} == {
        "default/planner": [("/agents/planner", [], "/")],
        "default/researcher": [("/", ["researcher.agents.local"], ""), ("/agents/researcher", [], "/")],
        "default/summarizer:9103": [("/agents/summarizer", [], "/")],
    }
