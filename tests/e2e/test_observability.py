"""Observability end to end with real processes: `agentgate controlplane`, one `agentgate dataplane` worker
started with --otlp-endpoint (an OTLP/gRPC TraceService of this test), --access-log PATH and a 1.0 trace
sampling, nginx behind a JWT + CEL + rate-limited route, and a route to a backend nothing listens on.
After a 401, a 403, a 200 continuing the client's trace, a 429 and a 502: /metrics is scraped, the admin
endpoints answered, and once the worker drained (SIGTERM: spans flushed, access log closed) the spans
received and the log lines parsed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import httpx
import pytest
import yaml
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.dataplane.policy.test_jwt import ec_key, jwks, sign
from tests.e2e.harness import (
    GATEWAY_CLASS,
    WorkerPorts,
    backend_yaml,
    controlplane_command,
    dataplane_command,
    gateway_yaml,
    logged_process,
    route_yaml,
    write_documents,
)
from tests.e2e.test_mcp_peers import POST_HEADERS, mcp_backend_yaml, mcp_route_yaml, python_sdk_target, secret_yaml
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.nginx import nginx
from tests.peers.otlp import otlp_grpc_receiver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

WITHIN = 30.0
ISSUER = "https://idp.test"
TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = 0xB7AD6B7169203331
MODERN = "2026-07-28"
MODERN_LIST = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    },
}
MODERN_LIST_HEADERS = {**POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": "tools/list"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}


def policy_yaml(keys: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "agents", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "HTTPRoute", "name": "web"}],
                "authentication": {
                    "jwt": [{"name": "idp", "issuer": ISSUER, "audiences": ["agentgate"], "jwks": {"inline": keys}}]
                },
                "authorization": {"allow": ["jwt.claims.tenant == request.headers['x-tenant']"]},
                "rateLimits": [{"name": "per-agent", "key": "jwt.sub", "capacity": 1, "per": "1m"}],
            },
        },
        sort_keys=False,
    )


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for found, v in samples(text, name).items() if labels.items() <= dict(found).items())


async def test_metrics_spans_and_access_log_of_a_real_worker(tmp_path: Path) -> None:
    key = ec_key("k1")
    now = int(time.time())
    jwt = sign(key, {"iss": ISSUER, "aud": "agentgate", "sub": "alice", "tenant": "acme", "iat": now, "exp": now + 300})
    folder = tmp_path / "config"
    folder.mkdir()
    log_path = tmp_path / "logs" / "access.log"
    gateway_port, xds_port, dead_port = free_port(), free_port(), free_port()
    ports = WorkerPorts.free()
    good = {"authorization": f"Bearer {jwt.decode()}", "x-tenant": "acme"}

    with anyio.fail_after(WITHIN):
        async with (
            nginx(tmp_path, "app") as app,
            otlp_grpc_receiver() as receiver,
            serve(build_app(build_server(), "streamable")) as web_port,
            serve(build_app(build_server(), "streamable")) as docs_port,
        ):
            write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)]))
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port),
                backend_yaml("gone", dead_port),
                route_yaml("web", "gw", [("app", 1)], path="/tools"),
                route_yaml("broken", "gw", [("gone", 1)], path="/broken"),
                route_yaml("orphan", "gw", [("missing", 1)], path="/orphan"),
                policy_yaml(json.dumps(jwks(key))),
            )
            write_documents(
                folder / "mcp.yaml",
                secret_yaml(),
                mcp_backend_yaml("tools", [python_sdk_target("web", web_port), python_sdk_target("docs", docs_port)]),
                mcp_route_yaml("mcp", "tools", "/mcp"),
                mcp_backend_yaml("down", [python_sdk_target("only", dead_port)]),
                mcp_route_yaml("down", "down", "/down"),
            )
            worker_command = [
                *dataplane_command(xds_port, "default/gw", ports),
                "--otlp-endpoint", receiver.endpoint, "--otlp-protocol", "grpc", "--trace-sampling", "1.0",
                "--access-log", str(log_path),
            ]  # fmt: skip
            async with logged_process("controlplane", controlplane_command(folder, xds_port)):
                async with (
                    logged_process("worker", worker_command, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as worker,
                    httpx.AsyncClient(timeout=5) as client,
                ):
                    await worker.wait_for("worker ready")
                    base = f"http://127.0.0.1:{gateway_port}"
                    traceparent = f"00-{TRACE:032x}-{PARENT:016x}-01"
                    answers = [
                        await client.get(f"{base}/tools"),
                        await client.get(f"{base}/tools", headers={**good, "x-tenant": "globex"}),
                        await client.get(f"{base}/tools", headers={**good, "traceparent": traceparent}),
                        await client.get(f"{base}/tools", headers=good),
                        await client.get(f"{base}/broken"),
                    ]
                    # The MCP SDK client (2026-07-28, sessionless) through the worker to two SDK servers.
                    async with Client(f"{base}/mcp") as mcp:
                        listed = {tool.name for tool in (await mcp.list_tools()).tools}
                        added = await mcp.call_tool("web__add", {"a": 2, "b": 3})
                    down_list = await client.post(f"{base}/down", json=MODERN_LIST, headers=MODERN_LIST_HEADERS)
                    down_init = await client.post(f"{base}/down", json=INITIALIZE, headers=POST_HEADERS)
                    orphan = await client.get(f"{base}/orphan")
                    metrics = (await client.get(f"http://127.0.0.1:{ports.metrics}/metrics")).text
                    live = await client.get(f"http://127.0.0.1:{ports.readiness}/healthz/live")
                    ready = await client.get(f"http://127.0.0.1:{ports.readiness}/healthz/ready")
                    dump = (await client.get(f"http://127.0.0.1:{ports.admin}/config_dump")).json()
                # The worker drained on SIGTERM: its spans are exported and its log lines written.
                spans = await receiver.wait_for(
                    lambda got: any(s.trace_id == TRACE and s.kind == 3 for s in got)
                    and sum(1 for s in got if s.name == "tools/list" and s.kind == 3) >= 3
                    and any(s.name == "tools/call add" for s in got)
                )

    assert [answer.status_code for answer in answers] == [401, 403, 200, 429, 502]
    assert live.status_code == 200 and live.text.strip() == "alive"
    assert ready.status_code == 200 and dump["ready"] is True

    web = {"gateway": "default/gw", "listener": "default/gw/http", "backend": "default/app"}
    total = "agentgate_requests_total"
    assert value(metrics, total, **web, status="4xx", reason="auth_denied") == 1
    assert value(metrics, total, **web, status="4xx", reason="authz_denied") == 1
    assert value(metrics, total, **web, status="4xx", reason="rate_limited") == 1
    assert value(metrics, total, **web, status="2xx", reason="ok") == 1
    assert value(metrics, total, backend="default/gone", status="5xx", reason="upstream_connect") == 1
    assert value(metrics, "agentgate_authorization_decisions_total", decision="deny") == 1
    assert value(metrics, "agentgate_ratelimit_decisions_total", decision="refused") == 1
    assert value(metrics, "agentgate_dataplane_config_ready") == 1

    server = next(s for s in spans if s.trace_id == TRACE and s.kind == 2)
    client_span = next(s for s in spans if s.trace_id == TRACE and s.kind == 3)
    assert server.parent_span_id == PARENT and client_span.parent_span_id == server.span_id
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["agentgate.gateway"] == "default/gw"
    assert server.resource["service.name"] == "agentgate"

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["status"] for line in lines[:5]] == [401, 403, 200, 429, 502]
    assert lines[2]["principal"] == "alice" and lines[2]["trace_id"] == f"{TRACE:032x}"
    assert lines[2]["upstream_address"] == f"127.0.0.1:{app.h1_port}"
    assert lines[1]["decision"]["result"] == "deny" and lines[1]["decision"]["policy"] == "default/agents"
    assert lines[4]["backend"] == "default/gone" and lines[4]["reason"] == "upstream_connect_failed"
    assert jwt.decode() not in log_path.read_text()

    # MCP: a series per method, target and tool; a client span per target of the fan-out; access records.
    assert {"web__add", "docs__add"} <= listed and added.content[0].text == "5"
    mcp_total = "agentgate_mcp_requests_total"
    tools = {"gateway": "default/gw", "backend": "default/tools", "outcome": "ok"}
    assert value(metrics, mcp_total, **tools, method="tools/list", target="web", tool="none") >= 1
    assert value(metrics, mcp_total, **tools, method="tools/list", target="docs", tool="none") >= 1
    assert value(metrics, mcp_total, **tools, method="tools/call", target="web", tool="add") == 1
    assert value(metrics, "agentgate_mcp_request_duration_seconds_count", backend="default/tools", target="web") >= 2
    listing = next(
        s for s in spans if s.kind == 2 and s.attributes.get("mcp.method.name") == "tools/list"
        and s.attributes.get("agentgate.backend") == "default/tools"
    )  # fmt: skip
    fan_out = [s for s in spans if s.parent_span_id == listing.span_id]
    assert sorted(s.attributes["agentgate.mcp.target"] for s in fan_out) == ["docs", "web"]
    assert all(s.kind == 3 and s.name == "tools/list" and s.trace_id == listing.trace_id for s in fan_out)
    (call,) = [s for s in spans if s.name == "tools/call add"]
    assert call.attributes["agentgate.mcp.target"] == "web" and call.attributes["gen_ai.tool.name"] == "add"
    mcp_lines = [line for line in lines if line["path"] == "/mcp"]
    assert {"method": "tools/list"} in [line["mcp"] for line in mcp_lines]
    assert {"method": "tools/call", "target": "web", "tool": "add"} in [line["mcp"] for line in mcp_lines]
    assert all(line["status"] == 200 and line["backend"] == "default/tools" for line in mcp_lines)

    # Failures. An MCP backend whose only target is down: HTTP 200 with a JSON-RPC error naming the target
    # (the client's request was served; the target's failure is the MCP sample's outcome).
    for answer in (down_list, down_init):
        assert answer.status_code == 200 and answer.json()["error"]["code"] == -32603
        assert "only" in answer.json()["error"]["data"]["targets"]
    down = {"backend": "default/down", "target": "only", "outcome": "error"}
    assert value(metrics, mcp_total, **down, method="tools/list") == 1
    assert value(metrics, mcp_total, **down, method="initialize") == 1
    assert value(metrics, total, backend="default/down", status="2xx", reason="ok") == 2
    # An HTTP backend whose only target is down is a 502 (upstream_connect, above); a route whose backend
    # does not exist answers 500 as the Gateway API says, reason no_backend. No 5xx here is a 503: the
    # worker answers 503 only for a backend it has no targets for (or a fail-closed policy dependency).
    assert orphan.status_code == 500
    assert value(metrics, total, route="default/orphan/0", status="5xx", reason="no_backend") == 1
    (orphan_line,) = [line for line in lines if line["path"] == "/orphan"]
    assert orphan_line["status"] == 500 and orphan_line["reason"] == "no_backend"
