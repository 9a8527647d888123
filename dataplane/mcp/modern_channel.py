"""A `TargetChannel` that gives the session-era federation a 2026-07-28-only (sessionless) target.

The federation speaks the session era to every channel (initialize, server-to-client requests,
notifications/cancelled, resources/subscribe); a target that implements 2026-07-28 only has none of
these. This channel translates, per the 2026-07-28 spec (basic/transports/streamable-http,
basic/patterns/mrtr, basic/versioning, changelog items 2-5 and 7):

- ``initialize`` becomes ``server/discover``; the InitializeResult is built from the DiscoverResult
  (capabilities, serverInfo from its ``_meta``, instructions) and names the session-era version the
  federation asked for. ``notifications/initialized`` is absorbed. There is no upstream session, so
  ``session_id`` stays None and a resumed gateway session simply initializes (discovers) again.
- Every other request is one POST carrying ``_meta`` (protocol version, the client's capabilities and
  clientInfo from its initialize, the log level of a past ``logging/setLevel``) and the headers
  MCP-Protocol-Version, Mcp-Method, Mcp-Name and Mcp-Param-* (``x-mcp-header``, learnt from the
  target's tools/list pages; tools with invalid annotations are dropped from those pages as the spec
  requires of clients). JSON and SSE answers; notifications on the stream (progress, log messages)
  are relayed as they are, so progress tokens stay the federation's own.
- An ``input_required`` result (tools/call, prompts/get, resources/read) becomes session-era
  server-to-client requests (elicitation/create, sampling/createMessage, roots/list) with fresh ids;
  once every answer is back, the original request is retried with ``inputResponses`` and the echoed
  ``requestState`` under a new upstream id, and the final result answers the federation's id. An
  error answer from the client ends the request with that error; more than ``max_input_rounds``
  rounds end it with -32603.
- ``notifications/cancelled`` closes the request's response stream, which is the 2026-07-28
  cancellation signal; server-to-client requests still open for it are cancelled towards the client.
- ``ping``, ``logging/setLevel``, ``resources/subscribe`` and ``resources/unsubscribe`` no longer
  exist upstream and are answered here. Change notifications come from one ``subscriptions/listen``
  stream opened once the channel is initialized and the target offers listChanged or subscribe; its
  filter holds the subscribed URIs, so (un)subscribe reopens it and answers once the target has
  acknowledged the new filter. A stream that ends is reopened with backoff; ``aclose`` closes it.

Sending never waits for the target's answer: ``send`` connects and writes the POST (so an
unreachable target raises TargetUnavailable there) and a task reads the answer, since a 2026-07-28
server may hold the response head of a silent handler for a while and the caller must stay free to
send ``notifications/cancelled``. Any failure after that, and any HTTP error status, becomes a
JSON-RPC error response for the request's id. The HTTP plumbing (pool, target headers, timeouts,
bounded inbox) is `McpHttpUpstream`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from dataplane.config.model import DEFAULT_MCP_MAX_BODY_BYTES, McpHttpTarget, UpstreamCluster
from dataplane.http.errors import ProxyError, RetryableUpstreamError
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.headers import (
    MCP_NAME_SOURCE,
    META_PROTOCOL_VERSION,
    MODERN_PROTOCOL_VERSIONS,
    SUPPORTED_PROTOCOL_VERSIONS,
    encode_header_value,
)
from dataplane.mcp.http_channel import DEFAULT_RESPONSE_TIMEOUT, McpHttpUpstream, media_type
from dataplane.mcp.jsonrpc import ErrorCode, RequestId, error_response, result_response
from dataplane.mcp.sse import SseParser
from dataplane.upstream.exchange import Exchange, Headers, UpstreamRequest
from shared.logging import get_logger

log = get_logger("dataplane.mcp.modern")

MODERN_VERSION: Final = "2026-07-28"
# Handshake-era versions the gateway speaks downstream; the InitializeResult names one of them.
SESSION_ERA_VERSIONS: Final = tuple(v for v in SUPPORTED_PROTOCOL_VERSIONS if v not in MODERN_PROTOCOL_VERSIONS)
DEFAULT_SESSION_ERA_VERSION: Final = "2025-11-25"
MAX_INPUT_ROUNDS: Final = 8

META_CLIENT_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT_INFO: Final = "io.modelcontextprotocol/clientInfo"
META_LOG_LEVEL: Final = "io.modelcontextprotocol/logLevel"
META_SERVER_INFO: Final = "io.modelcontextprotocol/serverInfo"
META_SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"

# basic/patterns/mrtr "Supported Requests" and the request kinds an InputRequests map may hold.
INPUT_REQUIRED_METHODS: Final = frozenset({"tools/call", "prompts/get", "resources/read"})
INPUT_REQUEST_METHODS: Final = frozenset({"elicitation/create", "sampling/createMessage", "roots/list"})
LISTEN_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
    }
)
# Session-era notifications with no 2026-07-28 counterpart over HTTP: absorbed.
_ABSORBED: Final = frozenset({"notifications/initialized", "notifications/roots/list_changed"})

# Waits between retries: a state-only input_required round (an out-of-band interaction in progress),
# and reopening a subscriptions/listen stream that ended.
STATE_ONLY_DELAY: Final = (0.05, 0.25)
LISTEN_RETRY_DELAY: Final = (1.0, 30.0)
MAX_HEADER_REFRESH_PAGES: Final = 16

INTERNAL_ERROR: Final = int(ErrorCode.INTERNAL_ERROR)
METHOD_NOT_FOUND: Final = int(ErrorCode.METHOD_NOT_FOUND)
HEADER_MISMATCH: Final = int(ErrorCode.HEADER_MISMATCH)
UNSUPPORTED_PROTOCOL_VERSION: Final = int(ErrorCode.UNSUPPORTED_PROTOCOL_VERSION)

_ACCEPT_BOTH: Final = (b"accept", b"application/json, text/event-stream")
_CONTENT_JSON: Final = (b"content-type", b"application/json")


# ============================================================================================ pure core


def is_modern_only(initialize_answer: JSON) -> bool:
    """Whether a target's answer to a session-era ``initialize`` shows it speaks 2026-07-28 only.

    Yes for UnsupportedProtocolVersion (-32022) whose ``data.supported`` names a modern version and no
    handshake-era one (versioning.mdx: a modern-only server SHOULD name its versions in any error to
    initialize), and for HeaderMismatch (-32020), which only 2026-07-28 servers define (a modern-only
    server's answer to a POST without MCP-Protocol-Version). A DiscoverResult cannot tell: dual-era
    servers list only their modern versions there, and should keep their native session-era channel.
    """
    error = initialize_answer.get("error")
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    if code == HEADER_MISMATCH:
        return True
    data = error.get("data")
    supported = data.get("supported") if isinstance(data, dict) else None
    if code != UNSUPPORTED_PROTOCOL_VERSION or not isinstance(supported, list):
        return False
    versions = {v for v in supported if isinstance(v, str)}
    return bool(versions & MODERN_PROTOCOL_VERSIONS) and not versions & set(SESSION_ERA_VERSIONS)


def initialize_result(discover: Any, requested_version: Any, target: str) -> JSON | str:
    """The session-era InitializeResult for a DiscoverResult, or why there is none."""
    if not isinstance(discover, dict):
        return "server/discover answered something that is not a result object"
    supported = discover.get("supportedVersions")
    if not isinstance(supported, list) or MODERN_VERSION not in supported:
        return f"server/discover lists no version the gateway speaks (wants {MODERN_VERSION}, got {supported!r})"
    capabilities = discover.get("capabilities")
    meta = discover.get("_meta")
    server_info = meta.get(META_SERVER_INFO) if isinstance(meta, dict) else None
    if not isinstance(server_info, dict) or not isinstance(server_info.get("name"), str):
        server_info = {"name": target, "version": ""}
    version = requested_version if requested_version in SESSION_ERA_VERSIONS else DEFAULT_SESSION_ERA_VERSION
    result: JSON = {
        "protocolVersion": version,
        "capabilities": capabilities if isinstance(capabilities, dict) else {},
        "serverInfo": server_info,
    }
    if isinstance(discover.get("instructions"), str):
        result["instructions"] = discover["instructions"]
    return result


def is_input_required(result: Any) -> bool:
    return isinstance(result, dict) and result.get("resultType") == "input_required"


class InvalidInputRequired(ValueError):
    """An ``input_required`` result the gateway cannot act on (the message says why)."""


@dataclass(slots=True, eq=False)
class InputRound:
    """One ``input_required`` result put to a session-era client as server-to-client requests.

    ``asks`` maps each request id given to the client to the server's input key; answers are
    collected by key until every key has one (or one came back as an error, which ends the round).
    """

    request_state: str | None
    asks: dict[RequestId, str]
    requests: list[JSON]
    responses: dict[str, Any] = field(default_factory=dict)
    refusal: JSON | None = None

    @classmethod
    def parse(cls, result: JSON, new_id: Callable[[], RequestId]) -> InputRound:
        """Validate an InputRequiredResult (basic/patterns/mrtr) and build the client requests."""
        inputs = result.get("inputRequests")
        state = result.get("requestState")
        if inputs is not None and not isinstance(inputs, dict):
            raise InvalidInputRequired("inputRequests is not an object")
        if state is not None and not isinstance(state, str):
            raise InvalidInputRequired("requestState is not a string")
        if not inputs and state is None:
            raise InvalidInputRequired("input_required result has neither inputRequests nor requestState")
        asks: dict[RequestId, str] = {}
        requests: list[JSON] = []
        for key, request in (inputs or {}).items():
            method = request.get("method") if isinstance(request, dict) else None
            if method not in INPUT_REQUEST_METHODS:
                raise InvalidInputRequired(f"input request {key!r} is not one of {sorted(INPUT_REQUEST_METHODS)}")
            params = request.get("params", {})
            if not isinstance(params, dict):
                raise InvalidInputRequired(f"input request {key!r} has params that are not an object")
            request_id = new_id()
            if method == "elicitation/create" and params.get("mode") == "url" and "elicitationId" not in params:
                # 2025-11-25 URL elicitations carry an id; 2026-07-28 dropped it (changelog minor item 11).
                params = {**params, "elicitationId": str(request_id)}
            asks[request_id] = key
            requests.append({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return cls(state, asks, requests)

    @property
    def complete(self) -> bool:
        return self.refusal is not None or len(self.responses) == len(self.asks)

    @property
    def outstanding(self) -> list[RequestId]:
        return [rid for rid, key in self.asks.items() if key not in self.responses]

    def answer(self, message: JSON) -> bool:
        """Record the client's answer to one of ``asks``; True once the round is complete."""
        key = self.asks.get(message.get("id"))  # type: ignore[arg-type]
        if key is None or self.complete:
            return self.complete
        if "error" in message:
            error = message["error"]
            self.refusal = error if isinstance(error, dict) else {"code": INTERNAL_ERROR, "message": "input refused"}
        else:
            self.responses[key] = message.get("result")
        return self.complete

    def retry_params(self, params: JSON) -> JSON:
        """The original request's params plus this round's answers (basic/patterns/mrtr, client rules)."""
        retry = {k: v for k, v in params.items() if k not in ("inputResponses", "requestState")}
        if self.responses:
            retry["inputResponses"] = dict(self.responses)
        if self.request_state is not None:
            retry["requestState"] = self.request_state
        return retry


def listen_filter(capabilities: JSON | None, subscribed: Iterable[str]) -> JSON | None:
    """The ``subscriptions/listen`` notification filter the target's capabilities allow; None if empty."""
    if not isinstance(capabilities, dict):
        return None
    wanted: JSON = {}
    for feature, flag in (("tools", "toolsListChanged"), ("prompts", "promptsListChanged")):
        caps = capabilities.get(feature)
        if isinstance(caps, dict) and caps.get("listChanged") is True:
            wanted[flag] = True
    resources = capabilities.get("resources")
    if isinstance(resources, dict):
        if resources.get("listChanged") is True:
            wanted["resourcesListChanged"] = True
        uris = sorted(subscribed)
        if resources.get("subscribe") is True and uris:
            wanted["resourceSubscriptions"] = uris
    return wanted or None


# x-mcp-header (basic/transports/streamable-http "Custom Headers from Tool Parameters").
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_TYPES: Final = frozenset({"string", "integer", "boolean"})
# JSON Schema 2020-12 keywords whose values are schemas; crossing one leaves the pure `properties` chain.
_SUBSCHEMA: Final = frozenset(
    {
        "items",
        "contains",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    }
)
_SUBSCHEMA_LISTS: Final = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS: Final = frozenset({"patternProperties", "dependentSchemas", "$defs", "definitions"})

ParamHeaders = dict[tuple[str, ...], str]


def x_mcp_headers(input_schema: Any) -> ParamHeaders | None:
    """Property path -> header token for every ``x-mcp-header`` annotation; None if any is invalid.

    Valid: on a property reached from the root by ``properties`` keys only, an RFC 9110 token, on a
    string/integer/boolean property, case-insensitively unique. Data keywords (const, enum, default,
    examples) are not schemas and are not searched.
    """
    found: ParamHeaders = {}
    seen: set[str] = set()
    stack: list[tuple[Any, tuple[str, ...] | None]] = [(input_schema, ())]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        if "x-mcp-header" in node:
            token = node["x-mcp-header"]
            if not path or not isinstance(token, str) or not _TOKEN.fullmatch(token):
                return None
            if node.get("type") not in _HEADER_TYPES or token.lower() in seen:
                return None
            seen.add(token.lower())
            found[path] = token
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                stack.extend((sub, None if path is None else (*path, name)) for name, sub in value.items())
            elif key in _SUBSCHEMA:
                stack.append((value, None))
            elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
                stack.extend((sub, None) for sub in value)
            elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                stack.extend((sub, None) for sub in value.values())
    return found


def param_headers(annotations: ParamHeaders, arguments: Any) -> Headers:
    """The Mcp-Param-* headers of a tools/call: one per annotated argument present and not null."""
    headers: Headers = []
    for path, token in annotations.items():
        value: Any = arguments
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float | str):
            text = str(value)
        else:
            continue
        name = f"mcp-param-{token.lower()}".encode("latin-1")
        headers.append((name, encode_header_value(text).encode("latin-1")))
    return headers


def request_headers(message: JSON, extra: Headers | None = None) -> Headers:
    """The 2026-07-28 request metadata headers mirroring the body (plus ``extra``)."""
    method = message["method"]
    headers: Headers = [
        _ACCEPT_BOTH,
        _CONTENT_JSON,
        (b"mcp-protocol-version", MODERN_VERSION.encode("latin-1")),
        (b"mcp-method", encode_header_value(method).encode("latin-1")),
    ]
    params = message.get("params")
    source = MCP_NAME_SOURCE.get(method)
    name = params.get(source) if source is not None and isinstance(params, dict) else None
    if isinstance(name, str):
        headers.append((b"mcp-name", encode_header_value(name).encode("latin-1")))
    if extra:
        headers.extend(extra)
    return headers


def _with_id(message: JSON, request_id: RequestId) -> JSON:
    """A response re-addressed to the federation's id."""
    answer: JSON = {"jsonrpc": "2.0", "id": request_id}
    if "error" in message:
        answer["error"] = message["error"]
    else:
        answer["result"] = message.get("result")
    return answer


# ============================================================================================ I/O shell


@dataclass(slots=True, eq=False)
class _Post:
    """A POST whose request went out: what to resend if the connection turns out stale."""

    exchange: Exchange
    body: bytes
    headers: Headers
    upstream_id: RequestId


@dataclass(slots=True, eq=False)
class _Call:
    """One federation request in flight upstream."""

    request_id: RequestId
    method: str
    params: JSON
    task: asyncio.Task[None] | None = None
    round: InputRound | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True, eq=False)
class _ListenAttempt:
    """One filter's subscriptions/listen stream: settled when the target acknowledged it (failure
    None), could not open it (failure says why), or a newer filter superseded it."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None

    def settle(self, failure: str | None) -> None:
        if not self.event.is_set():
            self.failure = failure
            self.event.set()


class ModernTargetChannel:
    """A session-era conversation with a 2026-07-28-only target. See the module docstring."""

    def __init__(
        self,
        target: McpHttpTarget,
        backend: UpstreamCluster,
        *,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        max_message_bytes: int = DEFAULT_MCP_MAX_BODY_BYTES,
        max_input_rounds: int = MAX_INPUT_ROUNDS,
        listen: bool = True,
        limits: ProxyLimits = DEFAULT_LIMITS,
    ) -> None:
        self._up = McpHttpUpstream(
            target, backend, response_timeout=response_timeout, max_message_bytes=max_message_bytes, limits=limits
        )
        self._path = target.path or "/"
        self._max_rounds = max_input_rounds
        self._listen = listen
        self._ids = itertools.count(1)
        self._closing = False
        # What the federation's initialize said, sent in every request's _meta.
        self._client_capabilities: JSON = {}
        self._client_info: JSON | None = None
        self._log_level: str | None = None
        self._capabilities: JSON | None = None  # the target's, from server/discover
        self._calls: dict[RequestId, _Call] = {}
        self._asks: dict[RequestId, _Call] = {}  # server-to-client request id -> the call it serves
        self._tool_headers: dict[str, ParamHeaders] = {}
        self._subscribed: set[str] = set()
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_attempt: _ListenAttempt | None = None

    @property
    def target(self) -> str:
        return self._up.target.name

    @property
    def session_id(self) -> str | None:
        return None

    @property
    def protocol_version(self) -> str:
        """The version spoken upstream."""
        return MODERN_VERSION

    @property
    def capabilities(self) -> JSON | None:
        """The target's capabilities from server/discover (None before initialize answered)."""
        return self._capabilities

    # --- the federation's messages --------------------------------------------------------------
    async def send(self, message: JSON) -> None:
        if self._closing or self._up.closed_reason is not None:
            raise TargetClosed(self._up.closed_reason or "channel closed")
        method = message.get("method")
        if not isinstance(method, str):
            self._client_answer(message)
            return
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if "id" not in message:
            await self._notification(method, params)
            return
        request_id: RequestId = message["id"]
        if method == "initialize":
            self._note_client(params)
            call = _Call(request_id, "server/discover", {})
            version = params.get("protocolVersion")
            await self._start(call, lambda post: self._conclude_initialize(call, post, version))
            return
        local = self._answer_locally(request_id, method, params)
        if local is not None:
            await self._up.deliver(local)
            return
        if method in ("resources/subscribe", "resources/unsubscribe"):
            self._spawn(self._subscription(request_id, method, params))
            return
        self._ensure_listening()
        call = _Call(request_id, method, params)
        await self._start(call, lambda post: self._conclude_call(call, post))

    def _note_client(self, params: JSON) -> None:
        capabilities = params.get("capabilities")
        info = params.get("clientInfo")
        self._client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        self._client_info = info if isinstance(info, dict) else None

    def _answer_locally(self, request_id: RequestId, method: str, params: JSON) -> JSON | None:
        """Session-era methods 2026-07-28 removed (changelog item 5), answered by the channel."""
        if method == "ping":
            return result_response(request_id, {})
        if method == "logging/setLevel":
            level = params.get("level")
            if not isinstance(level, str):
                return error_response(request_id, int(ErrorCode.INVALID_PARAMS), "level must be a string")
            self._log_level = level  # sent as _meta logLevel from now on
            return result_response(request_id, {})
        return None

    async def _notification(self, method: str, params: JSON) -> None:
        if method == "notifications/cancelled":
            await self._cancel(params.get("requestId"), params.get("reason"))
        elif method == "notifications/initialized":
            self._ensure_listening()
        elif method not in _ABSORBED:
            # 2026-07-28 defines no client-to-server notifications over HTTP.
            log.debug("MCP notification dropped for a 2026-07-28 target", target=self.target, method=method)

    def _client_answer(self, message: JSON) -> None:
        """The client's answer to a server-to-client request made for an input_required round."""
        call = self._asks.pop(message.get("id"), None)  # type: ignore[arg-type]
        if call is None or call.round is None:
            return  # an answer to nothing asked (or to a request already cancelled)
        if call.round.answer(message):
            call.answered.set()

    async def _cancel(self, request_id: Any, reason: Any) -> None:
        call = self._calls.pop(request_id, None)
        if call is None:
            return
        if call.task is not None:
            call.task.cancel()  # closing the response stream is the 2026-07-28 cancellation
        await self._withdraw(call, reason if isinstance(reason, str) else "the request was cancelled")

    async def _withdraw(self, call: _Call, reason: str) -> None:
        """Cancel, towards the client, the server-to-client requests still open for ``call``."""
        if call.round is None:
            return
        for ask in call.round.outstanding:
            if self._asks.pop(ask, None) is not None:
                params = {"requestId": ask, "reason": reason}
                await self._up.deliver({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})

    # --- requests upstream ----------------------------------------------------------------------
    def _upstream_message(self, method: str, params: JSON, upstream_id: RequestId | None = None) -> JSON:
        meta = params.get("_meta")
        meta = dict(meta) if isinstance(meta, dict) else {}
        meta[META_PROTOCOL_VERSION] = MODERN_VERSION
        meta[META_CLIENT_CAPABILITIES] = self._client_capabilities
        if self._client_info is not None:
            meta[META_CLIENT_INFO] = self._client_info
        if self._log_level is not None:
            meta[META_LOG_LEVEL] = self._log_level
        request_id = upstream_id if upstream_id is not None else next(self._ids)
        return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": meta}}

    def _extra_headers(self, message: JSON) -> Headers:
        params = message["params"]
        if message["method"] != "tools/call" or not isinstance(params.get("name"), str):
            return []
        annotations = self._tool_headers.get(params["name"])
        return param_headers(annotations, params.get("arguments")) if annotations else []

    async def _open(self, message: JSON) -> _Post:
        """Connect and write one POST (not waiting for the answer); TargetUnavailable if that fails."""
        up = self._up
        body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(body) > up.max_message_bytes:
            raise up.unavailable(f"message larger than {up.max_message_bytes} bytes")
        headers = request_headers(message, self._extra_headers(message))
        all_headers = [*headers, *up.extra_headers, (b"content-length", b"%d" % len(body))]
        request = UpstreamRequest(b"POST", self._path.encode("latin-1"), up.authority, all_headers, True, len(body))
        exchange: Exchange | None = None
        try:
            with anyio.fail_after(up.connect_timeout + up.response_timeout):
                exchange = await up.pool.open(request)
                await exchange.send_data(body)
                await exchange.end_request([])
        except BaseException as exc:
            if exchange is not None:
                exchange.abort()
            if isinstance(exc, TimeoutError):
                raise up.unavailable(f"could not send {message['method']} within the timeouts") from None
            if isinstance(exc, ProxyError):
                raise up.unavailable(exc.message) from None
            raise
        return _Post(exchange, body, headers, message["id"])

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._up.tasks.add(task)
        task.add_done_callback(self._up.tasks.discard)
        return task

    async def _start(self, call: _Call, conclude: Callable[[_Post], Awaitable[None]]) -> None:
        """Write the call's first POST here, so an unreachable target fails this send with
        TargetUnavailable; a task waits for and handles the answer."""
        post = await self._open(self._upstream_message(call.method, call.params))
        self._calls[call.request_id] = call
        call.task = self._spawn(self._run(call, conclude, post))

    async def _run(self, call: _Call, conclude: Callable[[_Post], Awaitable[None]], post: _Post) -> None:
        try:
            await conclude(post)
        except TargetUnavailable as exc:  # a retry round could not be sent
            await self._up.deliver(error_response(call.request_id, INTERNAL_ERROR, str(exc)))
        except Exception:
            # A bug here must not leave the federation waiting for an answer that never comes.
            log.exception("MCP request to a 2026-07-28 target failed", target=self.target, method=call.method)
            await self._up.deliver(self._error(call.request_id, "the gateway failed to relay the request"))
        finally:
            if self._calls.get(call.request_id) is call:
                del self._calls[call.request_id]

    def _error(self, request_id: RequestId, cause: str, code: int = INTERNAL_ERROR) -> JSON:
        return error_response(request_id, code, f"MCP target {self.target}: {cause}")

    # --- answers --------------------------------------------------------------------------------
    async def _head(self, post: _Post) -> Exchange:
        """Wait for the POST's response head; a reused connection that closed before answering
        (the server never read the request) gets the POST once more on a fresh one."""
        up = self._up
        exchange = post.exchange
        try:
            with anyio.fail_after(up.response_timeout):
                await exchange.response()
        except RetryableUpstreamError:
            exchange.abort()
            return await up.request(b"POST", self._path, post.headers, post.body)
        except TimeoutError:
            exchange.abort()
            raise up.unavailable(f"no response within {up.response_timeout:g}s") from None
        except ProxyError as exc:
            exchange.abort()
            raise up.unavailable(exc.message) from None
        except BaseException:
            exchange.abort()
            raise
        return exchange

    async def _answer(self, post: _Post, *, relay: bool = True) -> JSON:
        """The target's final answer to one POST (under the upstream id); the notifications on its
        stream are delivered when ``relay``. Every failure, and any HTTP error status, comes back
        as a JSON-RPC error response rather than an exception."""
        up = self._up
        upstream_id = post.upstream_id
        try:
            exchange = await self._head(post)
            head = await exchange.response()
            status, kind = head.status, media_type(head)
            if kind == "text/event-stream" and 200 <= status < 300:
                return await self._read_stream(exchange, upstream_id, relay)
            if kind != "application/json":
                await up.drain(exchange)
                return self._error(upstream_id, f"upstream answered {status} with content type {kind or 'none'!r}")
            answer = up.parse_message(await up.read_body(exchange))
        except TargetUnavailable as exc:
            return error_response(upstream_id, INTERNAL_ERROR, str(exc))
        if isinstance(answer.get("error"), dict) and "result" not in answer:
            return _with_id(answer, upstream_id)
        if not 200 <= status < 300:
            return self._error(upstream_id, f"upstream answered {status}")
        if "result" not in answer or answer.get("id") != upstream_id:
            return self._error(upstream_id, "upstream answered without the response to the request")
        return answer

    async def _read_stream(self, exchange: Exchange, upstream_id: RequestId, relay: bool) -> JSON:
        up = self._up
        parser = SseParser(up.max_message_bytes)
        async with contextlib.aclosing(up.events(exchange, parser, up.response_timeout)) as events:
            async for event in events:
                if event.event != "message" or not event.data:
                    continue  # keep-alive comments never get here; unknown event types are skipped
                message = up.parse_message(event.data)
                if "method" not in message:
                    if message.get("id") == upstream_id:
                        return message
                elif "id" in message:
                    # 2026-07-28 servers send no requests (they use input_required instead).
                    log.info("MCP request on a 2026-07-28 response stream dropped", target=self.target)
                elif relay:
                    await up.deliver(message)
        return self._error(upstream_id, "the event stream ended before the response")

    async def _conclude_initialize(self, call: _Call, post: _Post, version: Any) -> None:
        answer = await self._answer(post)
        if "error" in answer:
            await self._up.deliver(_with_id(answer, call.request_id))
            return
        built = initialize_result(answer.get("result"), version, self.target)
        if isinstance(built, str):
            await self._up.deliver(self._error(call.request_id, built))
            return
        if not self._listen:
            built["capabilities"] = _without_change_notifications(built["capabilities"])
        self._capabilities = built["capabilities"]
        await self._up.deliver(result_response(call.request_id, built))

    async def _conclude_call(self, call: _Call, post: _Post) -> None:
        """Answer the federation's request, driving input_required rounds until a final answer."""
        up = self._up
        rounds = 0
        delay = STATE_ONLY_DELAY[0]
        refreshed = False
        while True:
            answer = await self._answer(post)
            if not refreshed and self._header_mismatch(call, answer):
                # basic/transports/streamable-http: on HeaderMismatch, look at tools/list and retry.
                refreshed = True
                if await self._refresh_tool_headers(call.params["name"]):
                    post = await self._open(self._upstream_message(call.method, call.params))
                    continue
            result = answer.get("result")
            if "error" in answer or call.method not in INPUT_REQUIRED_METHODS or not is_input_required(result):
                if call.method == "tools/list" and isinstance(result, dict):
                    answer = {**answer, "result": self._learn_tools(result)}
                await up.deliver(_with_id(answer, call.request_id))
                return
            rounds += 1
            if rounds > self._max_rounds:
                cause = f"still asked for input after {self._max_rounds} rounds"
                await up.deliver(self._error(call.request_id, cause))
                return
            try:
                inputs = InputRound.parse(result, self._new_ask_id)
            except InvalidInputRequired as exc:
                await up.deliver(self._error(call.request_id, str(exc)))
                return
            if inputs.asks:
                delay = STATE_ONLY_DELAY[0]
                call.round = inputs
                call.answered.clear()
                for ask in inputs.asks:
                    self._asks[ask] = call
                for request in inputs.requests:
                    await up.deliver(request)
                await call.answered.wait()
                if inputs.refusal is not None:
                    await self._withdraw(call, "another input request was refused")
                    refusal = inputs.refusal
                    code = refusal.get("code")
                    message = refusal.get("message")
                    await up.deliver(
                        error_response(
                            call.request_id,
                            code if isinstance(code, int) else INTERNAL_ERROR,
                            message if isinstance(message, str) else "input refused",
                            refusal.get("data"),
                        )
                    )
                    return
            else:
                # Only requestState: an out-of-band interaction is under way; retry after a pause.
                await anyio.sleep(delay)
                delay = min(delay * 2, STATE_ONLY_DELAY[1])
            post = await self._open(self._upstream_message(call.method, inputs.retry_params(call.params)))

    def _new_ask_id(self) -> str:
        return f"mrtr-{next(self._ids)}"

    # --- x-mcp-header -----------------------------------------------------------------------------
    @staticmethod
    def _header_mismatch(call: _Call, answer: JSON) -> bool:
        error = answer.get("error")
        return (
            call.method == "tools/call"
            and isinstance(call.params.get("name"), str)
            and isinstance(error, dict)
            and error.get("code") == HEADER_MISMATCH
        )

    def _learn_tools(self, result: JSON) -> JSON:
        """Note each listed tool's x-mcp-header annotations; drop tools whose annotations are invalid
        (clients MUST exclude them from tools/list)."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        kept: list[Any] = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                kept.append(tool)
                continue
            annotations = x_mcp_headers(tool.get("inputSchema"))
            if annotations is None:
                log.warning("MCP tool dropped: invalid x-mcp-header", target=self.target, tool=name)
                self._tool_headers.pop(name, None)
                continue
            if annotations:
                self._tool_headers[name] = annotations
            else:
                self._tool_headers.pop(name, None)
            kept.append(tool)
        return result if len(kept) == len(tools) else {**result, "tools": kept}

    async def _refresh_tool_headers(self, name: str) -> bool:
        """Walk the target's tools/list (bounded); True if ``name``'s header annotations changed."""
        before = self._tool_headers.get(name)
        params: JSON = {}
        for _ in range(MAX_HEADER_REFRESH_PAGES):
            try:
                post = await self._open(self._upstream_message("tools/list", params))
            except TargetUnavailable:
                return False
            result = (await self._answer(post, relay=False)).get("result")
            if not isinstance(result, dict):
                return False
            self._learn_tools(result)
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
            params = {"cursor": cursor}
        return self._tool_headers.get(name) != before

    # --- subscriptions/listen ---------------------------------------------------------------------
    def _ensure_listening(self) -> None:
        if (
            self._listen
            and self._listen_task is None
            and not self._closing
            and listen_filter(self._capabilities, self._subscribed) is not None
        ):
            self._restart_listening()

    def _restart_listening(self) -> _ListenAttempt:
        """(Re)open the listen stream with the current filter; the previous stream is closed."""
        if self._listen_task is not None:
            self._listen_task.cancel()
        previous = self._listen_attempt
        attempt = _ListenAttempt()
        self._listen_attempt = attempt
        if previous is not None:
            previous.settle(None)  # its waiters move on to the new attempt
        self._listen_task = self._spawn(self._listen_loop(attempt))
        return attempt

    async def _listened(self) -> str | None:
        """Wait until the newest listen attempt settles; its failure, or None once acknowledged."""
        while True:
            attempt = self._listen_attempt
            if attempt is None:
                return "no subscription stream"
            await attempt.event.wait()
            if attempt is self._listen_attempt:
                return attempt.failure

    async def _subscription(self, request_id: RequestId, method: str, params: JSON) -> None:
        """resources/(un)subscribe: 2026-07-28 has them as the listen filter's resourceSubscriptions."""
        up = self._up
        uri = params.get("uri")
        if not isinstance(uri, str):
            await up.deliver(error_response(request_id, int(ErrorCode.INVALID_PARAMS), "uri must be a string"))
            return
        resources = (self._capabilities or {}).get("resources")
        if not self._listen or not isinstance(resources, dict) or resources.get("subscribe") is not True:
            await up.deliver(error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}"))
            return
        subscribe = method == "resources/subscribe"
        if (uri in self._subscribed) != subscribe:
            if subscribe:
                self._subscribed.add(uri)
            else:
                self._subscribed.discard(uri)
            self._restart_listening()
            try:
                with anyio.fail_after(up.response_timeout):
                    failure = await self._listened()
            except TimeoutError:
                failure = "the subscription was not acknowledged in time"
            if failure is not None and subscribe:
                self._subscribed.discard(uri)  # the stream retries without it
                await up.deliver(self._error(request_id, failure))
                return
        await up.deliver(result_response(request_id, {}))

    async def _listen_loop(self, attempt: _ListenAttempt) -> None:
        """Keep one subscriptions/listen stream open with the current filter, reopening with backoff."""
        delay = LISTEN_RETRY_DELAY[0]
        while not self._closing:
            notifications = listen_filter(self._capabilities, self._subscribed)
            if notifications is None:
                attempt.settle(None)
                self._listen_task = None if self._listen_task is asyncio.current_task() else self._listen_task
                return
            listen_id = f"listen-{next(self._ids)}"
            message = self._upstream_message("subscriptions/listen", {"notifications": notifications}, listen_id)
            acked = False
            try:
                post = await self._open(message)
                reason, acked = await self._read_listen(post, attempt)
            except TargetUnavailable as exc:
                reason = str(exc)
            except Exception as exc:  # keep listening whatever one stream did
                log.exception("MCP subscriptions/listen stream failed", target=self.target)
                reason = f"unexpected failure: {exc!r}"
            attempt.settle(reason)
            if reason == _LISTEN_UNSUPPORTED:
                log.info("MCP target does not serve subscriptions/listen", target=self.target)
                return
            log.info("MCP subscriptions/listen stream ended", target=self.target, reason=reason)
            if acked:
                delay = LISTEN_RETRY_DELAY[0]
            await anyio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_DELAY[1])

    async def _read_listen(self, post: _Post, attempt: _ListenAttempt) -> tuple[str, bool]:
        """Relay one listen stream's change notifications; (why it ended, whether it was acknowledged)."""
        up = self._up
        exchange = await self._head(post)
        head = await exchange.response()
        if not 200 <= head.status < 300 or media_type(head) != "text/event-stream":
            answer = await self._answer_of_refusal(exchange, head.status)
            error = answer.get("error")
            if isinstance(error, dict) and error.get("code") == METHOD_NOT_FOUND:
                return _LISTEN_UNSUPPORTED, False
            return f"subscriptions/listen answered {head.status}", False
        acked = False
        parser = SseParser(up.max_message_bytes)
        async with contextlib.aclosing(up.events(exchange, parser, None)) as events:
            async for event in events:
                if event.event != "message" or not event.data:
                    continue
                message = up.parse_message(event.data)
                method = message.get("method")
                if method == "notifications/subscriptions/acknowledged":
                    acked = True
                    attempt.settle(None)
                elif method in LISTEN_NOTIFICATIONS:
                    if method == "notifications/tools/list_changed":
                        self._tool_headers.clear()
                    await up.deliver(_without_subscription_id(message))
                elif method is None and message.get("id") == post.upstream_id:
                    return "the target ended the subscription", acked
        return "the subscription stream closed", acked

    async def _answer_of_refusal(self, exchange: Exchange, status: int) -> JSON:
        try:
            return self._up.parse_message(await self._up.read_body(exchange))
        except TargetUnavailable:
            return {"error": {"code": INTERNAL_ERROR, "message": f"upstream answered {status}"}}

    # --- receiving and closing --------------------------------------------------------------------
    async def receive(self) -> JSON:
        return await self._up.receive()

    async def aclose(self, *, end_session: bool = True) -> None:
        """Close the channel: stop every request and the listen stream (closing their response
        streams cancels them upstream). ``end_session`` is accepted for symmetry with
        StreamableHttpChannel; there is no upstream session to end. Idempotent."""
        if self._closing:
            return
        self._closing = True
        await self._up.stop_tasks()
        if self._listen_attempt is not None:
            self._listen_attempt.settle("channel closed")
        self._up.end("channel closed")
        self._up.close_pool()


_LISTEN_UNSUPPORTED: Final = "the target does not serve subscriptions/listen"


def _without_change_notifications(capabilities: JSON) -> JSON:
    """Capabilities without listChanged/subscribe, for a channel that opens no listen stream."""
    stripped = dict(capabilities)
    for feature in ("tools", "prompts", "resources"):
        caps = stripped.get(feature)
        if isinstance(caps, dict):
            stripped[feature] = {k: v for k, v in caps.items() if k not in ("listChanged", "subscribe")}
    return stripped


def _without_subscription_id(message: JSON) -> JSON:
    """A listen-stream notification as a session-era client expects it (no subscription id)."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or META_SUBSCRIPTION_ID not in meta:
        return message
    rest = {k: v for k, v in meta.items() if k != META_SUBSCRIPTION_ID}
    params = {k: v for k, v in params.items() if k != "_meta"}  # type: ignore[union-attr]
    if rest:
        params["_meta"] = rest
    return {**message, "params": params}


__all__ = [
    "MAX_INPUT_ROUNDS",
    "MODERN_VERSION",
    "InputRound",
    "InvalidInputRequired",
    "ModernTargetChannel",
    "initialize_result",
    "is_input_required",
    "is_modern_only",
    "listen_filter",
    "param_headers",
    "request_headers",
    "x_mcp_headers",
]
