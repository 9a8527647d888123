"""A deliberately misbehaving streamable-HTTP MCP endpoint (raw ASGI), one behaviour per path.

- `/garbage`: a request gets 200 application/json that is not JSON.
- `/garbage-sse`: a request gets an SSE event whose data is not JSON.
- `/error`: every POST gets 503.
- `/hang`: a POST gets no response head until the test releases `FaultyPeer.release`.
- `/resume`: a request's SSE stream sends a priming event (id e1) and a progress notification
  (id e2), then ends without the response; a GET with Last-Event-ID e2 replays the response
  (id e3). The Last-Event-ID values seen are recorded.
- `/cut`: a request's SSE stream sends one notification without an id and ends.
- `/big`: a request's SSE stream sends one event larger than any sane bound.
- `/listen`: the first GET without Last-Event-ID is a standalone stream carrying one
  tools/list_changed notification; later ones get 405.
Every path answers initialize with a JSON result and `Mcp-Session-Id: s-1`, notifications with
202, DELETE with 200, and a GET without Last-Event-ID with 405.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send


@dataclass
class FaultyPeer:
    last_event_ids: list[str] = field(default_factory=list)
    deletes: int = 0
    listened: bool = False
    release: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"] + ".complete"
                await send({"type": kind})
                if message["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        method = scope["method"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if method == "DELETE":
            self.deletes += 1
            await _plain(send, 200, b"")
            return
        if method == "GET":
            last = headers.get("last-event-id")
            if last is None:
                if path == "/listen" and not self.listened:
                    self.listened = True
                    await _sse(send, [b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n'])
                else:
                    await _plain(send, 405, b"")
                return
            self.last_event_ids.append(last)
            await _sse(send, [b'id: e3\ndata: {"jsonrpc":"2.0","id":7,"result":{"resumed":true}}\n\n'])
            return
        request: dict[str, Any] = json.loads(body)
        if "id" not in request or "method" not in request:
            await _plain(send, 202, b"")
            return
        if request["method"] == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "faulty"}}
            payload = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode()
            await _plain(send, 200, payload, b"application/json", [(b"mcp-session-id", b"s-1")])
            return
        if path == "/garbage":
            await _plain(send, 200, b"<html>not json", b"application/json")
        elif path == "/garbage-sse":
            await _sse(send, [b"data: {oops\n\n"])
        elif path == "/error":
            await _plain(send, 503, b"overloaded", b"text/plain")
        elif path == "/hang":
            await self.release.wait()
            await _plain(send, 503, b"", b"text/plain")
        elif path == "/resume":
            progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
            await _sse(
                send, [b"id: e1\nretry: 0\ndata:\n\n", b"id: e2\ndata: " + json.dumps(progress).encode() + b"\n\n"]
            )
        elif path == "/cut":
            await _sse(send, [b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'])
        elif path == "/big":
            await _sse(send, [b"data: " + b"x" * 200_000 + b"\n\n"])
        elif path == "/listen":
            await _plain(send, 200, b'{"jsonrpc":"2.0","id":%d,"result":{}}' % request["id"], b"application/json")
        else:
            await _plain(send, 404, b"")


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-length", b"%d" % len(body)), *(extra or [])]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _sse(send: Send, events: list[bytes]) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class FaultyLegacyPeer:
    """A 2024-11-05 HTTP+SSE endpoint at `/sse` whose misbehaviour is chosen by `mode`:

    - "foreign": the endpoint event names another host.
    - "silent": the stream sends no endpoint event until `release` is set.
    - "garbage": each POSTed request is answered on the stream with data that is not JSON.
    - "gone": POSTs get 404 (the server forgot the session).
    - "short": the stream ends once the first POST was accepted.
    """

    mode: str
    release: anyio.Event = field(default_factory=anyio.Event)
    posts: int = 0

    def __post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[bytes](16)

    def stop(self) -> None:
        """End every open event stream (so the server shuts down without waiting for them)."""
        self.release.set()
        self._send.close()
        self._receive.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["method"] == "GET":
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if self.mode == "silent":
                await self.release.wait()
            endpoint = b"http://192.0.2.1:9/messages" if self.mode == "foreign" else b"/messages?session=1"
            await send(
                {
                    "type": "http.response.body",
                    "body": b"event: endpoint\ndata: " + endpoint + b"\n\n",
                    "more_body": True,
                }
            )
            with anyio.move_on_after(30), contextlib.suppress(anyio.ClosedResourceError):
                async for chunk in self._receive:
                    if not chunk:
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        while (await receive()).get("more_body"):
            pass
        self.posts += 1
        if self.mode == "gone":
            await _plain(send, 404, b"Could not find session", b"text/plain")
            return
        await _plain(send, 202, b"Accepted", b"text/plain")
        if self.mode == "garbage":
            await self._send.send(b"event: message\ndata: {not json\n\n")
        elif self.mode == "short":
            await self._send.send(b"")
