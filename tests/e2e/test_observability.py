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
from tests.peers.nginx import nginx
from tests.peers.otlp import otlp_grpc_receiver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

WITHIN = 30.0
ISSUER = "https://idp.test"
TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = 0xB7AD6B7169203331


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
        async with nginx(tmp_path, "app") as app, otlp_grpc_receiver() as receiver:
            write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)]))
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port),
                backend_yaml("gone", dead_port),
                route_yaml("web", "gw", [("app", 1)], path="/tools"),
                route_yaml("broken", "gw", [("gone", 1)], path="/broken"),
                policy_yaml(json.dumps(jwks(key))),
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
                    metrics = (await client.get(f"http://127.0.0.1:{ports.metrics}/metrics")).text
                    live = await client.get(f"http://127.0.0.1:{ports.readiness}/healthz/live")
                    ready = await client.get(f"http://127.0.0.1:{ports.readiness}/healthz/ready")
                    dump = (await client.get(f"http://127.0.0.1:{ports.admin}/config_dump")).json()
                # The worker drained on SIGTERM: its spans are exported and its log lines written.
                spans = await receiver.wait_for(lambda got: any(s.trace_id == TRACE and s.kind == 3 for s in got))

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
    assert [line["status"] for line in lines] == [401, 403, 200, 429, 502]
    assert lines[2]["principal"] == "alice" and lines[2]["trace_id"] == f"{TRACE:032x}"
    assert lines[2]["upstream_address"] == f"127.0.0.1:{app.h1_port}"
    assert lines[1]["decision"]["result"] == "deny" and lines[1]["decision"]["policy"] == "default/agents"
    assert lines[4]["backend"] == "default/gone" and lines[4]["reason"] == "upstream_connect_failed"
    assert jwt.decode() not in log_path.read_text()
