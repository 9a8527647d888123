"""Discovery resources -> `RuntimeConfig`, once per update: validate everything, compile everything.

The result is immutable and self-contained (regexes compiled, weights accumulated, SSL
contexts loaded, backends resolved), so the request path only reads it. Every problem
found becomes a `ResourceError`; if there is any, `ConfigRejected` carries them all and
the proxy keeps its previous config (the xDS client NACKs with the message).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Literal, TypeVar

from google.protobuf.message import Message

from dataplane.config.a2a import compile_a2a_settings
from dataplane.config.errors import ConfigRejected, ErrorList, ErrorReporter, ResourceError
from dataplane.config.llm import compile_llm_settings
from dataplane.config.mcp import compile_mcp_settings
from dataplane.config.model import (
    DEFAULT_ALPN_PROTOCOLS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    ListenerGroup,
    LlmBackendSettings,
    McpBackendSettings,
    RuntimeConfig,
    ServerTlsSettings,
    UpstreamCluster,
    UpstreamProtocolName,
    UpstreamTarget,
)
from dataplane.config.policy import compile_policies
from dataplane.config.routes import compile_route
from dataplane.config.tls import ClientContextFor, client_context, server_context, sni_selector
from dataplane.config.validate import (
    MAX_WEIGHT_TOTAL,
    check_enum,
    check_hostname,
    duration_seconds,
    is_valid_host,
)
from dataplane.routing.match import RouteRule, RouteTable
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TARGET, ResourceMap

__all__ = ["ConfigRejected", "ResourceError", "compile_config"]

_UPSTREAM_PROTOCOLS: dict[int, UpstreamProtocolName] = {
    pb.UPSTREAM_PROTOCOL_UNSPECIFIED: "http1",
    pb.UPSTREAM_PROTOCOL_HTTP1: "http1",
    pb.UPSTREAM_PROTOCOL_HTTP2: "http2",
}
_UPSTREAM_ALPN: dict[UpstreamProtocolName, tuple[str, ...]] = {"http1": ("http/1.1",), "http2": ("h2",)}
_ANY_ADDRESS = "0.0.0.0"
_M = TypeVar("_M", bound=Message)


def compile_config(resources: ResourceMap, *, version: str) -> RuntimeConfig:
    """Compile one complete set of resources; raises ConfigRejected listing every error."""
    errors = ErrorList()
    backends = _compile_backends(errors, resources.get(BACKEND, {}), resources.get(TARGET, {}))
    listeners = _compile_listeners(errors, resources.get(LISTENER, {}))
    groups = _group_listeners(errors, listeners)
    rules_by_group: dict[tuple[str, int], list[RouteRule]] = {bind: [] for bind in groups}
    group_of_listener = {listener.name: bind for bind, members in groups.items() for listener in members}
    for name, message in sorted(resources.get(ROUTE, {}).items()):
        route = _expect(errors, ROUTE, name, message, pb.Route)
        if route is None:
            continue
        rule = compile_route(errors.reporter(ROUTE, name), name, route, backends)
        # A listener the route names may be gone already: the control plane orders updates.
        for bind in dict.fromkeys(group_of_listener[n] for n in route.listeners if n in group_of_listener):
            rules_by_group[bind].append(rule)
    policies = compile_policies(errors, resources)
    errors.raise_if_any()
    listener_groups = {
        bind: ListenerGroup(
            address=bind[0],
            port=bind[1],
            listener_names=tuple(listener.name for listener in members),
            tls=_group_tls(errors, members),
            route_table=RouteTable(rules_by_group[bind]),
        )
        for bind, members in groups.items()
    }
    return RuntimeConfig(
        version=version,
        listeners=MappingProxyType(listener_groups),
        backends=MappingProxyType(backends),
        policies=policies,
        resources=MappingProxyType(
            {type_url: MappingProxyType(dict(by_name)) for type_url, by_name in resources.items()}
        ),
    )


def _expect(errors: ErrorList, type_url: str, name: str, message: Message, cls: type[_M]) -> _M | None:
    """The resource as its expected class; a wrong class (a caller bug) is reported, not raised."""
    if not isinstance(message, cls):
        errors.reporter(type_url, name)("", f"expected {cls.DESCRIPTOR.full_name}, got {type(message).__name__}")
        return None
    return message


def _check_name(report: ErrorReporter, name: str, declared: str) -> None:
    if declared and declared != name:
        report("name", f"{declared!r} differs from the resource name")


# --- backends ----------------------------------------------------------------------------


def _compile_backends(
    errors: ErrorList, backends: Mapping[str, Message], targets: Mapping[str, Message]
) -> dict[str, UpstreamCluster]:
    kinds = {name: b.WhichOneof("kind") for name, b in backends.items() if isinstance(b, pb.Backend)}
    targets_of: dict[str, list[UpstreamTarget]] = {}
    # MCP servers compile with their backend, which decides their TLS (ALPN) and checks names.
    mcp_targets_of: dict[str, list[tuple[str, pb.Target]]] = {}
    for name, message in sorted(targets.items()):
        target = _expect(errors, TARGET, name, message, pb.Target)
        if target is None:
            continue
        report = errors.reporter(TARGET, name)
        # A target whose backend is unknown is ignored: its backend may be on its way or gone.
        known = target.backend in backends
        if target.WhichOneof("kind") == "mcp":
            _check_name(report, name, target.name)
            if not target.backend:
                report("backend", "a parent backend is required")
            elif known and kinds.get(target.backend) != "mcp":
                report("mcp", f"backend {target.backend} is not an MCP backend")
            elif known:
                mcp_targets_of.setdefault(target.backend, []).append((name, target))
            continue
        if known and kinds.get(target.backend) == "mcp":
            report(target.WhichOneof("kind") or "kind", f"backend {target.backend} is MCP: its targets must be mcp")
            continue
        if known and kinds.get(target.backend) == "llm":
            report(target.WhichOneof("kind") or "kind", f"backend {target.backend} is LLM: its providers are in llm")
            continue
        compiled = _compile_target(report, name, target)
        if compiled is not None and known:
            targets_of.setdefault(target.backend, []).append(compiled)
    contexts: dict[tuple[bytes, bool, str], ssl.SSLContext | None] = {}
    clusters: dict[str, UpstreamCluster] = {}
    for name, message in sorted(backends.items()):
        backend = _expect(errors, BACKEND, name, message, pb.Backend)
        if backend is None:
            continue
        report = errors.reporter(BACKEND, name)
        if kinds.get(name) == "mcp":
            targets = mcp_targets_of.get(name, [])
            mcp = partial(compile_mcp_settings, report, name, backend, targets, partial(errors.reporter, TARGET))
            cluster = _compile_server_backend(report, name, backend, contexts, "mcp", mcp)
        elif kinds.get(name) == "llm":
            llm = partial(compile_llm_settings, report, backend)
            cluster = _compile_server_backend(report, name, backend, contexts, "llm", llm)
        else:
            cluster = _compile_backend(report, name, backend, targets_of.get(name, []), contexts)
        if cluster is not None:
            clusters[name] = cluster
    return clusters


def _compile_server_backend(
    report: ErrorReporter,
    name: str,
    backend: pb.Backend,
    contexts: dict[tuple[bytes, bool, str], ssl.SSLContext | None],
    kind: Literal["mcp", "llm"],
    compile_settings: Callable[[ClientContextFor], McpBackendSettings | LlmBackendSettings | None],
) -> UpstreamCluster | None:
    """An MCP or LLM backend: its servers (MCP targets, LLM providers, each with its own address and
    TLS) live in `cluster.mcp` / `cluster.llm`, compiled by `compile_settings`; the Backend gives the
    protocol and pool settings they share."""
    _check_name(report, name, backend.name)
    protocol: UpstreamProtocolName = "http1"
    if check_enum(report, "protocol", backend, "protocol"):
        protocol = _UPSTREAM_PROTOCOLS[backend.protocol]

    def context_for(server_report: ErrorReporter, field: str, tls: pb.UpstreamTls) -> ssl.SSLContext | None:
        return _client_context(server_report, field, tls, protocol, contexts)

    settings = compile_settings(context_for)
    pool = backend.pool
    connect_timeout = duration_seconds(report, "pool.connect_timeout", pool, "connect_timeout")
    idle_timeout = duration_seconds(report, "pool.idle_timeout", pool, "idle_timeout")
    if settings is None:
        return None
    return UpstreamCluster(
        name=name,
        protocol=protocol,
        connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT,
        max_connections=pool.max_connections or DEFAULT_MAX_CONNECTIONS,
        kind=kind,
        mcp=settings if isinstance(settings, McpBackendSettings) else None,
        llm=settings if isinstance(settings, LlmBackendSettings) else None,
    )


def _client_context(
    report: ErrorReporter,
    field: str,
    tls: pb.UpstreamTls,
    protocol: UpstreamProtocolName,
    contexts: dict[tuple[bytes, bool, str], ssl.SSLContext | None],
) -> ssl.SSLContext | None:
    """One client context per distinct setting: loading the system store is not free."""
    key = (tls.ca_certificates_pem, tls.insecure_skip_verify, protocol)
    if key not in contexts:
        contexts[key] = client_context(
            report,
            field,
            tls.ca_certificates_pem,
            insecure_skip_verify=tls.insecure_skip_verify,
            alpn=_UPSTREAM_ALPN[protocol],
        )
    elif contexts[key] is None:
        report(field, "cannot load the CA certificates (see the other resource using them)")
    return contexts[key]


def _compile_target(report: ErrorReporter, name: str, target: pb.Target) -> UpstreamTarget | None:
    _check_name(report, name, target.name)
    if not target.backend:
        report("backend", "a parent backend is required")
    if target.WhichOneof("kind") != "address":
        report("address", "required (or mcp, for a target of an MCP backend)")
        return None
    host, port = target.address.host, target.address.port
    ok = bool(target.backend)
    if not _valid_host(host):
        report("address.host", f"invalid host {host!r}: must be a hostname or an IP address")
        ok = False
    if not 1 <= port <= 65535:
        report("address.port", f"{port} is not a port (1..65535)")
        ok = False
    if not ok:
        return None
    return UpstreamTarget(name=name, host=host, port=port, weight=target.weight or 1)


def _compile_backend(
    report: ErrorReporter,
    name: str,
    backend: pb.Backend,
    targets: list[UpstreamTarget],
    contexts: dict[tuple[bytes, bool, str], ssl.SSLContext | None],
) -> UpstreamCluster | None:
    _check_name(report, name, backend.name)
    protocol: UpstreamProtocolName = "http1"
    if check_enum(report, "protocol", backend, "protocol"):
        protocol = _UPSTREAM_PROTOCOLS[backend.protocol]
    ssl_context = None
    server_name = None
    if backend.HasField("tls"):
        tls = backend.tls
        server_name = tls.server_name or None
        if server_name is not None and not _valid_host(server_name):
            report("tls.server_name", f"invalid server name {server_name!r}")
        ssl_context = _client_context(report, "tls", tls, protocol, contexts)
        if ssl_context is None:
            return None
    pool = backend.pool
    connect_timeout = duration_seconds(report, "pool.connect_timeout", pool, "connect_timeout")
    idle_timeout = duration_seconds(report, "pool.idle_timeout", pool, "idle_timeout")
    total = sum(target.weight for target in targets)
    if total > MAX_WEIGHT_TOTAL:
        report("targets", f"total target weight {total} exceeds {MAX_WEIGHT_TOTAL}")
    kind = backend.WhichOneof("kind") or "http"
    # A2A: agent settings on top of an ordinary HTTP cluster (its targets are addresses).
    a2a = compile_a2a_settings(report, name, backend.a2a) if kind == "a2a" else None
    if kind == "a2a" and a2a is None:
        return None
    return UpstreamCluster(
        name=name,
        protocol=protocol,
        ssl_context=ssl_context,
        server_name=server_name,
        connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT,
        max_connections=pool.max_connections or DEFAULT_MAX_CONNECTIONS,
        targets=tuple(targets),
        kind=kind,
        a2a=a2a,
    )


_valid_host = is_valid_host


# --- listeners ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listener:
    name: str
    address: str
    port: int
    https: bool
    hostname: str | None
    tls: ServerTlsSettings | None


def _compile_listeners(errors: ErrorList, listeners: Mapping[str, Message]) -> list[_Listener]:
    compiled: list[_Listener] = []
    declared_by: dict[str, str] = {}
    tls_cache: dict[tuple[bytes, bytes, tuple[str, ...]], ServerTlsSettings | None] = {}
    for name, message in sorted(listeners.items()):
        listener = _expect(errors, LISTENER, name, message, pb.Listener)
        if listener is None:
            continue
        report = errors.reporter(LISTENER, name)
        _check_name(report, name, listener.name)
        declared = listener.name or name
        if declared in declared_by:
            report("name", f"duplicate listener name {declared!r} (also resource {declared_by[declared]})")
            continue
        declared_by[declared] = name
        ok = True
        if not 1 <= listener.port <= 65535:
            report("port", f"{listener.port} is not a port (1..65535)")
            ok = False
        address = _ANY_ADDRESS
        if listener.address:
            try:
                address = str(ipaddress.ip_address(listener.address))
            except ValueError:
                report("address", f"invalid bind address {listener.address!r}: must be an IP address")
                ok = False
        hostname = listener.hostname.lower().rstrip(".") or None
        if hostname is not None and not check_hostname(report, "hostname", listener.hostname, wildcard=True):
            ok = False
        https = False
        if check_enum(report, "protocol", listener, "protocol"):
            https = listener.protocol == pb.LISTENER_PROTOCOL_HTTPS
        else:
            ok = False
        tls = None
        if https:
            if not listener.HasField("tls"):
                report("tls", "required for an HTTPS listener")
                ok = False
            else:
                tls = _server_tls(report, listener.tls, tls_cache)
                ok = ok and tls is not None
        elif listener.HasField("tls"):
            report("tls", "set on a listener whose protocol is not HTTPS")
            ok = False
        if ok:
            compiled.append(_Listener(name, address, listener.port, https, hostname, tls))
    return compiled


def _server_tls(
    report: ErrorReporter,
    tls: pb.ServerTls,
    cache: dict[tuple[bytes, bytes, tuple[str, ...]], ServerTlsSettings | None],
) -> ServerTlsSettings | None:
    alpn = tuple(tls.alpn_protocols) or DEFAULT_ALPN_PROTOCOLS
    bad = [p for p in alpn if not 0 < len(p.encode()) <= 255]
    if bad:
        report("tls.alpn_protocols", f"invalid ALPN protocol ids {bad!r}: each must be 1..255 bytes")
        return None
    key = (tls.certificate_chain_pem, tls.private_key_pem, alpn)
    if key not in cache:
        context = server_context(report, "tls", tls.certificate_chain_pem, tls.private_key_pem, alpn)
        cache[key] = (
            ServerTlsSettings(
                certificate_chain_pem=tls.certificate_chain_pem,
                private_key_pem=tls.private_key_pem,
                alpn_protocols=alpn,
                ssl_context=context,
            )
            if context is not None
            else None
        )
    elif cache[key] is None:
        report("tls", "cannot load certificate chain and private key (see the other listener using them)")
    return cache[key]


def _group_tls(errors: ErrorList, members: list[_Listener]) -> ServerTlsSettings | None:
    """The TLS settings of a listener group; with several certificates, one that selects by SNI.

    The default certificate (no SNI, or a name no listener claims) is that of the listener
    without a hostname if there is one, else of the first listener.
    """
    secured = [m for m in members if m.tls is not None]
    if not secured:
        return None
    if len({m.tls.fingerprint for m in secured}) == 1:  # type: ignore[union-attr]
        return secured[0].tls
    default = next((m for m in secured if m.hostname is None), secured[0]).tls
    assert default is not None
    by_host = {m.hostname: m.tls for m in secured if m.hostname is not None}
    context = server_context(
        errors.reporter(LISTENER, secured[0].name), "tls", default.certificate_chain_pem,
        default.private_key_pem, default.alpn_protocols,
    )
    if context is None:  # already loaded once for the listener itself, so this is not expected
        return None
    context.sni_callback = sni_selector({host: tls.ssl_context for host, tls in by_host.items()})  # type: ignore[union-attr]
    return ServerTlsSettings(
        certificate_chain_pem=default.certificate_chain_pem,
        private_key_pem=default.private_key_pem,
        alpn_protocols=default.alpn_protocols,
        ssl_context=context,
        sni_hosts=tuple(sorted((host, tls.fingerprint) for host, tls in by_host.items())),  # type: ignore[union-attr]
    )


def _group_listeners(errors: ErrorList, listeners: list[_Listener]) -> dict[tuple[str, int], list[_Listener]]:
    """Listeners on one (address, port) share a socket: same protocol, distinct hostnames.

    HTTPS listeners sharing a port may hold different certificates: the group's TLS
    context then picks one by SNI (see _group_tls).
    """
    groups: dict[tuple[str, int], list[_Listener]] = {}
    for listener in listeners:
        bind = (listener.address, listener.port)
        members = groups.get(bind)
        if members is None:
            groups[bind] = [listener]
            continue
        first = members[0]
        report = errors.reporter(LISTENER, listener.name)
        where = f"{listener.address}:{listener.port}"
        if listener.https != first.https:
            report("protocol", f"differs from listener {first.name} on the same bind {where}")
        elif any(member.hostname == listener.hostname for member in members):
            other = next(member.name for member in members if member.hostname == listener.hostname)
            report("hostname", f"{listener.hostname or '(any)'!r} is already served by listener {other} on {where}")
        else:
            members.append(listener)
    return groups
