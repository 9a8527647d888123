"""Era bridging through the real proxy: a session-era client (the SDK in legacy mode, 2025-11-25)
federating a 2026-07-28-only target with a session-era stdio target."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.types import ElicitResult

from dataplane.config.model import RuntimeConfig
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.modern_only import ModernPeer, build_modern_app, serve
from tests.peers.node_client import ensure_node_packages, require_node, run_ts_client

pytestmark = pytest.mark.anyio

STDIO_SERVER = str(Path(__file__).parents[2] / "peers" / "mcp_servers" / "stdio_tools_server.py")
KEY = pb.McpSessionKey(id="k1", key=b"b" * 32)
POST_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def bridge_config(port: int, modern_port: int) -> RuntimeConfig:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    modern = pb.Target(
        name="default/mcp/modern",
        backend="default/mcp",
        mcp=pb.McpServer(
            name="modern",
            streamable_http=pb.McpHttpTransport(address=pb.SocketAddress(host="127.0.0.1", port=modern_port)),
        ),
    )
    local = pb.Target(
        name="default/mcp/local",
        backend="default/mcp",
        mcp=pb.McpServer(name="local", stdio=pb.McpStdioTransport(command=sys.executable, args=[STDIO_SERVER])),
    )
    return compile_resources(listener(port), backend, modern, local, route(backends=[("default/mcp", 1)]))


def last_message(response: httpx.Response) -> dict[str, Any]:
    """The last JSON-RPC message of a JSON or SSE reply (events without data carry none)."""
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads([payload for payload in data if payload][-1])


@pytest.fixture
async def modern_target() -> AsyncIterator[int]:
    async with serve(build_modern_app(ModernPeer())) as port:
        yield port


async def test_a_session_era_client_uses_a_modern_only_target(modern_target: int) -> None:
    port = free_port()
    progress: list[float] = []
    asked: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"text": "teal"})

    async with running_proxy(bridge_config(port, modern_target)):
        with anyio.fail_after(60):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", elicitation_callback=elicit) as client:
                assert client.session.initialize_result is not None
                assert client.session.initialize_result.protocol_version.startswith("2025")
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"modern__add", "modern__count", "modern__ask", "local__echo"} <= tools
                added = await client.call_tool("modern__add", {"a": 20, "b": 22})
                assert added.content[0].text == "42"
                counted = await client.call_tool("modern__count", {"n": 3}, progress_callback=on_progress)
                assert counted.content[0].text == "counted 3" and progress == [1, 2, 3]
                # The target's input_required round arrives as an elicitation/create, its answer goes back.
                answered = await client.call_tool("modern__ask", {"question": "colour?"})
                assert answered.content[0].text.startswith("answer: teal") and asked == ["colour?"]
                echoed = await client.call_tool("local__echo", {"text": "still here"})
                assert echoed.content[0].text == "still here"


async def test_a_second_worker_resumes_a_session_with_a_modern_only_target(modern_target: int) -> None:
    first, second = free_port(), free_port()
    async with (
        running_proxy(bridge_config(first, modern_target)),
        running_proxy(bridge_config(second, modern_target)),
        httpx.AsyncClient(timeout=30) as client,
    ):
        with anyio.fail_after(60):
            init = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
            response = await client.post(f"http://127.0.0.1:{first}/mcp", json=init, headers=POST_HEADERS)
            assert response.status_code == 200, response.text
            headers = {
                **POST_HEADERS,
                "mcp-session-id": response.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
            call = {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "modern__add", "arguments": {"a": 1, "b": 2}},
            }
            answer = await client.post(f"http://127.0.0.1:{second}/mcp", json=call, headers=headers)
            assert answer.status_code == 200, answer.text
            body = last_message(answer)
            assert body["result"]["content"][0]["text"] == "3"


async def test_the_typescript_client_uses_a_modern_only_target(modern_target: int) -> None:
    require_node()
    await ensure_node_packages()
    port = free_port()
    plan = [
        {"op": "listTools"},
        {"op": "callTool", "name": "modern__add", "arguments": {"a": 40, "b": 2}},
        {"op": "callTool", "name": "modern__count", "arguments": {"n": 2}},
        {"op": "callTool", "name": "local__echo", "arguments": {"text": "typescript"}},
    ]
    async with running_proxy(bridge_config(port, modern_target)):
        with anyio.fail_after(60):
            report = await run_ts_client(f"http://127.0.0.1:{port}/mcp", plan)
    assert report["protocolVersion"] == "2025-11-25"
    listed, added, counted, echoed = (step["result"] for step in report["steps"])
    assert {"modern__add", "modern__count", "local__echo"} <= set(listed["tools"])
    assert added["content"][0]["text"] == "42"
    assert counted["content"][0]["text"] == "counted 2"
    assert [update["progress"] for update in counted["progress"]] == [1, 2]
    assert echoed["content"][0]["text"] == "typescript"
