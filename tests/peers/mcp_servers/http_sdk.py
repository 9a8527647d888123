"""An MCP server built with the official SDK, served over streamable HTTP or legacy SSE on 127.0.0.1.

It runs in-process on the test's event loop: the listening socket is bound and listening before
uvicorn starts, so a client can connect at once (the kernel queues the connection) and nothing
waits for a readiness signal. Tools: `add` (plain), `count` (progress notifications), `ask`
(an elicitation round trip through the client), `crash` (a tool error).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel
from starlette.types import ASGIApp

Transport = Literal["streamable", "streamable-json", "sse"]


class Answer(BaseModel):
    text: str


def build_server() -> MCPServer:
    server = MCPServer("http-sdk-peer", instructions="A test peer.")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def count(n: int, ctx: Context) -> str:
        """Report progress n times, then answer."""
        for i in range(1, n + 1):
            await ctx.report_progress(i, n, f"step {i}")
        return f"counted {n}"

    @server.tool()
    async def ask(question: str, ctx: Context) -> str:
        """Ask the client (elicitation) and echo its answer."""
        result = await ctx.elicit(question, Answer)
        if result.action == "accept" and result.data is not None:
            return f"answer: {result.data.text}"
        return f"no answer ({result.action})"

    return server


def build_app(server: MCPServer, transport: Transport) -> ASGIApp:
    if transport == "sse":
        return server.sse_app()
    return server.streamable_http_app(json_response=transport == "streamable-json")


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[int]:
    """Serve `app` on a fresh 127.0.0.1 port (yielded) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    # Leave the test runner's signal handlers alone.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [sock])
            try:
                yield port
            finally:
                server.should_exit = True
    finally:
        sock.close()
