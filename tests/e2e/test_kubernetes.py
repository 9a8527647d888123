"""The Kubernetes source end to end: the fake Kubernetes API (tests/peers/kube_api/) in the test
process, `agentgate controlplane --kubernetes --kubeconfig` reading it with the real
kubernetes-asyncio client, one `agentgate dataplane` worker, and an MCP server (the official SDK)
behind a Service with ``appProtocol: kgateway.dev/mcp``. The Service is ExternalName
``localhost``: the control plane resolves a Service to its externalName or cluster DNS name.

Status, Events and leader election: two control planes with --leader-elect; only the Lease
holder writes status (a broken route gets Accepted=False with its reason) and turns a worker's
NACK into a Warning Event; stopped with SIGTERM, it releases the Lease and the other writes."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from tests.conftest import free_port
from tests.e2e.harness import AGENTGATE, LoggedProcess, WorkerPorts, dataplane_command, event, logged_process
from tests.peers.kube_api import kube_api
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

WITHIN = 60.0
GATEWAY_API = "gateway.networking.k8s.io/v1"
POST_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "e2e", "version": "1"}}}


def objects(gateway_port: int, mcp_port: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": "agentgate"},
         "spec": {"controllerName": "agentgate.dev/gateway-controller"}},
        {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "agentgate", "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                  "listeners": [{"name": "http", "protocol": "HTTP", "port": gateway_port}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "tools", "namespace": "default", "annotations": {"kgateway.dev/mcp-path": "/mcp"}},
         "spec": {"type": "ExternalName", "externalName": "localhost",
                  "ports": [{"name": "mcp", "port": mcp_port, "appProtocol": "kgateway.dev/mcp"}]}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "agentgate-mcp-session-key", "namespace": "default"},
         "data": {"current": base64.b64encode(bytes(range(32))).decode()}},
    ]


def mcp_route(mcp_port: int) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": "mcp", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "gw"}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/mcp"}}],
                                "backendRefs": [{"name": "tools", "port": mcp_port}]}]}}


async def initialize_status(client: httpx.AsyncClient, url: str) -> int:
    return (await client.post(url, json=INITIALIZE, headers=POST_HEADERS)).status_code


async def test_mcp_tool_through_a_gateway_from_the_kubernetes_api(tmp_path: Path) -> None:
    gateway_port, xds_port = free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}/mcp"
    with anyio.fail_after(WITHIN):
        async with kube_api() as api, serve(build_app(build_server(), "streamable")) as mcp_port:
            for manifest in objects(gateway_port, mcp_port):
                api.put(manifest)
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            command = [*AGENTGATE, "controlplane", "--kubernetes", "--kubeconfig", str(kubeconfig),
                       "--xds-address", f"127.0.0.1:{xds_port}", "--metrics-port", "-1", "--debounce", "0.05"]
            async with logged_process("controlplane", command) as cp:
                await cp.wait_for("kubernetes source synced")
                await cp.wait_for("control plane serving")
                async with (
                    logged_process("worker", dataplane_command(xds_port, "default/gw", WorkerPorts.free())) as worker,
                    httpx.AsyncClient(timeout=10) as http,
                ):
                    await worker.wait_for("worker ready")
                    assert await initialize_status(http, url) == 404  # no route yet

                    mark = worker.mark()
                    api.put(mcp_route(mcp_port))
                    await worker.wait_for(event("config applied", type="Route"), start=mark)
                    assert await initialize_status(http, url) == 200
                    async with Client(url, mode="legacy") as client:
                        assert "add" in {tool.name for tool in (await client.list_tools()).tools}
                        result = await client.call_tool("add", {"a": 20, "b": 22})
                        assert not result.is_error and result.structured_content == {"result": 42}

                    # Every watch is cut; the route is deleted while none is open: the control plane
                    # resumes from its resourceVersion, sees the deletion, and the worker answers 404.
                    await api.wait_for_watches(10)
                    api.stall()
                    api.drop_watches()
                    while api.open_watches():
                        await api.stalled()
                        await anyio.lowlevel.checkpoint()
                    mark = worker.mark()
                    api.remove(GATEWAY_API, "HTTPRoute", "mcp", "default")
                    api.release()
                    await worker.wait_for(event("config applied", type="Route"), start=mark)
                    assert await initialize_status(http, url) == 404
                    # Lists only: not watches, nor the status writer's reads of single routes.
                    relists = [path for method, path in api.requests if method == "GET"
                               and path.split("?")[0].endswith("/httproutes") and "watch" not in path]
                    assert len(relists) == 1  # resumed the watch, never listed again



def leader_command(kubeconfig: Path, xds_port: int) -> list[str]:
    return [*AGENTGATE, "controlplane", "--kubernetes", "--kubeconfig", str(kubeconfig),
            "--xds-address", f"127.0.0.1:{xds_port}", "--metrics-port", "-1", "--debounce", "0.05",
            "--leader-elect", "--leader-elect-namespace", "default", "--leader-elect-lease-duration", "3",
            "--leader-elect-renew-deadline", "2", "--leader-elect-retry-period", "0.2"]


def broken_route(section: str = "nope") -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": "broken", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "gw", "sectionName": section}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/broken"}}],
                                "backendRefs": [{"name": "tools", "port": 1}]}]}}


def held_lease(holder: str) -> dict[str, Any]:
    """A Lease as a replica named `holder` left it a moment ago (long duration: nobody else takes it)."""
    now = "2030-01-01T00:00:00.000000Z"
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "agentgate-controlplane", "namespace": "default"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now,
                     "leaseTransitions": 0}}


def conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or ()}


async def until(proc: LoggedProcess, holds: Callable[[], bool]) -> None:
    """Wait (bounded by the caller's deadline) until `holds()`, re-checking at each log line of `proc`."""
    while not holds():
        await proc.wait_for(lambda line: True, start=proc.mark(), within=WITHIN)


async def test_status_events_and_leader_failover(tmp_path: Path) -> None:
    gateway_port, mcp_port, xds_a, xds_b = free_port(), free_port(), free_port(), free_port()
    blocker = socket.socket()  # a port the worker cannot bind (no SO_REUSEPORT): it NACKs that Listener
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy_port = blocker.getsockname()[1]

    with blocker, anyio.fail_after(WITHIN):
        async with kube_api() as api:
            for manifest in [*objects(gateway_port, mcp_port), mcp_route(mcp_port), broken_route()]:
                api.put(manifest)
            # The Lease names cp-a as holder: cp-b (started first) waits, cp-a renews it at once.
            api.put(held_lease("cp-a"))
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")

            def status(kind: str, name: str) -> Mapping[str, Any]:
                return api.get(GATEWAY_API, kind, name, "default").get("status") or {}

            def lease() -> Mapping[str, Any]:
                return api.get("coordination.k8s.io/v1", "Lease", "agentgate-controlplane", "default")["spec"]

            def route_reason(name: str) -> str | None:
                parents = status("HTTPRoute", name).get("parents") or [{}]
                return conditions(parents[0]).get("Accepted", {}).get("reason")

            async with logged_process("cp-b", leader_command(kubeconfig, xds_b), env={"POD_NAME": "cp-b"}) as b:
                await b.wait_for("leader election")
                async with logged_process("cp-a", leader_command(kubeconfig, xds_a), env={"POD_NAME": "cp-a"}) as a:
                    await a.wait_for(event("leadership acquired", identity="cp-a"))
                    await until(a, lambda: route_reason("broken") == "NoMatchingParent"
                                and route_reason("mcp") == "Accepted" and bool(status("Gateway", "gw")))
                    gateway = status("Gateway", "gw")
                    assert conditions(gateway)["Accepted"]["status"] == "True", gateway
                    assert conditions(gateway)["Programmed"]["status"] == "True", gateway
                    assert gateway["listeners"][0]["attachedRoutes"] == 1, gateway
                    (broken,) = status("HTTPRoute", "broken")["parents"]
                    accepted = conditions(broken)["Accepted"]
                    assert accepted["status"] == "False" and "nope" in accepted["message"], broken
                    assert accepted["observedGeneration"] == 1 and accepted["lastTransitionTime"]

                    # A worker that cannot bind a new listener NACKs it: a Warning Event on the Gateway,
                    # and Programmed=False while it rejects the config.
                    async with logged_process(
                        "worker", dataplane_command(xds_a, "default/gw", WorkerPorts.free())
                    ) as worker:
                        await worker.wait_for("worker ready")
                        mark = a.mark()
                        listeners = [{"name": "http", "protocol": "HTTP", "port": gateway_port},
                                     {"name": "extra", "protocol": "HTTP", "port": busy_port}]
                        gw = objects(gateway_port, mcp_port)[1]
                        api.put({**gw, "spec": {**gw["spec"], "listeners": listeners}})
                        await worker.wait_for("config rejected")
                        await a.wait_for(event("event written", reason="ConfigRejected"), start=mark)
                        (warning,) = [obj for (rtype, _, _), obj in api.store.objects.items() if rtype.kind == "Event"]
                        assert warning["type"] == "Warning" and warning["involvedObject"]["name"] == "gw", warning
                        assert str(busy_port) in warning["message"] and "Listener" in warning["message"], warning
                        await until(a, lambda: conditions(status("Gateway", "gw"))["Programmed"]["status"] == "False")
                        programmed = conditions(status("Gateway", "gw"))["Programmed"]
                        assert programmed["reason"] == "Invalid" and str(busy_port) in programmed["message"]

                    assert b.find(event("status written")) is None, "only the leader writes"
                    assert b.find(event("event written")) is None
                    assert lease()["holderIdentity"] == "cp-a"
                # cp-a stopped (SIGTERM): it released the Lease, cp-b takes over and writes.
                assert a.find(event("lease released")) is not None
                await b.wait_for(event("leadership acquired", identity="cp-b"))
                assert lease()["holderIdentity"] == "cp-b" and lease()["leaseTransitions"] >= 1
                mark = b.mark()
                api.put(broken_route("http"))  # fixed: it attaches to the listener
                await b.wait_for(lambda line: line.get("event") == "status written" and line.get("name") == "broken",
                                 start=mark)
                assert route_reason("broken") == "Accepted"
