"""The downstream MCP endpoint: streamable HTTP, session era (2025-03-26 to 2025-11-25).

The HTTP shell around ``McpSessions``: it checks the request (method, Origin, Accept,
Content-Type, body size, session and protocol-version headers), hands the one JSON-RPC message
to the session, and answers 202 (notifications, responses), a JSON body (a request whose final
response comes first) or an SSE stream (a request that gets notifications or server-to-client
requests before its response). GET opens the standalone stream, DELETE ends the session. A
request waits at most ``request_timeout``; the GET stream lasts until the session closes (DELETE,
idle expiry) or the client goes.

Origin: absent, on the backend's allowed origins, or (none configured) the same host as the
request's authority: DNS-rebinding protection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from dataplane.config.model import UpstreamCluster
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink
from dataplane.mcp.headers import (
    META_PROTOCOL_VERSION,
    MODERN_PROTOCOL_VERSIONS,
    HeaderError,
    OriginAllowList,
    check_accept_get,
    check_accept_post,
    check_content_type,
    check_origin,
    check_protocol_version,
)
from dataplane.mcp.jsonrpc import (
    ErrorCode,
    InvalidMessage,
    Message,
    Request,
    encode,
    error_response,
    parse_message,
)
from dataplane.mcp.sessions import FederatedSession, McpSessions, SessionNotFound
from shared.logging import get_logger

log = get_logger("dataplane.mcp.endpoint")

# The longest a client request waits for its final response (the targets' own timeouts are shorter).
DEFAULT_REQUEST_TIMEOUT = 300.0
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")
_NO_CACHE = (b"cache-control", b"no-cache")
# Messages held back while an initialize waits for its result (and its session id).
_MAX_HELD = 64
# Session-era protocol versions this endpoint accepts in MCP-Protocol-Version.
_SESSION_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _same_host_origins(authority: bytes) -> OriginAllowList:
    host = authority.decode("latin-1")
    return OriginAllowList.compile([f"http://{host}", f"https://{host}"])


class _Reject(Exception):
    """An answer before any JSON-RPC work: HTTP status, plain or JSON-RPC body."""

    def __init__(
        self, status: int, message: str, body: dict[str, Any] | None = None, extra: Headers | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body
        self.extra: Headers = extra or []

    @classmethod
    def of(cls, error: HeaderError) -> _Reject:
        return cls(error.status, error.message, error.to_jsonrpc())


class ModernExchange(Protocol):
    """Serves one sessionless (2026-07-28) POST whose body is already parsed and valid JSON-RPC."""

    async def post(
        self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster, message: Message
    ) -> None: ...

    async def aclose(self) -> None: ...


def _is_modern(headers: Headers, message: Message) -> bool:
    """A 2026-07-28 request: its header says so, or (header missing) its `_meta` does without a session."""
    version = _header(headers, b"mcp-protocol-version")
    if version is not None:
        return version in MODERN_PROTOCOL_VERSIONS
    if _header(headers, b"mcp-session-id") is not None:
        return False
    params = getattr(message, "params", None)
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and META_PROTOCOL_VERSION in meta


class McpEndpoint:
    """Serves the MCP backends of one worker; one instance per ProxyHandler."""

    def __init__(
        self,
        sessions: McpSessions | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        modern: ModernExchange | None = None,
    ) -> None:
        self.sessions = sessions if sessions is not None else McpSessions()
        self.request_timeout = request_timeout
        self.modern = modern

    async def aclose(self) -> None:
        if self.modern is not None:
            await self.modern.aclose()
        await self.sessions.aclose()

    async def handle(self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster) -> None:
        """Answer one HTTP request for the MCP backend ``cluster``."""
        try:
            origin = _header(request.headers, b"origin")
            if origin is not None:
                allowed = cluster.mcp.allowed_origins if cluster.mcp is not None else None
                refused = check_origin(origin, allowed or _same_host_origins(request.authority))
                if refused is not None:
                    raise _Reject.of(refused)
            if request.method == b"POST":
                await self._post(request, sink, cluster)
            elif request.method == b"GET":
                await self._get(request, sink, cluster)
            elif request.method == b"DELETE":
                await self._delete(request, sink, cluster)
            else:
                allow = [(b"allow", b"GET, POST, DELETE")]
                raise _Reject(405, "Method Not Allowed: the MCP endpoint takes GET, POST and DELETE", extra=allow)
        except _Reject as reject:
            await _send_reject(sink, reject)

    # --- POST ----------------------------------------------------------------------------------
    async def _post(self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster) -> None:
        settings = cluster.mcp
        assert settings is not None
        refused = check_accept_post(_header(request.headers, b"accept")) or check_content_type(
            _header(request.headers, b"content-type")
        )
        if refused is not None:
            raise _Reject.of(refused)
        body = await _read_body(request, settings.max_body_bytes)
        parsed = parse_message(body)
        if isinstance(parsed, InvalidMessage):
            await _send_json(sink, 400, parsed.to_response())
            return
        if self.modern is not None and _is_modern(request.headers, parsed):
            await self.modern.post(request, sink, cluster, parsed)
            return
        message: dict[str, Any] = parsed.raw
        token = _header(request.headers, b"mcp-session-id")
        if isinstance(parsed, Request) and parsed.method == "initialize":
            if token is not None:
                refusal = error_response(
                    parsed.id, ErrorCode.INVALID_REQUEST, "initialize must not carry Mcp-Session-Id"
                )
                await _send_json(sink, 400, refusal)
                return
            await self._initialize(sink, cluster, parsed, message)
            return
        version = check_protocol_version(_header(request.headers, b"mcp-protocol-version"), _SESSION_VERSIONS)
        if isinstance(version, HeaderError):
            raise _Reject.of(version)
        session = await self._session(cluster, token)
        if not isinstance(parsed, Request):
            await session.submit(message)
            await sink.start(202, [(b"content-length", b"0")], 0, b"", True)
            return
        await self._exchange(sink, session, parsed, message)

    async def _session(self, cluster: UpstreamCluster, token: str | None) -> FederatedSession:
        if token is None:
            message = "Bad Request: Mcp-Session-Id header is required"
            raise _Reject(400, message, error_response(None, ErrorCode.INVALID_REQUEST, message))
        try:
            return await self.sessions.find(cluster, token)
        except SessionNotFound as exc:
            log.debug("mcp_session_not_found", backend=cluster.name, reason=str(exc))
            message = "Not Found: session unknown or expired"
            raise _Reject(404, message, error_response(None, ErrorCode.INVALID_REQUEST, message)) from None

    async def _initialize(
        self, sink: ResponseSink, cluster: UpstreamCluster, parsed: Request, message: dict[str, Any]
    ) -> None:
        session = await self.sessions.create(cluster)
        issued: list[bytes] = []

        def on_final(response: dict[str, Any]) -> Headers:
            result = response.get("result")
            if not isinstance(result, dict):
                return []
            version = result.get("protocolVersion")
            token = self.sessions.issue(session, version if isinstance(version, str) else _SESSION_VERSIONS[-1])
            issued.append(token.encode("ascii"))
            return [(b"mcp-session-id", issued[0])]

        try:
            await self._exchange(sink, session, parsed, message, on_final)
        finally:
            if not issued:
                await session.aclose()

    async def _exchange(
        self,
        sink: ResponseSink,
        session: FederatedSession,
        parsed: Request,
        message: dict[str, Any],
        issue: Callable[[dict[str, Any]], Headers] | None = None,
    ) -> None:
        """Submit one request; answer with JSON if the response comes first, else stream SSE events.

        With ``issue`` (initialize), the head waits for the final response, since the session id it
        carries only exists once the targets answered; earlier messages are held back until then.
        """
        params = parsed.params if isinstance(parsed.params, dict) else {}
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        stream = session.open_request(parsed.id, token)
        streaming = False
        answered = False
        held: list[dict[str, Any]] = []
        try:
            with anyio.move_on_after(self.request_timeout):
                await session.submit(message)
                async for item in stream:
                    final = "method" not in item and item.get("id") == parsed.id
                    if not final and issue is not None:
                        if len(held) < _MAX_HELD:
                            held.append(item)
                        continue
                    answered = final
                    if final and not streaming and not held:
                        await _send_json(sink, 200, item, issue(item) if issue is not None else None)
                        return
                    if not streaming:
                        streaming = True
                        headers = issue(item) if issue is not None else []
                        await sink.start(200, [_SSE, _NO_CACHE, *headers], None, b"", False)
                        for early in held:
                            await sink.write(_event(early))
                    await sink.write(_event(item))
                    if final:
                        await sink.end([])
                        return
            # Timed out, or the session closed under the request.
            failure = error_response(parsed.id, ErrorCode.INTERNAL_ERROR, "MCP request timed out or session closed")
            if streaming:
                await sink.write(_event(failure))
                await sink.end([])
            else:
                await _send_json(sink, 200, failure)
        finally:
            session.close_request(parsed.id)
            if not answered:
                session.abandon(parsed.id)

    # --- GET -----------------------------------------------------------------------------------
    async def _get(self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster) -> None:
        """The standalone stream: server messages not tied to a request, until the session ends."""
        refused = check_accept_get(_header(request.headers, b"accept"))
        if refused is not None:
            raise _Reject.of(refused)
        version = check_protocol_version(_header(request.headers, b"mcp-protocol-version"), _SESSION_VERSIONS)
        if isinstance(version, HeaderError):
            raise _Reject.of(version)
        session = await self._session(cluster, _header(request.headers, b"mcp-session-id"))
        stream = session.open_listener()
        try:
            await sink.start(200, [_SSE, _NO_CACHE], None, b"", False)
            async for item in stream:
                await sink.write(_event(item))
            await sink.end([])
        finally:
            session.close_listener(stream)

    # --- DELETE --------------------------------------------------------------------------------
    async def _delete(self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster) -> None:
        session = await self._session(cluster, _header(request.headers, b"mcp-session-id"))
        await self.sessions.end(session)
        await sink.start(204, [], 0, b"", True)


def _event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + encode(message) + b"\n\n"


async def _read_body(request: ProxyRequest, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _Reject(413, f"Payload Too Large: the limit is {limit} bytes")
    if request.body is None:
        return b""
    chunks: list[bytes] = []
    size = 0
    while True:
        data = await request.body.read()
        if not data:
            return b"".join(chunks)
        size += len(data)
        if size > limit:
            raise _Reject(413, f"Payload Too Large: the limit is {limit} bytes")
        chunks.append(data)


async def _send_json(sink: ResponseSink, status: int, message: dict[str, Any], extra: Headers | None = None) -> None:
    body = encode(message)
    headers: Headers = [_JSON, (b"content-length", b"%d" % len(body)), *(extra or [])]
    await sink.start(status, headers, len(body), body, True)


async def _send_reject(sink: ResponseSink, reject: _Reject) -> None:
    if reject.body is not None:
        await _send_json(sink, reject.status, reject.body, reject.extra)
        return
    body = json.dumps({"error": reject.message}).encode()
    headers: Headers = [_JSON, (b"content-length", b"%d" % len(body)), *reject.extra]
    await sink.start(reject.status, headers, len(body), body, True)


__all__ = ["DEFAULT_REQUEST_TIMEOUT", "McpEndpoint"]
