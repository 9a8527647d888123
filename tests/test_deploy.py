"""deploy/ and examples/kagent: every overlay renders with kubectl's kustomize and every rendered object
is valid (Kubernetes' own schemas for built-in kinds, our CRD schemas and CEL rules for ours, our
Gateway API checks for Gateway API kinds); the objects refer to each other correctly; the CRD schemas
are generated from, and agree with, the validators in controlplane/model.

No API server can run here, so the CRD schemas are checked the way one would apply them: the OpenAPI
schema as JSON Schema with unknown fields refused (kubectl's default strict field validation), list-map
keys unique, and every x-kubernetes-validations rule evaluated with the CEL engine on the object.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cel
import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane.model import SourceRef, object_from_manifest, validate
from controlplane.translate import translate
from shared.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
GOLDEN = REPO / "tests" / "controlplane" / "golden"
KAGENT = REPO / "examples" / "kagent"
# Built-in kinds are validated against this Kubernetes release's schemas (native sidecars need 1.29+).
KUBERNETES_VERSION = "1.34"
OVERLAYS = sorted(path.name for path in (DEPLOY / "overlays").iterdir() if (path / "kustomization.yaml").exists())
# Every kustomization the tests render: the overlays, and the sidecar example.
RENDERED = [f"overlays/{name}" for name in OVERLAYS] + ["dataplane/sidecar"]
OUR_GROUP = "agentgate.dev"
GATEWAY_GROUP = "gateway.networking.k8s.io"
IMAGE = re.compile(r"ghcr\.io/agentgate/agentgate:\S+")
XDS_AUDIENCE = "agentgate-xds"
# Flags the deploy/ manifests use before shared/cli.py has them (the Kubernetes source adds them).
PENDING_FLAGS = frozenset({"--kubernetes"})


def _load_generator() -> Any:
    """deploy/crds/generate.py (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("crd_generator", DEPLOY / "crds" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# --- rendering --------------------------------------------------------------------------------


def kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl is not installed: `make test` installs Debian's kubernetes-client (or set KUBECTL)")
    return found


@functools.cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/<directory>`, parsed."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize deploy/{directory} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert docs, f"deploy/{directory} rendered nothing"
    return docs


def group_of(doc: Mapping[str, Any]) -> str:
    api_version = str(doc.get("apiVersion", ""))
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def named(docs: tuple[dict[str, Any], ...], kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs if d["kind"] == kind}


def pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every Deployment and DaemonSet."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            yield doc, doc["spec"]["template"]


def all_containers(pod_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def agentgate_containers(pod_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in all_containers(pod_spec) if IMAGE.fullmatch(c["image"])]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- our CRDs as a validator -------------------------------------------------------------------


@functools.cache
def crds() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((DEPLOY / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "CustomResourceDefinition":
            found[doc["spec"]["names"]["kind"]] = doc
    return found


def openapi(kind: str) -> dict[str, Any]:
    return crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """The schema as JSON Schema, with fields no schema declares refused (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def json_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(openapi(kind)))


def schema_problems(doc: Mapping[str, Any]) -> list[str]:
    """What an API server with our CRDs would refuse in `doc`, one line per problem."""
    kind = doc["kind"]
    problems = [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in json_validator(kind).iter_errors(doc)
    ]
    problems += list(_walk(doc, openapi(kind), "", evaluate=not problems))
    return problems


def _walk(value: Any, schema: Mapping[str, Any], path: str, *, evaluate: bool) -> Iterator[str]:
    """List-map key uniqueness everywhere; CEL rules only on a schema-valid object (as the API server,
    which runs them after the OpenAPI checks, on well-typed values)."""
    if evaluate:
        for rule in schema.get("x-kubernetes-validations", ()):
            try:
                holds = cel.evaluate(rule["rule"], {"self": value})
            except Exception as exc:  # the engine's errors are ValueError, TypeError, RuntimeError
                yield f"{path or '<root>'}: rule {rule['rule']!r} failed to evaluate: {exc}"
                continue
            if holds is not True:
                yield f"{path or '<root>'}: {rule['message']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _walk(item, sub, f"{path}.{key}" if path else key, evaluate=evaluate)
    elif isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "set" and len(set(map(json.dumps, value))) < len(value):
            yield f"{path}: duplicate entries in a set"
        if keys:
            seen: set[tuple[Any, ...]] = set()
            for item in value:
                identity = tuple(item.get(key) for key in keys) if isinstance(item, dict) else (item,)
                if identity in seen:
                    yield f"{path}: duplicate entry for {dict(zip(keys, identity, strict=True))}"
                seen.add(identity)
        for index, item in enumerate(value):
            yield from _walk(item, schema.get("items", {}), f"{path}[{index}]", evaluate=evaluate)


def validator_errors(doc: Mapping[str, Any]) -> list[str]:
    obj, errors = object_from_manifest(copy.deepcopy(dict(doc)), SourceRef("test.yaml"))
    assert obj is not None, [str(e) for e in errors]
    return [str(e) for e in (*errors, *validate(obj))]


def schema_nodes(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}{{}}")


# --- the overlays -------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", RENDERED)
def test_every_kustomization_renders(directory: str) -> None:
    docs = render(directory)
    kinds = {doc["kind"] for doc in docs}
    if directory.startswith("overlays/"):
        assert {"CustomResourceDefinition", "Deployment", "GatewayClass", "Gateway", "NetworkPolicy"} <= kinds
        assert ("DaemonSet" in kinds) == directory.endswith("daemonset")
    names = [(doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]) for doc in docs]
    assert len(names) == len(set(names)), "an object is rendered twice"


def test_the_overlays_differ_where_they_should() -> None:
    def replicas(directory: str, name: str) -> Any:
        return named(render(directory), "Deployment")[("agentgate-system", name)]["spec"].get("replicas")

    assert replicas("overlays/dev", "agentgate-controlplane") == 1
    assert replicas("overlays/dev", "agentgate-dataplane") == 1
    assert replicas("overlays/production", "agentgate-controlplane") == 2
    assert replicas("overlays/production", "agentgate-dataplane") is None  # the HPA owns it
    dev = named(render("overlays/dev"), "Deployment")[("agentgate-system", "agentgate-dataplane")]
    assert parse_arguments(dev["spec"]["template"]["spec"]["containers"][0]["args"])[0].log_level == "debug"
    production = render("overlays/production")
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= {d["kind"] for d in production}
    assert "ServiceMonitor" not in {d["kind"] for d in render("overlays/dev")}


def check_object(doc: dict[str, Any]) -> None:
    """One rendered object is valid: ours against the CRD schema and the control plane's validator,
    Gateway API's against the validator, the Prometheus Operator's by shape, the rest against
    Kubernetes' own schemas."""
    what = f"{doc['kind']} {doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
    group = group_of(doc)
    if group == OUR_GROUP:
        assert schema_problems(doc) == [], what
        assert validator_errors(doc) == [], what
    elif group == GATEWAY_GROUP:
        assert validator_errors(doc) == [], what
    elif group == "monitoring.coreos.com":
        # No schema of the Prometheus Operator's kinds is installable here: the shape it needs.
        assert doc["kind"] == "ServiceMonitor" and doc["apiVersion"] == "monitoring.coreos.com/v1", what
        assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["endpoints"], what
    else:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what}: {exc.message} at {'.'.join(map(str, exc.path))}")


@pytest.mark.parametrize("directory", RENDERED)
def test_every_rendered_object_is_valid(directory: str) -> None:
    for doc in render(directory):
        check_object(doc)


@pytest.mark.parametrize("directory", RENDERED)
def test_rendered_objects_refer_to_each_other(directory: str) -> None:
    docs = render(directory)
    templates = [(workload, template) for workload, template in pod_templates(docs)]
    service_accounts = named(docs, "ServiceAccount")
    for workload, template in templates:
        namespace = workload["metadata"]["namespace"]
        assert selects(workload["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
        account = template["spec"].get("serviceAccountName", "default")
        assert (namespace, account) in service_accounts, f"{workload['metadata']['name']}: no ServiceAccount {account}"

    def pods_of(namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            t
            for w, t in templates
            if w["metadata"]["namespace"] == namespace and selects(selector, t["metadata"]["labels"])
        ]

    def port_names(pods: list[dict[str, Any]]) -> set[Any]:
        return {
            p.get(k)
            for t in pods
            for c in all_containers(t["spec"])
            for p in c.get("ports", [])
            for k in ("name", "containerPort")
        }

    for (namespace, name), service in named(docs, "Service").items():
        pods = pods_of(namespace, service["spec"]["selector"])
        assert pods, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in port_names(pods), f"Service {name} port {port}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for (namespace, name), doc in named(docs, kind).items():
            selector = (doc["spec"].get("selector") or doc["spec"]["podSelector"])["matchLabels"]
            pods = pods_of(namespace, selector)
            assert pods, f"{kind} {name} selects no pod"
            for rule in doc["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    assert port["port"] in port_names(pods), f"{kind} {name} port {port}"
    for (namespace, name), hpa in named(docs, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (namespace, target["name"]) in named(docs, target["kind"]), f"HPA {name}"
    for (_, name), monitor in named(docs, "ServiceMonitor").items():
        services = [
            s
            for (ns, _), s in named(docs, "Service").items()
            if ns in monitor["spec"]["namespaceSelector"]["matchNames"]
            and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert services, f"ServiceMonitor {name} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services), name
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for (namespace, name), binding in named(docs, kind).items():
            role_kind = binding["roleRef"]["kind"]
            assert (namespace if role_kind == "Role" else "", binding["roleRef"]["name"]) in named(docs, role_kind), (
                name
            )
            for subject in binding["subjects"]:
                assert (subject["namespace"], subject["name"]) in service_accounts, f"{kind} {name}: {subject}"


@pytest.mark.parametrize("directory", RENDERED)
def test_workloads_are_locked_down(directory: str) -> None:
    docs = render(directory)
    images = set()
    for workload, template in pod_templates(docs):
        name = workload["metadata"]["name"]
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in all_containers(pod):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
        for container in agentgate_containers(pod):
            images.add(container["image"])
            if container["args"][0] != "dataplane":
                continue
            # A data plane holds no API credentials, only its audience-bound xDS token.
            assert pod["automountServiceAccountToken"] is False, name
            assert template["metadata"]["labels"]["agentgate.dev/xds-client"] == "true", name
            tokens = [
                source["serviceAccountToken"]
                for volume in pod["volumes"]
                if "projected" in volume
                for source in volume["projected"]["sources"]
                if "serviceAccountToken" in source
            ]
            assert [token["audience"] for token in tokens] == [XDS_AUDIENCE], name
    assert len(images) == 1, f"one agentgate image everywhere, got {images}"


def parse_arguments(arguments: list[str]) -> tuple[Any, list[str]]:
    """The container's arguments through the real CLI parser; (namespace, flags it does not know)."""
    parser = build_parser()
    _, unknown = parser.parse_known_args(["controlplane", "--config=/x", *PENDING_FLAGS])
    if unknown and arguments[0] == "controlplane" and not any(a.startswith("--config") for a in arguments):
        arguments = [*arguments, "--config=/x"]  # required until --kubernetes lands and replaces it
    return parser.parse_known_args(arguments)


@pytest.mark.parametrize("directory", RENDERED)
def test_container_arguments_are_ones_the_cli_accepts(directory: str) -> None:
    docs = render(directory)
    gateways = named(docs, "Gateway")
    for workload, template in pod_templates(docs):
        for container in agentgate_containers(template["spec"]):
            args, unknown = parse_arguments(container["args"])
            assert set(unknown) <= PENDING_FLAGS, f"{workload['metadata']['name']}: {unknown}"
            if args.command != "dataplane":
                continue
            # The data plane serves a Gateway of the same render, on ports its container declares.
            namespace, name = args.gateway.split("/")
            assert (namespace, name) in gateways, f"--gateway={args.gateway} is not rendered"
            declared = {p["containerPort"] for p in container["ports"]}
            assert {args.metrics_port, args.readiness_port} <= declared
            assert {listener["port"] for listener in gateways[(namespace, name)]["spec"]["listeners"]} <= declared
            host, port = args.xds.rsplit(":", 1)
            assert host == "agentgate-controlplane.agentgate-system.svc" and port == "9977"


def test_rbac_is_least_privilege() -> None:
    docs = render("overlays/production")
    rules = [
        (doc["kind"], doc["metadata"]["name"], rule)
        for doc in docs
        if doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
    ]
    written = set()
    for kind, name, rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"{kind} {name}: wildcard {field}"
        writes = set(rule["verbs"]) - {"get", "list", "watch"}
        for resource in rule["resources"]:
            if writes:
                written.add(resource)
            if resource in ("secrets", "configmaps"):
                assert not writes, f"{kind} {name} writes {resource}"
    assert written == {
        "gatewayclasses/status",
        "gateways/status",
        "httproutes/status",
        "backends/status",
        "policies/status",
        "events",
        "tokenreviews",
        "leases",
    }
    leases = [rule for kind, _, rule in rules if "leases" in rule["resources"]]
    assert all(kind == "Role" for kind, _, rule in rules if "leases" in rule["resources"])
    assert [rule["resourceNames"] for rule in leases if "update" in rule["verbs"]] == [["agentgate-controlplane"]]
    bound = {s["name"] for d in docs if d["kind"].endswith("Binding") for s in d["subjects"]}
    assert bound == {"agentgate-controlplane"}, "the data plane needs no API access"


# --- the CRDs -----------------------------------------------------------------------------------


def test_crds_are_what_the_generator_writes() -> None:
    for name, build in generate.OUTPUTS.items():
        committed = (DEPLOY / "crds" / name).read_text()
        assert committed == generate.render(build), (
            f"deploy/crds/{name} is stale: run .venv/bin/python deploy/crds/generate.py"
        )


def test_crds_are_structural_and_bounded() -> None:
    for kind, crd in crds().items():
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
        version = crd["spec"]["versions"][0]
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{OUR_GROUP}"
        assert version["subresources"] == {"status": {}}
        assert {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}["Accepted"] == (
            '.status.conditions[?(@.type=="Accepted")].status'
        )
        for path, node in schema_nodes(openapi(kind)):
            where = f"{kind}{path}"
            assert node.get("type") in ("object", "array", "string", "integer", "boolean"), where
            assert not ("properties" in node and "additionalProperties" in node), where
            # The API server bounds the cost of CEL rules by these.
            if node["type"] == "array":
                assert "maxItems" in node, where
            if node["type"] == "string" and "enum" not in node and not path.endswith((".apiVersion", ".kind")):
                assert "maxLength" in node or node.get("format") == "date-time", where
            if node["type"] == "object" and "additionalProperties" in node:
                assert "maxProperties" in node, where
            for key in node.get("x-kubernetes-list-map-keys", ()):
                assert key in node["items"]["required"], f"{where}: list-map key {key} must be required"


_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_SELF_PATH = re.compile(r"\bself((?:\.[A-Za-z_]\w*)+)(\s*\()?")


def test_cel_rules_compile_and_read_only_declared_fields() -> None:
    count = 0
    for kind in crds():
        for path, node in schema_nodes(openapi(kind)):
            for rule in node.get("x-kubernetes-validations", ()):
                count += 1
                source = rule["rule"]
                program = cel.compile(source)
                bound = set(_MACRO_BINDING.findall(source))
                assert set(program.variables()) - bound <= {"self"}, f"{kind}{path}: {source}"
                assert rule["message"], source
                for match in _SELF_PATH.finditer(source):
                    fields = match.group(1).split(".")[1:]
                    if match.group(2):  # the last name is a method: self.x.matches(...)
                        fields = fields[:-1]
                    current = node
                    for field in fields:
                        assert field in current.get("properties", {}), (
                            f"{kind}{path}: {source} reads undeclared {field}"
                        )
                        current = current["properties"][field]
    assert count >= 40


def our_documents(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in paths:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and group_of(doc) == OUR_GROUP:
                yield f"{path.relative_to(REPO)}[{index}] {doc['kind']} {doc['metadata']['name']}", doc


EXAMPLE_FILES = sorted(
    [*GOLDEN.glob("*/input.yaml"), *(REPO / "examples").rglob("*.yaml"), *DEPLOY.rglob("*.yaml")],
)
OUR_OBJECTS = dict(our_documents([p for p in EXAMPLE_FILES if "crds" not in p.parts]))


@pytest.mark.parametrize("where", sorted(OUR_OBJECTS))
def test_the_schema_agrees_with_the_validators_on_every_example(where: str) -> None:
    """Objects the validators accept pass the schema; golden objects they refuse are refused by it too,
    except where a schema cannot tell (listed with the reason)."""
    doc = OUR_OBJECTS[where]
    refused_by_validators = validator_errors(doc)
    problems = schema_problems(doc)
    if not refused_by_validators:
        assert problems == [], where
    elif doc["metadata"]["name"] in INEXPRESSIBLE:
        assert problems == [], f"{where}: the schema now catches it, drop it from INEXPRESSIBLE"
    else:
        assert problems, f"{where}: the validators refuse it ({refused_by_validators}) but the schema accepts it"


# Refused by the validators for reasons a CRD schema cannot see.
INEXPRESSIBLE = {
    "bad-cel": "CEL syntax and variables of policy rules (the control plane checks them, the proxy compiles them)",
    "cross-namespace": "a rule cannot read metadata.namespace to compare targetRefs[].namespace with it",
}


def _backend(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": "b", "namespace": "default"},
        "spec": spec,
    }


def _policy(**spec: Any) -> dict[str, Any]:
    spec.setdefault("targetRefs", [{"kind": "HTTPRoute", "name": "r"}])
    return {
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Policy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    }


STATIC = {"host": "10.0.0.1", "port": 80}
KEY = {"name": "keys", "key": "current"}
STDIO = {"name": "local", "stdio": {"command": "server"}}
JWKS = {"remote": {"url": "https://idp.example.com/jwks"}}
SA = {"issuer": "https://kubernetes.default.svc", "audiences": ["agentgate"]}
LIMIT = {"name": "l", "capacity": 10, "per": "1m"}
OPENAI = {"name": "openai", "type": "openai", "apiKeyRef": KEY}
LOCAL = {"name": "local", "type": "openaiCompatible", "host": "127.0.0.1", "port": 8000}

# Objects both the validators and the schema must refuse; each is one mistake.
INVALID = {
    "no variant": _backend(protocol="HTTP1"),
    "two variants": _backend(static=STATIC, a2a={"static": STATIC}),
    "unknown field": _backend(static=STATIC, timeout="1s"),
    "bad protocol": _backend(static=STATIC, protocol="HTTP3"),
    "host and hosts": _backend(static={**STATIC, "hosts": [STATIC]}),
    "repeated host": _backend(static={"hosts": [STATIC, STATIC]}),
    "no hosts": _backend(static={"hosts": []}),
    "port out of range": _backend(static={"host": "a.example.com", "port": 0}),
    "host with a space": _backend(static={"host": "not a host", "port": 80}),
    "tls on mcp": _backend(mcp={"sessionKeyRef": KEY, "targets": [STDIO]}, tls={}),
    "skip verify with CAs": _backend(
        static=STATIC, tls={"insecureSkipVerify": True, "caCertificateRefs": [{"name": "ca"}]}
    ),
    "ca not PEM": _backend(static=STATIC, tls={"caCertificates": "hello"}),
    "bad duration": _backend(static=STATIC, connectTimeout="5 seconds"),
    "mcp without key": _backend(mcp={"targets": [STDIO]}),
    "target name with __": _backend(mcp={"sessionKeyRef": KEY, "targets": [{**STDIO, "name": "a__b"}]}),
    "repeated target": _backend(mcp={"sessionKeyRef": KEY, "targets": [STDIO, STDIO]}),
    "static and stdio": _backend(mcp={"sessionKeyRef": KEY, "targets": [{**STDIO, "static": STATIC}]}),
    "protocol on stdio": _backend(mcp={"sessionKeyRef": KEY, "targets": [{**STDIO, "protocol": "SSE"}]}),
    "path with //": _backend(
        mcp={"sessionKeyRef": KEY, "targets": [{"name": "t", "static": {**STATIC, "path": "/a//b"}}]}
    ),
    "relative path": _backend(
        mcp={"sessionKeyRef": KEY, "targets": [{"name": "t", "static": {**STATIC, "path": "mcp"}}]}
    ),
    "header value with LF": _backend(
        mcp={
            "sessionKeyRef": KEY,
            "targets": [{"name": "t", "static": {**STATIC, "headers": [{"name": "x", "value": "a\nb"}]}}],
        }
    ),
    "relative workingDir": _backend(
        mcp={"sessionKeyRef": KEY, "targets": [{"name": "t", "stdio": {"command": "s", "workingDir": "x"}}]}
    ),
    "zero idle timeout": _backend(mcp={"sessionKeyRef": KEY, "targets": [STDIO], "sessionIdleTimeout": "0s"}),
    "bad origin": _backend(
        mcp={"sessionKeyRef": KEY, "targets": [STDIO], "allowedOrigins": ["https://a.example.com/path"]}
    ),
    "a2a without address": _backend(a2a={"agentName": "x"}),
    "a2a with both addresses": _backend(a2a={"static": STATIC, "serviceRef": {"name": "s", "port": 80}}),
    "a2a three-part name": _backend(a2a={"static": STATIC, "agentName": "a/b/c"}),
    "a2a signedCards case": _backend(a2a={"static": STATIC, "signedCards": "strip"}),
    "a2a body limit": _backend(a2a={"static": STATIC, "maxRequestBytes": 0}),
    "llm without providers": _backend(llm={"providers": []}),
    "llm unknown field": _backend(llm={"providers": [OPENAI], "retries": 3}),
    "llm repeated provider": _backend(llm={"providers": [OPENAI, OPENAI]}),
    "llm bad type": _backend(llm={"providers": [{**OPENAI, "type": "OpenAI"}]}),
    "llm provider name": _backend(llm={"providers": [{**OPENAI, "name": "open ai"}]}),
    "llm tls on the backend": _backend(llm={"providers": [OPENAI]}, tls={}),
    "llm baseUrl and host": _backend(llm={"providers": [{**LOCAL, "baseUrl": "http://127.0.0.1:8000"}]}),
    "llm host without port": _backend(llm={"providers": [{**OPENAI, "host": "h"}]}),
    "llm path without host": _backend(llm={"providers": [{**OPENAI, "path": "/v1"}]}),
    "llm compatible without address": _backend(llm={"providers": [{"name": "x", "type": "openaiCompatible"}]}),
    "llm openai without key": _backend(llm={"providers": [{"name": "openai", "type": "openai"}]}),
    "llm azure without azure": _backend(
        llm={"providers": [{**OPENAI, "type": "azure", "baseUrl": "https://r.openai.azure.com"}]}
    ),
    "llm azure on openai": _backend(llm={"providers": [{**OPENAI, "azure": {"apiVersion": "2024-10-21"}}]}),
    "llm azure api version": _backend(
        llm={
            "providers": [
                {**OPENAI, "type": "azure", "baseUrl": "https://r.openai.azure.com", "azure": {"apiVersion": "v1"}}
            ]
        }
    ),
    "llm credentials in baseUrl": _backend(llm={"providers": [{**OPENAI, "baseUrl": "https://u:p@api.example.com"}]}),
    "llm baseUrl with //": _backend(llm={"providers": [{**OPENAI, "baseUrl": "https://api.example.com//v1"}]}),
    "llm tls over http": _backend(llm={"providers": [{**OPENAI, "baseUrl": "http://api.example.com", "tls": {}}]}),
    "llm tls over HTTP": _backend(llm={"providers": [{**OPENAI, "baseUrl": "HTTP://api.example.com", "tls": {}}]}),
    "llm model name": _backend(llm={"providers": [{**OPENAI, "models": ["gpt 4o"]}]}),
    "llm model twice": _backend(llm={"providers": [{**OPENAI, "models": ["gpt-4o", "gpt-4o"]}]}),
    "llm managed header": _backend(llm={"providers": [{**OPENAI, "headers": [{"name": "X-Api-Key", "value": "k"}]}]}),
    "llm eject over an hour": _backend(llm={"providers": [OPENAI], "failover": {"ejectFor": "2h"}}),
    "llm no failures": _backend(llm={"providers": [OPENAI], "failover": {"consecutiveFailures": 0}}),
    "llm body limit": _backend(llm={"providers": [OPENAI], "maxRequestBytes": 0}),
    "no section": _policy(),
    "no targetRefs": _policy(targetRefs=[], cors={"allowOrigins": ["*"]}),
    "target kind": _policy(targetRefs=[{"kind": "Service", "name": "s"}], cors={"allowOrigins": ["*"]}),
    "target group": _policy(
        targetRefs=[{"group": "agentgate.dev", "kind": "HTTPRoute", "name": "r"}], cors={"allowOrigins": ["*"]}
    ),
    "backend sectionName": _policy(
        targetRefs=[{"group": "agentgate.dev", "kind": "Backend", "name": "b", "sectionName": "x"}],
        cors={"allowOrigins": ["*"]},
    ),
    "listener name": _policy(
        targetRefs=[{"kind": "Gateway", "name": "g", "sectionName": "Not_A_Listener"}], cors={"allowOrigins": ["*"]}
    ),
    "repeated targetRef": _policy(targetRefs=[{"kind": "HTTPRoute", "name": "r"}] * 2, cors={"allowOrigins": ["*"]}),
    "no authentication method": _policy(authentication={"mode": "Strict"}),
    "bad mode": _policy(authentication={"mode": "Lenient", "serviceAccount": {**SA, "tokenReview": True}}),
    "tokenReview and jwks": _policy(authentication={"serviceAccount": {**SA, "tokenReview": True, "jwks": JWKS}}),
    "neither tokenReview nor jwks": _policy(authentication={"serviceAccount": SA}),
    "no audiences": _policy(authentication={"serviceAccount": {**SA, "audiences": [], "tokenReview": True}}),
    "two jwks sources": _policy(authentication={"jwt": [{"issuer": "i", "jwks": {**JWKS, "file": "/k.json"}}]}),
    "jwks over http": _policy(
        authentication={"jwt": [{"issuer": "i", "jwks": {"remote": {"url": "http://idp/jwks"}}}]}
    ),
    "issuer twice": _policy(
        authentication={
            "jwt": [{"issuer": "i", "jwks": JWKS}],
            "serviceAccount": {**SA, "issuer": "i", "tokenReview": True},
        }
    ),
    "provider name twice": _policy(
        authentication={"jwt": [{"name": "a", "issuer": "i", "jwks": JWKS}, {"name": "a", "issuer": "j", "jwks": JWKS}]}
    ),
    "leeway over 10m": _policy(authentication={"jwt": [{"issuer": "i", "jwks": JWKS, "leeway": "11m"}]}),
    "bad algorithm": _policy(authentication={"jwt": [{"issuer": "i", "jwks": JWKS, "algorithms": ["HS256"]}]}),
    "claim to reserved header": _policy(
        authentication={"jwt": [{"issuer": "i", "jwks": JWKS, "claimsToHeaders": [{"claim": "sub", "header": "Host"}]}]}
    ),
    "claim to authorization": _policy(
        authentication={
            "jwt": [{"issuer": "i", "jwks": JWKS, "claimsToHeaders": [{"claim": "sub", "header": "Authorization"}]}]
        }
    ),
    "realm with a quote": _policy(authentication={"basicAuth": {"secretRef": {"name": "s"}, "realm": 'a"b'}}),
    "empty rule": _policy(authorization={"allow": ["  "]}),
    "window and period": _policy(tokenBudgets=[{"name": "b", "tokens": 10, "period": "Day", "window": "1h"}]),
    "no tokens": _policy(tokenBudgets=[{"name": "b", "period": "Day"}]),
    "global without redis": _policy(rateLimits=[{**LIMIT, "scope": "Global"}]),
    "redis on a local limit": _policy(rateLimits=[{**LIMIT, "redis": {"url": "redis://r:6379"}}]),
    "redis credentials in url": _policy(
        rateLimits=[{**LIMIT, "scope": "Global", "redis": {"url": "redis://u:p@r:6379"}}]
    ),
    "limit without per": _policy(rateLimits=[{"name": "l", "capacity": 10}]),
    "zero per": _policy(rateLimits=[{**LIMIT, "per": "0s"}]),
    "repeated limit name": _policy(rateLimits=[LIMIT, LIMIT]),
    "bad unit": _policy(rateLimits=[{**LIMIT, "unit": "Bytes"}]),
    "per try over request": _policy(resilience={"requestTimeout": "10s", "perTryTimeout": "20s"}),
    "backoff inverted": _policy(
        resilience={"retry": {"attempts": 1, "backoff": {"baseInterval": "2s", "maxInterval": "1s"}}}
    ),
    "status codes without 5xx": _policy(
        resilience={"retry": {"attempts": 1, "retryOn": ["reset"], "statusCodes": [503]}}
    ),
    "too many attempts": _policy(resilience={"retry": {"attempts": 11}}),
    "credentials with any origin": _policy(cors={"allowOrigins": ["*"], "allowCredentials": True}),
    "maxAge over a day": _policy(cors={"allowOrigins": ["*"], "maxAge": "25h"}),
    "no origins": _policy(cors={"allowOrigins": []}),
    "set a reserved header": _policy(requestHeaders={"set": [{"name": "Content-Length", "value": "1"}]}),
    "set a header twice": _policy(
        requestHeaders={"set": [{"name": "x-a", "value": "1"}, {"name": "x-a", "value": "2"}]}
    ),
    "credentials without secret": _policy(upstreamCredentials={"header": "Authorization"}),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_objects_are_refused_by_the_validators_and_the_schema(case: str) -> None:
    doc = INVALID[case]
    assert validator_errors(doc), f"{case}: the validators accept it, so the case proves nothing"
    assert schema_problems(doc), f"{case}: the schema accepts it"


def test_cross_field_rules_are_what_refuses_them() -> None:
    """The rules themselves are evaluated: these pass the OpenAPI checks and only a CEL rule refuses them."""
    for case in (
        "two variants",
        "tokenReview and jwks",
        "window and period",
        "per try over request",
        "issuer twice",
        "target name with __",
        "zero per",
        "leeway over 10m",
        "repeated target",
        "llm tls on the backend",
        "llm baseUrl and host",
        "llm host without port",
        "llm compatible without address",
        "llm openai without key",
        "llm azure without azure",
        "llm azure on openai",
        "llm tls over http",
        "llm baseUrl with //",
        "llm eject over an hour",
        "llm managed header",
    ):
        doc = INVALID[case]
        assert list(json_validator(doc["kind"]).iter_errors(doc)) == [], case
        assert schema_problems(doc), case


def test_status_bodies_the_translator_writes_fit_the_status_schema() -> None:
    validators = {kind: jsonschema.Draft7Validator(strict(openapi(kind)["properties"]["status"])) for kind in crds()}
    checked = 0
    for path in sorted(GOLDEN.glob("*/status.json")):
        for entry in json.loads(path.read_text()):
            if entry["kind"] in validators:
                status = copy.deepcopy(entry["status"])
                for condition in status.get("conditions", []):
                    condition["lastTransitionTime"] = "2024-01-01T00:00:00Z"  # the status writer sets it
                errors = [e.message for e in validators[entry["kind"]].iter_errors(status)]
                assert errors == [], f"{path.parent.name} {entry['kind']} {entry['name']}"
                checked += 1
    assert checked > 20


# --- examples/kagent ----------------------------------------------------------------------------


def test_kagent_example_is_accepted_by_the_translator() -> None:
    """The example's routes, Backends and Policies on the base's Gateway, with the Secrets and the
    Service its README creates: every status condition is a good one."""
    docs: list[dict[str, Any]] = []
    for path in (
        DEPLOY / "base" / "gatewayclass.yaml",
        DEPLOY / "base" / "gateway.yaml",
        *sorted(KAGENT.glob("*.yaml")),
    ):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and group_of(d) in ("", OUR_GROUP, GATEWAY_GROUP)]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "kagent", "labels": {"agentgate.dev/gateway-access": "true"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mcp-session-key", "namespace": "kagent"},
            "stringData": {"current": base64.b64encode(bytes(range(32))).decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "openai-api-key", "namespace": "kagent"},
            "stringData": {"api-key": "sk-test"},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kagent-controller", "namespace": "kagent"},
            "spec": {"ports": [{"name": "http", "port": 8083}]},
        },
    ]
    objects = []
    for doc in docs:
        obj, errors = object_from_manifest(doc, SourceRef("kagent"))
        assert obj is not None and not errors, [str(e) for e in errors]
        assert validate(obj) == [], [str(e) for e in validate(obj)]
        objects.append(obj)
    result = translate(objects)
    assert "agentgate-system/agentgate" in result.snapshots

    def conditions(body: Any) -> Iterator[dict[str, Any]]:
        if isinstance(body, dict):
            if "type" in body and "status" in body and "reason" in body:
                yield body
            for value in body.values():
                yield from conditions(value)
        elif isinstance(body, list):
            for value in body:
                yield from conditions(value)

    seen = set()
    for status in result.statuses:
        for condition in conditions(status.status):
            good = "False" if condition["type"] == "Conflicted" else "True"
            assert condition["status"] == good, f"{status.kind} {status.namespace}/{status.name}: {condition}"
        seen.add((status.kind, status.name))
    expected = {("HTTPRoute", n) for n in ("kagent-mcp", "kagent-agents", "kagent-llm")}
    expected |= {("Backend", n) for n in ("kagent-tools", "platform-assistant", "openai")}
    expected |= {("Policy", n) for n in ("kagent-callers", "kagent-tools", "kagent-agents", "kagent-llm")}
    assert expected <= seen


def test_kagent_objects_point_at_the_gateway() -> None:
    """kagent's own kinds stay out of our schemas; their spelling is kagent.dev/v1alpha2's, and every
    URL they hold is a route of the example on the base's gateway Service."""
    docs = [d for d in yaml.safe_load_all((KAGENT / "kagent.yaml").read_text()) if d]
    assert {(d["apiVersion"], d["kind"]) for d in docs} == {
        ("kagent.dev/v1alpha2", "ModelConfig"),
        ("kagent.dev/v1alpha2", "RemoteMCPServer"),
        ("kagent.dev/v1alpha2", "Agent"),
    }
    by_kind = {d["kind"]: d for d in docs}
    routes = [d for d in yaml.safe_load_all((KAGENT / "routes.yaml").read_text()) if d]
    prefixes = {m["path"]["value"] for r in routes for rule in r["spec"]["rules"] for m in rule["matches"]}
    service = named(tuple(yaml.safe_load_all((DEPLOY / "base" / "dataplane-service.yaml").read_text())), "Service")[
        ("agentgate-system", "agentgate")
    ]
    gateway_url = (
        f"http://{service['metadata']['name']}.agentgate-system.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    )
    for url in (by_kind["ModelConfig"]["spec"]["openAI"]["baseUrl"], by_kind["RemoteMCPServer"]["spec"]["url"]):
        assert url.startswith(gateway_url + "/") and url[len(gateway_url) :] in prefixes, url
    agent = by_kind["Agent"]["spec"]["declarative"]
    assert agent["modelConfig"] == by_kind["ModelConfig"]["metadata"]["name"]
    assert agent["tools"][0]["mcpServer"]["name"] == by_kind["RemoteMCPServer"]["metadata"]["name"]
    agent_name = by_kind["Agent"]["metadata"]["name"]
    assert f"/agents/{agent_name}" in prefixes
