"""deploy/observability: the dashboard and the alert rules only use metrics the registries export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from controlplane.metrics import XdsMetrics
from controlplane.snapshot.cache import SnapshotCache
from dataplane.observability.metrics import WorkerMetrics, metric_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "observability"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                       "unless", "offset", "inf", "nan"})


def metric_names_in(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, aggregations,
    keywords, label names (inside braces or grouping clauses) or parts of numbers and variables."""
    text = _STRING.sub('""', expression)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_the_extractor_finds_selectors_and_nothing_else() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (route, le) (rate(agentgate_request_duration_seconds_bucket'
        '{gateway=~"$gateway", reason!="ok"}[$__rate_interval]))) / clamp_min(sum(x_total offset 5m), 1e-9) > 0.05'
        " and on (instance) up == 1"
    )
    assert metric_names_in(expression) == {"agentgate_request_duration_seconds_bucket", "x_total", "up"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    worker = WorkerMetrics(CollectorRegistry(), gateway="ns/gw")
    controlplane = CollectorRegistry()
    XdsMetrics(controlplane, SnapshotCache())
    return metric_names(worker.registry) | metric_names(controlplane)


def dashboard_expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_expressions(item)


def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = list(dashboard_expressions(dashboard["panels"]))
    assert len(expressions) >= 20
    used = set().union(*(metric_names_in(expression) for expression in expressions))
    assert used - exported == set()
    # The panels the dashboard promises.
    for name in ("agentgate_requests_total", "agentgate_request_duration_seconds_bucket",
                 "agentgate_mcp_requests_total", "agentgate_a2a_requests_total", "gen_ai_client_token_usage_sum",
                 "agentgate_ratelimit_decisions_total", "agentgate_xds_connected_proxies",
                 "agentgate_xds_nacks_total", "agentgate_xds_push_ack_seconds_bucket"):
        assert name in used
    assert {panel["id"] for panel in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))


def test_alert_rules_use_only_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yaml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    used = set().union(*(metric_names_in(expression) for expression in alerts.values()))
    assert used - exported == set()
    assert {"AgentgateHighErrorRate", "AgentgateHighLatencyP99", "AgentgateXdsNacks",
            "AgentgateRateLimitRejections", "AgentgateTokenBudgetNearExhaustion"} <= set(alerts)
    assert "agentgate_token_budget_remaining_ratio" in metric_names_in(alerts["AgentgateTokenBudgetNearExhaustion"])


def test_a_misspelt_metric_would_be_caught(exported: set[str]) -> None:
    assert metric_names_in("rate(agentgate_request_total[5m])") - exported == {"agentgate_request_total"}
