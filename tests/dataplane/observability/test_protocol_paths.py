"""Spans, metrics and access-log lines of the protocol paths test_request_path.py leaves out, from real
traffic through a ProxyServer: a 2026-07-28 (sessionless) MCP fan-out over a dual-era SDK server and a
session-era stdio server (trace context in the stdio request's ``_meta``), a session-era MCP request
that expires (its upstream attempt ends then, not when the session closes), and A2A calls to a real
a2a-sdk agent."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, MCPError

from dataplane.config.model import RuntimeConfig
from dataplane.observability.settings import Protocol
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.a2a.test_gateway import gateway_config, rpc, send_params, serve_agent
from tests.dataplane.mcp.test_mcp_resilience import Recorder, seconds, tool_server
from tests.dataplane.mcp.test_mcp_resilience import config as resilience_config
from tests.dataplane.observability.test_request_path import (
    CLIENT_SPAN,
    CLIENT_TRACE,
    TRACEPARENT,
    Recorders,
    by_name,
    observed_proxy,
    tracing,
)
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.otlp import ReceivedSpan, otlp_http_receiver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

MCP_BACKEND = "default/mcp"
MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}
SERVER, CLIENT = 2, 3  # span kinds

# A session-era stdio server (the SDK): `traced` answers with the W3C context its request's _meta carried.
TRACED_STDIO_SERVER = """
import warnings
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

warnings.filterwarnings("ignore")
server = MCPServer("stdio-traced")


@server.tool()
def traced(ctx: Context) -> str:
    meta = ctx.request_context.meta
    found = meta if isinstance(meta, dict) else (meta.model_dump(by_alias=True) if meta is not None else {})
    return str(found.get("traceparent", "none"))


server.run("stdio")
"""


def modern_config(port: int, http_port: int, request_timeout: float | None = None) -> RuntimeConfig:
    backend = pb.Backend(name=MCP_BACKEND, mcp=pb.McpBackend(session_keys=[pb.McpSessionKey(id="k1", key=b"k" * 32)]))
    web = pb.Target(
        name=f"{MCP_BACKEND}/web",
        backend=MCP_BACKEND,
        mcp=pb.McpServer(
            name="web",
            streamable_http=pb.McpHttpTransport(address=pb.SocketAddress(host="127.0.0.1", port=http_port)),
        ),
    )
    local = pb.Target(
        name=f"{MCP_BACKEND}/local",
        backend=MCP_BACKEND,
        mcp=pb.McpServer(
            name="local", stdio=pb.McpStdioTransport(command=sys.executable, args=["-c", TRACED_STDIO_SERVER])
        ),
    )
    rule = route(backends=[(MCP_BACKEND, 1)], request_timeout=request_timeout)
    return compile_resources(listener(port), backend, web, local, rule)


def modern_request(request_id: int, method: str, name: str | None = None, **params: Any) -> tuple[Any, Any]:
    """A 2026-07-28 POST (body, headers) continuing the client's trace."""
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
        "mcp-method": method,
        "traceparent": TRACEPARENT,
    }
    body: dict[str, Any] = {"_meta": META, **params}
    if name is not None:
        headers["mcp-name"] = name
        body["name"] = name
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": body}, headers


def final_result(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("application/json"):
        return response.json()["result"]
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    return events[-1]["result"]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [span for span in spans if span.parent_span_id == parent.span_id]


def server_span(spans: list[ReceivedSpan], **attributes: Any) -> ReceivedSpan:
    (found,) = [s for s in spans if s.kind == SERVER and attributes.items() <= s.attributes.items()]
    return found


@pytest.fixture
async def modern_target() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


async def test_a_sessionless_fan_out_has_a_client_span_and_a_metric_per_target(
    tmp_path: Path, modern_target: int
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with otlp_http_receiver() as receiver:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.HTTP_PROTOBUF), tmp_path / "access.log")
        async with observed_proxy(modern_config(port, modern_target), recorders), httpx.AsyncClient(timeout=30) as http:
            with anyio.fail_after(30):
                body, headers = modern_request(1, "tools/list")
                listed = final_result(await http.post(url, json=body, headers=headers))
                body, headers = modern_request(2, "tools/call", "local__traced", arguments={})
                traced = final_result(await http.post(url, json=body, headers=headers))
                body, headers = modern_request(3, "tools/call", "web__add", arguments={"a": 2, "b": 3})
                added = final_result(await http.post(url, json=body, headers=headers))
            spans = await receiver.wait_for(
                lambda got: len(by_name(got, "tools/list")) >= 2
                and len(by_name(got, "tools/call traced")) == 1
                and len(by_name(got, "tools/call add")) == 1
                and sum(1 for span in got if span.kind == SERVER) >= 3
            )
            lines = await recorders.lines(3)
    assert {"local__traced", "web__add"} <= {tool["name"] for tool in listed["tools"]}
    assert added["content"][0]["text"] == "5"

    # tools/list: one client span per target, children of the request's server span, in the client's trace.
    listing = server_span(spans, **{"mcp.method.name": "tools/list"})
    assert listing.trace_id == CLIENT_TRACE and listing.parent_span_id == CLIENT_SPAN
    fan_out = children(spans, listing)
    assert sorted(span.attributes["agentgate.mcp.target"] for span in fan_out) == ["local", "web"]
    assert all(span.kind == CLIENT and span.name == "tools/list" for span in fan_out)
    transports = {span.attributes["agentgate.mcp.target"]: span.attributes["network.transport"] for span in fan_out}
    assert transports == {"local": "pipe", "web": "tcp"}

    # tools/call to the stdio target: its span's context reached the server in params._meta.
    call = server_span(spans, **{"mcp.method.name": "tools/call", "gen_ai.tool.name": "traced"})
    (upstream,) = children(spans, call)
    assert upstream.name == "tools/call traced" and upstream.attributes["agentgate.mcp.target"] == "local"
    assert traced["content"][0]["text"] == f"00-{CLIENT_TRACE:032x}-{upstream.span_id:016x}-01"
    (add,) = by_name(spans, "tools/call add")
    assert add.attributes["agentgate.mcp.target"] == "web" and add.status_code != 2

    # Metrics by method, target and tool, as the session era records them.
    mcp = "agentgate_mcp_requests_total"
    assert recorders.value(mcp, backend=MCP_BACKEND, method="tools/list", target="web", outcome="ok") == 1
    assert recorders.value(mcp, backend=MCP_BACKEND, method="tools/list", target="local", outcome="ok") == 1
    assert recorders.value(mcp, backend=MCP_BACKEND, method="tools/call", target="local", tool="traced") == 1
    assert recorders.value(mcp, backend=MCP_BACKEND, method="tools/call", target="web", tool="add", outcome="ok") == 1
    assert recorders.value("agentgate_mcp_request_duration_seconds_count", backend=MCP_BACKEND) == 4

    # One access-log line per POST with the MCP method, target and tool.
    assert [line["mcp"] for line in lines] == [
        {"method": "tools/list"},
        {"method": "tools/call", "target": "local", "tool": "traced"},
        {"method": "tools/call", "target": "web", "tool": "add"},
    ]
    assert all(line["trace_id"] == f"{CLIENT_TRACE:032x}" and line["status"] == 200 for line in lines)


@pytest.fixture
async def slow_target() -> AsyncIterator[tuple[Recorder, int]]:
    released = anyio.Event()
    recorder = Recorder(build_app(tool_server(released), "streamable"))
    async with serve(recorder) as port:
        try:
            yield recorder, port
        finally:
            released.set()


async def test_a_sessionless_call_that_times_out_ends_its_upstream_call_before_the_client_hears(
    tmp_path: Path, slow_target: tuple[Recorder, int]
) -> None:
    _, http_port = slow_target
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    mcp = "agentgate_mcp_requests_total"
    async with otlp_http_receiver() as receiver:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.HTTP_PROTOBUF), tmp_path / "access.log")
        config = modern_config(port, http_port, request_timeout=1.0)
        async with observed_proxy(config, recorders), httpx.AsyncClient(timeout=30) as http:
            with anyio.fail_after(30):
                body, headers = modern_request(1, "tools/call", "web__slow", arguments={})
                answer = await http.post(url, json=body, headers=headers)
                assert answer.json()["error"]["code"] == -32001
                assert recorders.value(mcp, method="tools/call", target="web", tool="slow", outcome="error") == 1
            spans = await receiver.wait_for(lambda got: len(by_name(got, "tools/call slow")) == 1)
    (slow,) = by_name(spans, "tools/call slow")
    assert slow.attributes["agentgate.reason"] == "timeout" and slow.status_code == 2


async def test_an_expired_mcp_request_ends_its_upstream_attempt_at_expiry_not_at_session_close(
    tmp_path: Path, slow_target: tuple[Recorder, int]
) -> None:
    recorder, http_port = slow_target
    port = free_port()
    config = resilience_config(port, http_port, pb.Resilience(request_timeout=seconds(0.5)))
    mcp = "agentgate_mcp_requests_total"
    async with otlp_http_receiver() as receiver:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.HTTP_PROTOBUF), tmp_path / "access.log")
        async with observed_proxy(config, recorders) as server:
            with anyio.fail_after(30):
                async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
                    with pytest.raises(MCPError) as raised:
                        await client.call_tool("slow", {})
                    assert raised.value.code == -32001
                    # Counted when the request expired (before its -32001 went out), the session still open.
                    assert len(server._handler.mcp.sessions) == 1
                    assert recorders.value(mcp, method="tools/call", target="web", tool="slow", outcome="error") == 1
                    spans = await receiver.wait_for(lambda got: len(by_name(got, "tools/call slow")) == 1)
                    assert len(server._handler.mcp.sessions) == 1  # the span did not wait for the session's end
                    await recorder.wait_for("notifications/cancelled")
    (attempt,) = by_name(spans, "tools/call slow")
    assert attempt.kind == CLIENT and attempt.attributes["agentgate.reason"] == "timeout"
    assert attempt.status_code == 2 and attempt.attributes["agentgate.mcp.target"] == "web"
    # Ended once: closing the session later added no second sample.
    assert recorders.value(mcp, method="tools/call", target="web", tool="slow") == 1


async def test_a2a_calls_have_spans_metrics_and_access_records(tmp_path: Path) -> None:
    port = free_port()
    async with otlp_http_receiver() as receiver, serve_agent("planner") as agent:
        recorders = Recorders(tracing(receiver.endpoint, Protocol.HTTP_PROTOBUF), tmp_path / "access.log")
        config = gateway_config(port, [("planner", agent.port, "")])
        url = f"http://127.0.0.1:{port}/agents/planner/"
        version = {"a2a-version": "1.0"}
        async with observed_proxy(config, recorders), httpx.AsyncClient(timeout=30) as http:
            with anyio.fail_after(30):
                sent = await http.post(url, json=rpc("SendMessage", send_params("hi")), headers=version | {
                    "traceparent": TRACEPARENT
                })  # fmt: skip
                task = sent.json()["result"]["task"]
                got = await http.get(f"{url}tasks/{task['id']}", headers=version)
            spans = await receiver.wait_for(lambda found: sum(1 for s in found if s.kind == CLIENT) >= 2)
            lines = await recorders.lines(2)
    assert sent.status_code == 200 and got.status_code == 200, (sent.text, got.text)
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"

    # Spans: the server span names the method and the task the agent created; a client span per call.
    send = server_span(spans, **{"a2a.method.name": "SendMessage"})
    assert send.trace_id == CLIENT_TRACE and send.parent_span_id == CLIENT_SPAN
    assert send.attributes["a2a.task.id"] == task["id"] and send.attributes["gen_ai.agent.name"] == "planner"
    (invoke,) = children(spans, send)
    assert invoke.kind == CLIENT and invoke.name == "invoke_agent planner"
    assert invoke.attributes["a2a.method.name"] == "SendMessage" and invoke.attributes["agentgate.backend"] == (
        "default/planner"
    )
    assert agent.recorder.values("traceparent", 0) == [f"00-{CLIENT_TRACE:032x}-{invoke.span_id:016x}-01"]
    get = server_span(spans, **{"a2a.method.name": "GetTask"})
    (get_call,) = children(spans, get)
    assert get_call.attributes["a2a.task.id"] == task["id"] and get.attributes["a2a.task.id"] == task["id"]

    # Metrics by agent and operation.
    a2a = "agentgate_a2a_requests_total"
    labels = {"backend": "default/planner", "agent": "planner", "outcome": "ok"}
    assert recorders.value(a2a, operation="SendMessage", **labels) == 1
    assert recorders.value(a2a, operation="GetTask", **labels) == 1
    assert recorders.value("agentgate_a2a_request_duration_seconds_count", backend="default/planner") == 2

    # Access records: method, task, context and state.
    assert lines[0]["a2a"] == {
        "method": "SendMessage", "task": task["id"], "context": task["contextId"], "state": "completed",
    }  # fmt: skip
    assert lines[1]["a2a"]["method"] == "GetTask" and lines[1]["a2a"]["task"] == task["id"]
    assert [line["backend"] for line in lines] == ["default/planner"] * 2
    assert lines[0]["trace_id"] == f"{CLIENT_TRACE:032x}"
