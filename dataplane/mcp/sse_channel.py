"""A `TargetChannel` over the legacy MCP HTTP+SSE transport (2024-11-05).

The client GETs the target's path for an event stream whose first `endpoint` event names the URL
to POST messages to (basic/transports, "HTTP with SSE"). Every message is one POST there (202);
responses, notifications and server-to-client requests all arrive as `message` events on the one
stream. The stream is opened by the first `send`, so building a channel costs nothing.

The endpoint is resolved against the target's URL and must stay on the target's scheme, host and
port: a server must not be able to point the gateway at another host (that would let one target
make the gateway POST client traffic anywhere). The transport has no session the gateway could
resume elsewhere, so `session_id` is None and a channel lives and dies with its stream: when the
stream ends, `receive` raises TargetClosed once the queued messages are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Final
from urllib.parse import urljoin, urlsplit

import anyio

from dataplane.config.model import DEFAULT_MCP_MAX_BODY_BYTES, McpHttpTarget, UpstreamCluster
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.http_channel import (
    DEFAULT_RESPONSE_TIMEOUT,
    SESSION_EXPIRED,
    McpHttpUpstream,
    media_type,
)
from dataplane.mcp.sse import SseEvent, SseParser
from shared.logging import get_logger

log = get_logger("dataplane.mcp.sse")

_ACCEPT_SSE: Final = (b"accept", b"text/event-stream")
_CONTENT_JSON: Final = (b"content-type", b"application/json")
_ACCEPT_JSON: Final = (b"accept", b"application/json, text/event-stream")


def resolve_endpoint(target: McpHttpTarget, endpoint: str) -> str:
    """The request target (path and query) to POST to; ValueError if it leaves the target's origin."""
    scheme = "https" if target.ssl_context is not None else "http"
    base = f"{scheme}://{target.authority}{target.path or '/'}"
    resolved = urlsplit(urljoin(base, endpoint.strip()))
    origin = urlsplit(base)
    if (resolved.scheme, resolved.hostname, resolved.port or None) != (
        origin.scheme,
        origin.hostname,
        origin.port or None,
    ):
        raise ValueError(f"endpoint {endpoint!r} is not on {scheme}://{target.authority}")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in resolved.path + resolved.query):
        raise ValueError(f"endpoint {endpoint!r} is not a valid request target")
    path = resolved.path or "/"
    return f"{path}?{resolved.query}" if resolved.query else path


class LegacySseChannel:
    """One conversation with a 2024-11-05 HTTP+SSE MCP server."""

    def __init__(
        self,
        target: McpHttpTarget,
        backend: UpstreamCluster,
        *,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        max_message_bytes: int = DEFAULT_MCP_MAX_BODY_BYTES,
        limits: ProxyLimits = DEFAULT_LIMITS,
    ) -> None:
        self._up = McpHttpUpstream(
            target, backend, response_timeout=response_timeout, max_message_bytes=max_message_bytes, limits=limits
        )
        self._endpoint: str | None = None
        self._connecting = asyncio.Lock()
        self._closing = False

    @property
    def target(self) -> str:
        return self._up.target.name

    @property
    def session_id(self) -> str | None:
        return None

    @property
    def endpoint(self) -> str | None:
        """Where messages are POSTed, once the stream named it."""
        return self._endpoint

    async def _connect(self) -> str:
        async with self._connecting:
            if self._endpoint is not None:
                return self._endpoint
            up = self._up
            exchange = await up.request(b"GET", up.target.path or "/", [_ACCEPT_SSE])
            head = await exchange.response()
            if head.status == 404:
                await up.drain(exchange)
                raise up.unavailable("no event stream at the target's path (404)")
            if not 200 <= head.status < 300 or media_type(head) != "text/event-stream":
                await up.drain(exchange)
                raise up.unavailable(f"event stream GET answered {head.status} ({media_type(head) or 'no type'})")
            events = up.events(exchange, SseParser(up.max_message_bytes), None)
            try:
                with anyio.fail_after(up.response_timeout):
                    endpoint = await self._first_endpoint(events)
                path = resolve_endpoint(up.target, endpoint)
            except TimeoutError:
                await events.aclose()
                raise up.unavailable(f"no endpoint event within {up.response_timeout:g}s") from None
            except ValueError as exc:
                await events.aclose()
                raise up.unavailable(f"refused endpoint: {exc}") from None
            except BaseException:
                await events.aclose()
                raise
            self._endpoint = path
            up.spawn(lambda: self._read_stream(events))
            return path

    async def _first_endpoint(self, events: AsyncGenerator[SseEvent, None]) -> str:
        async for event in events:
            if event.event == "endpoint":
                return event.data
            # The spec puts the endpoint first; a message before it has nobody to answer yet.
            if event.event == "message" and event.data:
                await self._deliver(event.data)
        raise self._up.unavailable("event stream ended before the endpoint event")

    async def _deliver(self, data: str) -> None:
        await self._up.deliver(self._up.parse_message(data))

    async def _read_stream(self, events: AsyncGenerator[SseEvent, None]) -> None:
        up = self._up
        reason = "the target closed its event stream"
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.event == "message" and event.data:
                        await self._deliver(event.data)
        except TargetUnavailable as exc:
            reason = str(exc)
            log.info("MCP SSE stream failed", target=self.target, reason=reason)
        up.end(reason)

    async def send(self, message: JSON) -> None:
        up = self._up
        if self._closing or up.closed_reason is not None:
            raise TargetClosed(up.closed_reason or "channel closed")
        body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(body) > up.max_message_bytes:
            raise up.unavailable(f"message larger than {up.max_message_bytes} bytes")
        endpoint = self._endpoint or await self._connect()
        exchange = await up.request(b"POST", endpoint, [_ACCEPT_JSON, _CONTENT_JSON], body)
        head = await exchange.response()
        await up.drain(exchange)
        status = head.status
        if status == 404:
            up.end(SESSION_EXPIRED)
            raise TargetClosed(SESSION_EXPIRED)
        if not 200 <= status < 300:
            raise up.unavailable(f"message POST answered {status}")

    async def receive(self) -> JSON:
        return await self._up.receive()

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        up = self._up
        await up.stop_tasks()
        up.end("channel closed")
        up.close_pool()
