"""The MCP federation core: one client in front of N named targets, sans-I/O.

``McpFederation`` takes parsed JSON-RPC messages (plain dicts) from the client or from a named target and
returns actions (``SendToTarget``, ``SendToClient``); it never touches a socket, a clock or a task, so any
transport (streamable HTTP, SSE, stdio) drives it, and the tests need no network. One instance serves one
client conversation (a session in the 2025 era, or one request's lifetime in 2026-07-28).

What it does, and the rules it follows:

- ``initialize`` / ``server/discover`` fan out to every target; the answer merges capabilities (union of
  tools, prompts, resources, logging and completions -- the features the gateway knows how to route; tasks,
  experimental and extensions are not advertised since their methods are not routed), instructions (one
  ``[target]`` block per target, in target order) and the gateway's own serverInfo. The protocol version
  answered is the client's if the gateway supports it, else the gateway's newest (2025-11-25 lifecycle rule).
- ``*/list`` fans out to the targets whose capabilities include the feature and merges the pages. The gateway
  cursor is opaque base64url JSON ``[method, {target: upstream cursor}]``: the next page fans out only to the
  targets that still had more. A target answering -32601 to a list simply has none.
- ``tools/call``, ``prompts/get``, ``resources/*``, ``completion/complete`` route to one target by prefix or
  URI (see ``naming.py``), are forwarded with the upstream name, and resource URIs in results are mapped back.
- Tools and prompts are checked against the target's full catalog before forwarding, so "unknown" is the
  gateway's answer, identical to "hidden". The catalog is learnt from the client's own list walk, or, when a
  call comes first (a fresh session, another worker), by walking the target's list pages while the call waits;
  ``notifications/*/list_changed`` from the target forgets it.
- Without prefixes (NEVER, or one target under CONDITIONAL) a name belongs to the first target in config order
  that offers it visibly; lists show that one only and report the others via ``take_collisions``. A bare
  resource URI routes to the one target that listed it, else to the one template that matches it.
- Ids: requests to targets get fresh gateway ids (one integer sequence), so client and target ids never mix.
  Server-to-client requests get string ids ``"gw-N"``; the client's answer goes back to the target that asked,
  under its original id. Progress tokens are remapped both ways; ``notifications/cancelled`` maps request ids
  both ways and forgets the exchange, so late answers are dropped.
- Failure: ``FAIL_CLOSED`` fails a fan-out naming every failed target (-32603); ``FAIL_OPEN`` skips failed
  targets and fails only when all failed. Targets that fail ``initialize`` under FAIL_OPEN are left out of the
  conversation.
- ``Visibility`` is the one rule, applied to list items, calls, reads, completions and resource-update
  notifications. A hidden item and an unknown one get the same -32602 error, so nothing leaks.
- Resilience (the caller's policy, passed with each client request): the shell owns the clocks and asks.
  ``expire`` ends a request at its deadline: the client gets -32001 "Request timed out" (the code both MCP
  SDKs use), every pending upstream attempt gets ``notifications/cancelled``, and late answers are dropped.
  Progress resets nothing: the spec lets a receiver reset its clock on progress but asks it to enforce a
  maximum anyway, and a gateway's requestTimeout is the operator's maximum. Each request sent upstream
  carries the per-try timeout (``SendToTarget.try_timeout``); ``attempt_timed_out`` cancels that attempt
  and retries it (as a ``reset``) or fails that target's part with -32001. ``retry_attempt`` decides
  whether a send that got no response (connect failure, reset, 5xx) is sent again: per the policy's
  retryOn, attempts and jittered backoff, only for methods ``retries_mcp_method`` allows, where a
  ``tools/call`` also counts as idempotent when the target's own tools/list marked the tool
  ``readOnlyHint`` or ``idempotentHint`` (targets are the operator's configured servers, the trusted
  source the spec asks annotations to come from). A retry goes out under a fresh gateway id, so an answer
  to the abandoned attempt can never be taken for the retry's. Catalog walks are not retried.
"""

from __future__ import annotations

import base64
import binascii
import enum
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataplane.config.model import McpBackendSettings
from dataplane.config.policy import ResilienceSettings
from dataplane.mcp.jsonrpc import ErrorCode, RequestId
from dataplane.mcp.jsonrpc import error_response as _error
from dataplane.mcp.jsonrpc import result_response as _result
from dataplane.mcp.naming import Naming, PrefixMode
from dataplane.policy.resilience import (
    NON_IDEMPOTENT_MCP_METHODS,
    FailureKind,
    backoff_delay,
    retries_failure,
    retries_mcp_method,
    retries_status,
)

JSON = dict[str, Any]

INVALID_REQUEST = int(ErrorCode.INVALID_REQUEST)
METHOD_NOT_FOUND = int(ErrorCode.METHOD_NOT_FOUND)
INVALID_PARAMS = int(ErrorCode.INVALID_PARAMS)
INTERNAL_ERROR = int(ErrorCode.INTERNAL_ERROR)
# The code both official MCP SDKs give a request that timed out (TypeScript ErrorCode.RequestTimeout,
# Python mcp_types.REQUEST_TIMEOUT), so clients treat the gateway's timeout like their own.
REQUEST_TIMEOUT = -32001

# Newest first. The gateway answers initialize with the client's version if listed here, else the first.
DEFAULT_SUPPORTED_VERSIONS: tuple[str, ...] = ("2025-11-25", "2025-06-18", "2025-03-26")
_META_VERSION = "io.modelcontextprotocol/protocolVersion"
_META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"


class FailureMode(enum.Enum):
    """What a fan-out does when some targets fail."""

    # The values are the compiled config's (dataplane.config.model.McpBackendSettings).
    FAIL_CLOSED = "fail_closed"
    FAIL_OPEN = "fail_open"


class Kind(enum.Enum):
    """What a visibility decision is about."""

    TOOL = "tool"
    PROMPT = "prompt"
    RESOURCE = "resource"
    RESOURCE_TEMPLATE = "resourceTemplate"


class Visibility(Protocol):
    """Whether the caller may see ``name`` (upstream tool/prompt name, resource URI or URI template) of ``target``.

    The single decision point for list filtering and call routing; authorization plugs in here.
    """

    def __call__(self, kind: Kind, target: str, name: str) -> bool: ...


def allow_all(kind: Kind, target: str, name: str) -> bool:
    """The default rule: everything every target offers is visible."""
    return True


@dataclass(frozen=True, slots=True)
class SendToTarget:
    """Send ``message`` to the named target, after ``delay`` seconds (a retry's backoff); a request with a
    ``try_timeout`` is given that long (from when it is sent) before the shell calls ``attempt_timed_out``."""

    target: str
    message: JSON
    try_timeout: float | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send ``message`` (response, notification or server-to-client request) to the client."""

    message: JSON


Action = SendToTarget | SendToClient


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """Per-backend settings, compiled once at config time and shared by every conversation."""

    naming: Naming
    failure_mode: FailureMode = FailureMode.FAIL_CLOSED
    server_info: JSON = field(default_factory=lambda: {"name": "agentgate", "version": "0.1.0"})
    supported_versions: tuple[str, ...] = DEFAULT_SUPPORTED_VERSIONS

    @classmethod
    def from_settings(cls, settings: McpBackendSettings) -> FederationConfig:
        """The federation rules of one compiled MCP backend (called when a config is applied)."""
        naming = Naming([target.name for target in settings.targets], PrefixMode(settings.prefix_mode))
        return cls(naming=naming, failure_mode=FailureMode(settings.failure_mode))


# Method -> (result key, kind, capability) for the merged lists.
_LISTS: dict[str, tuple[str, Kind, str]] = {
    "tools/list": ("tools", Kind.TOOL, "tools"),
    "prompts/list": ("prompts", Kind.PROMPT, "prompts"),
    "resources/list": ("resources", Kind.RESOURCE, "resources"),
    "resources/templates/list": ("resourceTemplates", Kind.RESOURCE_TEMPLATE, "resources"),
}
_NAMED: dict[str, tuple[Kind, str]] = {"tools/call": (Kind.TOOL, "tool"), "prompts/get": (Kind.PROMPT, "prompt")}
_BY_URI = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
# Kinds routed by name, whose per-target catalogs tell "unknown" from "forward": list method and result key.
_CATALOGS: dict[Kind, tuple[str, str, str]] = {
    Kind.TOOL: ("tools/list", "tools", "tools"),
    Kind.PROMPT: ("prompts/list", "prompts", "prompts"),
}
_LIST_CHANGED = {"notifications/tools/list_changed": Kind.TOOL, "notifications/prompts/list_changed": Kind.PROMPT}
_AMBIGUOUS = ""  # owner of a bare name listed by several targets; never a valid target name
# A target whose cursors never end must not keep a catalog walk going forever.
MAX_CATALOG_PAGES = 1000
# Capabilities the gateway can route, hence may advertise.
_ROUTED_CAPABILITIES = ("tools", "prompts", "resources", "logging", "completions")


def _cancelled(up_id: int, reason: str) -> JSON:
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": up_id, "reason": reason}}


def _is_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def encode_cursor(method: str, cursors: dict[str, str]) -> str:
    """The opaque gateway cursor: which targets still have pages, and each one's own cursor."""
    raw = json.dumps([method, cursors], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(method: str, cursor: str) -> dict[str, str] | None:
    """The per-target cursors inside a gateway cursor for ``method``, or None if it is not a valid one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not (isinstance(decoded, list) and len(decoded) == 2 and decoded[0] == method):
        return None
    cursors = decoded[1]
    if not isinstance(cursors, dict) or not cursors:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cursors.items()):
        return None
    return cursors


def merge_capabilities(capabilities: Iterable[JSON]) -> JSON:
    """Union of the routable server capabilities: a feature is present if any target has it, flags OR'ed."""
    merged: JSON = {}
    for caps in capabilities:
        if not isinstance(caps, dict):
            continue
        for name in _ROUTED_CAPABILITIES:
            value = caps.get(name)
            if not isinstance(value, dict):
                continue
            into = merged.setdefault(name, {})
            for flag, on in value.items():
                if isinstance(on, bool):
                    into[flag] = into.get(flag, False) or on
    return merged


def merge_instructions(by_target: Iterable[tuple[str, Any]]) -> str | None:
    """One labelled block per target that has instructions, in target order; None if no target has any."""
    blocks = [f"[{target}]\n{text.strip()}" for target, text in by_target if isinstance(text, str) and text.strip()]
    return "\n\n".join(blocks) if blocks else None


def _template_pattern(template: str) -> re.Pattern[str]:
    """A matcher for URIs expanded from an RFC 6570 template (any expression matches any text)."""
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile(".*".join(re.escape(part) for part in parts), re.DOTALL)


@dataclass(slots=True, eq=False)
class _Exchange:
    """One client request in flight: routed to one target, or fanned out to several."""

    client_id: RequestId
    method: str
    modern: bool
    fan_out: bool
    upstream: dict[str, int] = field(default_factory=dict)  # target -> gateway id sent to it, while pending
    tokens: list[tuple[str, int]] = field(default_factory=list)  # (target, gateway progress token)
    results: dict[str, JSON] = field(default_factory=dict)
    failures: dict[str, JSON] = field(default_factory=dict)
    fresh_list: bool = False  # a first page: rebuilds the name index
    requested_version: str | None = None  # initialize: the version the client asked for
    resilience: ResilienceSettings | None = None  # the caller's timeouts and retries
    sent: dict[str, JSON] = field(default_factory=dict)  # target -> request last sent, for a retry
    retries: dict[str, int] = field(default_factory=dict)  # target -> retries done


@dataclass(slots=True, eq=False)
class _Walk:
    """Fetching every page of one target's tools or prompts, so calls can be checked against the catalog."""

    kind: Kind
    target: str
    meta: JSON | None
    names: set[str] = field(default_factory=set)
    pages: int = 0
    parked: list[RequestId] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Parked:
    """A call waiting for catalog walks before it can be routed or refused."""

    method: str
    params: JSON
    modern: bool
    waiting: set[tuple[Kind, str]]
    failures: dict[str, JSON] = field(default_factory=dict)
    resilience: ResilienceSettings | None = None


class McpFederation:
    """Federation state for one client conversation; see the module docstring for the rules."""

    def __init__(
        self,
        config: FederationConfig,
        visibility: Visibility = allow_all,
        catalogs: MutableMapping[tuple[Kind, str], frozenset[str]] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``catalogs`` may be shared by conversations of one backend (e.g. 2026-07-28 requests, which have no
        session), so a call does not walk the target's lists each time; it holds upstream names, before
        visibility, so sharing across callers is safe. ``rand`` draws the retry backoff's jitter."""
        self.config = config
        self._rand = rand
        # The resilience of the client request being handled (set around a handler, kept by parked calls).
        self._resilience: ResilienceSettings | None = None
        # (target, upstream tool name) marked readOnlyHint or idempotentHint by the target's tools/list.
        self._idempotent_tools: set[tuple[str, str]] = set()
        self.naming = config.naming
        self.visibility = visibility
        self._ids = itertools.count(1)
        self._exchanges: dict[RequestId, _Exchange] = {}
        self._upstream: dict[tuple[str, int], _Exchange | _Walk] = {}
        # Complete catalogs of upstream tool/prompt names per (kind, target); walks filling them; parked calls.
        self._catalogs = catalogs if catalogs is not None else {}
        self._observing: dict[tuple[Kind, str], set[str]] = {}
        self._walks: dict[tuple[Kind, str], _Walk] = {}
        self._parked: dict[RequestId, _Parked] = {}
        self._progress: dict[tuple[str, int], Any] = {}  # (target, gateway token) -> client token
        # gateway id -> (target, target's id, gateway progress token or None)
        self._relayed: dict[str, tuple[str, RequestId, str | None]] = {}
        self._relayed_by_target: dict[tuple[str, RequestId], str] = {}
        self._relayed_progress: dict[str, tuple[str, Any]] = {}  # gateway token -> (target, target's token)
        self._down: set[str] = set()
        self._live: tuple[str, ...] = self.naming.targets  # the targets not in _down, in config order
        self.target_capabilities: dict[str, JSON] = {}
        self.target_versions: dict[str, str] = {}
        # Who listed a name or URI first (NEVER collisions); bare resource URIs route by it.
        self._owners: dict[Kind, dict[str, str]] = {kind: {} for kind in Kind}
        self._templates: dict[tuple[str, str], re.Pattern[str]] = {}  # (target, URI template) -> matcher
        self._collisions: list[tuple[Kind, str, str]] = []
        self._requests: dict[str, Callable[[RequestId, str, JSON, bool], list[Action]]] = {
            "initialize": self._fan_out_lifecycle,
            "server/discover": self._fan_out_lifecycle,
            "ping": self._ping,
            "logging/setLevel": self._set_level,
            "completion/complete": self._complete,
            **dict.fromkeys(_LISTS, self._list),
            **dict.fromkeys(_NAMED, self._route_named),
            **dict.fromkeys(_BY_URI, self._route_uri),
        }

    # Introspection ------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Client requests awaiting targets plus server-to-client requests awaiting the client."""
        return len(self._exchanges) + len(self._parked) + len(self._relayed)

    @property
    def live_targets(self) -> tuple[str, ...]:
        """Targets taking part in this conversation (all but those that failed initialize under FAIL_OPEN)."""
        return self._live

    def take_collisions(self) -> list[tuple[Kind, str, str]]:
        """``(kind, name, shadowed target)`` dropped under NEVER since the last call, for the shell to log."""
        taken, self._collisions = self._collisions, []
        return taken

    # Inputs -------------------------------------------------------------------------------------------------

    def receive_from_client(self, message: Any, resilience: ResilienceSettings | None = None) -> list[Action]:
        """Handle one parsed JSON-RPC message from the client; ``resilience`` is the caller's policy for a
        request (per-try timeout and retries of its upstream attempts)."""
        if not isinstance(message, dict):
            return [SendToClient(_error(None, INVALID_REQUEST, "Invalid Request"))]
        method = message.get("method")
        if method is None:
            if _is_id(message.get("id")) and ("result" in message or "error" in message):
                return self._client_response(message)
            return [SendToClient(_error(None, INVALID_REQUEST, "Invalid Request"))]
        has_id = "id" in message
        request_id = message.get("id")
        if not isinstance(method, str) or (has_id and not _is_id(request_id)):
            return [SendToClient(_error(None, INVALID_REQUEST, "Invalid Request"))]
        params = message.get("params")
        if params is None:
            params = {}
        if not has_id:
            return self._client_notification(method, params) if isinstance(params, dict) else []
        if not isinstance(params, dict):
            return [SendToClient(_error(request_id, INVALID_PARAMS, "params must be an object"))]
        handler = self._requests.get(method)
        if handler is None:
            return [SendToClient(_error(request_id, METHOD_NOT_FOUND, f"Method not found: {method}"))]
        if request_id in self._exchanges or request_id in self._parked:
            return [SendToClient(_error(request_id, INVALID_REQUEST, "Request id already in use"))]
        meta = params.get("_meta")
        modern = isinstance(meta, dict) and _META_VERSION in meta
        self._resilience = resilience
        try:
            return handler(request_id, method, params, modern)
        finally:
            self._resilience = None

    def receive_from_target(self, target: str, message: Any) -> list[Action]:
        """Handle one parsed JSON-RPC message from ``target``; malformed upstream messages are dropped."""
        if target not in self.naming.targets or not isinstance(message, dict):
            return []
        method = message.get("method")
        if isinstance(method, str):
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if "id" in message:
                return self._target_request(target, message.get("id"), method, params)
            return self._target_notification(target, method, params)
        up_id = message.get("id")
        if not isinstance(up_id, int) or isinstance(up_id, bool):
            return []
        exchange = self._upstream.pop((target, up_id), None)
        if exchange is None:
            return []  # late answer to a cancelled or failed exchange
        error = message.get("error")
        result = message.get("result")
        if not isinstance(error, dict) and not isinstance(result, dict):
            error = {"code": INTERNAL_ERROR, "message": "malformed response"}
        if isinstance(exchange, _Walk):
            return self._walk_step(exchange, result, error if isinstance(error, dict) else None)
        del exchange.upstream[target]
        if isinstance(error, dict):
            return self._settle(exchange, target, error=error)
        return self._settle(exchange, target, result=result)

    def target_failed(self, target: str, reason: str) -> list[Action]:
        """The transport to ``target`` broke or timed out: fail what waits on it, cancel what it asked."""
        error = {"code": INTERNAL_ERROR, "message": reason}
        actions: list[Action] = []
        for (t, up_id), exchange in list(self._upstream.items()):
            if t != target:
                continue
            del self._upstream[(t, up_id)]
            if isinstance(exchange, _Walk):
                actions += self._walk_step(exchange, None, error)
            else:
                del exchange.upstream[target]
                actions += self._settle(exchange, target, error=error)
        for gw_id, (t, _, _) in list(self._relayed.items()):
            if t == target:
                self._forget_relayed(gw_id)
                params = {"requestId": gw_id, "reason": f"MCP target {target!r} failed"}
                actions.append(SendToClient({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}))
        return actions

    # Resilience (the shell's timers and failed sends) ----------------------------------------------------

    def expire(self, request_id: RequestId) -> list[Action]:
        """The client request ``request_id`` reached its deadline: answer it with -32001, cancel every
        upstream attempt still pending, and forget it (late answers are dropped); [] when nothing is
        pending for that id (answered already)."""
        if self._parked.pop(request_id, None) is not None:
            return [SendToClient(_error(request_id, REQUEST_TIMEOUT, "Request timed out"))]
        exchange = self._exchanges.get(request_id)
        if exchange is None:
            return []
        pending = list(exchange.upstream.items())
        self._forget(exchange)
        actions: list[Action] = [SendToClient(_error(request_id, REQUEST_TIMEOUT, "Request timed out"))]
        for target, up_id in pending:
            actions.append(SendToTarget(target, _cancelled(up_id, "the request timed out at the gateway")))
        return actions

    def is_pending(self, target: str, up_id: int) -> bool:
        """Whether an answer from ``target`` to gateway id ``up_id`` is still awaited (a delayed retry checks
        this before it goes out: its request may have been answered, cancelled or expired meanwhile)."""
        return (target, up_id) in self._upstream

    def retry_attempt(self, target: str, up_id: int, failure: FailureKind | int) -> SendToTarget | None:
        """The request sent to ``target`` as ``up_id`` got no response (``failure``: connect-failure, reset,
        or a 5xx status): the same request under a fresh id, with its backoff as ``delay``, when the
        caller's policy retries it; None when it is not retried (the shell then fails it as before)."""
        exchange = self._upstream.get((target, up_id))
        if not isinstance(exchange, _Exchange) or not self._may_retry(exchange, target, failure):
            return None
        return self._resend(exchange, target, up_id)

    def attempt_timed_out(self, target: str, up_id: int) -> list[Action]:
        """The per-try timeout of the attempt ``up_id`` on ``target`` passed without its answer: cancel that
        attempt, then retry it (as a ``reset``) or fail this target's part of the request with -32001."""
        exchange = self._upstream.get((target, up_id))
        if not isinstance(exchange, _Exchange):
            return []
        cancel = SendToTarget(target, _cancelled(up_id, "the attempt timed out at the gateway"))
        if self._may_retry(exchange, target, "reset"):
            return [cancel, self._resend(exchange, target, up_id)]
        del self._upstream[(target, up_id)]
        del exchange.upstream[target]
        error = {"code": REQUEST_TIMEOUT, "message": f"Request timed out: MCP target {target!r} did not answer"}
        return [cancel, *self._settle(exchange, target, error=error)]

    def _may_retry(self, exchange: _Exchange, target: str, failure: FailureKind | int) -> bool:
        resilience = exchange.resilience
        retry = resilience.retry if resilience is not None else None
        if retry is None or exchange.retries.get(target, 0) >= retry.attempts or target not in exchange.sent:
            return False
        if isinstance(failure, int):
            if not retries_status(retry, failure):
                return False
        elif not retries_failure(retry, failure):
            return False
        if retries_mcp_method(retry, exchange.method):
            return True
        if exchange.method not in NON_IDEMPOTENT_MCP_METHODS:
            return False
        name = exchange.sent[target]["params"].get("name")
        return (target, name) in self._idempotent_tools

    def _resend(self, exchange: _Exchange, target: str, up_id: int) -> SendToTarget:
        """The request again under a fresh gateway id; the old id's answer, if one ever comes, is dropped."""
        retry = exchange.resilience.retry if exchange.resilience is not None else None
        assert retry is not None
        done = exchange.retries[target] = exchange.retries.get(target, 0) + 1
        self._upstream.pop((target, up_id), None)
        new_id = next(self._ids)
        exchange.upstream[target] = new_id
        self._upstream[(target, new_id)] = exchange
        message = exchange.sent[target] = {**exchange.sent[target], "id": new_id}
        delay = backoff_delay(retry, done, self._rand)
        assert exchange.resilience is not None
        return SendToTarget(target, message, try_timeout=exchange.resilience.per_try_timeout, delay=delay)

    def _note_hints(self, target: str, items: Any, first_page: bool) -> None:
        """Remember which of a target's tools say a repeated call has no further effect."""
        hinted = self._idempotent_tools
        if first_page:
            self._idempotent_tools = hinted = {key for key in hinted if key[0] != target}
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            annotations = item.get("annotations")
            if isinstance(annotations, dict) and (
                annotations.get("readOnlyHint") is True or annotations.get("idempotentHint") is True
            ):
                hinted.add((target, item["name"]))

    # Client requests ----------------------------------------------------------------------------------------

    def _ping(self, request_id: RequestId, method: str, params: JSON, modern: bool) -> list[Action]:
        return [SendToClient(_result(request_id, {"resultType": "complete"} if modern else {}))]

    def _fan_out_lifecycle(self, request_id: RequestId, method: str, params: JSON, modern: bool) -> list[Action]:
        version = params.get("protocolVersion")
        requested = version if isinstance(version, str) else None
        return self._fan_out(request_id, method, modern, {t: params for t in self.live_targets}, requested=requested)

    def _set_level(self, request_id: RequestId, method: str, params: JSON, modern: bool) -> list[Action]:
        return self._fan_out(request_id, method, modern, {t: params for t in self._eligible("logging")})

    def _list(self, request_id: RequestId, method: str, params: JSON, modern: bool) -> list[Action]:
        cursor = params.get("cursor")
        if cursor is None:
            plain = {k: v for k, v in params.items() if k != "cursor"}
            per_target = {t: plain for t in self._eligible(_LISTS[method][2])}
        else:
            cursors = decode_cursor(method, cursor) if isinstance(cursor, str) else None
            if cursors is None or not cursors.keys() <= set(self.naming.targets):
                return [SendToClient(_error(request_id, INVALID_PARAMS, "Invalid cursor"))]
            per_target = {t: {**params, "cursor": cursors[t]} for t in self.live_targets if t in cursors}
        return self._fan_out(request_id, method, modern, per_target, fresh_list=cursor is None)

    def _route_named(
        self, request_id: RequestId, method: str, params: JSON, modern: bool, may_walk: bool = True
    ) -> list[Action]:
        kind, noun = _NAMED[method]
        exposed = params.get("name")
        if not isinstance(exposed, str):
            return [SendToClient(_error(request_id, INVALID_PARAMS, "name must be a string"))]
        hit = self._resolve_name(kind, exposed, may_walk)
        if isinstance(hit, set):
            return self._park(request_id, method, params, modern, kind, hit)
        if hit is None:
            return [SendToClient(_error(request_id, INVALID_PARAMS, f"Unknown {noun}: {exposed}"))]
        target, name = hit
        return self._forward(request_id, method, modern, target, {**params, "name": name})

    def _route_uri(self, request_id: RequestId, method: str, params: JSON, modern: bool) -> list[Action]:
        exposed = params.get("uri")
        if not isinstance(exposed, str):
            return [SendToClient(_error(request_id, INVALID_PARAMS, "uri must be a string"))]
        hit = self._resolve_uri(exposed)
        if hit is None:
            return [SendToClient(_error(request_id, INVALID_PARAMS, f"Unknown resource: {exposed}"))]
        target, uri = hit
        return self._forward(request_id, method, modern, target, {**params, "uri": uri})

    def _complete(
        self, request_id: RequestId, method: str, params: JSON, modern: bool, may_walk: bool = True
    ) -> list[Action]:
        ref = params.get("ref")
        ref_type = ref.get("type") if isinstance(ref, dict) else None
        if ref_type == "ref/prompt":
            exposed = ref.get("name")
            hit = self._resolve_name(Kind.PROMPT, exposed, may_walk) if isinstance(exposed, str) else None
            if isinstance(hit, set):
                return self._park(request_id, method, params, modern, Kind.PROMPT, hit)
            if hit is None:
                return [SendToClient(_error(request_id, INVALID_PARAMS, f"Unknown prompt: {exposed}"))]
            target, upstream_ref = hit[0], {**ref, "name": hit[1]}
        elif ref_type == "ref/resource":
            exposed = ref.get("uri")
            hit = self._resolve_template(exposed) if isinstance(exposed, str) else None
            if hit is None:
                return [SendToClient(_error(request_id, INVALID_PARAMS, f"Unknown resource: {exposed}"))]
            target, upstream_ref = hit[0], {**ref, "uri": hit[1]}
        else:
            return [SendToClient(_error(request_id, INVALID_PARAMS, "ref must be a ref/prompt or ref/resource"))]
        return self._forward(request_id, method, modern, target, {**params, "ref": upstream_ref})

    # Routing -------------------------------------------------------------------------------------------------

    def _eligible(self, capability: str) -> list[str]:
        """Live targets that have ``capability``, or whose capabilities are not known (no lifecycle seen)."""
        caps = self.target_capabilities
        return [t for t in self.live_targets if t not in caps or capability in caps[t]]

    def _visible(self, kind: Kind, target: str, name: str) -> bool:
        return self.visibility(kind, target, name)

    def _resolve_name(self, kind: Kind, exposed: str, may_walk: bool) -> tuple[str, str] | set[str] | None:
        """Where a tool/prompt call goes: ``(target, upstream name)``; the targets whose catalogs must be
        walked first; or None for unknown *and* hidden alike.

        Unknown is decided against the target's full catalog, never by forwarding, so the client cannot tell a
        hidden name (refused here) from a missing one (also refused here). Without prefixes the owner is the
        first target in config order whose catalog has the name visibly (the rule ``tools/list`` follows).
        """
        catalogs = self._catalogs
        if self.naming.prefixed:
            hit = self.naming.split(exposed)
            if hit is None or not self._visible(kind, *hit):
                return None
            target, name = hit
            if target in self._down:
                return hit  # visible but unreachable: _forward says so
            catalog = catalogs.get((kind, target))
            if catalog is None:
                return {target} if may_walk else None
            return hit if name in catalog else None
        candidates = self._eligible(_CATALOGS[kind][2])
        missing = {t for t in candidates if (kind, t) not in catalogs}
        if missing and may_walk:
            return missing
        for target in candidates:
            if exposed in catalogs.get((kind, target), ()) and self._visible(kind, target, exposed):
                return target, exposed
        return None

    def _park(
        self, request_id: RequestId, method: str, params: JSON, modern: bool, kind: Kind, targets: set[str]
    ) -> list[Action]:
        """Hold a call until the catalogs of ``targets`` are known, starting the walks not yet running."""
        waiting = {(kind, t) for t in targets}
        self._parked[request_id] = _Parked(method, params, modern, waiting, resilience=self._resilience)
        meta = params.get("_meta")
        meta = {k: v for k, v in meta.items() if k != "progressToken"} if isinstance(meta, dict) else None
        actions: list[Action] = []
        for target in self.naming.targets:
            if target not in targets:
                continue
            walk = self._walks.get((kind, target))
            if walk is None:
                walk = self._walks[(kind, target)] = _Walk(kind, target, meta)
                actions.append(self._walk_send(walk, None))
            walk.parked.append(request_id)
        return actions

    def _walk_send(self, walk: _Walk, cursor: str | None) -> SendToTarget:
        up_id = next(self._ids)
        walk.pages += 1
        params: JSON = {}
        if walk.meta is not None:
            params["_meta"] = walk.meta
        if cursor is not None:
            params["cursor"] = cursor
        self._upstream[(walk.target, up_id)] = walk
        message = {"jsonrpc": "2.0", "id": up_id, "method": _CATALOGS[walk.kind][0], "params": params}
        return SendToTarget(walk.target, message)

    def _walk_step(self, walk: _Walk, result: JSON | None, error: JSON | None) -> list[Action]:
        """One page of a catalog walk arrived (or the walk failed); release the calls it held when done."""
        _, key, _ = _CATALOGS[walk.kind]
        if error is None and result is not None:
            items = result.get(key)
            for item in items if isinstance(items, list) else ():
                name = item.get("name") if isinstance(item, dict) else None
                if isinstance(name, str):
                    walk.names.add(name)
            if walk.kind is Kind.TOOL:
                self._note_hints(walk.target, items, walk.pages == 1)
            next_cursor = result.get("nextCursor")
            if isinstance(next_cursor, str) and next_cursor:
                if walk.pages < MAX_CATALOG_PAGES:
                    return [self._walk_send(walk, next_cursor)]
                error = {"code": INTERNAL_ERROR, "message": f"more than {MAX_CATALOG_PAGES} list pages"}
        elif error is not None and error.get("code") == METHOD_NOT_FOUND:
            error = None  # the target has no such feature: an empty catalog
        walk_key = (walk.kind, walk.target)
        self._walks.pop(walk_key, None)
        if error is None:
            self._catalogs[walk_key] = frozenset(walk.names)
        actions: list[Action] = []
        for request_id in walk.parked:
            parked = self._parked.get(request_id)
            if parked is None:
                continue  # cancelled meanwhile
            parked.waiting.discard(walk_key)
            if error is not None:
                parked.failures[walk.target] = error
            if parked.waiting:
                continue
            del self._parked[request_id]
            if parked.failures and (self.naming.prefixed or self.config.failure_mode is FailureMode.FAIL_CLOSED):
                actions.append(SendToClient(self._failure(request_id, parked.failures)))
                continue
            route = self._route_named if parked.method in _NAMED else self._complete
            self._resilience = parked.resilience
            try:
                actions += route(request_id, parked.method, parked.params, parked.modern, may_walk=False)
            finally:
                self._resilience = None
        return actions

    def _resolve_uri(self, exposed: str) -> tuple[str, str] | None:
        """The owner of a resource URI: our rewrite, else a listed URI, else one unique template owner."""
        hit = self.naming.split_uri(exposed)
        if hit is None:
            owner = self._owners[Kind.RESOURCE].get(exposed)
            if owner == _AMBIGUOUS:
                return None
            if owner is None:
                owners = {t for (t, _), pattern in self._templates.items() if pattern.fullmatch(exposed)}
                if len(owners) == 1:
                    owner = owners.pop()
                elif not owners and len(self.naming.targets) == 1:
                    owner = self.naming.targets[0]
            hit = (owner, exposed) if owner is not None else None
        return hit if hit is not None and self._visible(Kind.RESOURCE, *hit) else None

    def _resolve_template(self, exposed: str) -> tuple[str, str] | None:
        hit = self.naming.split_uri(exposed)
        if hit is None:
            owners = [t for t, template in self._templates if template == exposed]
            if len(owners) == 1:
                hit = (owners[0], exposed)
            elif not owners and len(self.naming.targets) == 1:
                hit = (self.naming.targets[0], exposed)
        return hit if hit is not None and self._visible(Kind.RESOURCE_TEMPLATE, *hit) else None

    def _forward(self, request_id: RequestId, method: str, modern: bool, target: str, params: JSON) -> list[Action]:
        if target in self._down:
            return [SendToClient(_error(request_id, INTERNAL_ERROR, f"MCP target {target!r} is unavailable"))]
        exchange = _Exchange(request_id, method, modern, fan_out=False, resilience=self._resilience)
        self._exchanges[request_id] = exchange
        return [self._send(exchange, target, params)]

    def _fan_out(
        self,
        request_id: RequestId,
        method: str,
        modern: bool,
        per_target: dict[str, JSON],
        *,
        fresh_list: bool = False,
        requested: str | None = None,
    ) -> list[Action]:
        exchange = _Exchange(
            request_id,
            method,
            modern,
            fan_out=True,
            fresh_list=fresh_list,
            requested_version=requested,
            resilience=self._resilience,
        )
        if not per_target:
            return [SendToClient(self._merge(exchange))]
        self._exchanges[request_id] = exchange
        return [self._send(exchange, target, params) for target, params in per_target.items()]

    def _send(self, exchange: _Exchange, target: str, params: JSON) -> SendToTarget:
        up_id = next(self._ids)
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            token = next(self._ids)
            self._progress[(target, token)] = meta["progressToken"]
            exchange.tokens.append((target, token))
            params = {**params, "_meta": {**meta, "progressToken": token}}
        exchange.upstream[target] = up_id
        self._upstream[(target, up_id)] = exchange
        message = {"jsonrpc": "2.0", "id": up_id, "method": exchange.method, "params": params}
        resilience = exchange.resilience
        if resilience is None:
            return SendToTarget(target, message)
        exchange.sent[target] = message
        return SendToTarget(target, message, try_timeout=resilience.per_try_timeout)

    def _forget(self, exchange: _Exchange) -> None:
        self._exchanges.pop(exchange.client_id, None)
        for target, up_id in exchange.upstream.items():
            self._upstream.pop((target, up_id), None)
        exchange.upstream.clear()
        for key in exchange.tokens:
            self._progress.pop(key, None)

    def _settle(
        self, exchange: _Exchange, target: str, *, result: JSON | None = None, error: JSON | None = None
    ) -> list[Action]:
        """Record one target's outcome; answer the client once nothing is pending."""
        if not exchange.fan_out:
            self._forget(exchange)
            if error is not None:
                return [SendToClient({"jsonrpc": "2.0", "id": exchange.client_id, "error": error})]
            assert result is not None
            return [SendToClient(_result(exchange.client_id, self._map_result(exchange.method, target, result)))]
        if error is not None:
            if exchange.method in _LISTS and error.get("code") == METHOD_NOT_FOUND:
                exchange.results[target] = {}  # the target has no such feature: an empty page, not a failure
            else:
                exchange.failures[target] = error
        else:
            assert result is not None
            exchange.results[target] = result
        if exchange.upstream:
            return []
        self._forget(exchange)
        failures = exchange.failures
        if failures and (self.config.failure_mode is FailureMode.FAIL_CLOSED or not exchange.results):
            return [SendToClient(self._failure(exchange.client_id, failures))]
        if exchange.method in ("initialize", "server/discover"):
            self._down.update(failures)
            self._live = tuple(t for t in self.naming.targets if t not in self._down)
        return [SendToClient(self._merge(exchange))]

    def _failure(self, request_id: RequestId, failures: dict[str, JSON]) -> JSON:
        """The error naming every failed target (in config order) with what each one answered."""
        names = [t for t in self.naming.targets if t in failures]
        message = f"MCP target{'s' if len(names) > 1 else ''} failed: {', '.join(names)}"
        return _error(request_id, INTERNAL_ERROR, message, {"targets": {t: failures[t] for t in names}})

    # Merging -------------------------------------------------------------------------------------------------

    def _merge(self, exchange: _Exchange) -> JSON:
        method, results = exchange.method, exchange.results
        ordered = [(t, results[t]) for t in self.naming.targets if t in results]
        if method in _LISTS:
            merged = self._merge_list(exchange, ordered)
        elif method in ("initialize", "server/discover"):
            merged = self._merge_lifecycle(exchange, ordered)
        else:
            merged = {}
        if exchange.modern:
            merged.setdefault("resultType", "complete")
        return _result(exchange.client_id, merged)

    def _merge_lifecycle(self, exchange: _Exchange, ordered: list[tuple[str, JSON]]) -> JSON:
        for target, result in ordered:
            caps = result.get("capabilities")
            self.target_capabilities[target] = caps if isinstance(caps, dict) else {}
            version = result.get("protocolVersion")
            if isinstance(version, str):
                self.target_versions[target] = version
        merged: JSON = {"capabilities": merge_capabilities(r.get("capabilities") for _, r in ordered)}
        if exchange.method == "initialize":
            merged = {"protocolVersion": self._negotiate(exchange), **merged, "serverInfo": self.config.server_info}
        else:
            merged = {
                "supportedVersions": list(self.config.supported_versions),
                **merged,
                "_meta": {_META_SERVER_INFO: self.config.server_info},
            }
        instructions = merge_instructions((t, r.get("instructions")) for t, r in ordered)
        if instructions is not None:
            merged["instructions"] = instructions
        return merged

    def _negotiate(self, exchange: _Exchange) -> str:
        """The client's version if the gateway speaks it, else the gateway's newest (the client decides)."""
        requested = exchange.requested_version
        return requested if requested in self.config.supported_versions else self.config.supported_versions[0]

    def _merge_list(self, exchange: _Exchange, ordered: list[tuple[str, JSON]]) -> JSON:
        key, kind, _ = _LISTS[exchange.method]
        owners = self._owners[kind]
        if exchange.fresh_list:
            owners.clear()
            if kind is Kind.RESOURCE_TEMPLATE:
                self._templates.clear()
        field_name = "uriTemplate" if kind is Kind.RESOURCE_TEMPLATE else "uri" if kind is Kind.RESOURCE else "name"
        by_uri = field_name != "name"
        items: list[JSON] = []
        cursors: dict[str, str] = {}
        observe = kind in _CATALOGS
        for target, result in ordered:
            raw = result.get(key)
            next_cursor = result.get("nextCursor")
            has_more = isinstance(next_cursor, str) and bool(next_cursor)
            if observe:
                self._observe(kind, target, raw, exchange.fresh_list, has_more)
                if kind is Kind.TOOL:
                    self._note_hints(target, raw, exchange.fresh_list)
            for item in raw if isinstance(raw, list) else ():
                name = item.get(field_name) if isinstance(item, dict) else None
                if not isinstance(name, str) or not self._visible(kind, target, name):
                    continue
                owner = owners.setdefault(name, target)
                if owner != target:
                    if not self.naming.prefixed:
                        self._collisions.append((kind, name, target))
                        continue
                    owners[name] = _AMBIGUOUS  # listed by several targets: only the rewritten form routes
                if kind is Kind.RESOURCE_TEMPLATE and (target, name) not in self._templates:
                    self._templates[(target, name)] = _template_pattern(name)
                exposed = self.naming.expose_uri(target, name) if by_uri else self.naming.expose(target, name)
                items.append(item if exposed == name else {**item, field_name: exposed})
            if has_more:
                cursors[target] = next_cursor
        merged: JSON = {key: items}
        if cursors:
            merged["nextCursor"] = encode_cursor(exchange.method, cursors)
        return merged

    def _observe(self, kind: Kind, target: str, items: Any, first_page: bool, has_more: bool) -> None:
        """Learn a target's full catalog from a client's own list walk, sparing a separate one for calls."""
        key = (kind, target)
        names = self._observing.pop(key, None)
        if first_page:
            names = set()
        if names is None:
            return  # a later page of a walk we did not see begin
        for item in items if isinstance(items, list) else ():
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str):
                names.add(name)
        if has_more:
            self._observing[key] = names
        else:
            self._catalogs[key] = frozenset(names)

    def _map_result(self, method: str, target: str, result: JSON) -> JSON:
        """Rewrite the resource URIs a routed result carries, so the client can read them through us."""
        if not self.naming.prefixed:
            return result
        if method == "resources/read":
            contents = result.get("contents")
            if isinstance(contents, list):
                return {**result, "contents": [self._map_uri_field(target, c) for c in contents]}
        elif method == "tools/call":
            content = result.get("content")
            if isinstance(content, list):
                return {**result, "content": [self._map_block(target, block) for block in content]}
        elif method == "prompts/get":
            messages = result.get("messages")
            if isinstance(messages, list):
                mapped = [
                    {**m, "content": self._map_block(target, m["content"])}
                    if isinstance(m, dict) and isinstance(m.get("content"), dict)
                    else m
                    for m in messages
                ]
                return {**result, "messages": mapped}
        return result

    def _map_uri_field(self, target: str, obj: Any) -> Any:
        if isinstance(obj, dict) and isinstance(obj.get("uri"), str):
            return {**obj, "uri": self.naming.expose_uri(target, obj["uri"])}
        return obj

    def _map_block(self, target: str, block: Any) -> Any:
        if not isinstance(block, dict):
            return block
        kind = block.get("type")
        if kind == "resource_link":
            return self._map_uri_field(target, block)
        if kind == "resource":
            return {**block, "resource": self._map_uri_field(target, block.get("resource"))}
        return block

    # Server-to-client requests and notifications -------------------------------------------------------------

    def _target_request(self, target: str, original: Any, method: str, params: JSON) -> list[Action]:
        if not _is_id(original):
            return []
        if (target, original) in self._relayed_by_target:
            return [SendToTarget(target, _error(original, INVALID_REQUEST, "Request id already in use"))]
        gw_id = f"gw-{next(self._ids)}"
        token = None
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            token = f"gw-{next(self._ids)}"
            self._relayed_progress[token] = (target, meta["progressToken"])
            params = {**params, "_meta": {**meta, "progressToken": token}}
        self._relayed[gw_id] = (target, original, token)
        self._relayed_by_target[(target, original)] = gw_id
        return [SendToClient({"jsonrpc": "2.0", "id": gw_id, "method": method, "params": params})]

    def _forget_relayed(self, gw_id: str) -> tuple[str, RequestId] | None:
        """Drop a relayed request and its progress token; ``(target, target's id)`` if it was pending."""
        entry = self._relayed.pop(gw_id, None)
        if entry is None:
            return None
        target, original, token = entry
        self._relayed_by_target.pop((target, original), None)
        if token is not None:
            self._relayed_progress.pop(token, None)
        return target, original

    def _client_response(self, message: JSON) -> list[Action]:
        gw_id = message["id"]
        entry = self._forget_relayed(gw_id) if isinstance(gw_id, str) else None
        if entry is None:
            return []  # an answer to nothing we asked (or to a request already cancelled)
        target, original = entry
        response: JSON = {"jsonrpc": "2.0", "id": original}
        if "error" in message:
            response["error"] = message["error"]
        else:
            response["result"] = message["result"]
        return [SendToTarget(target, response)]

    def _client_notification(self, method: str, params: JSON) -> list[Action]:
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            if self._parked.pop(request_id, None) is not None:  # type: ignore[arg-type]
                return []  # its catalog walks go on: their result is worth keeping
            exchange = self._exchanges.get(request_id)  # type: ignore[arg-type]
            if exchange is None:
                return []
            pending = list(exchange.upstream.items())
            self._forget(exchange)
            actions: list[Action] = []
            for target, up_id in pending:
                upstream_params = {**params, "requestId": up_id}
                actions.append(SendToTarget(target, {"jsonrpc": "2.0", "method": method, "params": upstream_params}))
            return actions
        if method == "notifications/progress":
            entry = self._relayed_progress.get(params.get("progressToken"))  # type: ignore[arg-type]
            if entry is None:
                return []
            target, token = entry
            message = {"jsonrpc": "2.0", "method": method, "params": {**params, "progressToken": token}}
            return [SendToTarget(target, message)]
        # initialized, roots/list_changed and the like concern every target in the conversation.
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        return [SendToTarget(target, message) for target in self.live_targets]

    def _target_notification(self, target: str, method: str, params: JSON) -> list[Action]:
        if method == "notifications/progress":
            token = params.get("progressToken")
            key = (target, token)
            if not isinstance(token, int) or key not in self._progress:
                return []
            params = {**params, "progressToken": self._progress[key]}
        elif method == "notifications/cancelled":
            original = params.get("requestId")
            gw_id = self._relayed_by_target.get((target, original)) if _is_id(original) else None
            if gw_id is None:
                return []
            self._forget_relayed(gw_id)
            params = {**params, "requestId": gw_id}
        elif method == "notifications/resources/updated":
            uri = params.get("uri")
            if not isinstance(uri, str) or not self._visible(Kind.RESOURCE, target, uri):
                return []
            params = {**params, "uri": self.naming.expose_uri(target, uri)}
        elif method in _LIST_CHANGED:
            kind = _LIST_CHANGED[method]
            self._catalogs.pop((kind, target), None)
            self._observing.pop((kind, target), None)
            if kind is Kind.TOOL:
                self._idempotent_tools = {key for key in self._idempotent_tools if key[0] != target}
        elif method == "notifications/message":
            logger = params.get("logger")
            params = {**params, "logger": f"{target}/{logger}" if isinstance(logger, str) and logger else target}
        return [SendToClient({"jsonrpc": "2.0", "method": method, "params": params})]


__all__ = [
    "DEFAULT_SUPPORTED_VERSIONS",
    "REQUEST_TIMEOUT",
    "Action",
    "FailureMode",
    "FederationConfig",
    "Kind",
    "McpFederation",
    "PrefixMode",
    "SendToClient",
    "SendToTarget",
    "Visibility",
    "allow_all",
    "decode_cursor",
    "encode_cursor",
    "merge_capabilities",
    "merge_instructions",
]
