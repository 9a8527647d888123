"""A2A backends: our Backend's `spec.a2a` and `appProtocol: kgateway.dev/a2a` Services to discovery resources.

An A2A Backend is an HTTP backend with agent settings: its Targets are ordinary address
Targets (the proxy's HTTP pool reaches the agent), and `Backend.a2a` says how the agent is
named, where it lives on its host and what happens to signed agent cards. Every default is
filled here, so a proxy never has to guess the agent's name from a resource key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.model import SERVICE, KubeObject
from controlplane.translate.conditions import REASON_BACKEND_NOT_FOUND, RefProblem
from controlplane.translate.index import ObjectIndex
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# Service port appProtocol (kgateway's convention) that makes a Service an A2A agent.
SERVICE_APP_PROTOCOL = "kgateway.dev/a2a"
# Service annotation holding the agent's base path on its host.
SERVICE_PATH_ANNOTATION = "kgateway.dev/a2a-path"
DEFAULT_BASE_PATH = "/"

_SIGNED_CARDS = {
    "Strip": pb.A2aBackend.SIGNED_CARDS_STRIP,
    "Preserve": pb.A2aBackend.SIGNED_CARDS_PRESERVE,
}

# (host, port, weight) of one agent endpoint; the resolver turns them into address Targets.
AgentAddress = tuple[str, int, int]


def a2a_backend(obj: KubeObject, index: ObjectIndex, backend: pb.Backend) -> tuple[AgentAddress, ...] | RefProblem:
    """Fill `backend.a2a` from a validated `spec.a2a` and return the agent's addresses."""
    spec: Mapping[str, Any] = obj.spec["a2a"]
    settings = backend.a2a
    settings.agent_name = spec.get("agentName", obj.ref)
    settings.base_path = spec.get("basePath", DEFAULT_BASE_PATH)
    if "maxRequestBytes" in spec:
        settings.max_request_bytes = spec["maxRequestBytes"]
    settings.signed_cards = _SIGNED_CARDS[spec.get("signedCards", "Strip")]
    if "static" in spec:
        static = spec["static"]
        return tuple((host["host"], host["port"], host.get("weight", 1)) for host in static.get("hosts", [static]))
    ref = spec["serviceRef"]
    name, port = ref["name"], ref["port"]
    where = "spec.a2a.serviceRef"
    service = index.get(SERVICE, obj.namespace, name)
    if service is None:
        return RefProblem(REASON_BACKEND_NOT_FOUND, f"{where}: {index.problem(SERVICE, obj.namespace, name)}")
    ports = service.spec.get("ports") or []
    if ports and not any(entry.get("port") == port for entry in ports):
        listed = ", ".join(str(entry.get("port")) for entry in ports)
        message = f"{where}: Service {service.ref} has no port {port} (ports: {listed})"
        return RefProblem(REASON_BACKEND_NOT_FOUND, message)
    return ((service_host(service), port, 1),)


def service_a2a_backend(service: KubeObject, key: str) -> pb.Backend | RefProblem:
    """The A2A Backend for a Service port of appProtocol kgateway.dev/a2a (its one Target is the port)."""
    path = service.annotations.get(SERVICE_PATH_ANNOTATION, DEFAULT_BASE_PATH)
    if not path.startswith("/") or any(char in path for char in "?# \t\r\n\0"):
        message = f"Service {service.ref}: annotation {SERVICE_PATH_ANNOTATION} {path!r} is not an absolute path"
        return RefProblem(REASON_BACKEND_NOT_FOUND, message)
    backend = pb.Backend(name=key, protocol=pb.UPSTREAM_PROTOCOL_HTTP1)
    backend.a2a.agent_name = service.ref
    backend.a2a.base_path = path
    backend.a2a.signed_cards = pb.A2aBackend.SIGNED_CARDS_STRIP
    return backend


def service_host(service: KubeObject) -> str:
    """Where a Service answers: its externalName, or its cluster DNS name."""
    return service.spec.get("externalName") or f"{service.name}.{service.namespace}.svc.cluster.local"
