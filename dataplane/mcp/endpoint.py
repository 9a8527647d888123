"""The downstream MCP endpoint: streamable HTTP, session era (2025-03-26 to 2025-11-25), and the legacy
HTTP+SSE transport (2024-11-05) beside it.

The HTTP shell around ``McpSessions``: it checks the request (method, Origin, Accept,
Content-Type, body size, session and protocol-version headers), hands the one JSON-RPC message
to the session, and answers 202 (notifications, responses), a JSON body (a request whose final
response comes first, within ``sse_after`` for 2025-11-25 clients) or an SSE stream. GET opens the
standalone stream, or, with Last-Event-ID, resumes a stream; DELETE ends the session.

Resumption (2025-11-25 basic/transports "Resumability and Redelivery"): every SSE event carries
an id naming its stream and position (sessions.py). A 2025-11-25 stream starts with a priming
event (an id, a ``retry`` and empty data), so even a silent stream can be resumed. GET with
Last-Event-ID replays what followed that id and goes on live; a request stream ends after its
response (which arrives there if it was still pending). An id of a stream this worker no longer
has: a standalone stream's gets a fresh standalone stream (its lost notifications are not
replayable anyway); a request stream's gets 400, since a fresh stream would never carry the
response the client waits for (the SDK then gives up on that request, or retries and may reach the
worker that holds it); an id the gateway never issued gets 400. Resumption is per worker.

Bounds: a request waits at most ``request_timeout`` or the route's request timeout, whichever is
shorter (without a route timeout, the caller's policy ``requestTimeout`` replaces both), counted by
its session whether or not a client reads; then it gets JSON-RPC error -32001 and is cancelled
upstream. The policy's per-try timeout and retries apply to each upstream attempt (sessions.py).
The GET and legacy SSE streams are not bounded by the route's timeout: they last as long as their
session (DELETE, idle expiry, or the client going).

Policy (``caller``, built by ``dataplane.policy.chain`` after the HTTP request was authenticated and
authorized): each request attaches the caller's variables to the session's federation, whose single
visibility rule then hides the tools, prompts and resources the caller's rules deny (lists omit them,
calls fail like unknown ones); a 2026-07-28 request's federation gets its own. Limits keyed on ``mcp``
count item uses (tools/call, prompts/get, resources/read) before the message reaches the session. A
refused call is answered HTTP 429 (503 when a fail-closed limit cannot reach its store) with
``Retry-After`` and ``x-ratelimit-*``, and a JSON-RPC error body (code ``RATE_LIMITED``, -32010, in
the implementation-defined range JSON-RPC leaves below MCP's own -32020..-32099) carrying the request's
id: the transports let an error status carry a JSON-RPC body, and clients surface it as that request's
error while HTTP-aware ones honour ``Retry-After``. Legacy HTTP+SSE clients read answers only on their
stream (an error status on a message POST ends some clients' writer), so there the POST gets 202 and
the error goes on the stream. An admitted request that a limit counted carries that limit's ``x-ratelimit-*``
(the tightest of the HTTP-level and item limits) on its JSON or SSE answer (legacy: on the 202).

Authorization rules on a call's arguments (``mcp.tool.arguments``) cannot hide a tool from lists, which
have no arguments (``dataplane.policy.mcp_visibility``); they are decided per ``tools/call``, before limits
count it. A call to a visible tool whose arguments the rules deny is answered HTTP 200 with a JSON-RPC error
``POLICY_DENIED`` (-32011, next to ``RATE_LIMITED``) saying policy denied the call; no rule text is echoed
(the rule is in the gateway's log). 200, not 403: the HTTP request was authorized, one call was not, and a 403
sends OAuth-aware clients into a scope step-up. A hidden tool still fails like an unknown one (-32602).
Legacy clients get the error on their stream, like a limit's. Same for every era: the three call ``_admit``.

Paths: under an MCP route, a path ending in ``/sse`` (GET) and one ending in ``/message`` (POST)
belong to the legacy transport (legacy_endpoint.py): route ``/mcp`` serves streamable HTTP at
``/mcp`` and legacy clients at ``/mcp/sse``. Origin, for every path: absent, on the backend's
allowed origins, or (none configured) the same host as the request's authority: DNS-rebinding
protection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote

from dataplane.config.model import UpstreamCluster
from dataplane.config.policy import ResilienceSettings
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink, read_whole_body
from dataplane.mcp.federation import FederationConfig, McpFederation, Visibility, allow_all
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
from dataplane.mcp.legacy_endpoint import LegacyLink, LegacyRefusal, LegacySseEndpoint
from dataplane.mcp.naming import Naming
from dataplane.mcp.session import SessionTokenTooLong
from dataplane.mcp.sessions import (
    EventStream,
    FederatedSession,
    McpSessions,
    RequestIdInUse,
    SessionNotFound,
    StreamEvent,
    parse_event_id,
)
from dataplane.observability.metrics import CallOutcome

if TYPE_CHECKING:
    from dataplane.observability.request import RequestTelemetry
    from dataplane.observability.tracing import ServerSpan
from shared.logging import get_logger

log = get_logger("dataplane.mcp.endpoint")

# The longest a client request waits for its final response (the targets' own timeouts are shorter).
DEFAULT_REQUEST_TIMEOUT = 300.0
# The reconnection delay (ms) the priming event asks a client to wait before resuming a broken stream.
DEFAULT_RETRY_MS: Final = 1000
# How long a 2025-11-25 request may go silent before its answer becomes a (resumable) SSE stream.
DEFAULT_SSE_AFTER: Final = 1.0
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")
_NO_CACHE = (b"cache-control", b"no-cache")
# Messages held back while an initialize waits for its result (and its session id).
_MAX_HELD = 64
# Session-era protocol versions this endpoint accepts in MCP-Protocol-Version.
_SESSION_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
# Versions whose clients expect a priming event (an id with empty data) at the start of a stream.
_PRIMING_VERSIONS: Final = frozenset({"2025-11-25"})
# The JSON-RPC errors of a request a limit refused, and of a call whose arguments policy denied (see the
# module docstring).
RATE_LIMITED: Final = -32010
POLICY_DENIED: Final = -32011
# Methods that use one item, and the parameter naming it.
_ITEM_PARAMS: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

Issue = Callable[[dict[str, Any]], tuple[dict[str, Any], Headers]]


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


# The headers a POST reads; `_first_values` finds them in one pass.
_POST_HEADERS: Final = frozenset({b"accept", b"content-type", b"mcp-session-id", b"mcp-protocol-version"})
# Distinct Accept / Content-Type pairs whose verdict is remembered (clients send the same few).
_MAX_REMEMBERED_VERDICTS: Final = 256


def _first_values(headers: Headers, names: frozenset[bytes]) -> dict[bytes, str]:
    """The first value of each header in ``names`` that the request has (as ``_header`` finds it)."""
    found: dict[bytes, str] = {}
    for key, value in headers:
        if key in names and key not in found:
            found[key] = value.decode("latin-1")
    return found


def _same_host_origins(authority: bytes) -> OriginAllowList:
    host = authority.decode("latin-1")
    return OriginAllowList.compile([f"http://{host}", f"https://{host}"])


def _query_value(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return unquote(value)
    return None


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

    @classmethod
    def jsonrpc(cls, status: int, message: str, extra: Headers | None = None) -> _Reject:
        """With a JSON-RPC error without id as the body, as the spec allows for refused input."""
        return cls(status, message, error_response(None, ErrorCode.INVALID_REQUEST, message), extra)


@dataclass(frozen=True, slots=True)
class CallRefusal:
    """A limit refused one MCP request: the HTTP status (429, or 503 for a store that cannot be
    reached), the message, the headers (``retry-after``, ``x-ratelimit-*``) and the wait in seconds.
    With ``code`` ``POLICY_DENIED``: authorization refused a call's arguments (status 200, no wait)."""

    status: int
    message: str
    headers: Headers
    retry_after: float
    code: int = RATE_LIMITED


class CallerPolicy(Protocol):
    """The policy decided for the caller of one HTTP request (``dataplane.policy.chain.McpCaller``)."""

    def attach(self, federation: McpFederation) -> None:
        """Decide ``federation``'s visibility with this request's variables."""
        ...

    def visibility(self) -> Visibility:
        """The visibility for a federation that lives as long as this request."""
        ...

    async def admit(self, method: str, target: str, name: str, arguments: Any) -> CallRefusal | None:
        """Decide one request (``name`` on ``target``: upstream names) on its arguments and count it against
        the limits; a refusal or None."""
        ...

    @property
    def response_headers(self) -> Headers:
        """Headers for the answer to the request ``admit`` last let through (``x-ratelimit-*``), or []."""
        ...

    @property
    def resilience(self) -> ResilienceSettings | None:
        """The policy's timeouts and retries for each JSON-RPC request (None: the defaults)."""
        ...


def _attach(caller: CallerPolicy | None, federation: McpFederation) -> None:
    """The caller's visibility on ``federation``, or everything visible without a policy (a session
    outlives configs: a policy removed since must not keep hiding)."""
    if caller is not None:
        caller.attach(federation)
    elif federation.visibility is not allow_all:
        federation.visibility = allow_all


class ModernExchange(Protocol):
    """Serves one sessionless (2026-07-28) POST whose body is already parsed and valid JSON-RPC."""

    async def post(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        message: Message,
        route_timeout: float | None = None,
        *,
        visibility: Visibility = allow_all,
        telemetry: RequestTelemetry | None = None,
    ) -> None: ...

    def end_streams(self) -> None: ...

    async def aclose(self) -> None: ...


def _is_modern(version: str | None, token: str | None, message: Message) -> bool:
    """A 2026-07-28 request: its MCP-Protocol-Version header (``version``) says so, or (header
    missing) its `_meta` does without a session (no Mcp-Session-Id ``token``)."""
    if version is not None and version in MODERN_PROTOCOL_VERSIONS:
        return True
    if token is not None:
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
        *,
        retry_ms: int = DEFAULT_RETRY_MS,
        sse_after: float = DEFAULT_SSE_AFTER,
    ) -> None:
        self.sessions = sessions if sessions is not None else McpSessions()
        self.request_timeout = request_timeout
        self.modern = modern
        self.legacy = LegacySseEndpoint(self.sessions)
        self.retry_ms = retry_ms
        self.sse_after = sse_after
        self._loop: asyncio.AbstractEventLoop | None = None
        self._post_verdicts: dict[tuple[str | None, str | None], HeaderError | None] = {}
        # Per backend, rebuilt with a new cluster: how exposed names map to targets (for limit keys).
        self._namings: dict[str, tuple[UpstreamCluster, Naming]] = {}

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The worker's loop, looked up once (on Python 3.11 each lookup is a getpid syscall)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _post_headers_refused(self, accept: str | None, content_type: str | None) -> HeaderError | None:
        """Accept and Content-Type checked as ``check_accept_post`` / ``check_content_type`` do; the
        verdict depends on the two values only, so it is remembered per pair (a bounded table)."""
        key = (accept, content_type)
        verdicts = self._post_verdicts
        if key in verdicts:
            return verdicts[key]
        refused = check_accept_post(accept) or check_content_type(content_type)
        if len(verdicts) >= _MAX_REMEMBERED_VERDICTS:
            verdicts.clear()
        verdicts[key] = refused
        return refused

    def end_streams(self) -> None:
        """Draining: end the standing streams (GET, listen, legacy SSE); requests in flight finish."""
        self.sessions.end_streams()
        self.legacy.end_streams()
        if self.modern is not None:
            self.modern.end_streams()

    async def aclose(self) -> None:
        if self.modern is not None:
            await self.modern.aclose()
        await self.legacy.aclose()
        await self.sessions.aclose()

    async def handle(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        route_timeout: float | None = None,
        caller: CallerPolicy | None = None,
        *,
        telemetry: RequestTelemetry | None = None,
    ) -> None:
        """Answer one HTTP request for the MCP backend ``cluster``; ``route_timeout`` is the route's
        request timeout, which bounds requests but not the long-lived GET streams; ``caller`` the
        policy chain's decision for this request (None: no MCP rules or limits apply); ``telemetry``
        the request's span and access record (MCP method, target and tool are noted there)."""
        resilience = caller.resilience if caller is not None else None
        if route_timeout is None and resilience is not None and resilience.request_timeout is not None:
            route_timeout = bound = resilience.request_timeout  # the route's own timeout wins over the policy's
        else:
            bound = self.request_timeout if route_timeout is None else min(route_timeout, self.request_timeout)
        try:
            origin = _header(request.headers, b"origin")
            if origin is not None:
                allowed = cluster.mcp.allowed_origins if cluster.mcp is not None else None
                refused = check_origin(origin, allowed or _same_host_origins(request.authority))
                if refused is not None:
                    raise _Reject.of(refused)
            path, _, query = request.target.decode("latin-1").partition("?")
            method = request.method
            if path.endswith("/sse"):
                if method != b"GET":
                    raise _Reject(405, "Method Not Allowed: the HTTP+SSE stream takes GET", extra=[(b"allow", b"GET")])
                await self._legacy_stream(request, sink, cluster, path)
            elif path.endswith("/message"):
                if method != b"POST":
                    message = "Method Not Allowed: the HTTP+SSE message endpoint takes POST"
                    raise _Reject(405, message, extra=[(b"allow", b"POST")])
                await self._legacy_post(request, sink, cluster, query, bound, caller)
            elif method == b"POST":
                await self._post(request, sink, cluster, bound, route_timeout, caller, telemetry)
            elif method == b"GET":
                await self._get(request, sink, cluster, caller)
            elif method == b"DELETE":
                await self._delete(request, sink, cluster)
            else:
                allow = [(b"allow", b"GET, POST, DELETE")]
                raise _Reject(405, "Method Not Allowed: the MCP endpoint takes GET, POST and DELETE", extra=allow)
        except _Reject as reject:
            await _send_reject(sink, reject)

    # --- POST ----------------------------------------------------------------------------------
    async def _post(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        bound: float,
        route_timeout: float | None,
        caller: CallerPolicy | None,
        telemetry: RequestTelemetry | None = None,
    ) -> None:
        settings = cluster.mcp
        assert settings is not None
        found = _first_values(request.headers, _POST_HEADERS)
        refused = self._post_headers_refused(found.get(b"accept"), found.get(b"content-type"))
        if refused is not None:
            raise _Reject.of(refused)
        body = await _read_body(request, settings.max_body_bytes, bound, self._running_loop())
        parsed = parse_message(body)
        if isinstance(parsed, InvalidMessage):
            await _send_json(sink, 400, parsed.to_response())
            return
        span = None
        if telemetry is not None:
            self._observe(telemetry, cluster, parsed)
            span = telemetry.span
        token = found.get(b"mcp-session-id")
        version_header = found.get(b"mcp-protocol-version")
        if self.modern is not None and _is_modern(version_header, token, parsed):
            if caller is not None and isinstance(parsed, Request):
                refusal = await self._admit(caller, cluster, parsed)
                if refusal is not None:
                    self._denied(cluster, parsed, telemetry)
                    await _send_refused_call(sink, parsed, refusal)
                    return
                sink = _with_headers(sink, caller.response_headers)
            visibility = caller.visibility() if caller is not None else allow_all
            # The route's timeout bounds each request (answered with a JSON-RPC error), not listen streams.
            await self.modern.post(
                request, sink, cluster, parsed, route_timeout, visibility=visibility, telemetry=telemetry
            )
            return
        if isinstance(parsed, Request) and parsed.method == "initialize":
            if token is not None:
                refusal = error_response(
                    parsed.id, ErrorCode.INVALID_REQUEST, "initialize must not carry Mcp-Session-Id"
                )
                await _send_json(sink, 400, refusal)
                return
            await self._initialize(sink, cluster, parsed, bound, caller, span)
            return
        version = check_protocol_version(version_header, _SESSION_VERSIONS)
        if isinstance(version, HeaderError):
            raise _Reject.of(version)
        session = await self._session(cluster, token)
        _attach(caller, session.federation)
        if not isinstance(parsed, Request):
            await session.submit(parsed.raw, span=span)
            await sink.start(202, [(b"content-length", b"0")], 0, b"", True)
            return
        if caller is not None:
            refusal = await self._admit(caller, cluster, parsed)
            if refusal is not None:
                self._denied(cluster, parsed, telemetry)
                await _send_refused_call(sink, parsed, refusal)
                return
            sink = _with_headers(sink, caller.response_headers)
        resilience = caller.resilience if caller is not None else None
        await self._exchange(
            sink, session, parsed, bound, prime=version in _PRIMING_VERSIONS, resilience=resilience, span=span
        )

    def _observe(self, telemetry: RequestTelemetry, cluster: UpstreamCluster, parsed: Message) -> None:
        """The MCP method, and the target and tool (or prompt, resource) it names, into the access record
        and the server span."""
        method = getattr(parsed, "method", None)
        if not isinstance(method, str):
            return
        record = telemetry.record
        record.mcp_method = method
        key = _ITEM_PARAMS.get(method)
        params = getattr(parsed, "params", None)
        exposed = params.get(key) if key is not None and isinstance(params, dict) else None
        if isinstance(exposed, str):
            naming = self._naming(cluster)
            hit = naming.split_uri(exposed) if key == "uri" else naming.split(exposed)
            if hit is None:
                hit = (naming.targets[0] if len(naming.targets) == 1 else "", exposed)
            record.mcp_target, record.mcp_tool = hit
        telemetry.span.set_mcp(method, tool=record.mcp_tool or None, target=record.mcp_target or None)

    def _denied(self, cluster: UpstreamCluster, parsed: Request, telemetry: RequestTelemetry | None) -> None:
        """A call the caller's policy refused never reaches a target: counted here, outcome denied."""
        metrics = self.sessions.metrics
        if metrics is None:
            return
        target = tool = ""
        if telemetry is not None:
            target, tool = telemetry.record.mcp_target, telemetry.record.mcp_tool
        metrics.record_mcp(cluster.name, parsed.method, target, tool, tool_exists=True, outcome=CallOutcome.DENIED)

    def _naming(self, cluster: UpstreamCluster) -> Naming:
        entry = self._namings.get(cluster.name)
        if entry is None or entry[0] is not cluster:
            assert cluster.mcp is not None
            entry = self._namings[cluster.name] = (cluster, FederationConfig.from_settings(cluster.mcp).naming)
        return entry[1]

    async def _admit(self, caller: CallerPolicy, cluster: UpstreamCluster, parsed: Request) -> CallRefusal | None:
        """Count ``parsed`` against the caller's limits, naming its item by upstream name and target
        (an unprefixed name is the single target's, or the target is left empty)."""
        key = _ITEM_PARAMS.get(parsed.method)
        params = parsed.params if isinstance(parsed.params, dict) else {}
        exposed = params.get(key) if key is not None else None
        if not isinstance(exposed, str):
            return await caller.admit(parsed.method, "", "", None)
        naming = self._naming(cluster)
        hit = naming.split_uri(exposed) if key == "uri" else naming.split(exposed)
        if hit is None:
            hit = (naming.targets[0] if len(naming.targets) == 1 else "", exposed)
        return await caller.admit(parsed.method, hit[0], hit[1], params.get("arguments"))

    async def _session(self, cluster: UpstreamCluster, token: str | None) -> FederatedSession:
        if token is None:
            raise _Reject.jsonrpc(400, "Bad Request: Mcp-Session-Id header is required")
        try:
            return await self.sessions.find(cluster, token)
        except SessionNotFound as exc:
            log.debug("mcp_session_not_found", backend=cluster.name, reason=str(exc))
            raise _Reject.jsonrpc(404, "Not Found: session unknown or expired") from None

    async def _initialize(
        self,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        parsed: Request,
        bound: float,
        caller: CallerPolicy | None,
        span: ServerSpan | None = None,
    ) -> None:
        session = await self.sessions.create(cluster)
        _attach(caller, session.federation)
        issued: list[str] = []

        def issue(response: dict[str, Any]) -> tuple[dict[str, Any], Headers]:
            """The session id for a successful initialize, or an error if it cannot be sealed."""
            result = response.get("result")
            if not isinstance(result, dict):
                return response, []
            version = result.get("protocolVersion")
            try:
                token = self.sessions.issue(session, version if isinstance(version, str) else _SESSION_VERSIONS[-1])
            except SessionTokenTooLong as exc:
                log.warning("mcp_session_token_too_long", backend=cluster.name, reason=str(exc))
                message = (
                    "Cannot open an MCP session: the targets' upstream session ids do not fit in a session id "
                    "(too many targets, or ids too long)"
                )
                return error_response(parsed.id, ErrorCode.INTERNAL_ERROR, message), []
            issued.append(token)
            return response, [(b"mcp-session-id", token.encode("ascii"))]

        try:
            resilience = caller.resilience if caller is not None else None
            await self._exchange(
                sink, session, parsed, bound, prime=False, issue=issue, resilience=resilience, span=span
            )
        finally:
            if not issued:
                await session.aclose()

    async def _exchange(
        self,
        sink: ResponseSink,
        session: FederatedSession,
        parsed: Request,
        bound: float,
        *,
        prime: bool,
        issue: Issue | None = None,
        resilience: ResilienceSettings | None = None,
        span: ServerSpan | None = None,
    ) -> None:
        """Submit one request, answered within ``bound`` seconds (its upstream attempts per the caller's
        ``resilience``), and answer it from its stream (see ``_answer``)."""
        params = parsed.params if isinstance(parsed.params, dict) else {}
        meta = params.get("_meta")
        progress_token = meta.get("progressToken") if isinstance(meta, dict) else None
        try:
            stream = session.open_request(parsed.id, progress_token, bound)
        except RequestIdInUse as exc:
            await _send_json(sink, 200, error_response(parsed.id, ErrorCode.INVALID_REQUEST, str(exc)))
            return
        reader = session.attach(stream)
        try:
            await session.submit(parsed.raw, resilience, span)
            await self._answer(sink, stream, reader, parsed.id, prime, issue)
        finally:
            # A client gone mid-stream may resume it: the session keeps it (and the request) for a while.
            session.detach(stream, reader)

    async def _answer(
        self,
        sink: ResponseSink,
        stream: EventStream,
        reader: int,
        request_id: Any,
        prime: bool,
        issue: Issue | None,
    ) -> None:
        """JSON if the response comes first (and, with ``prime``, within ``sse_after``), else SSE events.

        With ``issue`` (initialize), the head waits for the final response, since the session id it
        carries only exists once the targets answered; earlier messages are held back until then.
        """
        cursor = 0
        streaming = False
        held: list[StreamEvent] = []
        while True:
            batch: list[StreamEvent] | None
            if prime and not streaming:
                batch = await stream.next_within(cursor, reader, self.sse_after)
                if batch is None:  # a slow answer: stream now, so that a broken connection can resume
                    streaming = True
                    await self._start_stream(sink, stream, [], prime)
                    continue
            else:
                batch = await stream.next(cursor, reader)
            if not batch:
                await self._unanswered(sink, stream, reader, request_id, streaming)
                return
            for event in batch:
                cursor = event.seq
                if issue is not None and not event.final:
                    if len(held) < _MAX_HELD:
                        held.append(event)
                    continue
                data, extra = event.data, []
                if event.final and issue is not None:
                    message, extra = issue(event.message)
                    if message is not event.message:
                        data = encode(message)
                if event.final and not streaming and not held:
                    await _send_body(sink, 200, data, extra)
                    return
                if not streaming:
                    streaming = True
                    await self._start_stream(sink, stream, extra, prime)
                    for early in held:
                        await sink.write(_event(stream, early.seq, early.data))
                await sink.write(_event(stream, event.seq, data))
                if event.final:
                    await sink.end([])
                    return

    async def _start_stream(self, sink: ResponseSink, stream: EventStream, extra: Headers, prime: bool) -> None:
        stream.exposed = True  # ids go out from here on: the session keeps the stream for resumption
        head = _priming(stream, self.retry_ms) if prime else b""
        await sink.start(200, [_SSE, _NO_CACHE, *extra], None, head, False)

    @staticmethod
    async def _unanswered(
        sink: ResponseSink, stream: EventStream, reader: int, request_id: Any, streaming: bool
    ) -> None:
        """The stream ended without the response: the session closed, a resumed GET took it over, or
        the client cancelled the request (no response then, as the spec asks)."""
        if stream.reader != reader and streaming:
            await sink.end([])  # the client reads the rest on the resumed stream
            return
        if stream.cancelled:
            if not streaming:
                await sink.start(200, [_SSE, _NO_CACHE], None, b"", False)
            await sink.end([])
            return
        failure = error_response(request_id, ErrorCode.INTERNAL_ERROR, "MCP session closed before the answer")
        if streaming:
            await sink.write(b"event: message\ndata: " + encode(failure) + b"\n\n")
            await sink.end([])
        else:
            await _send_json(sink, 200, failure)

    # --- GET -----------------------------------------------------------------------------------
    async def _get(
        self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster, caller: CallerPolicy | None
    ) -> None:
        """The standalone stream (server messages not tied to a request) until the session ends, or a
        resumed stream (Last-Event-ID)."""
        refused = check_accept_get(_header(request.headers, b"accept"))
        if refused is not None:
            raise _Reject.of(refused)
        version = check_protocol_version(_header(request.headers, b"mcp-protocol-version"), _SESSION_VERSIONS)
        if isinstance(version, HeaderError):
            raise _Reject.of(version)
        session = await self._session(cluster, _header(request.headers, b"mcp-session-id"))
        _attach(caller, session.federation)  # notifications on this stream pass the visibility rule
        last_event_id = _header(request.headers, b"last-event-id")
        if last_event_id is None:
            stream, cursor = session.open_standalone(), 0
        else:
            stream, cursor = self._resumed(session, last_event_id)
        reader = session.attach(stream)
        try:
            head = b""
            if not stream.exposed and version in _PRIMING_VERSIONS:
                stream.exposed = True
                head = _priming(stream, self.retry_ms)
            await sink.start(200, [_SSE, _NO_CACHE], None, head, False)
            while batch := await stream.next(cursor, reader):
                stream.exposed = True
                for event in batch:
                    await sink.write(_event(stream, event.seq, event.data))
                cursor = batch[-1].seq
            await sink.end([])
        finally:
            session.detach(stream, reader)

    @staticmethod
    def _resumed(session: FederatedSession, last_event_id: str) -> tuple[EventStream, int]:
        """The stream a Last-Event-ID names and the position to replay from; see the module docstring."""
        position = parse_event_id(last_event_id)
        if position is None:
            raise _Reject.jsonrpc(400, "Bad Request: Last-Event-ID is not an event id of this gateway")
        stream = session.stream(position.stream)
        if stream is not None:
            return stream, position.seq
        if position.of_request:
            message = (
                "Bad Request: the stream of this Last-Event-ID cannot be resumed here "
                "(its replay window passed, or another gateway worker holds it)"
            )
            raise _Reject.jsonrpc(400, message)
        log.debug("mcp_standalone_stream_restarted", backend=session.cluster.name, stream=position.stream)
        return session.open_standalone(), 0

    # --- DELETE --------------------------------------------------------------------------------
    async def _delete(self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster) -> None:
        session = await self._session(cluster, _header(request.headers, b"mcp-session-id"))
        await self.sessions.end(session)
        await sink.start(204, [], 0, b"", True)

    # --- legacy HTTP+SSE (2024-11-05) ----------------------------------------------------------
    async def _legacy_stream(
        self, request: ProxyRequest, sink: ResponseSink, cluster: UpstreamCluster, path: str
    ) -> None:
        refused = check_accept_get(_header(request.headers, b"accept"))
        if refused is not None:
            raise _Reject.of(refused)
        await self.legacy.stream(sink, cluster, path[: -len("/sse")] + "/message")

    async def _legacy_post(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        query: str,
        bound: float,
        caller: CallerPolicy | None,
    ) -> None:
        settings = cluster.mcp
        assert settings is not None
        session_id = _query_value(query, "sessionId") or _query_value(query, "session_id")
        if not session_id:
            raise _Reject.jsonrpc(400, "Bad Request: the sessionId query parameter is required")
        try:
            link = self.legacy.find(cluster, session_id)
        except LegacyRefusal as refusal:
            raise _Reject.jsonrpc(refusal.status, refusal.message) from None
        refused = check_content_type(_header(request.headers, b"content-type"))
        if refused is not None:
            raise _Reject.of(refused)
        parsed = parse_message(await _read_body(request, settings.max_body_bytes, bound, self._running_loop()))
        if isinstance(parsed, InvalidMessage):
            await _send_json(sink, 400, parsed.to_response())
            return
        _attach(caller, link.session.federation)
        counted: Headers = []
        if caller is not None and isinstance(parsed, Request):
            refusal = await self._admit(caller, cluster, parsed)
            if refusal is not None:
                _refuse_on_stream(link, parsed, refusal)
                await sink.start(202, [(b"content-length", b"0")], 0, b"", True)
                return
            counted = caller.response_headers
        await self.legacy.submit(link, parsed, bound, caller.resilience if caller is not None else None)
        await sink.start(202, [(b"content-length", b"0"), *counted], 0, b"", True)


def _event(stream: EventStream, seq: int, data: bytes) -> bytes:
    return b"id: " + stream.event_id(seq).encode("ascii") + b"\nevent: message\ndata: " + data + b"\n\n"


def _priming(stream: EventStream, retry_ms: int) -> bytes:
    """An id and empty data (2025-11-25): the client can resume from here before any message came."""
    return b"id: " + stream.event_id(0).encode("ascii") + b"\nretry: %d\ndata: \n\n" % retry_ms


async def _read_body(
    request: ProxyRequest, limit: int, bound: float, loop: asyncio.AbstractEventLoop | None = None
) -> bytes:
    """The whole body, at most ``limit`` bytes (413) arriving within ``bound`` seconds (408).

    The bound is a timer that cancels this task, undone as ``asyncio.timeout`` does (so a cancel
    from elsewhere still wins): once per request, where a cancel scope costs several times more.
    """
    whole = request.body.take_complete() if request.body is not None else b""
    if whole is not None or (request.content_length is not None and request.content_length > limit):
        # Nothing to wait for: no timer.
        if whole is None or len(whole) > limit:
            raise _Reject(413, f"Payload Too Large: the limit is {limit} bytes")
        return whole
    if loop is None:
        loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    cancelling = task.cancelling()  # cancels requested before ours are not ours to undo
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(bound, expire)
    try:
        body = await read_whole_body(request, limit)
        if body is None:
            raise _Reject(413, f"Payload Too Large: the limit is {limit} bytes")
        return body
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            raise _Reject(408, "Request Timeout: the request body did not arrive in time") from None
        raise
    finally:
        timer.cancel()


async def _send_body(sink: ResponseSink, status: int, body: bytes, extra: Headers | None = None) -> None:
    headers: Headers = [_JSON, (b"content-length", b"%d" % len(body)), *(extra or [])]
    await sink.start(status, headers, len(body), body, True)


async def _send_json(sink: ResponseSink, status: int, message: dict[str, Any], extra: Headers | None = None) -> None:
    await _send_body(sink, status, encode(message), extra)


def _refusal_error(request: Request, refusal: CallRefusal) -> dict[str, Any]:
    if refusal.code != RATE_LIMITED:
        return error_response(request.id, refusal.code, refusal.message)
    data = {"retryAfter": max(1, round(refusal.retry_after)), "status": refusal.status}
    return error_response(request.id, RATE_LIMITED, refusal.message, data)


async def _send_refused_call(sink: ResponseSink, request: Request, refusal: CallRefusal) -> None:
    await _send_json(sink, refusal.status, _refusal_error(request, refusal), list(refusal.headers))


def _refuse_on_stream(link: LegacyLink, request: Request, refusal: CallRefusal) -> None:
    link.stream.append(_refusal_error(request, refusal))


class _HeadersSink:
    """A sink adding ``extra`` (an admitted request's limit headers) to the response head. The proxy's
    own wrapper keeps these over its HTTP-level copies of the same names."""

    __slots__ = ("_extra", "_sink")

    def __init__(self, sink: ResponseSink, extra: Headers) -> None:
        self._sink = sink
        self._extra = extra

    @property
    def started(self) -> bool:
        return self._sink.started

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        await self._sink.start(status, [*headers, *self._extra], content_length, body, end)

    async def write(self, data: bytes) -> None:
        await self._sink.write(data)

    async def end(self, trailers: Headers) -> None:
        await self._sink.end(trailers)

    def abort(self) -> None:
        self._sink.abort()


def _with_headers(sink: ResponseSink, extra: Headers) -> ResponseSink:
    return _HeadersSink(sink, extra) if extra else sink


async def _send_reject(sink: ResponseSink, reject: _Reject) -> None:
    if reject.body is not None:
        await _send_json(sink, reject.status, reject.body, reject.extra)
        return
    body = json.dumps({"error": reject.message}).encode()
    headers: Headers = [_JSON, (b"content-length", b"%d" % len(body)), *reject.extra]
    await sink.start(reject.status, headers, len(body), body, True)


__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_RETRY_MS",
    "DEFAULT_SSE_AFTER",
    "POLICY_DENIED",
    "RATE_LIMITED",
    "CallRefusal",
    "CallerPolicy",
    "McpEndpoint",
    "ModernExchange",
]
