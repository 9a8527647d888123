"""LLM backends: our Backend's `spec.llm` to a discovery Backend whose `llm` lists the providers.

Every default is filled here (each provider type's public address and base path, the
anthropic-version header, models "*", priority 0), so a proxy never guesses a provider's
address or API shape. API keys are read from Secrets of the Backend's namespace and shipped in
the snapshot, as Policy upstream credentials are: the proxy injects them upstream and never
forwards the client's own credential.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from controlplane.model import SECRET, KubeObject, parse_duration, secret_line
from controlplane.translate.conditions import RefProblem
from controlplane.translate.index import ObjectIndex
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# Backend status reason when a provider's apiKeyRef cannot be used.
REASON_INVALID_API_KEY_REF = "InvalidApiKeyRef"
ANTHROPIC_VERSION_HEADER = "anthropic-version"
# The version every Anthropic model accepts, sampling parameters included; a provider may send
# another one with `headers`.
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"

_TYPES = {
    "openai": pb.LlmProvider.TYPE_OPENAI,
    "anthropic": pb.LlmProvider.TYPE_ANTHROPIC,
    "azure": pb.LlmProvider.TYPE_AZURE_OPENAI,
    "openaiCompatible": pb.LlmProvider.TYPE_OPENAI_COMPATIBLE,
}
# The public providers' base URLs, as their SDKs default them.
_DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
# Base path for host/port providers: where the SDKs expect the API (OpenAI's under /v1).
_DEFAULT_BASE_PATHS = {"openai": "/v1", "openaiCompatible": "/v1", "anthropic": "", "azure": ""}

# Builds an UpstreamTls from its spec (resolving CA references), or says why it cannot.
TlsBuilder = Callable[[KubeObject, Mapping[str, Any], pb.UpstreamTls, str], RefProblem | None]


def llm_backend(
    obj: KubeObject, index: ObjectIndex, backend: pb.Backend, upstream_tls: TlsBuilder
) -> RefProblem | None:
    """Fill `backend.llm` from a validated `spec.llm`; the problem when a Secret or CA is unusable."""
    spec: Mapping[str, Any] = obj.spec["llm"]
    settings = backend.llm
    settings.SetInParent()
    for position, provider_spec in enumerate(spec["providers"]):
        where = f"spec.llm.providers[{position}]"
        provider = settings.providers.add()
        problem = _provider(obj, index, provider_spec, provider, where, upstream_tls)
        if problem is not None:
            return problem
    aliases = spec.get("aliases") or {}
    for name in sorted(aliases):
        models = aliases[name]
        settings.aliases.append(pb.LlmModelAlias(name=name, models=[models] if isinstance(models, str) else models))
    failover = spec.get("failover")
    if failover is not None:
        settings.failover.SetInParent()
        settings.failover.consecutive_failures = failover.get("consecutiveFailures", 0)
        if "ejectFor" in failover:
            settings.failover.eject_for.FromTimedelta(parse_duration(failover["ejectFor"]))
    if "maxRequestBytes" in spec:
        settings.max_request_bytes = spec["maxRequestBytes"]
    settings.stream_usage_disabled = spec.get("streamUsage", True) is False
    return None


def _provider(
    obj: KubeObject,
    index: ObjectIndex,
    spec: Mapping[str, Any],
    out: pb.LlmProvider,
    where: str,
    upstream_tls: TlsBuilder,
) -> RefProblem | None:
    kind = spec["type"]
    out.name = spec["name"]
    out.type = _TYPES[kind]
    out.priority = spec.get("priority", 0)
    out.models.extend(spec.get("models") or ("*",))
    tls_spec = spec.get("tls")
    if "host" in spec:
        out.address.host = spec["host"]
        out.address.port = spec["port"]
        out.base_path = (spec.get("path") or _DEFAULT_BASE_PATHS[kind]).rstrip("/")
        secure = tls_spec is not None
    else:
        url = urlsplit(spec.get("baseUrl") or _DEFAULT_BASE_URLS[kind])
        secure = url.scheme == "https"
        out.address.host = url.hostname or ""
        out.address.port = url.port or (443 if secure else 80)
        out.base_path = url.path.rstrip("/")
    if secure:
        problem = upstream_tls(obj, tls_spec or {}, out.tls, f"{where}.tls")
        if problem is not None:
            return problem
    headers = [(h["name"].lower(), h["value"]) for h in spec.get("headers") or ()]
    if kind == "anthropic" and all(name != ANTHROPIC_VERSION_HEADER for name, _ in headers):
        headers.insert(0, (ANTHROPIC_VERSION_HEADER, DEFAULT_ANTHROPIC_VERSION))
    out.headers.extend(pb.HttpHeader(name=name, value=value) for name, value in headers)
    if "azure" in spec:
        azure = spec["azure"]
        out.azure.api_version = azure["apiVersion"]
        deployments = azure.get("deployments") or {}
        out.azure.deployments.extend(
            pb.LlmAzureDeployment(model=model, deployment=deployments[model]) for model in sorted(deployments)
        )
    if "apiKeyRef" in spec:
        ref = spec["apiKeyRef"]
        key = _secret_text(obj, index, ref["name"], ref["key"], f"{where}.apiKeyRef")
        if isinstance(key, RefProblem):
            return key
        out.api_key = key
    return None


def _secret_text(obj: KubeObject, index: ObjectIndex, name: str, key: str, where: str) -> str | RefProblem:
    """One line of ASCII from a Secret of the Backend's namespace (a trailing newline dropped)."""
    secret = index.get(SECRET, obj.namespace, name)
    if secret is None:
        return RefProblem(REASON_INVALID_API_KEY_REF, f"{where}: {index.problem(SECRET, obj.namespace, name)}")
    raw = secret.data_value(key)
    if raw is None:
        return RefProblem(REASON_INVALID_API_KEY_REF, f"{where}: Secret {secret.ref} has no key {key!r}")
    text = secret_line(raw)
    if text is None:
        message = f"{where}: Secret {secret.ref} key {key!r} must hold one line of ASCII text (value not shown)"
        return RefProblem(REASON_INVALID_API_KEY_REF, message)
    return text
