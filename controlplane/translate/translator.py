"""translate(): Kubernetes-shaped objects in, one snapshot per Gateway and status bodies out.

Pure and deterministic: no I/O, no clock, sorted output, so the folder source and the
Kubernetes source share it and golden-file tests pin it down.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from controlplane.model import GATEWAY, GATEWAY_CLASS, HTTP_ROUTE, KubeObject
from controlplane.translate.backends import BackendResolver
from controlplane.translate.conditions import (
    ACCEPTED,
    PROGRAMMED,
    REASON_ACCEPTED,
    REASON_INVALID,
    REASON_UNSUPPORTED_VALUE,
    condition,
)
from controlplane.translate.gateways import CertificateCache, GatewayState, evaluate_gateway
from controlplane.translate.index import ObjectIndex, describe_errors
from controlplane.translate.policies import translate_policies
from controlplane.translate.routes import (
    Attachment,
    CompiledRoute,
    attach,
    compile_route,
    parent_conditions,
    parent_gateway_key,
    status_parent_ref,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND as BACKEND_TYPE
from shared.resources import LISTENER, POLICY, ROUTE, TARGET, TYPE_ORDER, ResourceMap

CONTROLLER_NAME = "agentgate.dev/gateway-controller"


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    """The status subresource body of one object, as Kubernetes would hold it.

    Condition `lastTransitionTime` is absent: the status writer sets it (see conditions.py).
    HTTPRoute bodies hold only the parents this controller owns; the writer merges them with
    entries of other controllers.
    """

    kind: str
    namespace: str
    name: str
    status: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TranslationResult:
    # Gateway "namespace/name" -> type URL -> resource name -> message. Treat as immutable:
    # messages may be shared between snapshots.
    snapshots: Mapping[str, ResourceMap]
    statuses: tuple[ObjectStatus, ...]


def translate(objects: Iterable[KubeObject], *, controller_name: str = CONTROLLER_NAME) -> TranslationResult:
    """Translate objects into per-Gateway snapshots and statuses (Gateway API v1 semantics)."""
    index = ObjectIndex(objects)
    statuses: list[ObjectStatus] = []

    our_classes = set()
    for gateway_class in index.of_kind(GATEWAY_CLASS):
        if gateway_class.spec.get("controllerName") == controller_name:
            our_classes.add(gateway_class.name)
            cond = condition(ACCEPTED, True, REASON_ACCEPTED, "GatewayClass is accepted", gateway_class.generation)
            statuses.append(_status(gateway_class, {"conditions": [cond]}))

    certificates = CertificateCache()
    gateways: dict[str, GatewayState] = {}
    for obj in index.of_kind(GATEWAY):
        if obj.spec.get("gatewayClassName") in our_classes:
            gateways[obj.ref] = evaluate_gateway(obj, index, certificates)
    for obj, errors in index.invalid_of_kind(GATEWAY):
        if obj.spec.get("gatewayClassName") in our_classes:
            message = describe_errors(errors)
            g = obj.generation
            conditions = [
                condition(ACCEPTED, False, REASON_INVALID, message, g),
                condition(PROGRAMMED, False, REASON_INVALID, message, g),
            ]
            statuses.append(_status(obj, {"conditions": conditions}))

    resolver = BackendResolver(index)
    # gateway key -> route key -> (compiled route, its attachments on that gateway)
    attached: dict[str, dict[str, tuple[CompiledRoute, list[Attachment]]]] = defaultdict(dict)
    for route in index.of_kind(HTTP_ROUTE):
        compiled = compile_route(route, resolver)
        parents = []
        for parent in route.spec.get("parentRefs") or ():
            gateway = gateways.get(parent_gateway_key(route, parent) or "")
            if gateway is None:
                continue  # not ours: another controller reports on it
            verdict = attach(route, parent, gateway, index)
            if verdict.accepted and compiled.fully_invalid:
                verdict.accepted, verdict.reason = False, REASON_UNSUPPORTED_VALUE
                verdict.message, verdict.attachments = "; ".join(compiled.dropped), []
            for attachment in verdict.attachments:
                attachment.listener.attached_routes.add(route.ref)
            if verdict.attachments:
                entry = attached[gateway.key].setdefault(route.ref, (compiled, []))
                entry[1].extend(verdict.attachments)
            parents.append(_parent_status(parent, controller_name, parent_conditions(compiled, verdict)))
        if parents:
            statuses.append(_status(route, {"parents": parents}))
    for route, errors in index.invalid_of_kind(HTTP_ROUTE):
        parents = []
        for parent in _parent_refs(route):
            if parent_gateway_key(route, parent) in gateways:
                cond = condition(ACCEPTED, False, REASON_UNSUPPORTED_VALUE, describe_errors(errors), route.generation)
                parents.append(_parent_status(parent, controller_name, [cond]))
        if parents:
            statuses.append(_status(route, {"parents": parents}))

    for gateway in gateways.values():
        statuses.append(_status(gateway.obj, gateway.status()))

    snapshots = {key: _snapshot(gateways[key], attached.get(key, {})) for key in sorted(gateways)}
    for obj, body in resolver.statuses(_backend_users(snapshots)):
        statuses.append(_status(obj, body))
    policies = translate_policies(index, snapshots)
    snapshots = {key: {**resources, POLICY: policies.policies[key]} for key, resources in snapshots.items()}
    statuses.extend(_status(obj, body) for obj, body in policies.statuses)
    statuses.sort(key=lambda s: (s.kind, s.namespace, s.name))
    return TranslationResult(snapshots=snapshots, statuses=tuple(statuses))


def _snapshot(gateway: GatewayState, routes: Mapping[str, tuple[CompiledRoute, list[Attachment]]]) -> ResourceMap:
    listeners = gateway.listener_resources()
    route_resources: dict[str, Message] = {}
    backends: dict[str, Message] = {}
    targets: dict[str, Message] = {}
    for _, (compiled, attachments) in sorted(routes.items()):
        served = [a for a in attachments if a.listener.key in listeners]
        if not served:
            continue
        listener_keys = sorted({a.listener.key for a in served})
        # One Route serves all its listeners, so it carries the union of the per-listener
        # hostnames; the proxy's listener hostname still narrows each one. Any "any" wins.
        hostnames: list[str] = []
        if all(a.hostnames for a in served):
            hostnames = sorted({h for a in served for h in a.hostnames})
        for rule in compiled.rules:
            message = pb.Route()
            message.CopyFrom(rule.route)
            message.listeners.extend(listener_keys)
            message.hostnames.extend(hostnames)
            route_resources[message.name] = message
            for resolved in rule.backends:
                backends[resolved.key] = resolved.backend
                targets.update((target.name, target) for target in resolved.targets)
    by_type: dict[str, dict[str, Message]] = {
        BACKEND_TYPE: backends,
        TARGET: targets,
        LISTENER: dict(listeners),
        ROUTE: route_resources,
    }
    return {type_url: dict(sorted(by_type.get(type_url, {}).items())) for type_url in TYPE_ORDER}


def _backend_users(snapshots: Mapping[str, ResourceMap]) -> dict[str, set[str]]:
    """Backend key -> the routes serving it, as "HTTPRoute ns/name on Gateway ns/name"."""
    users: dict[str, set[str]] = defaultdict(set)
    for gateway, resources in snapshots.items():
        for route in resources[ROUTE].values():
            assert isinstance(route, pb.Route)
            for ref in route.backends:
                if ref.backend:
                    users[ref.backend].add(f"HTTPRoute {route.route_key} on Gateway {gateway}")
    return users


def _parent_refs(route: KubeObject) -> list[Mapping[str, Any]]:
    """parentRefs of a route that failed validation: only the well-formed entries."""
    refs = route.spec.get("parentRefs")
    if not isinstance(refs, list):
        return []
    return [ref for ref in refs if isinstance(ref, Mapping) and isinstance(ref.get("name"), str)]


def _parent_status(parent: Mapping[str, Any], controller_name: str, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"parentRef": status_parent_ref(parent), "controllerName": controller_name, "conditions": conditions}


def _status(obj: KubeObject, body: dict[str, Any]) -> ObjectStatus:
    return ObjectStatus(kind=obj.kind, namespace=obj.namespace, name=obj.name, status=body)
