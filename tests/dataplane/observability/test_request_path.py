"""Metrics, spans and access-log lines produced by real traffic through a ProxyServer: an echoing HTTP
upstream, an MCP SDK server as two federated targets, OTLP receivers over gRPC and HTTP, the access log in
a file. Denials (JWT 401, CEL 403, limit 429), an upstream failure (502) and an MCP fan-out are asserted
as scraped samples, received spans and parsed log lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.config.model import RuntimeConfig
from dataplane.http.server import ProxyServer
from dataplane.observability.access_log import AccessLog, FileSink
from dataplane.observability.metrics import WorkerMetrics
from dataplane.observability.request import Observability
from dataplane.observability.settings import BatchSettings, Protocol, TracingSettings
from dataplane.observability.tracing import Tracing
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.h1 import H1Peer
from tests.dataplane.policy.test_chain import (
    APP,
    LISTENER_NAME,
    MCP,
    RULE,
    build,
    jwt_authentication,
    policy,
    rate_limit,
    token,
)
from tests.dataplane.test_proxy_policy import mcp_session, rpc, tool_names
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.otlp import ReceivedSpan, otlp_grpc_receiver, otlp_http_receiver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

GATEWAY = "default/gw"
CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"


class Recorders:
    """The worker's three recorders, wired into a ProxyServer as the Worker wires them."""

    def __init__(self, tracing: Tracing, log_path: Path) -> None:
        self.metrics = WorkerMetrics(gateway=GATEWAY)
        self.tracing = tracing
        self.log_path = log_path
        self.access_log = AccessLog(FileSink(log_path), on_drop=self.metrics.access_log_dropped.inc)

    def wire(self, server: ProxyServer) -> None:
        handler = server._handler
        handler.observability = Observability(
            gateway=GATEWAY, tracing=self.tracing, metrics=self.metrics, access_log=self.access_log
        )
        handler.mcp.sessions.metrics = self.metrics

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Scraped samples of ``name`` (as /metrics would serve them)."""
        text = generate_latest(self.metrics.registry).decode()
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def value(self, name: str, **labels: str) -> float:
        return sum(value for found, value in self.samples(name) if labels.items() <= found.items())

    async def lines(self, count: int) -> list[dict[str, Any]]:
        """The access-log lines once ``count`` were written (bounded wait on the writer)."""
        assert await anyio.to_thread.run_sync(self.access_log.flush, 10.0)
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        assert len(lines) == count, lines
        return lines


@asynccontextmanager
async def observed_proxy(config: RuntimeConfig, recorders: Recorders) -> AsyncIterator[ProxyServer]:
    recorders.tracing.start()
    recorders.access_log.start()
    try:
        async with ProxyServer() as server:
            recorders.wire(server)
            await server.apply(config)
            recorders.metrics.prepare(config)
            yield server
    finally:
        await recorders.tracing.shutdown()
        recorders.access_log.close()


def tracing(endpoint: str, protocol: Protocol) -> Tracing:
    batch = BatchSettings(schedule_delay_ms=50)
    return Tracing(TracingSettings(endpoint=endpoint, protocol=protocol, batch=batch))


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


async def test_http_denials_limits_and_an_upstream_failure_in_metrics_spans_and_the_access_log(
    tmp_path: Path,
) -> None:
    port, dead_port = free_port(), free_port()
    authz = pb.Authorization(allow=["jwt.tenant == request.headers['x-tenant']"])
    limits = pb.RateLimits(limits=[rate_limit(capacity=1)])
    secret = token(sub="alice", tenant="acme").decode()
    async with otlp_grpc_receiver() as receiver, H1Peer() as peer:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.GRPC), tmp_path / "access.log")
        config = build(
            port, policy(authentication=jwt_authentication(), authorization=authz, rate_limits=limits),
            upstream_port=peer.port,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/tools?api_key=hunter2"
        good = {"authorization": f"Bearer {secret}", "x-tenant": "acme"}
        async with observed_proxy(config, recorders) as server, httpx.AsyncClient() as client:
            missing = await client.get(url)
            denied = await client.get(url, headers={**good, "x-tenant": "globex"})
            passed = await client.get(url, headers={**good, "traceparent": TRACEPARENT})
            limited = await client.get(url, headers=good)
            upstream_traceparent = dict(peer.requests[0].headers)[b"traceparent"].decode()
            # The same gateway, its backend gone: a 502.
            changed = build(port, upstream_port=dead_port, version="v2")
            await server.apply(changed)
            recorders.metrics.prepare(changed)
            failed = await client.get(url)
            spans = await receiver.wait_for(lambda got: len(by_name(got, "GET")) >= 1 and len(got) >= 7)
            lines = await recorders.lines(5)

    assert [r.status_code for r in (missing, denied, passed, limited, failed)] == [401, 403, 200, 429, 502]

    # Metrics: one request sample per answer, by route, backend, status class and reason.
    labels = {"gateway": GATEWAY, "listener": LISTENER_NAME, "route": RULE, "backend": APP}
    counted = "agentgate_requests_total"
    assert recorders.value(counted, **labels, status="4xx", reason="auth_denied") == 1
    assert recorders.value(counted, **labels, status="4xx", reason="authz_denied") == 1
    assert recorders.value(counted, **labels, status="4xx", reason="rate_limited") == 1
    assert recorders.value(counted, **labels, status="2xx", reason="ok") == 1
    assert recorders.value(counted, **labels, status="5xx", reason="upstream_connect") == 1
    assert recorders.value("agentgate_request_duration_seconds_count", **labels) == 5
    decisions = "agentgate_authorization_decisions_total"
    assert recorders.value(decisions, policy="default/p", decision="deny") == 1
    assert recorders.value(decisions, policy="default/p", decision="allow") == 2
    limit = "agentgate_ratelimit_decisions_total"
    assert recorders.value(limit, limit="default/p/per-user", decision="allowed") == 1
    assert recorders.value(limit, limit="default/p/per-user", decision="refused") == 1

    # Spans: the 200's server span continues the client's trace; its client span's context went upstream.
    server = next(span for span in spans if span.trace_id == CLIENT_TRACE and span.kind == 2)
    assert server.parent_span_id == CLIENT_SPAN
    assert server.name == f"GET {RULE}"
    assert server.attributes["agentgate.route"] == RULE and server.attributes["agentgate.backend"] == APP
    assert server.attributes["http.response.status_code"] == 200
    assert "hunter2" not in json.dumps(server.attributes)  # the query is never recorded
    client_span = next(span for span in spans if span.trace_id == CLIENT_TRACE and span.kind == 3)
    assert client_span.parent_span_id == server.span_id
    assert upstream_traceparent == f"00-{CLIENT_TRACE:032x}-{client_span.span_id:016x}-01"
    refused = [span for span in spans if span.kind == 2 and span.attributes.get("agentgate.reason") == "auth_denied"]
    assert refused and refused[0].attributes["http.response.status_code"] == 401
    failed_span = next(s for s in spans if s.kind == 2 and s.attributes.get("agentgate.reason") == "upstream_connect")
    assert failed_span.status_code == 2  # ERROR

    # Access log: one line per request, fields set, credentials redacted.
    assert [line["status"] for line in lines] == [401, 403, 200, 429, 502]
    assert [line["reason"] for line in lines] == [
        "credential_missing", "authorization_denied", "ok", "rate_limited", "upstream_connect_failed",
    ]
    ok = lines[2]
    assert ok["route"] == RULE and ok["backend"] == APP and ok["listener"] == LISTENER_NAME
    assert ok["gateway"] == GATEWAY and ok["principal"] == "alice" and ok["method"] == "GET"
    assert ok["path"] == "/tools" and ok["source_address"] == "127.0.0.1"
    assert ok["upstream_address"] == f"127.0.0.1:{peer.port}"
    assert ok["trace_id"] == f"{CLIENT_TRACE:032x}"
    assert ok["decision"] == {"result": "allow", "policy": "default/p", "rule": "allow[0]"}
    assert lines[1]["decision"]["result"] == "deny"
    assert ok["duration_ms"] > 0
    raw = recorders.log_path.read_text()
    assert secret not in raw and "hunter2" not in raw



@pytest.fixture
async def mcp_target() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


async def test_an_mcp_fan_out_has_a_client_span_and_a_metric_per_target(tmp_path: Path, mcp_target: int) -> None:
    port = free_port()
    async with otlp_http_receiver() as receiver:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.HTTP_PROTOBUF), tmp_path / "access.log")
        config = build(port, mcp_port=mcp_target, mcp_targets=("web", "docs"))
        url = f"http://127.0.0.1:{port}/mcp"
        async with observed_proxy(config, recorders), httpx.AsyncClient(timeout=30) as client:
            with anyio.fail_after(30):
                session = await mcp_session(client, url, {"traceparent": TRACEPARENT})
                _, listed = await rpc(client, url, session, "tools/list")
                _, added = await rpc(client, url, session, "tools/call", name="web__add", arguments={"a": 2, "b": 3})
            spans = await receiver.wait_for(
                lambda got: len(by_name(got, "tools/list")) >= 2 and len(by_name(got, "tools/call add")) >= 1
            )
            lines = await recorders.lines(4)  # initialize, initialized, tools/list, tools/call
    assert {"web__add", "docs__add"} <= tool_names(listed)
    assert added["result"]["content"][0]["text"] == "5"

    # One client span per target of the fan-out, children of the request's server span, in the client's trace.
    listing = by_name(spans, "tools/list")
    assert {span.attributes["agentgate.mcp.target"] for span in listing} == {"web", "docs"}
    assert {span.trace_id for span in listing} == {CLIENT_TRACE}
    servers = {span.span_id: span for span in spans if span.kind == 2}
    parent = servers[listing[0].parent_span_id]
    assert listing[1].parent_span_id == parent.span_id and parent.parent_span_id == CLIENT_SPAN
    assert parent.attributes["mcp.method.name"] == "tools/list"
    call = by_name(spans, "tools/call add")[0]
    assert call.attributes["gen_ai.tool.name"] == "add" and call.attributes["agentgate.mcp.target"] == "web"

    # Metrics by method, target and tool; requests by route.
    mcp = "agentgate_mcp_requests_total"
    assert recorders.value(mcp, backend=MCP, method="tools/list", target="web", outcome="ok") == 1
    assert recorders.value(mcp, backend=MCP, method="tools/list", target="docs", outcome="ok") == 1
    assert recorders.value(mcp, backend=MCP, method="tools/call", target="web", tool="add", outcome="ok") == 1
    assert recorders.value("agentgate_requests_total", route=RULE, backend=MCP, status="2xx", reason="ok") == 4

    # The access record names the MCP method, target and tool.
    assert [line.get("mcp", {}).get("method") for line in lines] == [
        "initialize", "notifications/initialized", "tools/list", "tools/call",
    ]
    assert lines[3]["mcp"] == {"method": "tools/call", "target": "web", "tool": "add"}
    assert all(line["trace_id"] == f"{CLIENT_TRACE:032x}" for line in lines)
