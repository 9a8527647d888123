"""LegacySseChannel against a real 2024-11-05 HTTP+SSE MCP server (the official SDK) and faulty peers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from dataplane.config.model import McpSseTarget, UpstreamCluster
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.sse_channel import LegacySseChannel, resolve_endpoint
from tests.conftest import free_port
from tests.peers.mcp_servers.http_faulty import FaultyLegacyPeer
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

BACKEND = UpstreamCluster(name="mcp-backend", kind="mcp", connect_timeout=2.0)
INITIALIZE: JSON = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2024-11-05",
        "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "gateway-test", "version": "0"},
    },
}
TOOLS_LIST: JSON = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


def target(port: int, path: str = "/sse") -> McpSseTarget:
    return McpSseTarget(name="legacy", host="127.0.0.1", port=port, path=path)


async def receive_until(channel: LegacySseChannel, request_id: int, seen: list[JSON]) -> JSON:
    with anyio.fail_after(10):
        while True:
            message = await channel.receive()
            seen.append(message)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message


@pytest.fixture
async def peer() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "sse")) as port:
        yield port


async def test_a_conversation_over_the_legacy_transport(peer: int) -> None:
    channel = LegacySseChannel(target(peer), BACKEND, response_timeout=10)
    try:
        await channel.send(INITIALIZE)
        assert channel.endpoint is not None and channel.endpoint.startswith("/messages/?session_id=")
        init = await receive_until(channel, 1, [])
        assert init["result"]["serverInfo"]["name"] == "http-sdk-peer"
        assert channel.session_id is None
        await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

        await channel.send(TOOLS_LIST)
        tools = await receive_until(channel, 2, [])
        assert {tool["name"] for tool in tools["result"]["tools"]} >= {"add", "count", "ask"}

        seen: list[JSON] = []
        params = {"name": "count", "arguments": {"n": 2}, "_meta": {"progressToken": 5}}
        await channel.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params})
        result = await receive_until(channel, 3, seen)
        assert result["result"]["content"][0]["text"] == "counted 2"
        assert [m["params"]["progress"] for m in seen if m.get("method") == "notifications/progress"] == [1, 2]

        params = {"name": "ask", "arguments": {"question": "size?"}}
        await channel.send({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": params})
        with anyio.fail_after(10):
            elicit = await channel.receive()
        assert elicit["method"] == "elicitation/create"
        await channel.send(
            {"jsonrpc": "2.0", "id": elicit["id"], "result": {"action": "accept", "content": {"text": "L"}}}
        )
        result = await receive_until(channel, 4, [])
        assert result["result"]["content"][0]["text"] == "answer: L"
    finally:
        await channel.aclose()
    with pytest.raises(TargetClosed):
        await channel.receive()
    with pytest.raises(TargetClosed):
        await channel.send(TOOLS_LIST)


async def test_a_target_that_is_down_fails_fast() -> None:
    channel = LegacySseChannel(target(free_port()), BACKEND)
    try:
        with anyio.fail_after(5), pytest.raises(TargetUnavailable, match=r"MCP target legacy .*refused"):
            await channel.send(INITIALIZE)
    finally:
        await channel.aclose()


async def run_faulty(mode: str, **options: float) -> AsyncIterator[tuple[FaultyLegacyPeer, LegacySseChannel]]:
    app = FaultyLegacyPeer(mode)
    async with serve(app) as port:
        channel = LegacySseChannel(target(port), BACKEND, **options)  # type: ignore[arg-type]
        try:
            yield app, channel
        finally:
            await channel.aclose()
            app.stop()


async def test_an_endpoint_on_another_host_is_refused() -> None:
    async for app, channel in run_faulty("foreign"):
        with pytest.raises(TargetUnavailable, match=r"refused endpoint.*192.0.2.1"):
            await channel.send(INITIALIZE)
        assert app.posts == 0


async def test_a_stream_without_an_endpoint_event_times_out() -> None:
    async for _, channel in run_faulty("silent", response_timeout=0.2):
        with anyio.fail_after(5), pytest.raises(TargetUnavailable, match=r"no endpoint event within 0.2s"):
            await channel.send(INITIALIZE)


async def test_a_message_that_is_not_json_ends_the_channel_naming_the_target() -> None:
    async for _, channel in run_faulty("garbage"):
        await channel.send(INITIALIZE)
        with anyio.fail_after(5), pytest.raises(TargetClosed, match=r"MCP target legacy .*invalid JSON"):
            await channel.receive()


async def test_a_forgotten_session_is_target_closed() -> None:
    async for _, channel in run_faulty("gone"):
        with pytest.raises(TargetClosed, match="session expired upstream"):
            await channel.send(INITIALIZE)


async def test_the_end_of_the_stream_ends_the_channel() -> None:
    async for _, channel in run_faulty("short"):
        await channel.send(INITIALIZE)
        with anyio.fail_after(5), pytest.raises(TargetClosed, match="closed its event stream"):
            await channel.receive()


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("/messages/?session_id=1", "/messages/?session_id=1"),
        ("messages", "/messages"),
        ("http://127.0.0.1:8000/m?x=1", "/m?x=1"),
    ],
)
def test_endpoints_resolve_against_the_target(endpoint: str, expected: str) -> None:
    assert resolve_endpoint(target(8000), endpoint) == expected


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8001/m", "https://127.0.0.1:8000/m", "//evil.test/m"])
def test_endpoints_off_the_target_origin_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="is not on"):
        resolve_endpoint(target(8000), endpoint)
