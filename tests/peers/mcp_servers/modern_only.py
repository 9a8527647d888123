"""An MCP server that speaks 2026-07-28 only, built with the official SDK, for in-process tests.

The SDK has no modern-only switch: its streamable-HTTP manager serves both eras on one endpoint and
routes by the MCP-Protocol-Version header (absent or a handshake-era version -> the session-era
transport). So the narrowest faithful modern-only server is the SDK's own app behind a guard that
refuses everything the 2026-07-28 "Backward Compatibility" section says such a server refuses:

- GET and DELETE -> 405 (no standalone stream, no sessions);
- a POST without MCP-Protocol-Version, or naming a handshake-era version (an `initialize` from a
  session-era client) -> 400 with UnsupportedProtocolVersion (-32022) whose `data.supported` names
  the modern versions only (versioning.mdx: a modern-only server SHOULD name its versions in any
  error to `initialize`).

Everything else is the SDK's modern entry: `server/discover`, per-request `_meta`, Mcp-Method /
Mcp-Name validation, `input_required` results with sealed `requestState`, `subscriptions/listen`.

Tools: `add`, `count` (progress), `ask` (an elicitation through `input_required`, asked again while
the answer is empty), `wait` (blocks until cancelled; `cancelled` is set when the SDK cancels it,
i.e. when its response stream closed), `where` (an `x-mcp-header` argument, so the server insists
on the Mcp-Param-Region header), `touch` (publishes tools list_changed and resources/updated for
`note://a` to listen streams). One resource: `note://a`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ElicitRequest, ElicitRequestFormParams, InputRequiredResult
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.peers.mcp_servers.http_sdk import serve

__all__ = ["ModernPeer", "build_modern_app", "serve"]

_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


class ModernPeer:
    """The server plus the events its tools expose to the test."""

    def __init__(self) -> None:
        self.wait_started = anyio.Event()
        self.cancelled = anyio.Event()
        self.server = self._build()

    def _build(self) -> MCPServer:
        server = MCPServer("modern-peer", instructions="A 2026-07-28-only peer.", version="1.0")
        peer = self

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
        async def ask(question: str, ctx: Context) -> str | InputRequiredResult:
            """Ask the client for a text (multi round-trip), twice if the first answer is empty."""
            answer = (ctx.input_responses or {}).get("text")
            content = getattr(answer, "content", None) or {}
            text = content.get("text") if isinstance(content, dict) else None
            if isinstance(text, str) and text:
                return f"answer: {text} (state {ctx.request_state})"
            request = ElicitRequest(
                params=ElicitRequestFormParams(message=question, requested_schema=_SCHEMA)  # type: ignore[arg-type]
            )
            round_no = 1 if ctx.request_state is None else int(ctx.request_state.rsplit("-", 1)[-1]) + 1
            return InputRequiredResult(input_requests={"text": request}, request_state=f"round-{round_no}")

        @server.tool()
        async def wait() -> str:
            """Block until cancelled (the test closes the response stream)."""
            peer.wait_started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                peer.cancelled.set()
                raise
            return "unreachable"

        @server.tool()
        def where(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
            """Echo the region, which travels as the Mcp-Param-Region header too."""
            return f"region {region}"

        @server.tool()
        async def touch(ctx: Context) -> str:
            """Tell listen streams that the tools and note://a changed."""
            await ctx.notify_tools_changed()
            await ctx.notify_resource_updated("note://a")
            return "touched"

        @server.resource("note://a")
        def note() -> str:
            """A note."""
            return "note a"

        return server


def build_modern_app(peer: ModernPeer) -> ASGIApp:
    """The SDK's streamable-HTTP app behind the modern-only guard (see the module docstring)."""
    app = peer.server.streamable_http_app()
    return _ModernOnlyGuard(app)


class _ModernOnlyGuard:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        method = scope["method"]
        if method in ("GET", "DELETE"):
            await _respond(send, 405, None, [(b"allow", b"POST")])
            return
        version = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"mcp-protocol-version"), None)
        if method == "POST" and (version is None or version in HANDSHAKE_PROTOCOL_VERSIONS):
            body = await _read_body(receive)
            request_id, requested = _id_and_requested(body, version)
            error = {
                "code": -32022,
                "message": f"Unsupported protocol version: this server speaks {', '.join(MODERN_PROTOCOL_VERSIONS)}",
                "data": {"supported": list(MODERN_PROTOCOL_VERSIONS), "requested": requested},
            }
            await _respond(send, 400, {"jsonrpc": "2.0", "id": request_id, "error": error}, [])
            return
        await self._app(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _id_and_requested(body: bytes, header: str | None) -> tuple[Any, str]:
    try:
        message = json.loads(body)
    except ValueError:
        return None, header or ""
    if not isinstance(message, dict):
        return None, header or ""
    params = message.get("params")
    asked = params.get("protocolVersion") if isinstance(params, dict) else None
    requested = header or (asked if isinstance(asked, str) else "")
    request_id = message.get("id")
    return (request_id if isinstance(request_id, str | int) else None), requested


async def _respond(send: Send, status: int, body: dict[str, Any] | None, headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    all_headers = [*headers, (b"content-length", b"%d" % len(data))]
    if body is not None:
        all_headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": data})
