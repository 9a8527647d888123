"""The spine end to end: YAML folder -> control plane -> worker -> real upstream."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Stack
from tests.e2e.harness import (
    AGENTGATE,
    GATEWAY_CLASS,
    WorkerPorts,
    controlplane_command,
    dataplane_command,
    event,
    gateway_yaml,
    logged_process,
    route_yaml,
    write_documents,
)

pytestmark = pytest.mark.anyio
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def applied(type_name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("event") == "config applied" and line.get("type") == type_name


async def test_http1_and_http2_reach_the_upstream(stack: Stack, client: httpx.AsyncClient) -> None:
    mark = stack.worker.mark()
    write_documents(
        stack.folder / "route.yaml",
        route_yaml("web", "gw", [("blue", 1)], set_headers={"x-served-by": "agentgate"}),
        route_yaml("h2", "gw", [("blue-h2", 1)], path="/h2"),
    )
    await stack.worker.wait_for(applied("Route"), start=mark)
    reply = await client.get(f"{stack.url}/hello")
    assert reply.status_code == 200
    assert reply.text.startswith("blue GET /hello 127.0.0.1"), reply.text  # x-forwarded-for reached nginx
    assert reply.headers["x-served-by"] == "agentgate"
    assert reply.headers["x-upstream"] == "blue"

    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2:
        reply = await h2.get(f"{stack.url}/h2/stream")  # h2c prior knowledge downstream, h2 upstream
        assert reply.http_version == "HTTP/2"
        assert reply.status_code == 200
        assert reply.text.startswith("blue GET /h2/stream")
        reply = await h2.get(f"{stack.url}/over-h2")  # h2 downstream, HTTP/1.1 upstream
        assert reply.status_code == 200 and reply.text.startswith("blue GET /over-h2")

    missing = await client.get(f"http://127.0.0.1:{stack.gateway_port}/", headers={"host": "x"})
    assert missing.status_code == 200, "a route without hostnames matches any host"


async def test_config_change_under_load_loses_no_request(stack: Stack) -> None:
    seen: dict[str, int] = {"blue": 0, "green": 0}
    failures: list[str] = []
    flowing = anyio.Event()
    switched = anyio.Event()
    done = anyio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        for _ in range(3000):  # bounded: stops far earlier once green has been seen enough
            if done.is_set():
                return
            try:
                reply = await client.get(f"{stack.url}/load")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if reply.status_code != 200:
                failures.append(f"{reply.status_code} {reply.text}")
                continue
            name = reply.headers["x-upstream"]
            seen[name] += 1
            if seen["blue"] >= 100:
                flowing.set()
            if switched.is_set() and seen["green"] >= 200:
                done.set()

    limits = httpx.Limits(max_connections=8)
    with anyio.fail_after(60):
        async with httpx.AsyncClient(timeout=10, limits=limits) as client, anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(load, client)
            await flowing.wait()  # the change lands while requests are in flight
            mark = stack.worker.mark()
            stack.write_route([("green", 1)])
            await stack.worker.wait_for(applied("Route"), start=mark)
            switched.set()
    assert not failures, failures[:5]
    assert seen["blue"] >= 100 and seen["green"] >= 200


async def test_control_plane_down_worker_keeps_serving(stack: Stack, client: httpx.AsyncClient) -> None:
    mark = stack.worker.mark()
    stack.controlplane.signal(signal.SIGKILL)
    await stack.worker.wait_for("xds stream ended", start=mark)
    for _ in range(20):
        reply = await client.get(f"{stack.url}/still-here")
        assert reply.status_code == 200 and reply.headers["x-upstream"] == "blue"
    ready = await client.get(f"http://127.0.0.1:{stack.worker_ports.readiness}/healthz/ready")
    assert ready.status_code == 200, "a worker that has config stays ready while the control plane is away"

    # A new control plane on the same address: the worker reconnects and takes new config.
    stack.write_route([("green", 1)])
    async with logged_process("controlplane-2", controlplane_command(stack.folder, stack.xds_port)) as cp2:
        await cp2.wait_for("control plane serving")
        await stack.worker.wait_for("xds stream up", start=mark, within=30)
        await stack.worker.wait_for(applied("Route"), start=mark, within=30)
        reply = await client.get(f"{stack.url}/after")
        assert reply.headers["x-upstream"] == "green"


async def test_broken_config_is_reported_and_last_good_keeps_serving(stack: Stack, client: httpx.AsyncClient) -> None:
    mark = stack.controlplane.mark()
    write_documents(
        stack.folder / "route.yaml",
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web, namespace: default}
        spec:
          parentRefs: [{name: gw}]
          rules:
            - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]
              backendRefs: [{group: agentgate.dev, kind: Backend, name: green}]
        """,
    )
    error = await stack.controlplane.wait_for("config error", start=mark)
    text = error["error"]
    assert "route.yaml" in text and "HTTPRoute default/web" in text and "spec.rules[0].matches[0].path" in text, text
    reply = await client.get(f"{stack.url}/x")
    assert reply.status_code == 200 and reply.headers["x-upstream"] == "blue", "the last good route keeps serving"
    status = (await client.get(f"http://127.0.0.1:{stack.controlplane_metrics_port}/status")).json()
    assert any("HTTPRoute default/web" in e for e in status["errors"]), status["errors"]

    worker_mark = stack.worker.mark()
    stack.write_route([("green", 1)])
    await stack.worker.wait_for(applied("Route"), start=worker_mark)
    assert (await client.get(f"{stack.url}/x")).headers["x-upstream"] == "green"


async def test_rejected_config_is_nacked_visible_and_old_config_serves(stack: Stack, client: httpx.AsyncClient) -> None:
    # Occupy a port without SO_REUSEPORT: the worker cannot open a listener there and must
    # NACK the Listener update while it keeps serving the old one.
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", 0))
    blocker.listen(1)
    busy_port = blocker.getsockname()[1]
    try:
        mark = stack.worker.mark()
        write_documents(
            stack.folder / "gateway.yaml",
            GATEWAY_CLASS,
            gateway_yaml("gw", [("http", stack.gateway_port), ("extra", busy_port)]),
        )
        rejected = await stack.worker.wait_for("config rejected", start=mark)
        assert str(busy_port) in rejected["error"], rejected
        assert (await client.get(f"{stack.url}/x")).status_code == 200, "the old listener keeps serving"

        result = await anyio.run_process(
            [GRPCURL, "-plaintext", "-d", "{}",
             f"127.0.0.1:{stack.xds_port}", "agentgate.debug.v1.DebugService/ListProxies"],
            check=False,
        )
        assert result.returncode == 0, result.stderr
        proxies = json.loads(result.stdout)["proxies"]
        nacks = [t["last_nack"]["message"] for p in proxies for t in p.get("types", []) if t.get("last_nack")]
        assert any(str(busy_port) in message for message in nacks), proxies
        dump = (await client.get(f"http://127.0.0.1:{stack.worker_ports.admin}/config_dump")).json()
        assert str(busy_port) in dump["last_nack"]["Listener"]
        metrics = (await client.get(f"http://127.0.0.1:{stack.controlplane_metrics_port}/metrics")).text
        assert 'agentgate_xds_nacks_total{type="Listener"} 1.0' in metrics
        status = await anyio.run_process([*AGENTGATE, "status", "--xds", f"127.0.0.1:{stack.xds_port}"], check=False)
        assert status.returncode == 0, status.stderr
        shown = status.stdout.decode()
        assert "NACKED" in shown and "NACK Listener" in shown and str(busy_port) in shown, shown
    finally:
        blocker.close()


async def test_state_of_the_world_worker_serves_beside_a_delta_worker(stack: Stack, client: httpx.AsyncClient) -> None:
    ports = WorkerPorts.free()
    command = dataplane_command(stack.xds_port, "default/gw", ports, mode="sotw", node_id="e2e-sotw")
    async with logged_process("sotw-worker", command) as sotw:
        await sotw.wait_for("worker ready")  # it shares the listener port with the Delta worker (SO_REUSEPORT)
        mark_sotw, mark_delta = sotw.mark(), stack.worker.mark()
        stack.write_route([("green", 1)])
        await sotw.wait_for(event("config applied", type="Route"), start=mark_sotw)
        await stack.worker.wait_for(event("config applied", type="Route"), start=mark_delta)
        for _ in range(10):
            reply = await client.get(f"{stack.url}/both", headers={"connection": "close"})
            assert reply.headers["x-upstream"] == "green"
        dump = (await client.get(f"http://127.0.0.1:{ports.admin}/config_dump")).json()
        assert dump["xds"]["mode"] == "sotw" and dump["ready"] is True
        assert [r["name"] for r in dump["types"]["Route"]["resources"]] == ["default/web/0"]


async def test_worker_is_not_ready_before_its_first_config(client: httpx.AsyncClient) -> None:
    ports = WorkerPorts.free()
    nothing_there = free_port()
    async with logged_process("lonely-worker", dataplane_command(nothing_there, "default/gw", ports)) as worker:
        await worker.wait_for("worker started")
        await worker.wait_for("xds stream ended")
        ready = await client.get(f"http://127.0.0.1:{ports.readiness}/healthz/ready")
        assert ready.status_code == 503
        assert "not ready: waiting for Backend, Listener, Policy, Route, Target" in ready.text
