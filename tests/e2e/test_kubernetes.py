"""The Kubernetes source end to end: the fake Kubernetes API (tests/peers/kube_api/) in the test
process, `agentgate controlplane --kubernetes --kubeconfig` reading it with the real
kubernetes-asyncio client, one `agentgate dataplane` worker, and an MCP server (the official SDK)
behind a Service with ``appProtocol: kgateway.dev/mcp``. The Service is ExternalName
``localhost``: the control plane resolves a Service to its externalName or cluster DNS name."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from tests.conftest import free_port
from tests.e2e.harness import AGENTGATE, WorkerPorts, dataplane_command, event, logged_process
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
                    relists = [path for method, path in api.requests if "httproutes" in path and "watch" not in path]
                    assert len(relists) == 1  # resumed the watch, never listed again
