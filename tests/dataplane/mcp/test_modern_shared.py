"""A 2026-07-28 client in front of session-era HTTP targets (streamable HTTP, legacy SSE) through shared sessions."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import ElicitResult
from starlette.types import ASGIApp, Receive, Scope, Send

from dataplane.config.model import RuntimeConfig
from dataplane.mcp.modern import ModernEndpoint
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

KEY = pb.McpSessionKey(id="k1", key=b"k" * 32)


class SessionEraOnly:
    """An SDK app made to behave like a session-era-only server (npm server-everything and the like): a
    2026-07-28 POST gets the 400 a server without that session gives. ``forget`` makes a session id 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.forgotten: set[bytes] = set()
        self.sessions: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        session = headers.get(b"mcp-session-id")
        if headers.get(b"mcp-protocol-version") == b"2026-07-28" or session in self.forgotten:
            status = 404 if session in self.forgotten else 400
            body = json.dumps(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": "Bad Request: no valid session"}}
            ).encode()
            head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        if session is not None and session not in self.sessions:
            self.sessions.append(session)
        await self.app(scope, receive, send)


def mcp_config(port: int, http_port: int, sse_port: int) -> RuntimeConfig:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    address = pb.SocketAddress(host="127.0.0.1", port=http_port)
    old = pb.Target(
        name="default/mcp/old",
        backend="default/mcp",
        mcp=pb.McpServer(name="old", streamable_http=pb.McpHttpTransport(address=address)),
    )
    sse_address = pb.SocketAddress(host="127.0.0.1", port=sse_port)
    sse = pb.Target(
        name="default/mcp/sse",
        backend="default/mcp",
        mcp=pb.McpServer(name="sse", sse=pb.McpHttpTransport(address=sse_address)),
    )
    return compile_resources(listener(port), backend, old, sse, route(backends=[("default/mcp", 1)]))


async def test_session_era_http_targets_behind_a_2026_client() -> None:
    port = free_port()
    old = SessionEraOnly(build_app(build_server(), "streamable"))
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def elicit(context: Any, params: Any) -> ElicitResult:
        return ElicitResult(action="accept", content={"text": params.message.upper()})

    async with (
        serve(old) as http_port,
        serve(build_app(build_server(), "sse")) as sse_port,
        running_proxy(mcp_config(port, http_port, sse_port)) as server,
    ):
        with anyio.fail_after(60):
            async with Client(f"http://127.0.0.1:{port}/mcp", elicitation_callback=elicit) as client:
                assert client.session.protocol_version == "2026-07-28"
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"old__add", "old__ask", "sse__add", "sse__count"} <= tools
                assert (await client.call_tool("old__add", {"a": 1, "b": 2})).content[0].text == "3"
                assert (await client.call_tool("sse__add", {"a": 2, "b": 2})).content[0].text == "4"
                counted = await client.call_tool("old__count", {"n": 2}, progress_callback=on_progress)
                assert counted.content[0].text == "counted 2" and progress == [1, 2]
                # The elicitation rides the target's POST stream of a shared session; the client answers it
                # through input_required.
                answered = await client.call_tool("old__ask", {"question": "colour?"})
                assert answered.content[0].text == "answer: COLOUR?"
                answered = await client.call_tool("sse__ask", {"question": "size?"})
                assert answered.content[0].text == "answer: SIZE?"

                endpoint = server._handler.mcp.modern
                assert isinstance(endpoint, ModernEndpoint)
                shared = endpoint._backends["default/mcp"].targets["old"].shared
                assert shared is not None and shared.connected
                assert len(old.sessions) == 1
                # The upstream forgets the session (expiry): the next call re-initializes and goes through.
                old.forgotten.add(old.sessions[0])
                assert (await client.call_tool("old__add", {"a": 5, "b": 5})).content[0].text == "10"
                assert len(old.sessions) == 2 and shared.connected
