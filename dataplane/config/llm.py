"""LLM Backends -> `LlmBackendSettings`, checked field by field.

Everything the LLM handler needs is decided here, once per update: provider types and
defaults resolved, providers sorted into failover order, the auth header each provider wants
built from its key, upstream TLS contexts loaded, aliases indexed. Serving a request never
parses or validates configuration.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from dataplane.config.errors import ErrorReporter
from dataplane.config.model import (
    ANY_MODEL,
    DEFAULT_LLM_CONSECUTIVE_FAILURES,
    DEFAULT_LLM_EJECT_FOR,
    DEFAULT_LLM_MAX_REQUEST_BYTES,
    LlmBackendSettings,
    LlmProviderSettings,
    LlmProviderType,
)
from dataplane.config.tls import ClientContextFor
from dataplane.config.validate import (
    check_enum,
    check_header_name,
    check_header_value,
    duration_seconds,
    is_valid_host,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.config_rules import (
    HEADER_VALUE_RULE,
    LLM_AZURE_API_VERSION,
    LLM_MANAGED_HEADERS,
    LLM_MODEL_NAME,
    LLM_PROVIDER_NAME,
    is_header_value,
    path_problem,
)

__all__ = ["MODEL_NAME", "PROVIDER_NAME", "compile_llm_settings"]

MAX_LLM_REQUEST_BYTES = 1 << 30
MAX_EJECT_FOR = 3600.0
MAX_CONSECUTIVE_FAILURES = 1000
# The control plane checks names with the same rules (controlplane/model/validation.py
# LLM_PROVIDER_NAME, LLM_MODEL_NAME).
PROVIDER_NAME = LLM_PROVIDER_NAME
MODEL_NAME = LLM_MODEL_NAME
_AZURE_API_VERSION = LLM_AZURE_API_VERSION
_AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ANTHROPIC_VERSION_HEADER = "anthropic-version"
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# Headers the gateway sets itself on provider requests (framing, the credential).
_MANAGED_HEADERS = LLM_MANAGED_HEADERS
_TYPES: dict[int, LlmProviderType] = {
    pb.LlmProvider.TYPE_OPENAI: "openai",
    pb.LlmProvider.TYPE_ANTHROPIC: "anthropic",
    pb.LlmProvider.TYPE_AZURE_OPENAI: "azure",
    pb.LlmProvider.TYPE_OPENAI_COMPATIBLE: "openai_compatible",
}



def auth_header(kind: LlmProviderType, api_key: str) -> tuple[str, str] | None:
    """The header each provider API takes its key in; None without a key."""
    if not api_key:
        return None
    if kind == "anthropic":
        return ("x-api-key", api_key)
    if kind == "azure":
        return ("api-key", api_key)
    return ("authorization", f"Bearer {api_key}")


def compile_llm_settings(
    report: ErrorReporter, backend: pb.Backend, context_for: ClientContextFor
) -> LlmBackendSettings | None:
    """Compile `backend.llm`; None (with every problem reported) when any field is invalid."""
    settings = backend.llm
    ok = True
    if backend.HasField("tls"):
        report("tls", "not used by LLM backends: set tls per provider (llm.providers[].tls)")
        ok = False
    if not settings.providers:
        report("llm.providers", "at least one provider is required")
        ok = False
    providers: list[LlmProviderSettings] = []
    names: set[str] = set()
    for index, provider in enumerate(settings.providers):
        if provider.name in names:
            report(f"llm.providers[{index}].name", f"provider name {provider.name!r} is used twice")
            ok = False
        names.add(provider.name)
        compiled = _provider(report, f"llm.providers[{index}]", provider, context_for)
        if compiled is None:
            ok = False
            continue
        providers.append(compiled)
    aliases: dict[str, tuple[str, ...]] = {}
    for index, alias in enumerate(settings.aliases):
        where = f"llm.aliases[{index}]"
        if not MODEL_NAME.fullmatch(alias.name):
            report(f"{where}.name", f"invalid alias {alias.name!r}: use 1-256 of letters, digits and . _ : / @ + -")
            ok = False
        elif alias.name in aliases:
            report(f"{where}.name", f"alias {alias.name!r} is defined twice")
            ok = False
        if not alias.models:
            report(f"{where}.models", "at least one model is required")
            ok = False
        for position, model in enumerate(alias.models):
            if not MODEL_NAME.fullmatch(model):
                report(f"{where}.models[{position}]", f"invalid model name {model!r}")
                ok = False
        aliases[alias.name] = tuple(alias.models)
    consecutive_failures = DEFAULT_LLM_CONSECUTIVE_FAILURES
    eject_for = DEFAULT_LLM_EJECT_FOR
    if settings.HasField("failover"):
        failover = settings.failover
        consecutive_failures = failover.consecutive_failures or DEFAULT_LLM_CONSECUTIVE_FAILURES
        if consecutive_failures > MAX_CONSECUTIVE_FAILURES:
            report("llm.failover.consecutive_failures", f"{consecutive_failures} exceeds {MAX_CONSECUTIVE_FAILURES}")
            ok = False
        seconds = duration_seconds(report, "llm.failover.eject_for", failover, "eject_for")
        if failover.HasField("eject_for"):
            if seconds is None:
                ok = False
            elif not 0 < seconds <= MAX_EJECT_FOR:
                report("llm.failover.eject_for", f"{seconds:g}s: must be greater than zero and at most 1h")
                ok = False
            else:
                eject_for = seconds
    max_request_bytes = settings.max_request_bytes or DEFAULT_LLM_MAX_REQUEST_BYTES
    if max_request_bytes > MAX_LLM_REQUEST_BYTES:
        report("llm.max_request_bytes", f"{max_request_bytes} exceeds the limit of {MAX_LLM_REQUEST_BYTES}")
        ok = False
    if not ok:
        return None
    return LlmBackendSettings(
        # sorted() is stable: equal priorities keep the order written.
        providers=tuple(sorted(providers, key=lambda p: p.priority)),
        aliases=MappingProxyType(aliases),
        consecutive_failures=consecutive_failures,
        eject_for=eject_for,
        max_request_bytes=max_request_bytes,
        stream_usage=not settings.stream_usage_disabled,
    )


def _provider(
    report: ErrorReporter, where: str, provider: pb.LlmProvider, context_for: ClientContextFor
) -> LlmProviderSettings | None:
    ok = True
    if not PROVIDER_NAME.fullmatch(provider.name):
        report(f"{where}.name", f"invalid provider name {provider.name!r}: use 1-63 of [A-Za-z0-9_-]")
        ok = False
    kind: LlmProviderType | None = None
    if not check_enum(report, f"{where}.type", provider, "type"):
        ok = False
    elif provider.type == pb.LlmProvider.TYPE_UNSPECIFIED:
        report(f"{where}.type", "required")
        ok = False
    else:
        kind = _TYPES[provider.type]
    host, port = provider.address.host, provider.address.port
    if not is_valid_host(host):
        report(f"{where}.address.host", f"invalid host {host!r}: must be a hostname or an IP address")
        ok = False
    if not 1 <= port <= 65535:
        report(f"{where}.address.port", f"{port} is not a port (1..65535)")
        ok = False
    base_path = provider.base_path.rstrip("/")
    if base_path and (problem := path_problem(base_path)) is not None:
        report(f"{where}.base_path", f"invalid base path {base_path!r}: {problem}")
        ok = False
    ssl_context = None
    server_name = None
    if provider.HasField("tls"):
        server_name = provider.tls.server_name or None
        if server_name is not None and not is_valid_host(server_name):
            report(f"{where}.tls.server_name", f"invalid server name {server_name!r}")
            ok = False
        ssl_context = context_for(report, f"{where}.tls", provider.tls)
        ok = ok and ssl_context is not None
    api_key = provider.api_key
    if api_key and not is_header_value(api_key):
        report(f"{where}.api_key", f"{HEADER_VALUE_RULE} (value not shown)")
        ok = False
    models = tuple(provider.models) or (ANY_MODEL,)
    for index, model in enumerate(models):
        if model != ANY_MODEL and not MODEL_NAME.fullmatch(model):
            report(f"{where}.models[{index}]", f"invalid model name {model!r}")
            ok = False
    headers: list[tuple[str, str]] = []
    for index, header in enumerate(provider.headers):
        name = header.name.lower()
        field = f"{where}.headers[{index}]"
        if not check_header_name(report, f"{field}.name", header.name) or not check_header_value(
            report, f"{field}.value", header.value
        ):
            ok = False
        elif name in _MANAGED_HEADERS:
            report(f"{field}.name", f"header {name!r} is set by the gateway")
            ok = False
        elif any(existing == name for existing, _ in headers):
            report(f"{field}.name", f"header {name!r} appears twice")
            ok = False
        else:
            headers.append((name, header.value))
    anthropic_version = None
    if kind == "anthropic":
        anthropic_version = next((v for n, v in headers if n == ANTHROPIC_VERSION_HEADER), None)
        if anthropic_version is None:
            anthropic_version = DEFAULT_ANTHROPIC_VERSION
            headers.insert(0, (ANTHROPIC_VERSION_HEADER, anthropic_version))
    api_version = ""
    deployments: dict[str, str] = {}
    if provider.HasField("azure"):
        if kind is not None and kind != "azure":
            report(f"{where}.azure", "only applies to TYPE_AZURE_OPENAI providers")
            ok = False
        api_version = provider.azure.api_version
        if not _AZURE_API_VERSION.fullmatch(api_version):
            report(f"{where}.azure.api_version", f"invalid api-version {api_version!r} (like 2024-10-21)")
            ok = False
        for index, entry in enumerate(provider.azure.deployments):
            if not MODEL_NAME.fullmatch(entry.model) or entry.model in deployments:
                report(f"{where}.azure.deployments[{index}].model", f"invalid or repeated model {entry.model!r}")
                ok = False
            if not _AZURE_DEPLOYMENT.fullmatch(entry.deployment):
                report(f"{where}.azure.deployments[{index}].deployment", f"invalid deployment {entry.deployment!r}")
                ok = False
            deployments[entry.model] = entry.deployment
    elif kind == "azure":
        report(f"{where}.azure", "required for TYPE_AZURE_OPENAI (api_version)")
        ok = False
    if not ok or kind is None:
        return None
    return LlmProviderSettings(
        name=provider.name,
        type=kind,
        host=host,
        port=port,
        base_path=base_path,
        ssl_context=ssl_context,
        server_name=server_name,
        api_key=api_key,
        auth_header=auth_header(kind, api_key),
        headers=tuple(headers),
        priority=provider.priority,
        models=models,
        azure_api_version=api_version,
        azure_deployments=MappingProxyType(deployments),
        anthropic_version=anthropic_version,
    )
