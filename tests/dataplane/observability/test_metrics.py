"""Worker metrics: scraped from the text exposition after recording, with bounded labels and caps."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.a2a.methods import A2aOperation
from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.metrics import WorkerMetrics as LegacyWorkerMetrics
from dataplane.observability import metrics as m
from dataplane.observability.metrics import CallOutcome, RequestReason, WorkerMetrics, refusal_reason, status_class
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TARGET

GW = "ns/gw"
LISTENER_NAME = "ns/gw/http"
KEY = bytes(range(32))

FAMILIES = {
    "agentgate_requests", "agentgate_request_duration_seconds", "agentgate_mcp_requests",
    "agentgate_mcp_request_duration_seconds", "agentgate_a2a_requests", "agentgate_a2a_request_duration_seconds",
    "gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_operation_time_to_first_chunk_seconds", "agentgate_ratelimit_decisions",
    "agentgate_authorization_decisions", "agentgate_token_budget_remaining_ratio",
    "agentgate_token_budget_remaining_tokens", "agentgate_token_budget_limit_tokens",
    "agentgate_dataplane_xds_connected", "agentgate_dataplane_xds_updates", "agentgate_dataplane_xds_reconnects",
    "agentgate_dataplane_config_ready", "agentgate_dataplane_config_info", "agentgate_access_log_dropped",
}


def scrape(metrics: WorkerMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The text exposition parsed back: sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get(name, {}).get(tuple(sorted(labels.items())))


def label_values(metrics: WorkerMetrics, name: str, label: str) -> set[str]:
    return {dict(key)[label] for key in scrape(metrics).get(name, {})}


def family_names(metrics: WorkerMetrics) -> set[str]:
    return {family.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())}


def route(name: str, backends: Iterable[str] = ("ns/web",), **fields: object) -> pb.Route:
    key, _, index = name.rpartition("/")
    refs = [pb.BackendRef(backend=backend, weight=1) for backend in backends]
    return pb.Route(name=name, listeners=[LISTENER_NAME], route_key=key, rule_index=int(index), backends=refs, **fields)


def config(*routes: pb.Route, version: str = "v1") -> RuntimeConfig:
    messages = [
        pb.Listener(name=LISTENER_NAME, gateway=GW, port=8080, protocol=pb.LISTENER_PROTOCOL_HTTP),
        pb.Backend(name="ns/web", http=pb.HttpBackend()),
        pb.Backend(name="ns/tools", mcp=pb.McpBackend(session_keys=[pb.McpSessionKey(id="k", key=KEY)])),
        pb.Target(name="ns/tools/clock", backend="ns/tools", mcp=pb.McpServer(name="clock", stdio={"command": "x"})),
        pb.Target(name="ns/tools/notes", backend="ns/tools", mcp=pb.McpServer(name="notes", stdio={"command": "x"})),
        pb.Backend(name="ns/agent", a2a=pb.A2aBackend(agent_name="billing")),
        *routes,
    ]
    by_type = {pb.Listener: LISTENER, pb.Route: ROUTE, pb.Backend: BACKEND, pb.Target: TARGET}
    resources: dict[str, dict[str, object]] = {}
    for message in messages:
        resources.setdefault(by_type[type(message)], {})[message.name] = message
    return compile_config(resources, version=version)


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(CollectorRegistry(), gateway=GW)


# --- families and zero series -------------------------------------------------------------------------


def test_every_family_is_exported_before_any_traffic(metrics: WorkerMetrics) -> None:
    assert family_names(metrics) >= FAMILIES


def test_two_workers_export_the_same_series_for_the_same_config() -> None:
    """`agentgate run --workers N`: each worker has its own registry; same config, same series."""
    workers = [WorkerMetrics(CollectorRegistry(), gateway=GW) for _ in range(2)]
    for worker in workers:
        worker.prepare(config(route("ns/web/0"), route("ns/mcp/0", ["ns/tools"])))
    first, second = (scrape(worker) for worker in workers)
    assert {name: set(series) for name, series in first.items() if not name.endswith("_created")} == {
        name: set(series) for name, series in second.items() if not name.endswith("_created")
    }


def test_prepare_exports_configured_routes_at_zero(metrics: WorkerMetrics) -> None:
    metrics.prepare(config(route("ns/web/0"), route("ns/direct/0", backends=(), direct_response_status=204)))
    labels = {"gateway": GW, "listener": LISTENER_NAME, "status": "2xx", "reason": "ok"}
    assert value(metrics, "agentgate_requests_total", route="ns/web/0", backend="ns/web", **labels) == 0
    assert value(metrics, "agentgate_requests_total", route="ns/direct/0", backend="none", **labels) == 0
    assert value(metrics, "agentgate_request_duration_seconds_count", route="ns/web/0", backend="ns/web", **labels) == 0
    assert value(metrics, "agentgate_dataplane_config_info", gateway=GW, version="v1") == 1


def test_a_new_config_drops_removed_routes_and_the_old_version(metrics: WorkerMetrics) -> None:
    metrics.prepare(config(route("ns/web/0"), route("ns/old/0")))
    metrics.record_request(LISTENER_NAME, "ns/old/0", "ns/web", 500, RequestReason.UPSTREAM_ERROR, 0.1)
    metrics.prepare(config(route("ns/web/0"), version="v2"))
    assert label_values(metrics, "agentgate_requests_total", "route") == {"ns/web/0"}
    assert label_values(metrics, "agentgate_dataplane_config_info", "version") == {"v2"}


# --- requests -------------------------------------------------------------------------------------------


def test_requests_count_and_time_by_route_status_class_and_reason(metrics: WorkerMetrics) -> None:
    metrics.prepare(config(route("ns/web/0")))
    for status, reason in ((200, "ok"), (204, RequestReason.OK), (401, "auth_denied"), (504, "timeout")):
        metrics.record_request(LISTENER_NAME, "ns/web/0", "ns/web", status, reason, 0.003)
    base = {"gateway": GW, "listener": LISTENER_NAME, "route": "ns/web/0", "backend": "ns/web"}
    assert value(metrics, "agentgate_requests_total", status="2xx", reason="ok", **base) == 2
    assert value(metrics, "agentgate_requests_total", status="4xx", reason="auth_denied", **base) == 1
    assert value(metrics, "agentgate_requests_total", status="5xx", reason="timeout", **base) == 1
    bucket = value(metrics, "agentgate_request_duration_seconds_bucket", status="2xx", reason="ok", le="0.005", **base)
    assert bucket == 2
    assert value(metrics, "agentgate_request_duration_seconds_sum", status="2xx", reason="ok", **base) == 0.006


def test_unrouted_and_odd_requests_stay_bounded(metrics: WorkerMetrics) -> None:
    metrics.record_request(LISTENER_NAME, "", "", 404, RequestReason.NOT_FOUND, 0.001)
    metrics.record_request(LISTENER_NAME, "", "", 0, RequestReason.CLIENT_CLOSED, 0.001)
    metrics.record_request(LISTENER_NAME, "", "", 999, "made_up_reason", 0.001)
    assert label_values(metrics, "agentgate_requests_total", "route") == {"none"}
    assert label_values(metrics, "agentgate_requests_total", "status") == {"4xx", "none", "other"}
    reasons = label_values(metrics, "agentgate_requests_total", "reason")
    assert reasons == {"not_found", "client_closed", "internal_error"}


def test_triples_outside_the_config_are_capped(metrics: WorkerMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "MAX_ROUTE_SERIES", 3)
    for index in range(10):
        metrics.record_request(LISTENER_NAME, f"ns/gone/{index}", "ns/web", 200, "ok", 0.01)
    routes = label_values(metrics, "agentgate_requests_total", "route")
    assert routes == {"ns/gone/0", "ns/gone/1", "ns/gone/2", "_OTHER"}
    assert value(metrics, "agentgate_requests_total", gateway=GW, listener="_OTHER", route="_OTHER",
                 backend="_OTHER", status="2xx", reason="ok") == 7


@pytest.mark.parametrize(
    ("label", "status", "expected"),
    [
        ("credential_missing", 401, "auth_denied"),
        ("token_expired", 401, "auth_denied"),
        ("kid_unknown", 401, "auth_denied"),
        ("authorization_denied", 403, "authz_denied"),
        ("rate_limited", 429, "rate_limited"),
        ("rate_limited", 503, "rate_limited"),
        ("budget_exhausted", 429, "budget_exhausted"),
        ("policy_invalid", 500, "policy_error"),
        ("policy_uncompilable", 500, "policy_error"),
        ("token_review_unavailable", 503, "auth_unavailable"),
        ("something_new", 403, "authz_denied"),
        ("something_new", 400, "bad_request"),
    ],
)
def test_policy_refusals_map_to_the_fixed_reasons(label: str, status: int, expected: str) -> None:
    assert refusal_reason(label, status) == expected


def test_status_classes() -> None:
    assert [status_class(s) for s in (0, 101, 200, 302, 404, 503, 600, -1)] == [
        "none", "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other",
    ]


# --- MCP, A2A -------------------------------------------------------------------------------------------


def test_mcp_counts_only_tools_that_exist(metrics: WorkerMetrics) -> None:
    metrics.prepare(config(route("ns/mcp/0", ["ns/tools"])))
    metrics.record_mcp(
        "ns/tools", "tools/call", "clock", "now", tool_exists=True, outcome=CallOutcome.OK, duration=0.01
    )
    metrics.record_mcp("ns/tools", "tools/call", "clock", "now", tool_exists=True, outcome="ok")
    for invented in ("x1", "x2", "x3"):
        metrics.record_mcp("ns/tools", "tools/call", "clock", invented, tool_exists=False, outcome="error")
    metrics.record_mcp("ns/tools", "tools/call", "ghost", "now", tool_exists=True, outcome="error")
    metrics.record_mcp("ns/tools", "tools/list", "", "", tool_exists=False, outcome="ok")
    metrics.record_mcp("ns/tools", "evil/method", "", "", tool_exists=False, outcome="weird")
    metrics.record_mcp("ns/nope", "tools/call", "clock", "now", tool_exists=True, outcome="ok")
    base = {"gateway": GW, "backend": "ns/tools"}
    assert value(metrics, "agentgate_mcp_requests_total", method="tools/call", target="clock", tool="now",
                 outcome="ok", **base) == 2
    assert value(metrics, "agentgate_mcp_requests_total", method="tools/call", target="clock", tool="unknown",
                 outcome="error", **base) == 3
    assert value(metrics, "agentgate_mcp_requests_total", method="tools/call", target="unknown", tool="unknown",
                 outcome="error", **base) == 1
    assert value(metrics, "agentgate_mcp_requests_total", method="tools/list", target="none", tool="none",
                 outcome="ok", **base) == 1
    assert value(metrics, "agentgate_mcp_requests_total", method="unknown", target="none", tool="none",
                 outcome="error", **base) == 1
    assert label_values(metrics, "agentgate_mcp_requests_total", "backend") == {"ns/tools", "unknown"}
    assert value(metrics, "agentgate_mcp_request_duration_seconds_count", method="tools/call", target="clock",
                 tool="now", **base) == 1


def test_mcp_tool_names_are_capped_per_target(metrics: WorkerMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "MAX_TOOLS_PER_TARGET", 5)
    metrics.prepare(config(route("ns/mcp/0", ["ns/tools"])))
    for index in range(50):
        metrics.record_mcp("ns/tools", "tools/call", "notes", f"tool{index}", tool_exists=True, outcome="ok")
    tools = label_values(metrics, "agentgate_mcp_requests_total", "tool")
    assert tools == {f"tool{index}" for index in range(5)} | {"_OTHER"}
    assert value(metrics, "agentgate_mcp_requests_total", gateway=GW, backend="ns/tools", method="tools/call",
                 target="notes", tool="_OTHER", outcome="ok") == 45


def test_a2a_by_agent_and_operation(metrics: WorkerMetrics) -> None:
    metrics.prepare(config(route("ns/agent/0", ["ns/agent"])))
    metrics.record_a2a("ns/agent", "SendMessage", outcome="ok", duration=0.2)
    metrics.record_a2a("ns/agent", "message/send", outcome="denied")
    metrics.record_a2a("ns/other", "GetTask", outcome="ok")
    base = {"gateway": GW}
    assert value(metrics, "agentgate_a2a_requests_total", backend="ns/agent", agent="billing", operation="SendMessage",
                 outcome="ok", **base) == 1
    assert value(metrics, "agentgate_a2a_requests_total", backend="ns/agent", agent="billing", operation="unknown",
                 outcome="denied", **base) == 1
    assert value(metrics, "agentgate_a2a_requests_total", backend="unknown", agent="unknown", operation="GetTask",
                 outcome="ok", **base) == 1


def test_a2a_operation_names_match_the_a2a_core() -> None:
    assert {operation.value for operation in A2aOperation} == m.A2A_OPERATIONS


# --- LLM -------------------------------------------------------------------------------------------------


def test_llm_token_usage_follows_the_genai_conventions(metrics: WorkerMetrics) -> None:
    metrics.record_llm("openai", "chat", "gpt-4o", input_tokens=120, output_tokens=30, duration=1.5,
                       time_to_first_chunk=0.3)
    metrics.record_llm("openai", "chat", "gpt-4o", input_tokens=5, output_tokens=None, duration=0.5)
    base = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-4o"}
    assert value(metrics, "gen_ai_client_token_usage_sum", gen_ai_token_type="input", **base) == 125
    assert value(metrics, "gen_ai_client_token_usage_count", gen_ai_token_type="output", **base) == 1
    assert value(metrics, "gen_ai_client_token_usage_bucket", gen_ai_token_type="output", le="64.0", **base) == 1
    assert value(metrics, "gen_ai_client_operation_duration_seconds_count", error_type="", **base) == 2
    assert value(metrics, "gen_ai_client_operation_time_to_first_chunk_seconds_count", **base) == 1
    assert m.GEN_AI_TOKEN_BUCKETS[0] == 1 and m.GEN_AI_TOKEN_BUCKETS[-1] == 67108864


def test_llm_models_need_a_successful_answer_and_are_capped(
    metrics: WorkerMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(m, "MAX_MODELS_PER_PROVIDER", 2)
    metrics.record_llm("openai", "chat", "invented-1", input_tokens=None, output_tokens=None, duration=0.1,
                       error_type="404")
    for model in ("gpt-4o", "gpt-4o-mini", "o3"):
        metrics.record_llm("openai", "chat", model, input_tokens=1, output_tokens=1, duration=0.1)
    metrics.record_llm("Evil Provider!", "summon", "m", input_tokens=1, output_tokens=1, duration=0.1,
                       error_type="not-a-known-error")
    models = label_values(metrics, "gen_ai_client_operation_duration_seconds_count", "gen_ai_request_model")
    assert models == {"_OTHER", "gpt-4o", "gpt-4o-mini"}
    assert value(metrics, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat",
                 gen_ai_provider_name="openai", gen_ai_request_model="_OTHER", error_type="404") == 1
    assert value(metrics, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="_OTHER",
                 gen_ai_provider_name="_OTHER", gen_ai_request_model="_OTHER", error_type="_OTHER") == 1


# --- policy decisions and budgets ---------------------------------------------------------------------


def test_rate_limit_and_authorization_decisions(metrics: WorkerMetrics) -> None:
    metrics.record_rate_limit("per-agent", allowed=True)
    metrics.record_rate_limit("per-agent", allowed=False)
    metrics.record_rate_limit("per-agent", allowed=False)
    metrics.record_rate_limit("global", allowed=True, store_down=True)
    metrics.record_authorization("ns/tenants", allowed=True)
    metrics.record_authorization("ns/tenants", allowed=False)
    assert value(metrics, "agentgate_ratelimit_decisions_total", gateway=GW, limit="per-agent", decision="refused") == 2
    assert value(metrics, "agentgate_ratelimit_decisions_total", gateway=GW, limit="per-agent", decision="allowed") == 1
    assert value(metrics, "agentgate_ratelimit_decisions_total", gateway=GW, limit="global", decision="store_down") == 1
    assert value(metrics, "agentgate_authorization_decisions_total", gateway=GW, policy="ns/tenants",
                 decision="deny") == 1


def test_decision_names_are_capped(metrics: WorkerMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_limits", m.BoundedNames(2))
    for index in range(5):
        metrics.record_rate_limit(f"limit-{index}", allowed=False)
    assert label_values(metrics, "agentgate_ratelimit_decisions_total", "limit") == {"limit-0", "limit-1", "_OTHER"}


def test_budget_gauge_keeps_the_lowest_share_until_its_period_ends() -> None:
    now = [1000.0]
    metrics = WorkerMetrics(CollectorRegistry(), gateway=GW, clock=lambda: now[0])
    metrics.record_budget("daily", remaining=900, limit=1000, reset=3600)
    metrics.record_budget("daily", remaining=50, limit=1000, reset=3600)  # another key, nearly spent
    metrics.record_budget("daily", remaining=800, limit=1000, reset=3600)  # a third key does not raise it
    assert value(metrics, "agentgate_token_budget_remaining_ratio", gateway=GW, budget="daily") == 0.05
    assert value(metrics, "agentgate_token_budget_remaining_tokens", gateway=GW, budget="daily") == 50
    assert value(metrics, "agentgate_token_budget_limit_tokens", gateway=GW, budget="daily") == 1000
    now[0] += 3601  # the period ended: every key starts full again
    assert value(metrics, "agentgate_token_budget_remaining_ratio", gateway=GW, budget="daily") == 1.0
    metrics.record_budget("daily", remaining=700, limit=1000, reset=3600)
    assert value(metrics, "agentgate_token_budget_remaining_ratio", gateway=GW, budget="daily") == 0.7


# --- the xDS metrics' old home -------------------------------------------------------------------------


def test_the_old_module_reexports_the_same_class() -> None:
    assert LegacyWorkerMetrics is WorkerMetrics
    metrics = LegacyWorkerMetrics()
    metrics.xds_updates.labels("Route", "ack").inc()
    metrics.xds_connected.set(1)
    assert value(metrics, "agentgate_dataplane_xds_updates_total", type="Route", result="ack") == 1
    assert value(metrics, "agentgate_dataplane_xds_connected") == 1


def test_metric_names_lists_sample_names_of_empty_families(metrics: WorkerMetrics) -> None:
    names = m.metric_names(metrics.registry)
    assert {"agentgate_requests_total", "agentgate_request_duration_seconds_bucket",
            "gen_ai_client_token_usage_sum", "agentgate_token_budget_remaining_ratio"} <= names
