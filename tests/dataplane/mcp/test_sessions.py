"""The per-worker session registry against real SDK targets: issue, idle expiry, resume, end, failure modes."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from google.protobuf.duration_pb2 import Duration

from dataplane.config.model import UpstreamCluster
from dataplane.mcp.sessions import FederatedSession, McpSessions, SessionNotFound
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

STDIO_SERVER = str(Path(__file__).parents[2] / "peers" / "mcp_servers" / "stdio_tools_server.py")
INIT_PARAMS = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


def cluster(
    http_port: int,
    *,
    idle: float | None = None,
    fail_open: bool = False,
    stdio: bool = True,
    command: str = sys.executable,
) -> UpstreamCluster:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[pb.McpSessionKey(id="k", key=b"s" * 32)]))
    if idle is not None:
        backend.mcp.session_idle_timeout.CopyFrom(Duration(seconds=int(idle), nanos=int(idle % 1 * 1e9)))
    if fail_open:
        backend.mcp.failure_mode = pb.McpBackend.FAILURE_MODE_FAIL_OPEN
    address = pb.SocketAddress(host="127.0.0.1", port=http_port)
    targets = [
        pb.Target(
            name="default/mcp/web",
            backend="default/mcp",
            mcp=pb.McpServer(name="web", streamable_http=pb.McpHttpTransport(address=address)),
        )
    ]
    if stdio:
        targets.append(
            pb.Target(
                name="default/mcp/local",
                backend="default/mcp",
                mcp=pb.McpServer(name="local", stdio=pb.McpStdioTransport(command=command, args=[STDIO_SERVER])),
            )
        )
    return compile_resources(backend, *targets).backends["default/mcp"]


async def call(session: FederatedSession, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request through the session; its final response (bounded)."""
    stream = session.open_request(request_id, None, 30)
    reader = session.attach(stream)
    try:
        with anyio.fail_after(30):
            await session.submit({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            cursor = 0
            while batch := await stream.next(cursor, reader):
                for event in batch:
                    if event.final:
                        return event.message
                cursor = batch[-1].seq
    finally:
        session.detach(stream, reader)
    raise AssertionError("the session closed before answering")


async def open_session(sessions: McpSessions, backend: UpstreamCluster) -> tuple[FederatedSession, str]:
    session = await sessions.create(backend)
    answer = await call(session, 1, "initialize", INIT_PARAMS)
    token = sessions.issue(session, answer["result"]["protocolVersion"])
    await session.submit({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return session, token


@pytest.fixture
async def http_target() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


@pytest.fixture
async def sessions() -> AsyncIterator[McpSessions]:
    registry = McpSessions()
    try:
        yield registry
    finally:
        with anyio.fail_after(15):
            await registry.aclose()


async def test_an_idle_session_closes_here_but_its_upstream_session_lives_on(
    http_target: int, sessions: McpSessions
) -> None:
    backend = cluster(http_target, idle=0.3)
    session, token = await open_session(sessions, backend)
    with anyio.fail_after(10):
        await session.closed.wait()
    assert len(sessions) == 0
    resumed = await sessions.find(backend, token)
    assert resumed is not session
    answer = await call(resumed, 2, "tools/call", {"name": "web__add", "arguments": {"a": 20, "b": 22}})
    assert answer["result"]["content"][0]["text"] == "42"


async def test_ending_a_session_deletes_upstream_so_no_worker_resumes_it(
    http_target: int, sessions: McpSessions
) -> None:
    backend = cluster(http_target, stdio=False)
    session, token = await open_session(sessions, backend)
    assert await sessions.find(backend, token) is session
    await sessions.end(session)
    with pytest.raises(SessionNotFound):
        await McpSessions().find(backend, token)


async def test_tampered_and_foreign_tokens_are_not_found(http_target: int, sessions: McpSessions) -> None:
    backend = cluster(http_target, stdio=False)
    _, token = await open_session(sessions, backend)
    with pytest.raises(SessionNotFound):
        await sessions.find(backend, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    with pytest.raises(SessionNotFound):
        await sessions.find(backend, "not-a-token")


async def test_fail_open_skips_a_dead_target_and_fail_closed_names_it(sessions: McpSessions) -> None:
    missing = "agentgate-no-such-command"
    async with serve(build_app(build_server(), "streamable")) as live:
        # FAIL_CLOSED: the broken stdio target fails the initialize, named in the error.
        session = await sessions.create(cluster(live, command=missing))
        answer = await call(session, 1, "initialize", INIT_PARAMS)
        assert answer["error"]["code"] == -32603 and "local" in answer["error"]["message"]
        await session.aclose()
        # Every target dead (nothing listens on the port): even FAIL_OPEN fails, naming it.
        session = await sessions.create(cluster(free_port(), fail_open=True, stdio=False))
        answer = await call(session, 1, "initialize", INIT_PARAMS)
        assert answer["error"]["code"] == -32603 and "web" in answer["error"]["message"]
        await session.aclose()
        # FAIL_OPEN: the broken target is skipped, the live one serves.
        session = await sessions.create(cluster(live, fail_open=True, command=missing))
        answer = await call(session, 1, "initialize", INIT_PARAMS)
        assert "result" in answer
        listed = await call(session, 2, "tools/list", {})
        names = {tool["name"] for tool in listed["result"]["tools"]}
        assert "web__add" in names and not any(name.startswith("local__") for name in names)
        await session.aclose()
