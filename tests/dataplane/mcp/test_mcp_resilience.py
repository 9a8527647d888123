"""A Policy's resilience section on MCP traffic, through the real proxy to a real SDK server: the
request timeout (-32001 to the SDK client, notifications/cancelled upstream, the session still
usable) and retries of requests that got a 5xx or no connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from google.protobuf.duration_pb2 import Duration
from mcp import Client, MCPError
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dataplane.config.compile import compile_config
from dataplane.config.model import McpStreamableHttpTarget, RuntimeConfig, UpstreamCluster
from dataplane.mcp.channel import TargetUnavailable
from dataplane.mcp.http_channel import StreamableHttpChannel
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.peers.config import listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, serve

pytestmark = pytest.mark.anyio

KEY = pb.McpSessionKey(id="k1", key=b"k" * 32)
RULE = "default/r/0"


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def tool_server(released: anyio.Event) -> MCPServer:
    server = MCPServer("resilience-peer")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def peek() -> str:
        """A read-only tool (the gateway may retry it)."""
        return "peeked"

    @server.tool()
    async def slow() -> str:
        """Wait until the test releases it (the gateway's timeout comes first)."""
        await released.wait()
        return "slow done"

    return server


class Recorder:
    """Wraps an ASGI app: records every POSTed JSON-RPC message and answers 503 to the next
    ``fail[method]`` POSTs of that method instead of passing them on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.fail: dict[str, int] = {}
        self._arrived = anyio.Event()

    async def wait_for(self, method: str) -> list[dict[str, Any]]:
        """The messages of ``method`` once one arrived (the caller bounds the wait)."""
        while not (found := self.methods(method)):
            await self._arrived.wait()
        return found

    def methods(self, method: str) -> list[dict[str, Any]]:
        return [m for m in self.seen if m.get("method") == method]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        parsed = json.loads(body)
        self.seen.append(parsed)
        self._arrived.set()
        self._arrived = anyio.Event()
        method = parsed.get("method")
        if self.fail.get(method, 0) > 0:
            self.fail[method] -= 1
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Recorder, int, anyio.Event]]:
    released = anyio.Event()
    recorder = Recorder(build_app(tool_server(released), "streamable"))
    async with serve(recorder) as port:
        try:
            yield recorder, port, released
        finally:
            released.set()


def config(port: int, http_port: int, resilience: pb.Resilience) -> RuntimeConfig:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    web = pb.Target(
        name="default/mcp/web",
        backend="default/mcp",
        mcp=pb.McpServer(
            name="web",
            streamable_http=pb.McpHttpTransport(address=pb.SocketAddress(host="127.0.0.1", port=http_port)),
        ),
    )
    on_rule = pb.PolicyTargetRef(kind=pb.PolicyTargetRef.KIND_ROUTE_RULE, name=RULE)
    policy = pb.Policy(name="default/resilience", targets=[on_rule], resilience=resilience)
    mcp_listener = listener(port)
    resources: dict[str, dict[str, Any]] = {
        LISTENER: {mcp_listener.name: mcp_listener},
        BACKEND: {backend.name: backend},
        TARGET: {web.name: web},
        ROUTE: {RULE: route(RULE, backends=[("default/mcp", 1)])},
        POLICY: {policy.name: policy},
    }
    return compile_config(resources, version="v1")


def retrying(attempts: int = 2, *, non_idempotent: bool = False) -> pb.Resilience:
    retry = pb.Retry(
        attempts=attempts,
        on=[pb.Retry.ON_5XX],
        backoff_base=seconds(0.001),
        backoff_max=seconds(0.002),
        retry_non_idempotent_mcp=non_idempotent,
    )
    return pb.Resilience(retry=retry)


async def test_a_slow_tool_times_out_with_32001_is_cancelled_upstream_and_the_session_goes_on(
    peer: tuple[Recorder, int, anyio.Event],
) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    async with running_proxy(config(port, http_port, pb.Resilience(request_timeout=seconds(0.5)))):
        with anyio.fail_after(30):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                await client.list_tools()
                with pytest.raises(MCPError) as raised:
                    await client.call_tool("slow", {})
                assert raised.value.code == -32001
                (call,) = recorder.methods("tools/call")
                with anyio.fail_after(5):
                    (cancel,) = await recorder.wait_for("notifications/cancelled")
                assert cancel["params"]["requestId"] == call["id"]
                added = await client.call_tool("add", {"a": 2, "b": 3})
                assert added.content[0].text == "5"


async def test_a_list_answered_503_once_is_retried_and_succeeds(peer: tuple[Recorder, int, anyio.Event]) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    async with running_proxy(config(port, http_port, retrying())):
        with anyio.fail_after(30):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                recorder.fail["tools/list"] = 1
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"add", "peek", "slow"} <= tools
                first, second = recorder.methods("tools/list")
                assert first["id"] != second["id"]  # the retry has a fresh gateway id


async def test_a_tool_call_answered_503_is_not_retried_without_retry_non_idempotent_mcp(
    peer: tuple[Recorder, int, anyio.Event],
) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    async with running_proxy(config(port, http_port, retrying())):
        with anyio.fail_after(30):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                await client.list_tools()
                recorder.fail["tools/call"] = 1
                with pytest.raises(MCPError, match="503"):
                    await client.call_tool("add", {"a": 1, "b": 1})
                assert len(recorder.methods("tools/call")) == 1
                # A tool its server marks read-only is retried all the same.
                recorder.fail["tools/call"] = 1
                peeked = await client.call_tool("peek", {})
                assert peeked.content[0].text == "peeked"
                assert len(recorder.methods("tools/call")) == 3


async def test_a_tool_call_answered_503_is_retried_with_retry_non_idempotent_mcp(
    peer: tuple[Recorder, int, anyio.Event],
) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    async with running_proxy(config(port, http_port, retrying(non_idempotent=True))):
        with anyio.fail_after(30):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                await client.list_tools()
                recorder.fail["tools/call"] = 1
                added = await client.call_tool("add", {"a": 1, "b": 1})
                assert added.content[0].text == "2"
                assert len(recorder.methods("tools/call")) == 2


async def test_retries_run_out_and_the_client_gets_the_error(peer: tuple[Recorder, int, anyio.Event]) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    async with running_proxy(config(port, http_port, retrying(attempts=1))):
        with anyio.fail_after(30):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                recorder.fail["tools/list"] = 2
                with pytest.raises(MCPError, match="MCP target failed: web") as raised:
                    await client.list_tools()
                assert "503" in json.dumps(raised.value.error.data)
                assert len(recorder.methods("tools/list")) == 2


async def test_a_refused_connection_is_a_retryable_connect_failure() -> None:
    """What the session's retry decision is fed when nothing listens: ``connect-failure``."""
    backend = UpstreamCluster(name="mcp-backend", kind="mcp", connect_timeout=2.0)
    target = McpStreamableHttpTarget(name="peer", host="127.0.0.1", port=free_port(), path="/mcp")
    channel = StreamableHttpChannel(target, backend, listen=False)
    try:
        with anyio.fail_after(5), pytest.raises(TargetUnavailable) as raised:
            await channel.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert raised.value.failure == "connect-failure"
    finally:
        await channel.aclose()


async def test_a_per_try_timeout_cancels_the_attempt_and_fails_the_call_without_retries(
    peer: tuple[Recorder, int, anyio.Event],
) -> None:
    recorder, http_port, _ = peer
    port = free_port()
    resilience = pb.Resilience(request_timeout=seconds(20), per_try_timeout=seconds(0.3))
    async with running_proxy(config(port, http_port, resilience)):
        with anyio.fail_after(10):  # well inside the 20 s request timeout: the per-try timer ended it
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                await client.list_tools()
                with pytest.raises(MCPError, match="did not answer") as raised:
                    await client.call_tool("slow", {})
                assert raised.value.code == -32001
                (call,) = recorder.methods("tools/call")
                with anyio.fail_after(5):
                    (cancel,) = await recorder.wait_for("notifications/cancelled")
                assert cancel["params"]["requestId"] == call["id"]
                assert (await client.call_tool("add", {"a": 1, "b": 2})).content[0].text == "3"
