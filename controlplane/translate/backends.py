"""backendRefs to discovery Backends and Targets: Kubernetes Services and our agentgate.dev Backend.

Each referenced object becomes one Backend resource with its Target children, built once per
translation however many routes and gateways use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration

from controlplane.model import (
    AGENTGATE_GROUP,
    BACKEND,
    BACKEND_VARIANTS,
    CONFIG_MAP,
    CORE_GROUP,
    GATEWAY_GROUP,
    HTTP_ROUTE,
    SERVICE,
    KubeObject,
    ObjectKey,
    parse_duration,
)
from controlplane.translate.a2a import SERVICE_APP_PROTOCOL as A2A_APP_PROTOCOL
from controlplane.translate.a2a import a2a_backend, service_a2a_backend
from controlplane.translate.conditions import (
    ACCEPTED,
    ATTACHED,
    REASON_ACCEPTED,
    REASON_ATTACHED,
    REASON_BACKEND_NOT_FOUND,
    REASON_INVALID,
    REASON_INVALID_CA_CERTIFICATE_REF,
    REASON_INVALID_KIND,
    REASON_NOT_ACCEPTED,
    REASON_NOT_REFERENCED,
    REASON_REF_NOT_PERMITTED,
    RefProblem,
    condition,
)
from controlplane.translate.index import ObjectIndex, describe_errors
from controlplane.translate.llm import llm_backend
from controlplane.translate.mcp import SERVICE_APP_PROTOCOL, mcp_backend, service_mcp_backend
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# Service appProtocol values (GEP-1911) that select HTTP/2 with prior knowledge.
_H2C_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c"})
_DEFAULT_CA_KEY = "ca.crt"
# Routes an Attached message names before it only counts the rest (conditions stay readable).
_USERS_SHOWN = 10


@dataclass(frozen=True, slots=True)
class ResolvedBackend:
    key: str
    backend: pb.Backend
    targets: tuple[pb.Target, ...]


def _shown(names: Iterable[str]) -> str:
    ordered = sorted(names)
    more = len(ordered) - _USERS_SHOWN
    return ", ".join(ordered[:_USERS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _attached(obj: KubeObject, users: Iterable[str], refused: Iterable[str] = ()) -> dict[str, Any]:
    used = sorted(users)
    if not used and (referrers := set(refused)):
        message = f"referred to by {_shown(referrers)}, which cannot use it: it is not accepted"
        return condition(ATTACHED, False, REASON_NOT_ACCEPTED, message, obj.generation)
    if not used:
        message = "no HTTPRoute attached to a Gateway of this controller uses this Backend"
        return condition(ATTACHED, False, REASON_NOT_REFERENCED, message, obj.generation)
    return condition(ATTACHED, True, REASON_ATTACHED, f"used by {_shown(used)}", obj.generation)


def duration_message(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


def target_name(backend_key: str, host: str, port: int) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{backend_key}/{address}"


class BackendResolver:
    """Resolves backendRefs of routes, caching each Backend it builds and the status of ours."""

    def __init__(self, index: ObjectIndex) -> None:
        self._index = index
        self._services: dict[tuple[str, str, int], ResolvedBackend | RefProblem] = {}
        self._ours: dict[ObjectKey, ResolvedBackend | RefProblem] = {}
        # Backends of ours that routes refer to but cannot use -> "HTTPRoute ns/name" (for Attached).
        self._refused: dict[ObjectKey, set[str]] = {}

    def resolve(self, route: KubeObject, ref: Mapping[str, Any]) -> ResolvedBackend | RefProblem:
        group, kind = ref.get("group", CORE_GROUP), ref.get("kind", SERVICE)
        name = ref["name"]
        namespace = ref.get("namespace", route.namespace)
        if (group, kind) not in ((CORE_GROUP, SERVICE), (AGENTGATE_GROUP, BACKEND)):
            shown = f"{kind}.{group}" if group else kind
            return RefProblem(
                REASON_INVALID_KIND, f"unsupported backendRef kind {shown} (use Service or Backend.{AGENTGATE_GROUP})"
            )
        if not self._index.reference_permitted(
            from_group=GATEWAY_GROUP,
            from_kind=HTTP_ROUTE,
            from_namespace=route.namespace,
            to_group=group,
            to_kind=kind,
            to_namespace=namespace,
            to_name=name,
        ):
            return RefProblem(
                REASON_REF_NOT_PERMITTED,
                f"{kind} {namespace}/{name} is in another namespace and no ReferenceGrant in {namespace} "
                f"allows HTTPRoutes from {route.namespace} to refer to it",
            )
        if kind == SERVICE:
            key = (namespace, name, int(ref["port"]))
            if key not in self._services:
                self._services[key] = self._service(*key)
            return self._services[key]
        obj_key = ObjectKey(BACKEND, namespace, name)
        if obj_key not in self._ours:
            obj = self._index.get(BACKEND, namespace, name)
            if obj is None:
                problem = RefProblem(REASON_BACKEND_NOT_FOUND, self._index.problem(BACKEND, namespace, name))
                return self._refuse(route, obj_key, problem)
            self._ours[obj_key] = self._our_backend(obj)
        resolved = self._ours[obj_key]
        if isinstance(resolved, RefProblem):
            message = f"Backend {namespace}/{name} is not usable: {resolved.message}"
            return self._refuse(route, obj_key, RefProblem(REASON_BACKEND_NOT_FOUND, message))
        return resolved

    def _refuse(self, route: KubeObject, backend: ObjectKey, problem: RefProblem) -> RefProblem:
        """`problem` for the route, remembered for the Backend's Attached condition."""
        self._refused.setdefault(backend, set()).add(f"HTTPRoute {route.namespace}/{route.name}")
        return problem

    def statuses(self, users: Mapping[str, Iterable[str]]) -> list[tuple[KubeObject, dict[str, Any]]]:
        """The status of every Backend of ours: Accepted, or why not; Attached, naming the routes
        that use it on which Gateways (`users`: backend key -> "HTTPRoute ns/name on Gateway ns/name")."""
        result: list[tuple[KubeObject, dict[str, Any]]] = []
        for obj in self._index.of_kind(BACKEND):
            if obj.key not in self._ours:
                self._ours[obj.key] = self._our_backend(obj)
            resolved = self._ours[obj.key]
            if isinstance(resolved, RefProblem):
                cond = condition(ACCEPTED, False, resolved.reason, resolved.message, obj.generation)
            else:
                cond = condition(ACCEPTED, True, REASON_ACCEPTED, "Backend is accepted", obj.generation)
            refused = self._refused.get(obj.key, ())
            result.append((obj, {"conditions": [cond, _attached(obj, users.get(obj.ref, ()), refused)]}))
        for obj, errors in self._index.invalid_of_kind(BACKEND):
            cond = condition(ACCEPTED, False, REASON_INVALID, describe_errors(errors), obj.generation)
            result.append((obj, {"conditions": [cond, _attached(obj, (), self._refused.get(obj.key, ()))]}))
        return result

    # --- Kubernetes Service ------------------------------------------------------------------

    def _service(self, namespace: str, name: str, port: int) -> ResolvedBackend | RefProblem:
        service = self._index.get(SERVICE, namespace, name)
        if service is None:
            return RefProblem(REASON_BACKEND_NOT_FOUND, self._index.problem(SERVICE, namespace, name))
        ports = service.spec.get("ports") or []
        entry = next((p for p in ports if p.get("port") == port), None)
        if ports and entry is None:
            listed = ", ".join(str(p.get("port")) for p in ports)
            message = f"Service {namespace}/{name} has no port {port} (ports: {listed})"
            return RefProblem(REASON_BACKEND_NOT_FOUND, message)
        app_protocol = (entry or {}).get("appProtocol", "")
        key = f"{namespace}/{name}:{port}"
        host = service.spec.get("externalName") or f"{name}.{namespace}.svc.cluster.local"
        if app_protocol == SERVICE_APP_PROTOCOL:
            built = service_mcp_backend(self._index, service, key, host, port)
            if isinstance(built, RefProblem):
                return built
            return ResolvedBackend(key, *built)
        target = pb.Target(
            name=target_name(key, host, port), backend=key, weight=1, address=pb.SocketAddress(host=host, port=port)
        )
        if app_protocol == A2A_APP_PROTOCOL:
            agent = service_a2a_backend(service, key)
            return agent if isinstance(agent, RefProblem) else ResolvedBackend(key, agent, (target,))
        backend = pb.Backend(
            name=key,
            protocol=pb.UPSTREAM_PROTOCOL_HTTP2 if app_protocol in _H2C_APP_PROTOCOLS else pb.UPSTREAM_PROTOCOL_HTTP1,
            http=pb.HttpBackend(),
        )
        return ResolvedBackend(key, backend, (target,))

    # --- agentgate.dev Backend ---------------------------------------------------------------

    def _our_backend(self, obj: KubeObject) -> ResolvedBackend | RefProblem:
        spec = obj.spec
        key = obj.ref
        backend = pb.Backend(
            name=key,
            protocol=pb.UPSTREAM_PROTOCOL_HTTP2 if spec.get("protocol") == "HTTP2" else pb.UPSTREAM_PROTOCOL_HTTP1,
        )
        if "tls" in spec:
            problem = self._upstream_tls(obj, spec.get("tls") or {}, backend.tls)
            if problem is not None:
                return problem
        pool = backend.pool
        if "connectTimeout" in spec:
            pool.connect_timeout.CopyFrom(duration_message(parse_duration(spec["connectTimeout"])))
        if "idleTimeout" in spec:
            pool.idle_timeout.CopyFrom(duration_message(parse_duration(spec["idleTimeout"])))
        if "maxConnections" in spec:
            pool.max_connections = spec["maxConnections"]
        if not pool.ListFields():
            backend.ClearField("pool")
        variant = next(name for name in BACKEND_VARIANTS if name in spec)
        if variant == "mcp":
            built = mcp_backend(obj, self._index, backend, self._upstream_tls)
            if isinstance(built, RefProblem):
                return built
            return ResolvedBackend(key, backend, built)
        if variant == "llm":
            problem = llm_backend(obj, self._index, backend, self._upstream_tls)
            return problem if problem is not None else ResolvedBackend(key, backend, ())
        if variant == "a2a":
            addresses = a2a_backend(obj, self._index, backend)
            if isinstance(addresses, RefProblem):
                return addresses
            return ResolvedBackend(key, backend, address_targets(key, addresses))
        targets = _VARIANT_BUILDERS[variant](key, spec[variant], backend)
        return ResolvedBackend(key, backend, targets)

    def _upstream_tls(
        self, obj: KubeObject, tls: Mapping[str, Any], out: pb.UpstreamTls, path: str = "spec.tls"
    ) -> RefProblem | None:
        out.SetInParent()  # present, even empty, means "TLS with the system trust store"
        out.server_name = tls.get("sni", "")
        out.insecure_skip_verify = bool(tls.get("insecureSkipVerify", False))
        bundle: list[bytes] = []
        if tls.get("caCertificates"):
            bundle.append(tls["caCertificates"].encode())
        for index, ref in enumerate(tls.get("caCertificateRefs") or ()):
            kind, name = ref.get("kind", CONFIG_MAP), ref["name"]
            data_key = ref.get("key", _DEFAULT_CA_KEY)
            holder = self._index.get(kind, obj.namespace, name)
            where = f"{path}.caCertificateRefs[{index}]"
            if holder is None:
                return RefProblem(
                    REASON_INVALID_CA_CERTIFICATE_REF, f"{where}: {self._index.problem(kind, obj.namespace, name)}"
                )
            pem = holder.data_value(data_key)
            if pem is None:
                message = f"{where}: {kind} {holder.ref} has no key {data_key!r}"
                return RefProblem(REASON_INVALID_CA_CERTIFICATE_REF, message)
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                return RefProblem(
                    REASON_INVALID_CA_CERTIFICATE_REF,
                    f"{where}: {kind} {holder.ref} key {data_key!r} holds no PEM certificate",
                )
            bundle.append(pem if pem.endswith(b"\n") else pem + b"\n")
        out.ca_certificates_pem = b"".join(bundle)
        return None


def address_targets(key: str, addresses: Iterable[tuple[str, int, int]]) -> tuple[pb.Target, ...]:
    """Address Targets of a Backend from (host, port, weight) triples."""
    return tuple(
        pb.Target(
            name=target_name(key, host, port),
            backend=key,
            weight=weight,
            address=pb.SocketAddress(host=host, port=port),
        )
        for host, port, weight in addresses
    )


def _static_targets(key: str, static: Mapping[str, Any], backend: pb.Backend) -> tuple[pb.Target, ...]:
    backend.http.SetInParent()
    hosts = static.get("hosts", [static])
    return address_targets(key, ((host["host"], host["port"], host.get("weight", 1)) for host in hosts))


# One builder per Backend variant (see model.validation.BACKEND_VARIANTS) that needs no other
# objects: it sets the Backend's kind and returns its Targets. "mcp" and "llm" resolve Secrets
# and "a2a" may resolve a Service, so the resolver builds them (translate.mcp, translate.a2a,
# translate.llm).
_VARIANT_BUILDERS: Mapping[str, Callable[[str, Any, pb.Backend], tuple[pb.Target, ...]]] = {
    "static": _static_targets,
}
