"""A2A end to end with real processes: a YAML folder (Gateway, two A2A Backends, HTTPRoutes at
/agents/<name> rewritten to each agent's base path) -> control plane -> worker -> two a2a-sdk agents.
One card fetch and one streamed message, with the a2a-sdk client, through the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from a2a.helpers import get_artifact_text
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, StreamResponse, TaskState

from tests.conftest import free_port
from tests.e2e.harness import (
    GATEWAY_CLASS,
    LoggedProcess,
    WorkerPorts,
    controlplane_command,
    dataplane_command,
    event,
    logged_process,
    write_documents,
)
from tests.peers.a2a_agents import agent_client, fetch_card, serve_agent

pytestmark = pytest.mark.anyio


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def gateway_yaml(port: int) -> str:
    return _dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "agents", "namespace": "default"},
            "spec": {
                "gatewayClassName": "agentgate",
                "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                "listeners": [{"name": "http", "protocol": "HTTP", "port": port}],
            },
        }
    )


def agent_yaml(name: str, port: int, base_path: str) -> str:
    """An A2A Backend for the agent and its route /agents/<name>, the prefix rewritten to its base path."""
    backend = {
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"a2a": {"agentName": name, "basePath": base_path, "static": {"host": "127.0.0.1", "port": port}}},
    }
    rewrite = {"type": "ReplacePrefixMatch", "replacePrefixMatch": base_path}
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "agents"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/agents/{name}"}}],
                    "filters": [{"type": "URLRewrite", "urlRewrite": {"path": rewrite}}],
                    "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": name}],
                }
            ],
        },
    }
    return "---\n".join((_dump(backend), _dump(route)))


@dataclass
class Stack:
    gateway_port: int
    worker: LoggedProcess

    def agent_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/agents/{name}/"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port, xds_port = free_port(), free_port()
    async with serve_agent("planner") as planner, serve_agent("researcher", base_path="/a2a") as researcher:
        write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml(gateway_port))
        write_documents(
            folder / "agents.yaml",
            agent_yaml("planner", planner.port, "/"),
            agent_yaml("researcher", researcher.port, "/a2a"),
        )
        async with logged_process("controlplane", controlplane_command(folder, xds_port)) as cp:
            await cp.wait_for("control plane serving")
            async with logged_process(
                "worker", dataplane_command(xds_port, "default/agents", WorkerPorts.free())
            ) as worker:
                await worker.wait_for("worker ready")
                await worker.wait_for("listening")
                yield Stack(gateway_port, worker)


async def test_card_and_streamed_message_through_the_gateway(stack: Stack) -> None:
    with anyio.fail_after(20):
        planner_card = await fetch_card(stack.agent_url("planner"))
        researcher_url = stack.agent_url("researcher")
        card = await fetch_card(researcher_url)
        assert {i.url for i in planner_card.supported_interfaces} == {stack.agent_url("planner")}
        assert {i.url for i in card.supported_interfaces} == {researcher_url}
        message = Message(role=Role.ROLE_USER, message_id="m-1", parts=[Part(text="countdown 2")])
        events: list[StreamResponse] = []
        async with agent_client(researcher_url, card=card) as client:
            async for item in client.send_message(SendMessageRequest(message=message)):
                events.append(item)
        line = await stack.worker.wait_for(
            event("a2a request", agent="researcher", a2a_operation="SendStreamingMessage")
        )
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    artifact = next(e.artifact_update.artifact for e in events if e.HasField("artifact_update"))
    assert get_artifact_text(artifact) == "echo: countdown 2"
    assert line["a2a_task_state"] == "completed" and line["status"] == 200
    assert line["a2a_task_id"] == events[0].task.id
