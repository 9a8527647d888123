"""Model routing: aliases, served-model lists and "*", failover order, ejection on an injected clock,
and the upstream URL and credential each provider type wants."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from dataplane.config.llm import auth_header
from dataplane.config.model import LlmBackendSettings, LlmProviderSettings, LlmProviderType
from dataplane.llm.routing import (
    ProviderHealth,
    candidates,
    is_failover_status,
    provider_format,
    route_model,
    upstream_headers,
    upstream_target,
)


def provider(
    name: str, kind: LlmProviderType = "openai", models: tuple[str, ...] = ("*",), priority: int = 0, **extra: object
) -> LlmProviderSettings:
    base = "/v1" if kind in ("openai", "openai_compatible") else ""
    return LlmProviderSettings(
        name=name,
        type=kind,
        host=f"{name}.example",
        port=443,
        base_path=base,
        models=models,
        priority=priority,
        **extra,  # type: ignore[arg-type]
    )


OPENAI = provider("openai", models=("gpt-4o", "gpt-4o-mini"))
AZURE = provider(
    "azure",
    "azure",
    models=("gpt-4o",),
    priority=1,
    azure_api_version="2024-10-21",
    azure_deployments=MappingProxyType({"gpt-4o": "prod-4o"}),
)
CLAUDE = provider("claude", "anthropic", models=("claude-sonnet-4-5",), priority=2, anthropic_version="2023-06-01")
LOCAL = provider("local", "openai_compatible", priority=5)
SETTINGS = LlmBackendSettings(
    providers=(OPENAI, AZURE, CLAUDE, LOCAL),
    aliases=MappingProxyType({"smart": ("gpt-4o", "claude-sonnet-4-5"), "fast": ("gpt-4o-mini",)}),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tries(model: str, health: ProviderHealth | None = None, operation: str = "chat") -> list[tuple[str, str]]:
    route = route_model(SETTINGS, model, health, operation)  # type: ignore[arg-type]
    assert route is not None
    return [(a.provider.name, a.model) for a in route.attempts]


def test_models_listed_by_name_then_wildcards_in_failover_order() -> None:
    assert tries("gpt-4o") == [("openai", "gpt-4o"), ("azure", "gpt-4o"), ("local", "gpt-4o")]
    assert tries("llama3:8b") == [("local", "llama3:8b")]
    assert tries("claude-sonnet-4-5") == [("claude", "claude-sonnet-4-5"), ("local", "claude-sonnet-4-5")]


def test_aliases_stand_for_their_models_in_order() -> None:
    assert tries("smart") == [
        ("openai", "gpt-4o"),
        ("azure", "gpt-4o"),
        ("local", "gpt-4o"),
        ("claude", "claude-sonnet-4-5"),
        ("local", "claude-sonnet-4-5"),
    ]
    assert tries("fast") == [("openai", "gpt-4o-mini"), ("local", "gpt-4o-mini")]


def test_unknown_model_without_wildcard_provider_is_none() -> None:
    settings = LlmBackendSettings(providers=(OPENAI, CLAUDE))
    assert route_model(settings, "gpt-5") is None
    assert candidates(settings, "gpt-4o") == candidates(SETTINGS, "gpt-4o")[:1]
    assert settings.listed_models() == ("claude-sonnet-4-5", "gpt-4o", "gpt-4o-mini")
    assert SETTINGS.listed_models() == ("claude-sonnet-4-5", "fast", "gpt-4o", "gpt-4o-mini", "smart")


def test_embeddings_never_go_to_anthropic() -> None:
    assert tries("claude-sonnet-4-5", operation="embeddings") == [("local", "claude-sonnet-4-5")]
    only_claude = LlmBackendSettings(providers=(CLAUDE,))
    assert route_model(only_claude, "claude-sonnet-4-5", operation="embeddings") is None


def test_failing_provider_is_ejected_after_n_failures_and_comes_back() -> None:
    clock = Clock()
    health = ProviderHealth(clock)
    assert not health.record_failure("openai", threshold=2, eject_for=30.0)
    assert tries("gpt-4o", health)[0][0] == "openai"
    assert health.record_failure("openai", threshold=2, eject_for=30.0)
    route = route_model(SETTINGS, "gpt-4o", health)
    assert route is not None and route.skipped == ("openai",) and not route.all_ejected
    assert [a.provider.name for a in route.attempts] == ["azure", "local"]
    clock.now += 29.9
    assert tries("gpt-4o", health)[0][0] == "azure"
    clock.now += 0.1
    assert tries("gpt-4o", health)[0][0] == "openai"
    assert health.ejected_until("openai") is None


def test_success_resets_the_count() -> None:
    health = ProviderHealth(Clock())
    health.record_failure("openai", threshold=2, eject_for=30.0)
    health.record_success("openai")
    assert health.failures("openai") == 0
    assert not health.record_failure("openai", threshold=2, eject_for=30.0)


def test_retry_after_lengthens_an_ejection_up_to_a_bound() -> None:
    clock = Clock()
    health = ProviderHealth(clock)
    health.record_failure("azure", threshold=1, eject_for=30.0, retry_after=120.0)
    assert health.ejected_until("azure") == 1120.0
    health.record_failure("local", threshold=1, eject_for=30.0, retry_after=1.0)
    assert health.ejected_until("local") == 1030.0
    health.record_failure("openai", threshold=1, eject_for=30.0, retry_after=1e9)
    assert health.ejected_until("openai") == 1000.0 + 3600.0


def test_all_ejected_tries_everyone_soonest_back_first() -> None:
    clock = Clock()
    health = ProviderHealth(clock)
    health.record_failure("openai", threshold=1, eject_for=60.0)
    health.record_failure("azure", threshold=1, eject_for=10.0)
    health.record_failure("local", threshold=1, eject_for=30.0)
    route = route_model(SETTINGS, "gpt-4o", health)
    assert route is not None and route.all_ejected
    assert [a.provider.name for a in route.attempts] == ["azure", "local", "openai"]
    health.forget({"azure"})
    assert health.ejected_until("openai") is None and health.ejected_until("azure") is not None


@pytest.mark.parametrize(
    ("status", "fails_over"),
    [
        (429, True),
        (500, True),
        (529, True),
        (503, True),
        (408, True),
        (400, False),
        (401, True),  # the gateway's key, not the client's
        (403, True),
        (404, False),
        (413, False),
    ],
)
def test_failover_statuses(status: int, fails_over: bool) -> None:
    assert is_failover_status(status) is fails_over


def test_upstream_targets_per_provider_type() -> None:
    assert upstream_target(OPENAI, "chat", "gpt-4o") == "/v1/chat/completions"
    assert upstream_target(OPENAI, "messages", "gpt-4o") == "/v1/chat/completions"
    assert upstream_target(OPENAI, "embeddings", "text-embedding-3-small") == "/v1/embeddings"
    assert upstream_target(OPENAI, "models", "") == "/v1/models"
    assert (
        upstream_target(AZURE, "chat", "gpt-4o")
        == "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    )
    assert upstream_target(AZURE, "embeddings", "text-embedding-3-small") == (
        "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
    )
    assert upstream_target(AZURE, "models", "") == "/openai/models?api-version=2024-10-21"
    assert upstream_target(CLAUDE, "chat", "claude-sonnet-4-5") == "/v1/messages"
    assert upstream_target(CLAUDE, "models", "") == "/v1/models"
    assert upstream_target(CLAUDE, "embeddings", "x") is None
    assert (provider_format(CLAUDE), provider_format(AZURE), provider_format(LOCAL)) == (
        "anthropic",
        "openai",
        "openai",
    )


def test_each_type_gets_its_own_credential_header() -> None:
    assert auth_header("openai", "sk-1") == ("authorization", "Bearer sk-1")
    assert auth_header("openai_compatible", "k") == ("authorization", "Bearer k")
    assert auth_header("anthropic", "sk-ant") == ("x-api-key", "sk-ant")
    assert auth_header("azure", "az") == ("api-key", "az")
    assert auth_header("openai_compatible", "") is None
    claude = provider(
        "c", "anthropic", headers=(("anthropic-version", "2023-06-01"),), auth_header=("x-api-key", "sk-ant")
    )
    assert upstream_headers(claude) == [(b"anthropic-version", b"2023-06-01"), (b"x-api-key", b"sk-ant")]
    assert "sk-ant" not in repr(claude)
