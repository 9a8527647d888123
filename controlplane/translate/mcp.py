"""MCP backends: our Backend's `spec.mcp` and `appProtocol: kgateway.dev/mcp` Services to discovery resources.

An MCP Backend carries its settings and session keyring; each MCP server is one Target child
keyed "<backend key>/<server name>". Session keys come from Secrets: there is no built-in
default, because a key every installation shares would let anyone forge or read session ids
(which carry the upstream session ids).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.model import SECRET, KubeObject, parse_duration
from controlplane.translate.conditions import REASON_BACKEND_NOT_FOUND, REASON_INVALID_SESSION_KEY_REF, RefProblem
from controlplane.translate.index import ObjectIndex
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# Service port appProtocol (kgateway's convention) that makes a Service an MCP server.
SERVICE_APP_PROTOCOL = "kgateway.dev/mcp"
# Service annotation holding the MCP endpoint path.
SERVICE_PATH_ANNOTATION = "kgateway.dev/mcp-path"
# A Service has no place for a key reference, so its MCP backend takes its keyring from this
# Secret in the Service's namespace: key "current" encrypts, optional "previous" still decrypts.
SERVICE_SESSION_KEY_SECRET = "agentgate-mcp-session-key"
SERVICE_SESSION_KEY_CURRENT = "current"
SERVICE_SESSION_KEY_PREVIOUS = "previous"

DEFAULT_STREAMABLE_HTTP_PATH = "/mcp"
DEFAULT_SSE_PATH = "/sse"
SESSION_KEY_BYTES = 32

_PREFIX_MODES = {
    "Conditional": pb.McpBackend.PREFIX_MODE_CONDITIONAL,
    "Always": pb.McpBackend.PREFIX_MODE_ALWAYS,
    "Never": pb.McpBackend.PREFIX_MODE_NEVER,
}
_FAILURE_MODES = {
    "FailClosed": pb.McpBackend.FAILURE_MODE_FAIL_CLOSED,
    "FailOpen": pb.McpBackend.FAILURE_MODE_FAIL_OPEN,
}

# Builds a target's UpstreamTls from its spec (resolving CA references), or says why it cannot.
TlsBuilder = Callable[[KubeObject, Mapping[str, Any], pb.UpstreamTls, str], RefProblem | None]


def mcp_backend(
    obj: KubeObject, index: ObjectIndex, backend: pb.Backend, upstream_tls: TlsBuilder
) -> tuple[pb.Target, ...] | RefProblem:
    """Fill `backend.mcp` from a validated `spec.mcp` and return its Targets."""
    spec: Mapping[str, Any] = obj.spec["mcp"]
    key = obj.ref
    settings = backend.mcp
    settings.prefix_mode = _PREFIX_MODES[spec.get("prefixMode", "Conditional")]
    settings.failure_mode = _FAILURE_MODES[spec.get("failureMode", "FailClosed")]
    if "maxBodyBytes" in spec:
        settings.max_request_body_bytes = spec["maxBodyBytes"]
    if "sessionIdleTimeout" in spec:
        settings.session_idle_timeout.FromTimedelta(parse_duration(spec["sessionIdleTimeout"]))
    settings.allowed_origins.extend(spec.get("allowedOrigins") or ())
    refs = [("spec.mcp.sessionKeyRef", spec["sessionKeyRef"])]
    refs += [
        (f"spec.mcp.previousSessionKeyRefs[{i}]", ref) for i, ref in enumerate(spec.get("previousSessionKeyRefs") or ())
    ]
    for where, ref in refs:
        session_key = _session_key(index, obj.namespace, ref["name"], ref["key"], where)
        if isinstance(session_key, RefProblem):
            return session_key
        if any(existing.id == session_key.id for existing in settings.session_keys):
            return RefProblem(REASON_INVALID_SESSION_KEY_REF, f"{where}: Secret key {session_key.id} is listed twice")
        settings.session_keys.append(session_key)
    targets: list[pb.Target] = []
    for position, target in enumerate(spec["targets"]):
        server = pb.McpServer(name=target["name"])
        if "stdio" in target:
            stdio = target["stdio"]
            server.stdio.command = stdio["command"]
            server.stdio.args.extend(stdio.get("args") or ())
            env = stdio.get("env") or {}
            server.stdio.env.extend(pb.EnvironmentVariable(name=n, value=env[n]) for n in sorted(env))
            server.stdio.working_dir = stdio.get("workingDir", "")
        else:
            static = target["static"]
            sse = target.get("protocol") == "SSE"
            transport = server.sse if sse else server.streamable_http
            transport.address.host = static["host"]
            transport.address.port = static["port"]
            transport.path = static.get("path", DEFAULT_SSE_PATH if sse else DEFAULT_STREAMABLE_HTTP_PATH)
            transport.headers.extend(
                pb.HttpHeader(name=h["name"], value=h["value"]) for h in static.get("headers") or ()
            )
            if "tls" in static:
                where = f"spec.mcp.targets[{position}].static.tls"
                problem = upstream_tls(obj, static["tls"] or {}, transport.tls, where)
                if problem is not None:
                    return problem
        targets.append(pb.Target(name=f"{key}/{server.name}", backend=key, weight=1, mcp=server))
    return tuple(targets)


def service_mcp_backend(
    index: ObjectIndex, service: KubeObject, key: str, host: str, port: int
) -> tuple[pb.Backend, tuple[pb.Target, ...]] | RefProblem:
    """An MCP Backend with one streamable-HTTP target for a Service port of appProtocol kgateway.dev/mcp."""
    path = service.annotations.get(SERVICE_PATH_ANNOTATION, DEFAULT_STREAMABLE_HTTP_PATH)
    if not path.startswith("/") or any(char in path for char in "?# \t\r\n\0"):
        message = f"Service {service.ref}: annotation {SERVICE_PATH_ANNOTATION} {path!r} is not an absolute path"
        return RefProblem(REASON_BACKEND_NOT_FOUND, message)
    backend = pb.Backend(name=key, protocol=pb.UPSTREAM_PROTOCOL_HTTP1)
    backend.mcp.SetInParent()
    name, namespace = SERVICE_SESSION_KEY_SECRET, service.namespace
    where = f"Service {service.ref} (appProtocol {SERVICE_APP_PROTOCOL} takes its session keys from Secret {name})"
    data_keys = [SERVICE_SESSION_KEY_CURRENT]
    secret = index.get(SECRET, namespace, name)
    if secret is not None and secret.data_value(SERVICE_SESSION_KEY_PREVIOUS) is not None:
        data_keys.append(SERVICE_SESSION_KEY_PREVIOUS)
    for data_key in data_keys:
        session_key = _session_key(index, namespace, name, data_key, where)
        if isinstance(session_key, RefProblem):
            # ResolvedRefs reasons are fixed by the Gateway API: the Service is not usable.
            return RefProblem(REASON_BACKEND_NOT_FOUND, session_key.message)
        backend.mcp.session_keys.append(session_key)
    server = pb.McpServer(
        name=service.name,
        streamable_http=pb.McpHttpTransport(address=pb.SocketAddress(host=host, port=port), path=path),
    )
    return backend, (pb.Target(name=f"{key}/{service.name}", backend=key, weight=1, mcp=server),)


def _session_key(
    index: ObjectIndex, namespace: str, name: str, data_key: str, where: str
) -> pb.McpSessionKey | RefProblem:
    """One keyring entry from a Secret: 32 raw bytes, or their base64 text (`openssl rand -base64 32`)."""
    secret = index.get(SECRET, namespace, name)
    if secret is None:
        return RefProblem(REASON_INVALID_SESSION_KEY_REF, f"{where}: {index.problem(SECRET, namespace, name)}")
    raw = secret.data_value(data_key)
    if raw is None:
        return RefProblem(REASON_INVALID_SESSION_KEY_REF, f"{where}: Secret {secret.ref} has no key {data_key!r}")
    key = raw if len(raw) == SESSION_KEY_BYTES else _base64_key(raw)
    if key is None:
        message = (
            f"{where}: Secret {secret.ref} key {data_key!r} must hold {SESSION_KEY_BYTES} bytes "
            f"(raw, or base64 as from `openssl rand -base64 32`), got {len(raw)} bytes"
        )
        return RefProblem(REASON_INVALID_SESSION_KEY_REF, message)
    return pb.McpSessionKey(id=f"{name}/{data_key}", key=key)


def _base64_key(text: bytes) -> bytes | None:
    try:
        decoded = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == SESSION_KEY_BYTES else None
