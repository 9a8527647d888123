"""The MCP reference server `@modelcontextprotocol/server-everything` (TypeScript SDK), run for tests.

``everything("sse" | "streamableHttp")`` starts it as a child process on 127.0.0.1 and yields once it
listens: the loopback preload (tests/peers/node/loopback.cjs) binds every server socket to 127.0.0.1
and prints ``{"event": "listening", "port": N}`` when the socket listens, so the port is the kernel's
pick (``PORT=0``, free by construction) and readiness is an awaited log line, not a sleep. The trace
preload (trace.mjs) logs each JSON-RPC message the server receives as ``{"event": "mcp message
received", ...}``, so a test can assert what reached the upstream. The stdio mode is spawned by
whoever speaks to it over stdin/stdout (the gateway's stdio target): ``everything_command("stdio")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tests.peers.node_client import NODE_PROJECT, require_node
from tests.peers.process import LoggedProcess, event, logged_process

Transport = Literal["stdio", "sse", "streamableHttp"]
NetworkTransport = Literal["sse", "streamableHttp"]

SERVER_SCRIPT = NODE_PROJECT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
LOOPBACK_PRELOAD = NODE_PROJECT / "loopback.cjs"
TRACE_PRELOAD = NODE_PROJECT / "trace.mjs"
# The path each network transport serves: the SSE stream (legacy HTTP+SSE) or the MCP endpoint.
ENDPOINT_PATHS: dict[NetworkTransport, str] = {"sse": "/sse", "streamableHttp": "/mcp"}
RECEIVED = "mcp message received"


def everything_command(transport: Transport, *, trace: bool = False) -> list[str]:
    """The command line running server-everything over ``transport``, bound to loopback."""
    command = [str(require_node()), "--require", str(LOOPBACK_PRELOAD)]
    if trace:
        command += ["--import", TRACE_PRELOAD.as_uri()]
    return [*command, str(SERVER_SCRIPT), transport]


@dataclass(frozen=True)
class Everything:
    """A running server-everything: where it listens and its log (listening line, received messages)."""

    transport: NetworkTransport
    port: int
    process: LoggedProcess

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.transport]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def wait_received(
        self, method: str, *, start: int = 0, within: float = 10.0, **params: Any
    ) -> dict[str, Any]:
        """Wait (bounded) until the server received ``method`` whose params include ``params``."""

        def match(line: dict[str, Any]) -> bool:
            got = line.get("params") or {}
            return event(RECEIVED, method=method)(line) and all(got.get(k) == v for k, v in params.items())

        return await self.process.wait_for(match, start=start, within=within)


@asynccontextmanager
async def everything(
    transport: NetworkTransport, *, name: str | None = None, within: float = 20.0
) -> AsyncIterator[Everything]:
    """Run server-everything over ``transport`` on a free 127.0.0.1 port until the block ends (SIGTERM)."""
    label = name or f"everything-{transport}"
    async with logged_process(label, everything_command(transport, trace=True), env={"PORT": "0"}) as process:
        listening = await process.wait_for("listening", within=within)
        assert listening["host"] == "127.0.0.1", listening
        yield Everything(transport, int(listening["port"]), process)


__all__ = [
    "ENDPOINT_PATHS",
    "SERVER_SCRIPT",
    "Everything",
    "NetworkTransport",
    "Transport",
    "everything",
    "everything_command",
]
