"""Which provider serves a request's model, in which order, and where upstream (sans-I/O).

A request's model goes through the backend's aliases (an alias stands for one or more provider
models, tried in order), then each model through the providers serving it (listed by name or
"*"), in the backend's failover order (priority, then the order written). Providers a
`ProviderHealth` has ejected are left out; if that leaves nothing, every candidate is returned
anyway, the soonest to come back first: trying a provider that may have recovered beats
refusing outright, and each failure re-ejects it.

`ProviderHealth` is the one piece of state: per backend and worker, it counts consecutive
failures (connect errors, resets, 429 and 5xx) per provider and ejects a provider for the
backend's `eject_for` (at least the Retry-After of the 429 or 503 that ejected it) once they
reach `consecutive_failures`. A success resets the count. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import quote

from dataplane.config.model import LlmBackendSettings, LlmProviderSettings
from dataplane.llm.wire import ApiFormat

# The operations of the LLM gateway's routes.
Operation = Literal["chat", "messages", "embeddings", "models"]

# A provider's answer to the gateway's own key: the client did nothing wrong.
CREDENTIAL_STATUSES: Final = frozenset({401, 403})
# Upstream statuses after which the next provider is tried (and that count as failures).
# Anthropic's 529 means overloaded. A 4xx other than these is the request's fault: it would fail
# anywhere, so it goes back to the client.
FAILOVER_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529}) | CREDENTIAL_STATUSES
# An ejection never lasts longer than this, whatever Retry-After says.
MAX_EJECTION: Final = 3600.0


def provider_format(provider: LlmProviderSettings) -> ApiFormat:
    """The API a provider speaks."""
    return "anthropic" if provider.type == "anthropic" else "openai"


def supports(provider: LlmProviderSettings, operation: Operation) -> bool:
    """Whether a provider can serve an operation at all (Anthropic has no embeddings)."""
    return not (operation == "embeddings" and provider.type == "anthropic")


def is_failover_status(status: int) -> bool:
    return status in FAILOVER_STATUSES or status >= 500


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try: this provider, asked for this model (its own name for it)."""

    provider: LlmProviderSettings
    model: str


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """The tries for one request, in order. `skipped` names the ejected providers left out;
    `all_ejected` says every candidate was ejected (the tries are then all of them)."""

    requested: str
    attempts: tuple[Attempt, ...]
    skipped: tuple[str, ...] = ()
    all_ejected: bool = False


def candidates(settings: LlmBackendSettings, model: str, operation: Operation = "chat") -> tuple[Attempt, ...]:
    """Every (provider, model) that could serve `model`, in failover order, health aside."""
    models = settings.aliases.get(model, (model,))
    attempts: list[Attempt] = []
    for name in models:
        attempts += (Attempt(p, name) for p in settings.providers_for(name) if supports(p, operation))
    return tuple(attempts)


def route_model(
    settings: LlmBackendSettings, model: str, health: ProviderHealth | None = None, operation: Operation = "chat"
) -> ModelRoute | None:
    """The tries for `model`; None when no provider serves it (the client gets 404)."""
    every = candidates(settings, model, operation)
    if not every:
        return None
    if health is None:
        return ModelRoute(model, every)
    now = health.now()
    available = tuple(a for a in every if health.available(a.provider.name, now))
    skipped = tuple(dict.fromkeys(a.provider.name for a in every if not health.available(a.provider.name, now)))
    if available:
        return ModelRoute(model, available, skipped)
    # sorted() is stable: providers back at the same moment keep the failover order.
    soonest = tuple(sorted(every, key=lambda a: health.ejected_until(a.provider.name) or 0.0))
    return ModelRoute(model, soonest, skipped, all_ejected=True)


class ProviderHealth:
    """Consecutive failures and ejections of one backend's providers, on one worker."""

    __slots__ = ("_clock", "_ejected_until", "_failures")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def now(self) -> float:
        return self._clock()

    def available(self, provider: str, now: float | None = None) -> bool:
        until = self._ejected_until.get(provider)
        if until is None:
            return True
        if (self._clock() if now is None else now) >= until:
            del self._ejected_until[provider]
            return True
        return False

    def ejected_until(self, provider: str) -> float | None:
        """When an ejected provider comes back (clock time), None when it is not ejected."""
        return self._ejected_until.get(provider)

    def failures(self, provider: str) -> int:
        return self._failures.get(provider, 0)

    def record_success(self, provider: str) -> None:
        self._failures.pop(provider, None)
        self._ejected_until.pop(provider, None)

    def record_failure(
        self, provider: str, *, threshold: int, eject_for: float, retry_after: float | None = None
    ) -> bool:
        """Count a failure; True when it ejects the provider (for eject_for, or longer when the
        provider's Retry-After asks for more, at most MAX_EJECTION)."""
        count = self._failures.get(provider, 0) + 1
        self._failures[provider] = count
        if count < threshold:
            return False
        duration = min(max(eject_for, retry_after or 0.0), MAX_EJECTION)
        self._ejected_until[provider] = self._clock() + duration
        self._failures[provider] = 0
        return True

    def forget(self, keep: set[str]) -> None:
        """Drop the state of providers no longer configured (after a config update)."""
        for table in (self._failures, self._ejected_until):
            for name in [name for name in table if name not in keep]:
                del table[name]


def upstream_target(provider: LlmProviderSettings, operation: Operation, model: str) -> str | None:
    """The request target (path and query) of an operation on a provider, in the provider's own
    API: a chat request to an Anthropic provider goes to /v1/messages (translated), a messages
    request to an OpenAI-type provider to its chat completions. None when it has no such API."""
    base = provider.base_path
    if provider.type == "anthropic":
        if operation in ("chat", "messages"):
            return f"{base}/v1/messages"
        if operation == "models":
            return f"{base}/v1/models"
        return None
    if provider.type == "azure":
        version = quote(provider.azure_api_version, safe="")
        if operation == "models":
            return f"{base}/openai/models?api-version={version}"
        deployment = quote(provider.deployment(model), safe="")
        path = "embeddings" if operation == "embeddings" else "chat/completions"
        return f"{base}/openai/deployments/{deployment}/{path}?api-version={version}"
    if operation == "models":
        return f"{base}/models"
    return f"{base}/embeddings" if operation == "embeddings" else f"{base}/chat/completions"


def upstream_headers(provider: LlmProviderSettings) -> list[tuple[bytes, bytes]]:
    """The provider's own headers and credential (lower-case names), set over the client's."""
    headers = [(name.encode(), value.encode()) for name, value in provider.headers]
    if provider.auth_header is not None:
        name, value = provider.auth_header
        headers.append((name.encode(), value.encode()))
    return headers
