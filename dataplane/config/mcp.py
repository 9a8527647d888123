"""MCP Backends and their server Targets -> `McpBackendSettings`, checked field by field.

Everything the federation layer needs is decided here, once per update: modes resolved to
their defaults, keys checked for length, upstream TLS contexts loaded, header names
lowercased, so serving a session never parses or validates configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from dataplane.config.errors import ErrorReporter
from dataplane.config.model import (
    DEFAULT_MCP_MAX_BODY_BYTES,
    DEFAULT_MCP_SESSION_IDLE_TIMEOUT,
    MCP_SESSION_KEY_BYTES,
    McpBackendSettings,
    McpFailureMode,
    McpHttpTarget,
    McpPrefixMode,
    McpSessionKey,
    McpSseTarget,
    McpStdioTarget,
    McpStreamableHttpTarget,
    McpTarget,
)
from dataplane.config.tls import ClientContextFor
from dataplane.config.validate import (
    check_enum,
    check_header_name,
    check_header_value,
    check_path,
    duration_seconds,
    is_valid_host,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.config_rules import MCP_MANAGED_HEADERS
from shared.mcp_names import target_name_problem
from shared.origins import OriginAllowList

# Target names are name prefixes; the federation layer's separator must not be one of these.
MAX_MCP_BODY_BYTES = 1 << 30
DEFAULT_STREAMABLE_HTTP_PATH = "/mcp"
DEFAULT_SSE_PATH = "/sse"
_KEY_ID = re.compile(r"[\x21-\x7e]{1,255}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Headers the gateway itself manages on upstream requests; configuring them would break framing
# or sessions.
_MANAGED_HEADERS = MCP_MANAGED_HEADERS
_PREFIX_MODES: dict[int, McpPrefixMode] = {
    pb.McpBackend.PREFIX_MODE_UNSPECIFIED: "conditional",
    pb.McpBackend.PREFIX_MODE_CONDITIONAL: "conditional",
    pb.McpBackend.PREFIX_MODE_ALWAYS: "always",
    pb.McpBackend.PREFIX_MODE_NEVER: "never",
}
_FAILURE_MODES: dict[int, McpFailureMode] = {
    pb.McpBackend.FAILURE_MODE_UNSPECIFIED: "fail_closed",
    pb.McpBackend.FAILURE_MODE_FAIL_CLOSED: "fail_closed",
    pb.McpBackend.FAILURE_MODE_FAIL_OPEN: "fail_open",
}

# For a backend that sends no keys: a random key of this process, stable across config updates.
# It is secret, so ids stay unforgeable, but only this worker can resume its sessions. The
# control plane always sends keys; this covers hand-written and test configs.
PROCESS_SESSION_KEY = McpSessionKey(key_id="(process-local)", key=os.urandom(MCP_SESSION_KEY_BYTES))



def compile_mcp_settings(
    report: ErrorReporter,
    backend_name: str,
    backend: pb.Backend,
    targets: Sequence[tuple[str, pb.Target]],
    target_reporter: Callable[[str], ErrorReporter],
    context_for: ClientContextFor,
) -> McpBackendSettings | None:
    """Compile `backend.mcp` and its Targets (sorted by resource name); None when any is invalid."""
    settings = backend.mcp
    ok = True
    if backend.HasField("tls"):
        report("tls", "not used by MCP backends: set tls per target (mcp.streamable_http.tls or mcp.sse.tls)")
        ok = False
    prefix_mode: McpPrefixMode = "conditional"
    if check_enum(report, "mcp.prefix_mode", settings, "prefix_mode"):
        prefix_mode = _PREFIX_MODES[settings.prefix_mode]
    else:
        ok = False
    failure_mode: McpFailureMode = "fail_closed"
    if check_enum(report, "mcp.failure_mode", settings, "failure_mode"):
        failure_mode = _FAILURE_MODES[settings.failure_mode]
    else:
        ok = False
    max_body = settings.max_request_body_bytes or DEFAULT_MCP_MAX_BODY_BYTES
    if max_body > MAX_MCP_BODY_BYTES:
        report("mcp.max_request_body_bytes", f"{max_body} exceeds the limit of {MAX_MCP_BODY_BYTES}")
        ok = False
    idle = duration_seconds(report, "mcp.session_idle_timeout", settings, "session_idle_timeout")
    if settings.HasField("session_idle_timeout") and idle is not None and idle <= 0:
        report("mcp.session_idle_timeout", "must be greater than zero")
        ok = False
    keys = _session_keys(report, settings.session_keys)
    origins: OriginAllowList | None = None
    if settings.allowed_origins:
        try:
            origins = OriginAllowList.compile(settings.allowed_origins)
        except ValueError as exc:
            report("mcp.allowed_origins", str(exc))
            ok = False
    # A server's Target key is "<backend>/<server name>" (checked per target), and keys are
    # unique, so server names are unique within the backend.
    compiled: list[McpTarget] = []
    for name, target in targets:
        result = compile_mcp_target(target_reporter(name), name, backend_name, target, context_for)
        if result is None:
            ok = False
            continue
        compiled.append(result)
    if keys is None or not ok:
        return None
    return McpBackendSettings(
        prefix_mode=prefix_mode,
        failure_mode=failure_mode,
        max_body_bytes=max_body,
        session_idle_timeout=idle or DEFAULT_MCP_SESSION_IDLE_TIMEOUT,
        session_keys=keys,
        targets=tuple(compiled),
        allowed_origins=origins,
    )


def _session_keys(report: ErrorReporter, keys: Sequence[pb.McpSessionKey]) -> tuple[McpSessionKey, ...] | None:
    if not keys:
        return (PROCESS_SESSION_KEY,)
    compiled: list[McpSessionKey] = []
    ids: set[str] = set()
    ok = True
    for index, key in enumerate(keys):
        where = f"mcp.session_keys[{index}]"
        if key.id == PROCESS_SESSION_KEY.key_id:
            report(f"{where}.id", f"{key.id!r} is reserved for the proxy's own key")
            ok = False
        elif not _KEY_ID.fullmatch(key.id):
            report(f"{where}.id", f"invalid key id {key.id!r}: 1 to 255 printable ASCII characters, no spaces")
            ok = False
        elif key.id in ids:
            report(f"{where}.id", f"duplicate key id {key.id!r}")
            ok = False
        ids.add(key.id)
        if len(key.key) != MCP_SESSION_KEY_BYTES:
            # Never echo the key material itself.
            report(f"{where}.key", f"must be {MCP_SESSION_KEY_BYTES} bytes (AES-256), got {len(key.key)}")
            ok = False
        compiled.append(McpSessionKey(key_id=key.id, key=bytes(key.key)))
    return tuple(compiled) if ok else None


def compile_mcp_target(
    report: ErrorReporter, name: str, backend_name: str, target: pb.Target, context_for: ClientContextFor
) -> McpTarget | None:
    """One MCP server Target; None (with errors reported) when it is unusable."""
    server = target.mcp
    ok = True
    problem = target_name_problem(server.name)
    if problem is not None:
        report("mcp.name", problem)
        ok = False
    elif name != f"{backend_name}/{server.name}":
        report("mcp.name", f"{server.name!r} does not match the target key {name!r} (want {backend_name}/<name>)")
        ok = False
    transport = server.WhichOneof("transport")
    if transport is None:
        report("mcp.transport", "one of streamable_http, sse, stdio is required")
        return None
    if transport == "stdio":
        stdio = _stdio_target(report, server.name, server.stdio)
        return stdio if ok else None
    http = _http_target(report, f"mcp.{transport}", server.name, getattr(server, transport), transport, context_for)
    return http if ok else None


def _http_target(
    report: ErrorReporter,
    field: str,
    name: str,
    config: pb.McpHttpTransport,
    transport: str,
    context_for: ClientContextFor,
) -> McpHttpTarget | None:
    ok = True
    host, port = config.address.host, config.address.port
    if not is_valid_host(host):
        report(f"{field}.address.host", f"invalid host {host!r}: must be a hostname or an IP address")
        ok = False
    if not 1 <= port <= 65535:
        report(f"{field}.address.port", f"{port} is not a port (1..65535)")
        ok = False
    path = config.path or (DEFAULT_SSE_PATH if transport == "sse" else DEFAULT_STREAMABLE_HTTP_PATH)
    ok = check_path(report, f"{field}.path", path) and ok
    headers: list[tuple[str, str]] = []
    for index, header in enumerate(config.headers):
        where = f"{field}.headers[{index}]"
        lowered = header.name.lower()
        if not check_header_name(report, f"{where}.name", header.name):
            ok = False
        elif lowered in _MANAGED_HEADERS:
            report(f"{where}.name", f"{header.name!r} is set by the gateway and cannot be configured")
            ok = False
        elif any(existing == lowered for existing, _ in headers):
            report(f"{where}.name", f"header {header.name!r} appears twice")
            ok = False
        ok = check_header_value(report, f"{where}.value", header.value) and ok
        headers.append((lowered, header.value))
    context = None
    server_name = None
    if config.HasField("tls"):
        server_name = config.tls.server_name or None
        if server_name is not None and not is_valid_host(server_name):
            report(f"{field}.tls.server_name", f"invalid server name {server_name!r}")
            ok = False
        context = context_for(report, f"{field}.tls", config.tls)
        ok = ok and context is not None
    if not ok:
        return None
    cls = McpSseTarget if transport == "sse" else McpStreamableHttpTarget
    return cls(
        name=name,
        host=host,
        port=port,
        path=path,
        ssl_context=context,
        server_name=server_name,
        headers=tuple(headers),
    )


def _stdio_target(report: ErrorReporter, name: str, config: pb.McpStdioTransport) -> McpStdioTarget | None:
    ok = True
    if not config.command.strip():
        report("mcp.stdio.command", "required: the program to run")
        ok = False
    elif "\0" in config.command:
        report("mcp.stdio.command", "must not contain NUL")
        ok = False
    for index, arg in enumerate(config.args):
        if "\0" in arg:
            report(f"mcp.stdio.args[{index}]", "must not contain NUL")
            ok = False
    env: list[tuple[str, str]] = []
    for index, variable in enumerate(config.env):
        where = f"mcp.stdio.env[{index}]"
        if not _ENV_NAME.fullmatch(variable.name):
            report(f"{where}.name", f"invalid variable name {variable.name!r} (letters, digits, '_'; no leading digit)")
            ok = False
        elif any(existing == variable.name for existing, _ in env):
            report(f"{where}.name", f"variable {variable.name!r} is set twice")
            ok = False
        if "\0" in variable.value:
            report(f"{where}.value", "must not contain NUL")
            ok = False
        env.append((variable.name, variable.value))
    working_dir = config.working_dir or None
    if working_dir is not None and (not working_dir.startswith("/") or "\0" in working_dir):
        report("mcp.stdio.working_dir", f"{working_dir!r} is not an absolute path")
        ok = False
    if not ok:
        return None
    return McpStdioTarget(
        name=name, command=config.command, args=tuple(config.args), env=tuple(env), working_dir=working_dir
    )
