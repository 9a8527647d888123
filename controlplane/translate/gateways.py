"""Gateways and their listeners: what can be served, the Listener resources, and Gateway status.

Follows gateway.networking.k8s.io/v1 GatewaySpec.Listeners: listeners sharing a port must
agree on the protocol (else every one of them is Conflicted/ProtocolConflict) and differ by
hostname (else Conflicted/HostnameConflict); conflicted listeners are all rejected, never
one picked as the winner. Route attachment is counted per listener whatever its state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.model import CORE_GROUP, GATEWAY, GATEWAY_GROUP, HTTP_ROUTE, SECRET, KubeObject
from controlplane.translate.conditions import (
    ACCEPTED,
    CONFLICTED,
    PROGRAMMED,
    REASON_ACCEPTED,
    REASON_HOSTNAME_CONFLICT,
    REASON_INVALID,
    REASON_INVALID_CERTIFICATE_REF,
    REASON_INVALID_ROUTE_KINDS,
    REASON_LISTENERS_NOT_VALID,
    REASON_NO_CONFLICTS,
    REASON_PROGRAMMED,
    REASON_PROTOCOL_CONFLICT,
    REASON_REF_NOT_PERMITTED,
    REASON_RESOLVED_REFS,
    REASON_UNSUPPORTED_ADDRESS,
    REASON_UNSUPPORTED_PROTOCOL,
    RESOLVED_REFS,
    condition,
)
from controlplane.translate.index import ObjectIndex, selector_matches
from shared.api.agentgate.config.v1 import resources_pb2 as pb

_PROTOCOLS = {"HTTP": pb.LISTENER_PROTOCOL_HTTP, "HTTPS": pb.LISTENER_PROTOCOL_HTTPS}
_ROUTE_KINDS = ({"group": GATEWAY_GROUP, "kind": HTTP_ROUTE},)
_ADDRESS_TYPES = ("IPAddress", "Hostname")


@dataclass
class ListenerState:
    """One listener of a Gateway as evaluated: its verdicts and, if programmed, its resource."""

    name: str
    key: str
    port: int
    protocol: str
    hostname: str
    allowed_routes: Mapping[str, Any]
    supported_kinds: list[dict[str, str]]
    generation: int
    accepted_reason: str = REASON_ACCEPTED
    accepted_message: str = "Listener is accepted"
    conflict_reason: str = ""
    refs_reason: str = REASON_RESOLVED_REFS
    refs_message: str = "All references are resolved"
    tls: pb.ServerTls | None = None
    programmed: bool = False
    attached_routes: set[str] = field(default_factory=set)

    @property
    def usable(self) -> bool:
        """Valid on its own: accepted, not conflicted, certificate resolved (when TLS)."""
        certificate_ok = self.refs_reason in (REASON_RESOLVED_REFS, REASON_INVALID_ROUTE_KINDS)
        return self.accepted_reason == REASON_ACCEPTED and not self.conflict_reason and certificate_ok

    def problem(self) -> str:
        if self.accepted_reason != REASON_ACCEPTED:
            return self.accepted_reason
        if self.conflict_reason:
            return self.conflict_reason
        return self.refs_reason

    def refusal(self, route: KubeObject, gateway_namespace: str, index: ObjectIndex) -> str | None:
        """Why allowedRoutes keeps this HTTPRoute from attaching (kind, then namespace), or None."""
        if not any(kind["kind"] == route.kind and kind["group"] == route.group for kind in self.supported_kinds):
            return f"listener {self.name} does not accept {route.kind}s"
        namespaces = self.allowed_routes.get("namespaces") or {}
        source = namespaces.get("from", "Same")
        if source == "All":
            return None
        if source == "Selector":
            if selector_matches(namespaces.get("selector") or {}, index.namespace_labels(route.namespace)):
                return None
            return f"listener {self.name} admits routes from selected namespaces only, not from {route.namespace}"
        if route.namespace == gateway_namespace:
            return None
        return f"listener {self.name} admits routes from namespace {gateway_namespace} only"

    def status(self) -> dict[str, Any]:
        g = self.generation
        accepted = self.accepted_reason == REASON_ACCEPTED and not self.conflict_reason
        accepted_reason = self.accepted_reason if self.accepted_reason != REASON_ACCEPTED else self.conflict_reason
        conditions = [
            condition(ACCEPTED, accepted, accepted_reason or REASON_ACCEPTED, self.accepted_message, g),
            condition(
                PROGRAMMED,
                self.programmed,
                REASON_PROGRAMMED if self.programmed else REASON_INVALID,
                "Listener is programmed" if self.programmed else "Listener is not served, see the other conditions",
                g,
            ),
            condition(RESOLVED_REFS, self.refs_reason == REASON_RESOLVED_REFS, self.refs_reason, self.refs_message, g),
            condition(
                CONFLICTED,
                bool(self.conflict_reason),
                self.conflict_reason or REASON_NO_CONFLICTS,
                self.accepted_message if self.conflict_reason else "No conflicts",
                g,
            ),
        ]
        return {
            "name": self.name,
            "supportedKinds": [dict(kind) for kind in self.supported_kinds],
            "attachedRoutes": len(self.attached_routes),
            "conditions": conditions,
        }


@dataclass
class GatewayState:
    obj: KubeObject
    listeners: list[ListenerState]
    accepted: bool
    accepted_reason: str
    accepted_message: str
    bind_address: str

    @property
    def key(self) -> str:
        return self.obj.ref

    def listener_resources(self) -> dict[str, pb.Listener]:
        resources: dict[str, pb.Listener] = {}
        for listener in self.listeners:
            if not listener.programmed:
                continue
            message = pb.Listener(
                name=listener.key,
                gateway=self.key,
                address=self.bind_address,
                port=listener.port,
                protocol=_PROTOCOLS[listener.protocol],
                hostname=listener.hostname,
            )
            if listener.tls is not None:
                message.tls.CopyFrom(listener.tls)
            resources[listener.key] = message
        return dict(sorted(resources.items()))

    def status(self) -> dict[str, Any]:
        g = self.obj.generation
        programmed = any(listener.programmed for listener in self.listeners)
        body: dict[str, Any] = {}
        addresses = [
            {"type": a.get("type", "IPAddress"), "value": a["value"]} for a in self.obj.spec.get("addresses") or ()
        ]
        if addresses:
            body["addresses"] = addresses
        body["conditions"] = [
            condition(ACCEPTED, self.accepted, self.accepted_reason, self.accepted_message, g),
            condition(
                PROGRAMMED,
                programmed,
                REASON_PROGRAMMED if programmed else REASON_INVALID,
                "Gateway is programmed" if programmed else "No listener of this Gateway can be served",
                g,
            ),
        ]
        body["listeners"] = [listener.status() for listener in self.listeners]
        return body


def evaluate_gateway(obj: KubeObject, index: ObjectIndex, certificates: CertificateCache) -> GatewayState:
    listeners = [_evaluate_listener(obj, spec, index, certificates) for spec in obj.spec.get("listeners") or ()]
    _mark_conflicts(listeners)

    addresses = obj.spec.get("addresses") or ()
    unsupported = [a for a in addresses if a.get("type", "IPAddress") not in _ADDRESS_TYPES]
    bind_address = next((a["value"] for a in addresses if a.get("type", "IPAddress") == "IPAddress"), "")
    usable = [listener for listener in listeners if listener.usable]
    invalid = [listener for listener in listeners if not listener.usable]
    if unsupported:
        types = ", ".join(sorted({a["type"] for a in unsupported}))
        accepted, reason, message = False, REASON_UNSUPPORTED_ADDRESS, f"unsupported address type {types}"
    elif invalid:
        listed = ", ".join(f"{listener.name} ({listener.problem()})" for listener in invalid)
        accepted, reason = bool(usable), REASON_LISTENERS_NOT_VALID
        message = f"Listeners not valid: {listed}" + ("" if usable else "; no listener can be served")
    else:
        accepted, reason, message = True, REASON_ACCEPTED, "Gateway is accepted"
    for listener in listeners:
        listener.programmed = accepted and listener.usable
    return GatewayState(obj, listeners, accepted, reason, message, bind_address)


def _evaluate_listener(
    gateway: KubeObject, spec: Mapping[str, Any], index: ObjectIndex, certificates: CertificateCache
) -> ListenerState:
    protocol = spec["protocol"]
    listener = ListenerState(
        name=spec["name"],
        key=f"{gateway.namespace}/{gateway.name}/{spec['name']}",
        port=spec["port"],
        protocol=protocol,
        hostname=spec.get("hostname", ""),
        allowed_routes=spec.get("allowedRoutes") or {},
        supported_kinds=[],
        generation=gateway.generation,
    )
    if protocol not in _PROTOCOLS:
        listener.accepted_reason = REASON_UNSUPPORTED_PROTOCOL
        listener.accepted_message = f"protocol {protocol} is not supported (use HTTP or HTTPS)"
        return listener
    requested = listener.allowed_routes.get("kinds")
    if requested is None:
        listener.supported_kinds = [dict(kind) for kind in _ROUTE_KINDS]
    else:
        for kind in requested:
            normalized = {"group": kind.get("group", GATEWAY_GROUP), "kind": kind["kind"]}
            if normalized in _ROUTE_KINDS:
                if normalized not in listener.supported_kinds:
                    listener.supported_kinds.append(normalized)
            else:
                listener.refs_reason = REASON_INVALID_ROUTE_KINDS
                listener.refs_message = f"route kind {normalized['kind']}.{normalized['group']} is not supported"
    if protocol == "HTTPS":
        _resolve_certificates(gateway, listener, spec.get("tls") or {}, index, certificates)
    return listener


def _resolve_certificates(
    gateway: KubeObject,
    listener: ListenerState,
    tls: Mapping[str, Any],
    index: ObjectIndex,
    certificates: CertificateCache,
) -> None:
    """The first certificateRef serves; every ref must resolve (per spec), or the listener is not programmed."""
    for position, ref in enumerate(tls.get("certificateRefs") or ()):
        where = f"tls.certificateRefs[{position}]"
        group, kind, name = ref.get("group", CORE_GROUP), ref.get("kind", SECRET), ref["name"]
        namespace = ref.get("namespace", gateway.namespace)
        if (group, kind) != (CORE_GROUP, SECRET):
            listener.refs_reason = REASON_INVALID_CERTIFICATE_REF
            shown = f"{kind}.{group}" if group else kind
            listener.refs_message = f"{where}: unsupported kind {shown} (use a Secret)"
            return
        if not index.reference_permitted(
            from_group=GATEWAY_GROUP,
            from_kind=GATEWAY,
            from_namespace=gateway.namespace,
            to_group=CORE_GROUP,
            to_kind=SECRET,
            to_namespace=namespace,
            to_name=name,
        ):
            listener.refs_reason = REASON_REF_NOT_PERMITTED
            listener.refs_message = (
                f"{where}: Secret {namespace}/{name} is in another namespace and no ReferenceGrant in {namespace} "
                f"allows Gateways from {gateway.namespace} to refer to it"
            )
            return
        served = certificates.get(index, namespace, name)
        if isinstance(served, str):
            listener.refs_reason = REASON_INVALID_CERTIFICATE_REF
            listener.refs_message = f"{where}: {served}"
            return
        if listener.tls is None:
            listener.tls = served


class CertificateCache:
    """Server certificates checked once per Secret: PEM parses and the key matches the certificate."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], pb.ServerTls | str] = {}

    def get(self, index: ObjectIndex, namespace: str, name: str) -> pb.ServerTls | str:
        key = (namespace, name)
        if key not in self._cache:
            self._cache[key] = _load_certificate(index, namespace, name)
        return self._cache[key]


def _load_certificate(index: ObjectIndex, namespace: str, name: str) -> pb.ServerTls | str:
    secret = index.get(SECRET, namespace, name)
    if secret is None:
        return index.problem(SECRET, namespace, name)
    chain, key = secret.data_value("tls.crt"), secret.data_value("tls.key")
    if chain is None or key is None:
        return f"Secret {secret.ref} needs keys tls.crt and tls.key"
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        return f"Secret {secret.ref} tls.crt is not a PEM certificate chain: {exc}"
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        return f"Secret {secret.ref} tls.key is not an unencrypted PEM private key: {exc}"
    leaf_public = (
        certificates[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    key_public = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if leaf_public != key_public:
        return f"Secret {secret.ref} tls.key does not match the certificate in tls.crt"
    return pb.ServerTls(certificate_chain_pem=chain, private_key_pem=key)


def _mark_conflicts(listeners: list[ListenerState]) -> None:
    by_port: dict[int, list[ListenerState]] = defaultdict(list)
    for listener in listeners:
        if listener.protocol in _PROTOCOLS:
            by_port[listener.port].append(listener)
    for port, group in by_port.items():
        protocols = sorted({listener.protocol for listener in group})
        if len(protocols) > 1:
            for listener in group:
                listener.conflict_reason = REASON_PROTOCOL_CONFLICT
                listener.accepted_message = f"port {port} is used with different protocols ({', '.join(protocols)})"
            continue
        by_hostname: dict[str, list[ListenerState]] = defaultdict(list)
        for listener in group:
            by_hostname[listener.hostname].append(listener)
        for hostname, same in by_hostname.items():
            if len(same) > 1:
                names = ", ".join(listener.name for listener in same)
                shown = hostname or "no hostname"
                for listener in same:
                    listener.conflict_reason = REASON_HOSTNAME_CONFLICT
                    listener.accepted_message = f"listeners {names} share port {port} and {shown}"
