"""StreamableHttpChannel against a real MCP server (the official SDK) over streamable HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from dataplane.config.model import McpStreamableHttpTarget, UpstreamCluster
from dataplane.http.limits import DEFAULT_LIMITS
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.http_channel import McpHttpUpstream, StreamableHttpChannel
from tests.conftest import free_port
from tests.peers.mcp_servers.http_faulty import FaultyPeer
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

BACKEND = UpstreamCluster(name="mcp-backend", kind="mcp", connect_timeout=2.0)
CLIENT_INFO = {"name": "gateway-test", "version": "0"}


def target(port: int, path: str = "/mcp") -> McpStreamableHttpTarget:
    return McpStreamableHttpTarget(name="peer", host="127.0.0.1", port=port, path=path)


def initialize(request_id: int = 1, version: str = "2025-11-25") -> JSON:
    params = {
        "protocolVersion": version,
        "capabilities": {"elicitation": {"form": {}}},
        "clientInfo": CLIENT_INFO,
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": params}


async def receive_until(channel: StreamableHttpChannel, request_id: Any, seen: list[JSON]) -> JSON:
    """Collect messages until the response to `request_id`; returns it."""
    with anyio.fail_after(10):
        while True:
            message = await channel.receive()
            seen.append(message)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message


async def open_session(channel: StreamableHttpChannel) -> JSON:
    await channel.send(initialize())
    response = await receive_until(channel, 1, [])
    await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return response


@pytest.fixture
async def peer() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


@pytest.fixture
async def json_peer() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable-json")) as port:
        yield port


async def test_a_session_lists_calls_with_progress_answers_elicitation_and_deletes(peer: int) -> None:
    channel = StreamableHttpChannel(target(peer), BACKEND, response_timeout=10)
    try:
        init = await open_session(channel)
        assert init["result"]["serverInfo"]["name"] == "http-sdk-peer"
        assert channel.session_id
        assert channel.protocol_version == init["result"]["protocolVersion"]

        await channel.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        tools = await receive_until(channel, 2, [])
        assert {tool["name"] for tool in tools["result"]["tools"]} >= {"add", "count", "ask"}

        seen: list[JSON] = []
        params = {"name": "count", "arguments": {"n": 3}, "_meta": {"progressToken": "p1"}}
        await channel.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params})
        result = await receive_until(channel, 3, seen)
        assert result["result"]["content"][0]["text"] == "counted 3"
        progress = [m["params"]["progress"] for m in seen if m.get("method") == "notifications/progress"]
        assert progress == [1, 2, 3]

        params = {"name": "ask", "arguments": {"question": "colour?"}}
        await channel.send({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": params})
        with anyio.fail_after(10):
            elicit = await channel.receive()
        assert elicit["method"] == "elicitation/create"
        assert elicit["params"]["message"] == "colour?"
        answer = {"action": "accept", "content": {"text": "blue"}}
        await channel.send({"jsonrpc": "2.0", "id": elicit["id"], "result": answer})
        result = await receive_until(channel, 4, [])
        assert result["result"]["content"][0]["text"] == "answer: blue"
    finally:
        await channel.aclose()
    session_id = channel.session_id

    # DELETE ended the upstream session: a channel resuming it gets 404 -> TargetClosed.
    resumed = StreamableHttpChannel(
        target(peer), BACKEND, session_id=session_id, protocol_version="2025-11-25", listen=False
    )
    try:
        with pytest.raises(TargetClosed, match="session expired upstream"):
            await resumed.send({"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
        with pytest.raises(TargetClosed, match="session expired upstream"):
            await resumed.receive()
    finally:
        await resumed.aclose()


async def test_json_responses_are_delivered_and_the_session_deleted(json_peer: int) -> None:
    channel = StreamableHttpChannel(target(json_peer), BACKEND)
    try:
        await open_session(channel)
        args = {"name": "add", "arguments": {"a": 20, "b": 22}}
        await channel.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": args})
        result = await receive_until(channel, 2, [])
        assert result["result"]["content"][0]["text"] == "42"
    finally:
        await channel.aclose()
    with pytest.raises(TargetClosed, match="channel closed"):
        await channel.send({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    resumed = StreamableHttpChannel(target(json_peer), BACKEND, session_id=channel.session_id, listen=False)
    try:
        with pytest.raises(TargetClosed, match="session expired upstream"):
            await resumed.send({"jsonrpc": "2.0", "id": 4, "method": "tools/list"})
    finally:
        await resumed.aclose()


async def test_a_second_channel_resumes_the_upstream_session_by_id(peer: int) -> None:
    first = StreamableHttpChannel(target(peer), BACKEND, listen=False)
    await open_session(first)
    second = StreamableHttpChannel(
        target(peer), BACKEND, session_id=first.session_id, protocol_version=first.protocol_version, listen=False
    )
    try:
        args = {"name": "add", "arguments": {"a": 2, "b": 3}}
        await second.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": args})
        result = await receive_until(second, 9, [])
        assert result["result"]["content"][0]["text"] == "5"
    finally:
        await second.aclose()
        await first.aclose()


async def test_a_target_that_is_down_fails_fast_with_target_unavailable() -> None:
    channel = StreamableHttpChannel(target(free_port()), BACKEND)
    try:
        with anyio.fail_after(5), pytest.raises(TargetUnavailable, match=r"MCP target peer .*refused"):
            await channel.send(initialize())
    finally:
        await channel.aclose()


async def test_an_unknown_session_is_reported_as_expired(peer: int) -> None:
    channel = StreamableHttpChannel(target(peer), BACKEND, session_id="no-such-session", listen=False)
    try:
        with pytest.raises(TargetClosed, match="session expired upstream"):
            await channel.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    finally:
        await channel.aclose()


@pytest.fixture
async def faulty() -> AsyncIterator[tuple[FaultyPeer, int]]:
    app = FaultyPeer()
    async with serve(app) as port:
        yield app, port


async def started(port: int, path: str, **options: Any) -> StreamableHttpChannel:
    channel = StreamableHttpChannel(target(port, path), BACKEND, listen=False, **options)
    await open_session(channel)
    return channel


TOOLS_LIST: JSON = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}


async def test_a_body_that_is_not_json_is_target_unavailable_naming_the_target(
    faulty: tuple[FaultyPeer, int],
) -> None:
    channel = await started(faulty[1], "/garbage")
    try:
        with pytest.raises(TargetUnavailable, match=r"MCP target peer .*invalid JSON"):
            await channel.send(TOOLS_LIST)
    finally:
        await channel.aclose()
    assert faulty[0].deletes == 1


async def test_an_event_that_is_not_json_answers_the_request_with_an_error(faulty: tuple[FaultyPeer, int]) -> None:
    channel = await started(faulty[1], "/garbage-sse")
    try:
        await channel.send(TOOLS_LIST)
        answer = await receive_until(channel, 7, [])
        assert answer["error"]["code"] == -32603
        assert "peer" in answer["error"]["message"] and "invalid JSON" in answer["error"]["message"]
    finally:
        await channel.aclose()


async def test_an_oversized_event_answers_the_request_with_an_error(faulty: tuple[FaultyPeer, int]) -> None:
    channel = await started(faulty[1], "/big", max_message_bytes=64 * 1024)
    try:
        await channel.send(TOOLS_LIST)
        answer = await receive_until(channel, 7, [])
        assert "larger than 65536 bytes" in answer["error"]["message"]
    finally:
        await channel.aclose()


async def test_a_5xx_is_target_unavailable(faulty: tuple[FaultyPeer, int]) -> None:
    channel = await started(faulty[1], "/error")
    try:
        with pytest.raises(TargetUnavailable, match="answered 503"):
            await channel.send(TOOLS_LIST)
    finally:
        await channel.aclose()


async def test_a_silent_upstream_times_out_as_target_unavailable(faulty: tuple[FaultyPeer, int]) -> None:
    channel = await started(faulty[1], "/hang", response_timeout=0.2)
    try:
        with anyio.fail_after(5), pytest.raises(TargetUnavailable, match=r"no response to POST within 0.2s"):
            await channel.send(TOOLS_LIST)
    finally:
        faulty[0].release.set()
        await channel.aclose()


async def test_a_broken_stream_with_event_ids_is_resumed_with_last_event_id(faulty: tuple[FaultyPeer, int]) -> None:
    channel = await started(faulty[1], "/resume")
    try:
        await channel.send(TOOLS_LIST)
        seen: list[JSON] = []
        answer = await receive_until(channel, 7, seen)
        assert answer["result"] == {"resumed": True}
        assert [m.get("method") for m in seen] == ["notifications/progress", None]
        assert faulty[0].last_event_ids == ["e2"]
    finally:
        await channel.aclose()


async def test_a_stream_cut_without_event_ids_answers_the_request_with_an_error(
    faulty: tuple[FaultyPeer, int],
) -> None:
    channel = await started(faulty[1], "/cut")
    try:
        await channel.send(TOOLS_LIST)
        seen: list[JSON] = []
        answer = await receive_until(channel, 7, seen)
        assert seen[0]["method"] == "notifications/message"
        assert "ended before the response" in answer["error"]["message"]
    finally:
        await channel.aclose()


async def test_the_standalone_get_stream_delivers_server_messages(faulty: tuple[FaultyPeer, int]) -> None:
    channel = StreamableHttpChannel(target(faulty[1], "/listen"), BACKEND)
    try:
        await open_session(channel)
        with anyio.fail_after(5):
            message = await channel.receive()
        assert message["method"] == "notifications/tools/list_changed"
        await channel.send(TOOLS_LIST)
        assert (await receive_until(channel, 7, []))["result"] == {}
    finally:
        await channel.aclose()
    assert faulty[0].listened


@pytest.mark.parametrize("transport", ["streamable", "streamable-json"])
async def test_a_2026_07_28_request_needs_no_session_and_carries_its_routing_headers(transport: str) -> None:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
    }
    params = {"name": "add", "arguments": {"a": 1, "b": 2}, "_meta": meta}
    async with serve(build_app(build_server(), transport)) as port:  # type: ignore[arg-type]
        channel = StreamableHttpChannel(target(port), BACKEND, listen=False)
        try:
            await channel.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
            result = await receive_until(channel, 1, [])
            assert result["result"]["content"][0]["text"] == "3"
            assert channel.session_id is None
        finally:
            await channel.aclose()


async def test_concurrent_calls_each_get_their_answer_and_aclose_ends_a_waiting_receive(peer: int) -> None:
    channel = StreamableHttpChannel(target(peer), BACKEND)
    await open_session(channel)
    answers: dict[int, str] = {}
    try:
        async with anyio.create_task_group() as tasks:
            for request_id, n in ((10, 2), (11, 4), (12, 1)):
                params = {"name": "count", "arguments": {"n": n}}
                tasks.start_soon(
                    channel.send, {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
                )
        with anyio.fail_after(10):
            while len(answers) < 3:
                message = await channel.receive()
                if "result" in message:
                    answers[message["id"]] = message["result"]["content"][0]["text"]
        assert answers == {10: "counted 2", 11: "counted 4", 12: "counted 1"}

        outcome: list[BaseException] = []

        async def wait_for_more() -> None:
            try:
                await channel.receive()
            except TargetClosed as exc:
                outcome.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait_for_more)
                await anyio.wait_all_tasks_blocked()
                await channel.aclose()
        assert [str(exc) for exc in outcome] == ["channel closed"]
    finally:
        await channel.aclose()


async def test_a_full_inbox_holds_the_stream_readers_back_until_receive_takes_one() -> None:
    up = McpHttpUpstream(
        target(free_port()), BACKEND, response_timeout=1, max_message_bytes=1024, limits=DEFAULT_LIMITS, max_queued=2
    )
    delivered: list[int] = []

    async def deliver(n: int) -> None:
        await up.deliver({"n": n})
        delivered.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            for n in range(3):
                tasks.start_soon(deliver, n)
            await anyio.wait_all_tasks_blocked()
            assert delivered == [0, 1]
            assert await up.receive() == {"n": 0}
        assert delivered == [0, 1, 2]
    up.end("done")
    assert [await up.receive(), await up.receive()] == [{"n": 1}, {"n": 2}]
    with pytest.raises(TargetClosed, match="done"):
        await up.receive()
    up.close_pool()
