"""The 2026-07-28 ("modern", sessionless) downstream: one self-contained POST in, one answer out.

``McpEndpoint`` hands every 2026-07-28 POST here, already parsed (``ModernExchange``). A request is
validated (routing headers against the body, the ``_meta`` envelope, the protocol version), then served
by one ``McpFederation`` that lives as long as the request; the backend's tool and prompt catalogs are
shared by all requests, so a call does not walk the targets' lists each time. The answer is one JSON
body, or an SSE stream when notifications (progress) come before the result. A request lasts at most
``request_timeout``; when the client goes, the request's upstream work is cancelled.

Targets of either era sit behind it. Each target's era is decided once per worker and cached: a
streamable-HTTP target that answers ``server/discover`` at 2026-07-28 is modern and gets one plain POST
per request (``ModernHttpTarget``: no session, its response stream is the request's); every other
target (session-era HTTP, legacy SSE, stdio) is reached through one shared upstream session per worker
(``shared_upstream.SharedUpstream``), whose server-to-client requests become ``input_required`` results.
A modern target's own ``input_required`` results pass through untouched; the retry routes by the tool's
prefixed name like any call.

``subscriptions/listen`` is a long SSE response: the gateway acknowledges, then relays the change
notifications of every target (a ``subscriptions/listen`` of its own to each modern target, the shared
session's notifications for the others), stamped with the listen request's id, until the client goes
(abrupt end) or the worker shuts down (the graceful final result). The caller's visibility applies there
too: a ``notifications/resources/updated`` for a resource the caller cannot see is dropped, while the
acknowledgement still echoes every URI asked for, so a hidden resource looks like one that never
changes. The list_changed notifications name no item and pass.

Answers follow the 2026-07-28 wire: every result carries ``resultType``, cacheable results
``ttlMs``/``cacheScope`` (0 and private unless the target said otherwise for a routed call), and a
JSON error answer carries the HTTP status the reference SDK maps its code to (400 for envelope and
parameter errors, 404 for an unknown method).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from dataplane.config.model import (
    McpBackendSettings,
    McpSseTarget,
    McpStdioTarget,
    McpStreamableHttpTarget,
    McpTarget,
    UpstreamCluster,
)
from dataplane.http.limits import DEFAULT_LIMITS
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink
from dataplane.mcp.channel import JSON, TargetChannel, TargetClosed, TargetUnavailable
from dataplane.mcp.federation import (
    DEFAULT_SUPPORTED_VERSIONS,
    REQUEST_TIMEOUT,
    Action,
    FederationConfig,
    Kind,
    McpFederation,
    SendToClient,
    Visibility,
    allow_all,
)
from dataplane.mcp.headers import (
    MCP_NAME_SOURCE,
    META_PROTOCOL_VERSION,
    MODERN_PROTOCOL_VERSIONS,
    check_request_metadata,
    encode_header_value,
)
from dataplane.mcp.http_channel import DEFAULT_RESPONSE_TIMEOUT, McpHttpUpstream, StreamableHttpChannel, media_type
from dataplane.mcp.jsonrpc import (
    ErrorCode,
    Message,
    Notification,
    Request,
    RequestId,
    encode,
    error_response,
)
from dataplane.mcp.session import SessionKeyring
from dataplane.mcp.shared_upstream import (
    GATEWAY_CLIENT_INFO,
    LISTEN_METHODS,
    RequestStateCodec,
    SharedUpstream,
    UpstreamMux,
    ephemeral_keyring,
)
from dataplane.mcp.sse import SseParser
from dataplane.mcp.sse_channel import LegacySseChannel
from dataplane.mcp.stdio import SpawnBackoff, StdioChannel
from dataplane.observability.metrics import CallOutcome, RequestReason, WorkerMetrics
from dataplane.observability.tracing import NOOP_CLIENT_SPAN, NOOP_SERVER_SPAN, ClientSpan, ServerSpan
from shared.logging import get_logger

if TYPE_CHECKING:
    from dataplane.observability.request import RequestTelemetry

log = get_logger("dataplane.mcp.modern")

MODERN_VERSION: Final = "2026-07-28"
# What server/discover and -32022 advertise: the gateway speaks both eras downstream.
SUPPORTED_VERSIONS: Final = (MODERN_VERSION, *DEFAULT_SUPPORTED_VERSIONS)
DEFAULT_REQUEST_TIMEOUT: Final = 300.0
# How long a learnt tool/prompt catalog is trusted before a call walks the target's list again: modern
# targets announce changes only to listen streams, so a catalog must not outlive a change for long.
DEFAULT_CATALOG_TTL: Final = 60.0
CLIENT_BUFFER: Final = 256
LISTEN_BUFFER: Final = 1024
_META_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
_META_CLIENT_INFO: Final = "io.modelcontextprotocol/clientInfo"
SUBSCRIPTION_ID_META_KEY: Final = "io.modelcontextprotocol/subscriptionId"
# The methods a 2026-07-28 client may call.
MODERN_METHODS: Final = frozenset(
    {
        "server/discover",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "completion/complete",
        "subscriptions/listen",
    }
)
CACHEABLE_METHODS: Final = frozenset(
    {"server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)
# HTTP status of a JSON error answer, by JSON-RPC code (the reference SDK's table); others answer 200.
ERROR_STATUS: Final = {
    int(ErrorCode.PARSE_ERROR): 400,
    int(ErrorCode.INVALID_REQUEST): 400,
    int(ErrorCode.INVALID_PARAMS): 400,
    int(ErrorCode.HEADER_MISMATCH): 400,
    int(ErrorCode.MISSING_REQUIRED_CLIENT_CAPABILITY): 400,
    int(ErrorCode.UNSUPPORTED_PROTOCOL_VERSION): 400,
    int(ErrorCode.METHOD_NOT_FOUND): 404,
}
_LIST_CHANGED: Final = {
    "notifications/tools/list_changed": Kind.TOOL,
    "notifications/prompts/list_changed": Kind.PROMPT,
}
_ROUTING_HEADERS: Final = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
_PARAM_HEADER: Final = b"mcp-param-"
_JSON_TYPE: Final = (b"content-type", b"application/json")
_SSE_HEADERS: Final[Headers] = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_ACCEPT_BOTH: Final = (b"accept", b"application/json, text/event-stream")


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _is_final(message: JSON, request_id: RequestId) -> bool:
    return "method" not in message and message.get("id") == request_id


def _event(message: JSON) -> bytes:
    return b"event: message\ndata: " + encode(message) + b"\n\n"


async def _send_json(sink: ResponseSink, message: JSON, status: int | None = None) -> None:
    if status is None:
        error = message.get("error")
        status = ERROR_STATUS.get(error.get("code"), 200) if isinstance(error, dict) else 200  # type: ignore[arg-type]
    body = encode(message)
    await sink.start(status, [_JSON_TYPE, (b"content-length", b"%d" % len(body))], len(body), body, True)


def complete_result(method: str, message: JSON) -> JSON:
    """A final response as the 2026-07-28 wire wants it: ``resultType`` always, cache hints where due."""
    result = message.get("result")
    if not isinstance(result, dict):
        return message
    if "resultType" in result and (result["resultType"] != "complete" or method not in CACHEABLE_METHODS):
        return message
    result = {**result, "resultType": result.get("resultType", "complete")}
    if method in CACHEABLE_METHODS:
        result.setdefault("ttlMs", 0)
        result.setdefault("cacheScope", "private")
    return {**message, "result": result}


class ExpiringCatalogs(MutableMapping[tuple[Kind, str], frozenset[str]]):
    """The federation's shared catalogs, each entry trusted for ``ttl`` seconds after it was learnt."""

    def __init__(self, ttl: float = DEFAULT_CATALOG_TTL, clock: Any = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[Kind, str], tuple[float, frozenset[str]]] = {}

    def __getitem__(self, key: tuple[Kind, str]) -> frozenset[str]:
        learnt, names = self._entries[key]
        if self._clock() - learnt > self.ttl:
            del self._entries[key]
            raise KeyError(key)
        return names

    def __setitem__(self, key: tuple[Kind, str], names: frozenset[str]) -> None:
        self._entries[key] = (self._clock(), names)

    def __delitem__(self, key: tuple[Kind, str]) -> None:
        del self._entries[key]

    def __iter__(self) -> Iterator[tuple[Kind, str]]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True


# --------------------------------------------------------------------------------------------- modern targets


class UpstreamAnswered(TargetUnavailable):
    """The target answered over HTTP, but not with MCP (evidence about its era, not an outage)."""


class ModernHttpTarget:
    """A 2026-07-28 streamable-HTTP target: every request is its own POST and its own response stream."""

    def __init__(
        self,
        target: McpStreamableHttpTarget,
        backend: UpstreamCluster,
        *,
        max_message_bytes: int,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
    ) -> None:
        self.name = target.name
        self.response_timeout = response_timeout
        self._up = McpHttpUpstream(
            target,
            backend,
            response_timeout=response_timeout,
            max_message_bytes=max_message_bytes,
            limits=DEFAULT_LIMITS,
        )
        self._path = target.path or "/"

    async def probe(self) -> JSON | None:
        """``server/discover`` at 2026-07-28: the result if the target speaks it, None if it is session era.

        Raises TargetUnavailable only when the target could not be reached (not a verdict on its era)."""
        meta = {META_PROTOCOL_VERSION: MODERN_VERSION, _META_CAPABILITIES: {}, _META_CLIENT_INFO: GATEWAY_CLIENT_INFO}
        message = {"jsonrpc": "2.0", "id": "agw-discover", "method": "server/discover", "params": {"_meta": meta}}
        answer: JSON | None = None
        try:
            async for item in self.exchange(message, idle_timeout=self.response_timeout):
                if _is_final(item, "agw-discover"):
                    answer = item
        except UpstreamAnswered as exc:
            log.info("mcp_target_not_modern", target=self.name, reason=str(exc))
            return None
        result = answer.get("result") if answer is not None else None
        versions = result.get("supportedVersions") if isinstance(result, dict) else None
        if isinstance(versions, list) and MODERN_VERSION in versions:
            return result  # type: ignore[return-value]
        return None

    async def exchange(
        self, message: JSON, *, extra_headers: Headers = (), idle_timeout: float | None
    ) -> AsyncIterator[JSON]:
        """POST one request; yield what the target sends on its response, ending with the final response."""
        up = self._up
        body = encode(message)
        if len(body) > up.max_message_bytes:
            raise up.unavailable(f"message larger than {up.max_message_bytes} bytes")
        exchange = await up.request(b"POST", self._path, [*_modern_headers(message), *extra_headers], body)
        head = await exchange.response()
        status, kind = head.status, media_type(head)
        request_id = message.get("id")
        if kind == "text/event-stream" and 200 <= status < 300:
            parser = SseParser(up.max_message_bytes)
            async with contextlib.aclosing(up.events(exchange, parser, idle_timeout)) as events:
                async for event in events:
                    if event.event != "message" or not event.data:
                        continue
                    item = up.parse_message(event.data)
                    yield item
                    if _is_final(item, request_id):  # type: ignore[arg-type]
                        return
            raise up.unavailable("the event stream ended before the response")
        if kind != "application/json":
            await up.drain(exchange)
            raise UpstreamAnswered(f"MCP target {self.name}: answered {status} with content type {kind or 'none'!r}")
        answer = up.parse_message(await up.read_body(exchange))
        if "error" in answer and answer.get("id") is None:
            answer = {**answer, "id": request_id}
        if not 200 <= status < 300 and "error" not in answer:
            raise UpstreamAnswered(f"MCP target {self.name}: answered {status}")
        yield answer

    def close(self) -> None:
        self._up.close_pool()


def _modern_headers(message: JSON) -> Headers:
    """The 2026-07-28 request headers mirroring the body (version, method, name)."""
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    version = meta.get(META_PROTOCOL_VERSION) if isinstance(meta, dict) else None
    method = message.get("method")
    headers: Headers = [_ACCEPT_BOTH, _JSON_TYPE]
    headers.append((b"mcp-protocol-version", (version if isinstance(version, str) else MODERN_VERSION).encode()))
    if isinstance(method, str):
        headers.append((b"mcp-method", encode_header_value(method).encode("latin-1")))
        source = MCP_NAME_SOURCE.get(method)
        name = params.get(source) if source is not None else None
        if isinstance(name, str):
            headers.append((b"mcp-name", encode_header_value(name).encode("latin-1")))
    return headers


class ModernLease:
    """One client request's ``TargetChannel`` onto a modern target: each request sent is one POST whose
    stream feeds ``receive``; ``notifications/cancelled`` (and ``aclose``) close that POST, the 2026-07-28
    way to cancel."""

    def __init__(self, target: ModernHttpTarget, param_headers: Headers) -> None:
        self._target = target
        self._param_headers = param_headers
        self._send, self._inbox = anyio.create_memory_object_stream[JSON](CLIENT_BUFFER)
        self._scopes: dict[RequestId, anyio.CancelScope] = {}

    @property
    def target(self) -> str:
        return self._target.name

    @property
    def session_id(self) -> str | None:
        return None

    async def send(self, message: JSON) -> None:
        method = message.get("method")
        request_id = message.get("id")
        if isinstance(method, str) and isinstance(request_id, str | int):
            await self._request(message, method, request_id)
        elif method == "notifications/cancelled":
            params = message.get("params")
            scope = self._scopes.get(params.get("requestId")) if isinstance(params, dict) else None
            if scope is not None:
                scope.cancel()

    async def _request(self, message: JSON, method: str, request_id: RequestId) -> None:
        extra = self._param_headers if method == "tools/call" else []
        with anyio.CancelScope() as scope:
            self._scopes[request_id] = scope
            try:
                async for item in self._target.exchange(
                    message, extra_headers=extra, idle_timeout=self._target.response_timeout
                ):
                    self._deliver(item)
            except TargetUnavailable as exc:
                # One POST failed: only its request fails (the target may serve the others).
                self._deliver(error_response(request_id, ErrorCode.INTERNAL_ERROR, str(exc)))
            finally:
                self._scopes.pop(request_id, None)

    def _deliver(self, message: JSON) -> None:
        try:
            self._send.send_nowait(message)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.info("mcp_lease_message_dropped", target=self.target, method=message.get("method"))

    async def receive(self) -> JSON:
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TargetClosed(f"MCP target {self.target!r}: lease closed") from None

    async def aclose(self) -> None:
        for scope in list(self._scopes.values()):
            scope.cancel()
        self._send.close()
        self._inbox.close()


# ------------------------------------------------------------------------------------------------ backends


@dataclass(slots=True, eq=False)
class _Target:
    """One configured target on this worker, its era decided on first use and then kept."""

    config: McpTarget
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    modern: ModernHttpTarget | None = None
    shared: SharedUpstream | None = None
    capabilities: JSON | None = None

    async def aclose(self) -> None:
        if self.modern is not None:
            self.modern.close()
        if self.shared is not None:
            await self.shared.aclose()


@dataclass(slots=True, eq=False)
class _Context:
    """What a target lease needs from the client request."""

    meta: JSON
    capabilities: JSON
    param_headers: Headers


@dataclass(slots=True, eq=False)
class _UpstreamCall:
    """One upstream request of a client request in flight: its client span and when it went out."""

    method: str
    tool: str
    started: float
    span: ClientSpan


class _UpstreamCalls:
    """The upstream requests one sessionless request causes, each with a client span (a child of the
    request's server span) and an ``agentgate_mcp_requests_total`` sample, as a session does it
    (``sessions.FederatedSession``): one per target of a fan-out, with its own duration and outcome.
    Built only when tracing propagates or metrics are on; everything still open when the request ends
    (timed out, client gone) is ended then, not later."""

    __slots__ = ("_backend", "_metrics", "_open", "_parent", "_stdio")

    def __init__(
        self, backend: str, parent: ServerSpan, metrics: WorkerMetrics | None, stdio: frozenset[str]
    ) -> None:
        self._backend = backend
        self._parent = parent
        self._metrics = metrics
        self._stdio = stdio
        self._open: dict[tuple[str, RequestId], _UpstreamCall] = {}

    def sending(self, target: str, message: JSON) -> JSON:
        """Start the span of a request about to go to ``target``; the message with the span's W3C context
        in ``params._meta`` (SEP-414: how a stdio target gets it; an HTTP target reads it the same way)."""
        method = message.get("method")
        up_id = message.get("id")
        if not isinstance(method, str) or not isinstance(up_id, str | int) or isinstance(up_id, bool):
            return message  # notifications (a cancel) are not calls of their own
        params = message.get("params")
        tool = params.get("name") if method == "tools/call" and isinstance(params, dict) else None
        tool = tool if isinstance(tool, str) else ""
        span = self._parent.mcp_span(target, method, tool=tool or None, stdio=target in self._stdio, request_id=up_id)
        self._open[(target, up_id)] = _UpstreamCall(method, tool, time.perf_counter(), span)
        if span is NOOP_CLIENT_SPAN:
            return message
        return {**message, "params": span.inject_into_mcp_meta(params if isinstance(params, dict) else None)}

    def answered(self, target: str, message: JSON) -> None:
        """A response from ``target``: the call it answers ends, an error answer as an error."""
        up_id = message.get("id")
        call = self._open.pop((target, up_id), None) if isinstance(up_id, str | int) else None
        if call is not None:
            failed = "error" in message
            self._end(
                target, call, CallOutcome.ERROR if failed else CallOutcome.OK,
                RequestReason.UPSTREAM_ERROR if failed else RequestReason.OK,
            )  # fmt: skip

    def failed(self, target: str, message: JSON, reason: RequestReason) -> None:
        """``message`` could not be sent to ``target`` (unreachable, gone): its call ends as an error."""
        up_id = message.get("id")
        call = self._open.pop((target, up_id), None) if isinstance(up_id, str | int) else None
        if call is not None:
            self._end(target, call, CallOutcome.ERROR, reason)

    def close(self, reason: RequestReason) -> None:
        """The client request ended (``reason``: timeout, client gone...): what is still open ends now."""
        while self._open:
            (target, _), call = self._open.popitem()
            self._end(target, call, CallOutcome.ERROR, reason)

    def _end(self, target: str, call: _UpstreamCall, outcome: CallOutcome, reason: RequestReason) -> None:
        call.span.end(reason=reason.value)
        metrics = self._metrics
        if metrics is not None:
            metrics.record_mcp(
                self._backend, call.method, target, call.tool, tool_exists=True, outcome=outcome,
                duration=time.perf_counter() - call.started,
            )  # fmt: skip


class _Backend:
    """The per-worker state of one MCP backend for sessionless clients."""

    def __init__(self, cluster: UpstreamCluster, endpoint: ModernEndpoint, previous: _Backend | None) -> None:
        settings = cluster.mcp
        assert settings is not None
        self.cluster = cluster
        self.settings: McpBackendSettings = settings
        self.endpoint = endpoint
        self.config = replace(FederationConfig.from_settings(settings), supported_versions=SUPPORTED_VERSIONS)
        self.catalogs = previous.catalogs if previous is not None else ExpiringCatalogs(endpoint.catalog_ttl)
        if settings.session_keys:
            keyring = SessionKeyring([(key.key_id, key.key) for key in settings.session_keys])
        else:
            keyring = ephemeral_keyring()
        self.codec = RequestStateCodec(keyring, cluster.name)
        self.listens: set[_ListenStream] = previous.listens if previous is not None else set()
        kept = previous.targets if previous is not None else {}
        self.targets: dict[str, _Target] = {}
        for target in settings.targets:
            old = kept.get(target.name)
            self.targets[target.name] = old if old is not None and old.config == target else _Target(target)
        # The stdio targets: their client spans say so (network.transport pipe).
        self.stdio = frozenset(t.name for t in settings.targets if isinstance(t, McpStdioTarget))

    def upstream_calls(self, telemetry: RequestTelemetry | None) -> _UpstreamCalls | None:
        """The tracker of one request's upstream calls; None when nothing would be recorded or propagated."""
        if telemetry is None:
            return None
        span, metrics = telemetry.span, telemetry.metrics
        if span is NOOP_SERVER_SPAN and metrics is None:
            return None
        return _UpstreamCalls(self.cluster.name, span, metrics, self.stdio)

    def retired(self, newer: _Backend) -> list[_Target]:
        """The targets of this state that ``newer`` does not carry over."""
        return [t for name, t in self.targets.items() if newer.targets.get(name) is not t]

    def known_capabilities(self) -> dict[str, JSON]:
        caps: dict[str, JSON] = {}
        for name, target in self.targets.items():
            shared = target.shared.capabilities if target.shared is not None else None
            known = target.capabilities if target.capabilities is not None else shared
            if known is not None:
                caps[name] = known
        return caps

    async def lease(self, name: str, context: _Context) -> TargetChannel:
        """A per-request channel to target ``name``."""
        target = await self.decide(name)
        if target.modern is not None:
            return ModernLease(target.modern, context.param_headers)
        assert target.shared is not None
        return await target.shared.lease(context.capabilities)

    async def decide(self, name: str) -> _Target:
        """Target ``name`` with its era decided (once per worker): a streamable-HTTP target that answers
        ``server/discover`` at 2026-07-28 is modern, every other one gets a shared session. An unreachable
        target raises TargetUnavailable and is asked again next time."""
        target = self.targets[name]
        async with target.lock:
            if target.modern is not None or target.shared is not None:
                return target
            config = target.config
            if isinstance(config, McpStreamableHttpTarget):
                modern = ModernHttpTarget(config, self.cluster, max_message_bytes=self.settings.max_body_bytes)
                try:
                    discovered = await modern.probe()
                except BaseException:
                    modern.close()
                    raise
                if discovered is not None:
                    caps = discovered.get("capabilities")
                    target.modern, target.capabilities = modern, caps if isinstance(caps, dict) else {}
                    log.info("mcp_target_era", backend=self.cluster.name, target=name, era=MODERN_VERSION)
                    return target
                modern.close()
            target.shared = self._shared(config)
            log.info("mcp_target_era", backend=self.cluster.name, target=name, era="session")
            return target

    def _shared(self, config: McpTarget) -> SharedUpstream:
        endpoint, cluster, limit = self.endpoint, self.cluster, self.settings.max_body_bytes
        mux = UpstreamMux(config.name, self.codec, worker=endpoint.worker_id, input_ttl=endpoint.input_ttl)

        def open_channel(tasks: TaskGroup) -> TargetChannel:
            if isinstance(config, McpStdioTarget):
                return StdioChannel(config, task_group=tasks, backoff=endpoint.backoff)
            if isinstance(config, McpSseTarget):
                return LegacySseChannel(config, cluster, max_message_bytes=limit)
            return StreamableHttpChannel(config, cluster, max_message_bytes=limit)

        shared = SharedUpstream(mux, open_channel)
        # Through the endpoint: after a config swap the shared session serves the newer backend state.
        shared.add_listener(lambda message: endpoint.target_event(cluster.name, config.name, message))
        return shared

    def target_event(self, target: str, message: JSON, only: _ListenStream | None = None) -> None:
        """A change notification from a target: forget its catalog, tell the listen streams (or ``only``
        the one whose upstream listen it came on)."""
        kind = _LIST_CHANGED.get(message.get("method"))  # type: ignore[arg-type]
        if kind is not None:
            self.catalogs.pop((kind, target), None)
        if message.get("method") in LISTEN_METHODS:
            for listen in [only] if only is not None else list(self.listens):
                listen.offer(self.config, target, message)


# ---------------------------------------------------------------------------------------- subscriptions/listen


@dataclass(slots=True, eq=False)
class _ListenStream:
    """One open ``subscriptions/listen``: what it asked for, and the queue its response drains."""

    request_id: RequestId
    flags: frozenset[str]
    uris: frozenset[str]
    send: MemoryObjectSendStream[JSON]
    lost: bool = False
    # The caller's: an update naming a resource it cannot see is dropped.
    visibility: Visibility = allow_all

    def offer(self, config: FederationConfig, target: str, message: JSON) -> None:
        method = message.get("method")
        params = message.get("params")
        params = dict(params) if isinstance(params, dict) else {}
        if method == "notifications/resources/updated":
            uri = params.get("uri")
            if not isinstance(uri, str) or not self.visibility(Kind.RESOURCE, target, uri):
                return
            exposed = config.naming.expose_uri(target, uri)
            if not any(exposed == u or exposed.startswith(u) for u in self.uris):
                return
            params["uri"] = exposed
        elif _LISTEN_FLAGS.get(method) not in self.flags:  # type: ignore[arg-type]
            return
        meta = params.get("_meta")
        params["_meta"] = {**(meta if isinstance(meta, dict) else {}), SUBSCRIPTION_ID_META_KEY: self.request_id}
        try:
            self.send.send_nowait({"jsonrpc": "2.0", "method": method, "params": params})
        except anyio.WouldBlock:
            log.warning("mcp_listen_backlog_full", request_id=self.request_id)
            self.lost = True
            self.send.close()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass


_LISTEN_FLAGS: Final = {
    "notifications/tools/list_changed": "toolsListChanged",
    "notifications/prompts/list_changed": "promptsListChanged",
    "notifications/resources/list_changed": "resourcesListChanged",
}


# -------------------------------------------------------------------------------------------------- endpoint


class _Refusal(Exception):
    def __init__(self, response: JSON) -> None:
        super().__init__(response["error"]["message"])
        self.response = response


class ModernEndpoint:
    """Serves 2026-07-28 POSTs for every MCP backend of one worker (implements ``endpoint.ModernExchange``).

    ``request_timeout`` bounds one request; ``input_ttl`` how long a call bridged to ``input_required``
    waits for the client's retry; ``catalog_ttl`` how long a learnt catalog is trusted.
    """

    def __init__(
        self,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        input_ttl: float = DEFAULT_REQUEST_TIMEOUT,
        catalog_ttl: float = DEFAULT_CATALOG_TTL,
    ) -> None:
        self.request_timeout = request_timeout
        self.input_ttl = input_ttl
        self.catalog_ttl = catalog_ttl
        self.worker_id = os.urandom(8).hex()
        self.backoff = SpawnBackoff()
        self._backends: dict[str, _Backend] = {}
        self._listen_ids = itertools.count(1)
        self._closing = False

    def _backend(self, cluster: UpstreamCluster) -> _Backend:
        """The backend's state, rebuilt when a new config brings a new cluster (unchanged targets kept)."""
        state = self._backends.get(cluster.name)
        if state is None or state.cluster is not cluster:
            fresh = _Backend(cluster, self, state)
            if state is not None:
                for target in state.retired(fresh):
                    _spawn(target.aclose())
            self._backends[cluster.name] = state = fresh
        return state

    def target_event(self, backend: str, target: str, message: JSON) -> None:
        state = self._backends.get(backend)
        if state is not None:
            state.target_event(target, message)

    def end_streams(self) -> None:
        """A draining worker ends its listen streams gracefully (and refuses new ones), so clients
        listen again elsewhere instead of being cut at the drain deadline; requests in flight finish."""
        self._closing = True
        for backend in self._backends.values():
            for listen in list(backend.listens):
                listen.send.close()

    async def aclose(self) -> None:
        """End the listen streams (gracefully) and the shared upstream sessions. Idempotent."""
        self._closing = True
        backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            for listen in list(backend.listens):
                listen.send.close()
        for backend in backends:
            for target in backend.targets.values():
                await target.aclose()

    # --- entry ----------------------------------------------------------------------------------------------
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
    ) -> None:
        """Answer one 2026-07-28 POST (see the module docstring). ``route_timeout`` shortens the
        request bound; a ``subscriptions/listen`` stream lasts until the client or the worker goes.
        ``visibility`` is the caller's (the policy chain's): what the request's federation may show;
        ``telemetry`` the request's span and the worker's metrics (a client span and an MCP sample per
        upstream request)."""
        headers = request.headers
        if isinstance(message, Notification):
            version = _header(headers, b"mcp-protocol-version") or _meta_version(message.params)
            if version not in MODERN_PROTOCOL_VERSIONS:
                await _send_json(sink, _unsupported(None, version))
                return
            # 2026-07-28 defines no client notifications over HTTP (a client cancels by closing its stream).
            await sink.start(202, [(b"content-length", b"0")], 0, b"", True)
            return
        if not isinstance(message, Request):
            text = "Invalid Request: a 2026-07-28 client sends no responses (input requests come as input_required)"
            await _send_json(sink, error_response(None, ErrorCode.INVALID_REQUEST, text))
            return
        try:
            meta = _check_request(headers, message)
        except _Refusal as refusal:
            await _send_json(sink, refusal.response)
            return
        backend = self._backend(cluster)
        capabilities = meta[_META_CAPABILITIES]
        param_headers = [(k, v) for k, v in headers if k.startswith(_PARAM_HEADER)]
        context = _Context(meta, capabilities, param_headers)
        if message.method == "subscriptions/listen":
            await self._listen(backend, sink, message, context, visibility)
            return
        bound = self.request_timeout if route_timeout is None else min(route_timeout, self.request_timeout)
        await self._exchange(backend, sink, message, context, bound, visibility, backend.upstream_calls(telemetry))

    # --- one request ----------------------------------------------------------------------------------------
    async def _exchange(
        self,
        backend: _Backend,
        sink: ResponseSink,
        message: Request,
        context: _Context,
        bound: float,
        visibility: Visibility = allow_all,
        calls: _UpstreamCalls | None = None,
    ) -> None:
        federation = McpFederation(backend.config, visibility, catalogs=backend.catalogs)
        federation.target_capabilities.update(backend.known_capabilities())
        out_send, out_receive = anyio.create_memory_object_stream[JSON](CLIENT_BUFFER)
        leases: dict[str, TargetChannel] = {}
        locks: dict[str, anyio.Lock] = {}
        request_id = message.id
        streaming = False

        async with anyio.create_task_group() as tasks:

            def act(actions: list[Action]) -> None:
                for action in actions:
                    if isinstance(action, SendToClient):
                        item = action.message
                        if "method" in item and "id" in item:
                            continue  # server-to-client requests never reach a modern client (bridged upstream)
                        try:
                            out_send.send_nowait(item)
                        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                            log.info("mcp_client_message_dropped", backend=backend.cluster.name)
                    else:
                        tasks.start_soon(send_to_target, action.target, action.message)

            async def lease_of(name: str) -> TargetChannel:
                lock = locks.setdefault(name, anyio.Lock())
                async with lock:
                    lease = leases.get(name)
                    if lease is None:
                        lease = leases[name] = await backend.lease(name, context)
                        tasks.start_soon(pump, name, lease)
                    return lease

            async def send_to_target(name: str, upstream: JSON) -> None:
                if calls is not None:
                    upstream = calls.sending(name, upstream)
                try:
                    lease = await lease_of(name)
                    await lease.send(upstream)
                except (TargetUnavailable, TargetClosed) as exc:
                    log.warning("mcp_target_failed", backend=backend.cluster.name, target=name, error=str(exc))
                    if calls is not None:
                        calls.failed(name, upstream, RequestReason.UPSTREAM_ERROR)
                    act(federation.target_failed(name, str(exc) or f"MCP target {name!r} failed"))

            async def pump(name: str, lease: TargetChannel) -> None:
                while True:
                    try:
                        item = await lease.receive()
                    except TargetClosed:
                        return
                    if calls is not None and "method" not in item:
                        calls.answered(name, item)
                    act(federation.receive_from_target(name, item))

            try:
                with anyio.move_on_after(bound):
                    act(federation.receive_from_client(message.raw))
                    async for item in out_receive:
                        final = _is_final(item, request_id)
                        if final:
                            item = complete_result(message.method, item)
                        if final and not streaming:
                            await _send_json(sink, item)
                            return
                        if not streaming:
                            streaming = True
                            await sink.start(200, _SSE_HEADERS, None, b"", False)
                        await sink.write(_event(item))
                        if final:
                            await sink.end([])
                            return
                if calls is not None:
                    calls.close(RequestReason.TIMEOUT)  # before the client hears of it
                failure = error_response(request_id, REQUEST_TIMEOUT, "Request timed out")
                if streaming:
                    await sink.write(_event(failure))
                    await sink.end([])
                else:
                    await _send_json(sink, failure)
            finally:
                if calls is not None:
                    # The client went away, or the answer came without waiting for them: nobody waits now.
                    calls.close(RequestReason.CLIENT_CLOSED)
                tasks.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    for lease in leases.values():
                        await lease.aclose()
                out_send.close()
                out_receive.close()

    # --- subscriptions/listen -------------------------------------------------------------------------------
    async def _listen(
        self,
        backend: _Backend,
        sink: ResponseSink,
        message: Request,
        context: _Context,
        visibility: Visibility = allow_all,
    ) -> None:
        params = message.params if isinstance(message.params, dict) else {}
        wanted = params.get("notifications")
        uris = wanted.get("resourceSubscriptions") if isinstance(wanted, dict) else None
        if not isinstance(wanted, dict) or not (uris is None or isinstance(uris, list)):
            text = "Invalid params: notifications must be an object, resourceSubscriptions a list of URIs"
            await _send_json(sink, error_response(message.id, ErrorCode.INVALID_PARAMS, text))
            return
        flags = frozenset(flag for flag in _LISTEN_FLAGS.values() if wanted.get(flag) is True)
        subscribed = frozenset(u for u in uris or () if isinstance(u, str))
        honored: JSON = {flag: True for flag in sorted(flags)}
        if subscribed:
            honored["resourceSubscriptions"] = sorted(subscribed)
        send, receive = anyio.create_memory_object_stream[JSON](LISTEN_BUFFER)
        stream = _ListenStream(message.id, flags, subscribed, send, visibility=visibility)
        if self._closing:
            send.close()
        backend.listens.add(stream)
        meta = {SUBSCRIPTION_ID_META_KEY: message.id}
        ack = {"notifications": honored, "_meta": meta}
        try:
            async with anyio.create_task_group() as tasks:
                for name in backend.targets:
                    tasks.start_soon(self._relay, backend, name, stream, context, honored)
                await sink.start(200, _SSE_HEADERS, None, b"", False)
                await sink.write(
                    _event({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": ack})
                )
                async for item in receive:
                    await sink.write(_event(item))
                if stream.lost:
                    sink.abort()  # the client fell behind: an abrupt end tells it to re-listen and refetch
                else:
                    final = {"jsonrpc": "2.0", "id": message.id, "result": {"resultType": "complete", "_meta": meta}}
                    await sink.write(_event(final))
                    await sink.end([])
                tasks.cancel_scope.cancel()
        finally:
            backend.listens.discard(stream)
            send.close()
            receive.close()

    async def _relay(
        self, backend: _Backend, name: str, stream: _ListenStream, context: _Context, honored: JSON
    ) -> None:
        """Feed one target's change notifications into a listen stream until it ends."""
        target = backend.targets[name]
        naming = backend.config.naming
        uris = {naming.split_uri(u) or (name, u) for u in stream.uris}
        mine = sorted(uri for owner, uri in uris if owner == name)
        wanted: JSON = {k: v for k, v in honored.items() if k != "resourceSubscriptions"}
        if mine:
            wanted["resourceSubscriptions"] = mine
        if not wanted:
            return
        try:
            await backend.decide(name)
            if target.shared is not None:
                await target.shared.ensure()  # its notifications flow once the session is up
        except (TargetUnavailable, TargetClosed) as exc:
            log.warning("mcp_listen_target_failed", backend=backend.cluster.name, target=name, error=str(exc))
            return
        if target.modern is not None:
            await self._relay_modern(backend, target.modern, stream, context, wanted)
            return
        shared = target.shared
        assert shared is not None
        for uri in mine:
            shared.subscribe(uri)
        try:
            await anyio.sleep_forever()
        finally:
            for uri in mine:
                shared.unsubscribe(uri)

    async def _relay_modern(
        self, backend: _Backend, target: ModernHttpTarget, stream: _ListenStream, context: _Context, wanted: JSON
    ) -> None:
        meta = {k: v for k, v in context.meta.items() if k != "progressToken"}
        listen_id = f"agw-listen-{next(self._listen_ids)}"
        message = {
            "jsonrpc": "2.0",
            "id": listen_id,
            "method": "subscriptions/listen",
            "params": {"notifications": wanted, "_meta": meta},
        }
        try:
            async for item in target.exchange(message, idle_timeout=None):
                if item.get("method") in LISTEN_METHODS:
                    backend.target_event(target.name, item, only=stream)
        except TargetUnavailable as exc:
            log.warning("mcp_listen_target_failed", backend=backend.cluster.name, target=target.name, error=str(exc))


# -------------------------------------------------------------------------------------------------- validation


def _meta_version(params: Any) -> Any:
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get(META_PROTOCOL_VERSION) if isinstance(meta, dict) else None


def _unsupported(request_id: RequestId | None, requested: Any) -> JSON:
    shown = requested if isinstance(requested, str) and requested.isprintable() and len(requested) <= 64 else ""
    return error_response(
        request_id,
        ErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
        f"Unsupported protocol version: {shown or '(none)'}",
        {"supported": list(SUPPORTED_VERSIONS), "requested": shown},
    )


def _check_request(headers: Headers, message: Request) -> JSON:
    """The request's ``_meta`` envelope once headers and body agree; raises ``_Refusal`` with the answer.

    Order (2026-07-28 "Server Validation", as the reference SDK applies it): duplicated routing headers,
    the envelope (-32602), the mirrored headers (-32020), the version (-32022), the method (-32601), the
    client capabilities' shape (-32602)."""
    request_id = message.id
    for name in _ROUTING_HEADERS:
        if sum(1 for key, _ in headers if key == name) > 1:
            raise _Refusal(
                error_response(
                    request_id, ErrorCode.HEADER_MISMATCH, f"Header mismatch: {name.decode()} appears more than once"
                )
            )
    params = message.params
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or META_PROTOCOL_VERSION not in meta or _META_CAPABILITIES not in meta:
        text = f"Invalid params: params._meta must carry {META_PROTOCOL_VERSION!r} and {_META_CAPABILITIES!r}"
        raise _Refusal(error_response(request_id, ErrorCode.INVALID_PARAMS, text))
    version = _header(headers, b"mcp-protocol-version")
    if version is None:
        raise _Refusal(
            error_response(
                request_id, ErrorCode.HEADER_MISMATCH, "Header mismatch: the MCP-Protocol-Version header is required"
            )
        )
    version = version.strip()
    body_version = meta[META_PROTOCOL_VERSION]
    if body_version != version:
        text = f"Header mismatch: the MCP-Protocol-Version header does not match _meta {META_PROTOCOL_VERSION}"
        raise _Refusal(error_response(request_id, ErrorCode.HEADER_MISMATCH, text))
    if version not in MODERN_PROTOCOL_VERSIONS:
        raise _Refusal(_unsupported(request_id, version))
    mismatch = check_request_metadata(
        message,
        protocol_version=version,
        mcp_method=_header(headers, b"mcp-method"),
        mcp_name=_header(headers, b"mcp-name"),
    )
    if mismatch is not None:
        body = mismatch.to_jsonrpc(request_id)
        assert body is not None
        raise _Refusal(body)
    if message.method not in MODERN_METHODS:
        text = f"Method not found: {message.method} (not a 2026-07-28 method)"
        raise _Refusal(error_response(request_id, ErrorCode.METHOD_NOT_FOUND, text))
    if not isinstance(meta[_META_CAPABILITIES], dict):
        text = f"Invalid params: _meta {_META_CAPABILITIES!r} must be an object"
        raise _Refusal(error_response(request_id, ErrorCode.INVALID_PARAMS, text))
    return meta


def _spawn(work: Any) -> None:
    """Run a clean-up coroutine detached (a config swap must not wait for old sessions to end)."""
    task = asyncio.get_running_loop().create_task(work)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)


_DETACHED: set[Any] = set()


__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "SUPPORTED_VERSIONS",
    "ExpiringCatalogs",
    "ModernEndpoint",
    "ModernHttpTarget",
    "ModernLease",
    "complete_result",
]
