"""One upstream MCP session per target per worker, shared by sessionless (2026-07-28) client requests.

A 2026-07-28 client has no session, but a session-era target (streamable HTTP 2025-x such as npm
server-everything, legacy SSE, stdio) only speaks inside one. The gateway therefore opens ONE upstream
session per such target per worker, initialized by the gateway itself, and multiplexes every concurrent
sessionless request over it:

- Request ids and progress tokens are rewritten to values unique on the upstream session, so answers and
  progress reach the request (the ``SharedLease``) that caused them. Notifications not tied to a request
  (list_changed, resources/updated) go to the upstream's event listeners (``subscriptions/listen`` relays).
- The 2026-07-28 envelope (``_meta`` keys ``io.modelcontextprotocol/*``, ``inputResponses``,
  ``requestState``) is stripped before a message goes upstream; ``server/discover`` is answered from the
  upstream's initialize result; ``ping`` from the target is answered by the gateway.
- Server-to-client requests (elicitation/create, sampling/createMessage) cannot reach a
  2026-07-28 client, so they become an ``input_required`` result (the input-required bridge): the
  upstream call is *parked* (it keeps running upstream, waiting for its answer) and the client gets the
  target's request as ``inputRequests`` plus a gateway ``requestState`` sealed with AES-GCM under the
  backend's session keys (integrity, the parked exchange it names, its binding to method, name and
  arguments, its expiry, and the worker that holds it). The client's retry carries ``inputResponses``:
  they go upstream as the responses to the target's requests, and the retry's response stream continues
  the original call. Parked calls live in this worker's memory only: a retry that reaches another
  worker, or comes after expiry, gets a clear -32602 error telling the client to send the call again
  without ``requestState``. An expired parked call is cancelled upstream.
- The target does not say which request an elicitation belongs to (the session era has no such field,
  and stdio has no per-request stream), so a server-to-client request is attributed to the oldest
  interactive call (tools/call, prompts/get, resources/read) in flight on that target. Concurrent
  interactive calls that both ask for input may therefore swap questions; a target that needs strict
  per-call attribution should speak 2026-07-28 itself.

Why one long-lived process per stdio target: a stdio server serves exactly one client session and the
session era ties its state to that session; sessionless clients have no session to scope a process to,
and spawning a process per request would pay start-up and initialize on every call. The shared session
lives until the worker shuts down (``aclose``) and is re-initialized when it dies (process exit, 404 on
an expired HTTP session); calls in flight when it dies fail with a JSON-RPC error, and a request whose
send found the session already gone is sent once more on the fresh one (the target never saw it).

``UpstreamMux`` is the sans-I/O core (messages in, actions out, time passed in); ``SharedUpstream`` and
``SharedLease`` are the I/O shell.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.exceptions import InvalidTag

from dataplane.mcp.channel import JSON, TargetChannel, TargetClosed, TargetUnavailable
from dataplane.mcp.jsonrpc import ErrorCode, RequestId, error_response, result_response
from dataplane.mcp.session import SessionKeyring
from shared.logging import get_logger

log = get_logger("dataplane.mcp.shared_upstream")

MODERN_VERSION: Final = "2026-07-28"
# The version the gateway asks for when it initializes a shared upstream session.
HANDSHAKE_VERSION: Final = "2025-11-25"
# What the gateway tells a session-era target it can do: it bridges elicitation and sampling, which
# belong to a call. Not roots: they describe a client, and a shared session serves many clients (a
# target may ask them at any time, with no call to pin them on); 2026-07-28 deprecates roots anyway.
GATEWAY_CLIENT_CAPABILITIES: Final[JSON] = {"elicitation": {"form": {}, "url": {}}, "sampling": {}}
GATEWAY_CLIENT_INFO: Final[JSON] = {"name": "agentgate", "version": "0.1.0"}
HANDSHAKE_TIMEOUT: Final = 30.0
CLOSE_TIMEOUT: Final = 5.0
# How long a parked call waits for the client's retry, and how many may wait per target.
DEFAULT_INPUT_TTL: Final = 300.0
MAX_PARKED: Final = 1024
# Messages queued for one lease before further ones are dropped (the federation drains them at once).
LEASE_BUFFER: Final = 256
# Methods whose results may be input_required (2026-07-28 "Multi Round-Trip Requests").
INTERACTIVE_METHODS: Final = frozenset({"tools/call", "prompts/get", "resources/read"})
# Server-to-client requests the bridge turns into inputRequests, and the client capability each needs.
INPUT_METHODS: Final = {
    "elicitation/create": "elicitation",
    "sampling/createMessage": "sampling",
}
LISTEN_METHODS: Final = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
    }
)
_ENVELOPE_PREFIX: Final = "io.modelcontextprotocol/"
_META_SERVER_INFO: Final = "io.modelcontextprotocol/serverInfo"
INVALID_STATE: Final = "Invalid or expired requestState"
NOT_HELD: Final = (
    "requestState names an input request this gateway worker does not hold (already answered, expired, or "
    "issued by another worker); send the original request again without requestState and inputResponses"
)


# --------------------------------------------------------------------------------------------- requestState


class RequestStateCodec:
    """Seals and opens the gateway's ``requestState``: ``"s1." key_id "." base64url(nonce || ciphertext)``.

    AES-256-GCM under the backend's session keyring (first key seals, every key opens); the associated
    data binds the token to this format and backend, so a session token or another backend's state does
    not open. The claims are compact JSON; the codec only guarantees integrity and confidentiality, the
    mux checks what they say.
    """

    __slots__ = ("_aad", "_keyring", "_random_bytes")

    def __init__(
        self, keyring: SessionKeyring, backend: str, *, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._keyring = keyring
        self._aad = b"agentgate/mcp-request-state\x00" + backend.encode("utf-8") + b"\x00"
        self._random_bytes = random_bytes

    def seal(self, claims: JSON) -> str:
        key_id = self._keyring.sealing_key_id
        cipher = self._keyring.cipher(key_id)
        assert cipher is not None
        nonce = self._random_bytes(12)
        payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        sealed = cipher.encrypt(nonce, payload, self._aad + key_id.encode("ascii"))
        return f"s1.{key_id}.{base64.urlsafe_b64encode(nonce + sealed).rstrip(b'=').decode('ascii')}"

    def open(self, token: Any) -> JSON | None:
        """The claims of a state this backend sealed, or None for anything else (never raises)."""
        if not isinstance(token, str) or len(token) > 4096 or not token.startswith("s1."):
            return None
        key_id, _, body = token[3:].rpartition(".")
        cipher = self._keyring.cipher(key_id) if key_id else None
        if cipher is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            payload = cipher.decrypt(raw[:12], raw[12:], self._aad + key_id.encode("ascii"))
            claims = json.loads(payload)
        except (binascii.Error, ValueError, InvalidTag):
            return None
        return claims if isinstance(claims, dict) else None


def ephemeral_keyring() -> SessionKeyring:
    """A process-local key, for a backend without session keys (its states only open on this worker anyway)."""
    return SessionKeyring([("ephemeral", os.urandom(32))])


def arguments_digest(params: JSON) -> str:
    """What a retry must repeat exactly: the call's arguments (tools/call, prompts/get), canonically hashed."""
    arguments = params.get("arguments")
    canonical = json.dumps(arguments, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _call_name(method: str, params: JSON) -> Any:
    return params.get("uri") if method == "resources/read" else params.get("name")


def strip_envelope(params: JSON) -> JSON:
    """Params fit for a session-era upstream: no 2026-07-28 ``_meta`` keys, inputResponses or requestState."""
    out = {k: v for k, v in params.items() if k not in ("inputResponses", "requestState")}
    meta = params.get("_meta")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if not k.startswith(_ENVELOPE_PREFIX)}
        if kept:
            out["_meta"] = kept
        else:
            out.pop("_meta", None)
    return out


# ---------------------------------------------------------------------------------------------- the mux core


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Send ``message`` on the shared upstream session."""

    message: JSON


@dataclass(frozen=True, slots=True)
class ToLease:
    """Deliver ``message`` to one lease (one client request's view of the target)."""

    lease: int
    message: JSON


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A target notification not tied to a request (list_changed, resources/updated, log lines)."""

    message: JSON


MuxAction = ToUpstream | ToLease | Broadcast


@dataclass(slots=True, eq=False)
class _Call:
    """One request on the upstream session: owned by a lease, or parked waiting for a client's retry."""

    up_id: int
    method: str
    params: JSON  # as sent upstream (upstream names), for the requestState binding
    owner: int | None
    local_id: RequestId
    up_token: int | None = None
    local_token: Any = None
    # Server-to-client requests this call raised and the client has not answered: key -> (their id, request).
    asked: dict[str, tuple[RequestId, JSON]] = field(default_factory=dict)
    pending_id: str | None = None
    expires: float = math.inf
    final: JSON | None = None  # the target answered while the call was parked


@dataclass(slots=True, eq=False)
class _Lease:
    capabilities: JSON
    calls: dict[RequestId, _Call] = field(default_factory=dict)  # local id -> call


class UpstreamMux:
    """Sans-I/O multiplexing of one upstream session among leases, with the input-required bridge.

    ``target`` names the target (bound into states); ``worker`` identifies the process holding parked
    calls; ``clock`` is monotonic seconds, used for expiry only.
    """

    def __init__(
        self,
        target: str,
        codec: RequestStateCodec,
        *,
        worker: str,
        clock: Callable[[], float] = time.monotonic,
        input_ttl: float = DEFAULT_INPUT_TTL,
        max_parked: int = MAX_PARKED,
    ) -> None:
        self.target = target
        self.codec = codec
        self.worker = worker
        self.clock = clock
        self.input_ttl = input_ttl
        self.max_parked = max_parked
        self.initialize_result: JSON | None = None
        self._ids = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._calls: dict[int, _Call] = {}  # up id -> call, oldest first
        self._tokens: dict[int, _Call] = {}  # up progress token -> call
        self._parked: dict[str, _Call] = {}  # pending id -> call

    # --- introspection --------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def parked(self) -> int:
        return len(self._parked)

    def has_call(self, up_id: int) -> bool:
        return up_id in self._calls

    def next_expiry(self) -> float | None:
        return min((call.expires for call in self._parked.values()), default=None)

    # --- leases ---------------------------------------------------------------------------------------------
    def open_lease(self, capabilities: Any) -> int:
        key = next(self._ids)
        self._leases[key] = _Lease(capabilities if isinstance(capabilities, dict) else {})
        return key

    def close_lease(self, key: int) -> list[MuxAction]:
        """The client request ended: cancel its calls upstream (parked ones are not its own any more)."""
        lease = self._leases.pop(key, None)
        if lease is None:
            return []
        actions: list[MuxAction] = []
        for call in list(lease.calls.values()):
            self._forget(call)
            actions.append(ToUpstream(_cancelled(call.up_id, "the client stopped waiting")))
        return actions

    def from_lease(self, key: int, message: JSON) -> list[MuxAction]:
        """A message the federation sends to this target on behalf of one client request."""
        lease = self._leases.get(key)
        if lease is None:
            return []
        method = message.get("method")
        if not isinstance(method, str):
            return []  # a response: the bridge never lets server-to-client requests reach the federation
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if "id" not in message:
            return self._lease_notification(lease, method, params)
        local_id = message["id"]
        if method == "server/discover":
            return [ToLease(key, result_response(local_id, self._discover_result()))]
        if method in INTERACTIVE_METHODS and params.get("requestState") is not None:
            return self._retry(key, lease, local_id, method, params)
        up_id = next(self._ids)
        upstream = strip_envelope(params)
        call = _Call(up_id, method, upstream, key, local_id)
        meta = upstream.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            call.local_token = meta["progressToken"]
            call.up_token = next(self._ids)
            self._tokens[call.up_token] = call
            upstream = {**upstream, "_meta": {**meta, "progressToken": call.up_token}}
        self._calls[up_id] = call
        lease.calls[local_id] = call
        return [ToUpstream({"jsonrpc": "2.0", "id": up_id, "method": method, "params": upstream})]

    def _lease_notification(self, lease: _Lease, method: str, params: JSON) -> list[MuxAction]:
        if method != "notifications/cancelled":
            return []  # 2026-07-28 clients send no other notifications, and none concern a shared session
        call = lease.calls.get(params.get("requestId"))  # type: ignore[arg-type]
        if call is None:
            return []
        self._forget(call)
        return [ToUpstream(_cancelled(call.up_id, params.get("reason")))]

    def _discover_result(self) -> JSON:
        init = self.initialize_result or {}
        result: JSON = {
            "supportedVersions": [MODERN_VERSION],
            "capabilities": init.get("capabilities") if isinstance(init.get("capabilities"), dict) else {},
            "resultType": "complete",
            "ttlMs": 0,
            "cacheScope": "private",
        }
        if isinstance(init.get("instructions"), str):
            result["instructions"] = init["instructions"]
        if isinstance(init.get("serverInfo"), dict):
            result["_meta"] = {_META_SERVER_INFO: init["serverInfo"]}
        return result

    # --- the input-required bridge: retry -------------------------------------------------------------------
    def _retry(self, key: int, lease: _Lease, local_id: RequestId, method: str, params: JSON) -> list[MuxAction]:
        claims = self.codec.open(params.get("requestState"))
        if claims is None:
            return [ToLease(key, error_response(local_id, ErrorCode.INVALID_PARAMS, INVALID_STATE))]
        if claims.get("w") != self.worker or claims.get("t") != self.target:
            return [ToLease(key, error_response(local_id, ErrorCode.INVALID_PARAMS, NOT_HELD))]
        call = self._parked.get(claims.get("p"))  # type: ignore[arg-type]
        if call is None:
            return [ToLease(key, error_response(local_id, ErrorCode.INVALID_PARAMS, NOT_HELD))]
        upstream = strip_envelope(params)
        if (
            claims.get("m") != method
            or claims.get("n") != _call_name(method, upstream)
            or claims.get("a") != arguments_digest(upstream)
        ):
            message = f"{INVALID_STATE}: it belongs to another request"
            return [ToLease(key, error_response(local_id, ErrorCode.INVALID_PARAMS, message))]
        responses = params.get("inputResponses")
        if responses is not None and not isinstance(responses, dict):
            return [
                ToLease(key, error_response(local_id, ErrorCode.INVALID_PARAMS, "inputResponses must be an object"))
            ]
        # Adopt the parked call: its answer and progress now go to this request.
        del self._parked[call.pending_id]  # type: ignore[arg-type]
        call.pending_id, call.expires = None, math.inf
        call.owner, call.local_id = key, local_id
        lease.calls[local_id] = call
        meta = params.get("_meta")
        call.local_token = meta.get("progressToken") if isinstance(meta, dict) else None
        actions: list[MuxAction] = []
        for input_key, response in (responses or {}).items():
            asked = call.asked.pop(input_key, None)
            if asked is not None:
                actions.append(ToUpstream(_answer(asked[0], response)))
        if call.final is not None:
            final, call.final = call.final, None
            self._forget(call)
            actions.append(ToLease(key, {**final, "id": local_id}))
        elif call.asked:
            actions += self._park(call, key)
        return actions

    # --- upstream -------------------------------------------------------------------------------------------
    def from_upstream(self, message: JSON) -> list[MuxAction]:
        """A message from the target; malformed ones are dropped."""
        method = message.get("method")
        if isinstance(method, str):
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if "id" in message:
                return self._target_request(message["id"], method, params)
            return self._target_notification(method, params)
        up_id = message.get("id")
        call = self._calls.get(up_id) if isinstance(up_id, int) and not isinstance(up_id, bool) else None
        if call is None:
            return []  # a late answer to a cancelled call
        if "result" not in message and "error" not in message:
            message = error_response(up_id, ErrorCode.INTERNAL_ERROR, "malformed response")
        if call.owner is None:
            call.final = message  # parked: kept for the retry
            call.asked.clear()
            return []
        self._forget(call)
        return [ToLease(call.owner, {**message, "id": call.local_id})]

    def _target_request(self, their_id: Any, method: str, params: JSON) -> list[MuxAction]:
        if not isinstance(their_id, str | int) or isinstance(their_id, bool):
            return []
        if method == "ping":
            return [ToUpstream(result_response(their_id, {}))]
        capability = INPUT_METHODS.get(method)
        if capability is None:  # roots/list included: never declared, and never pinned on a client's call
            return [ToUpstream(error_response(their_id, ErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}"))]
        call = self._asker()
        if call is None:
            message = f"no client request is waiting on {self.target!r} that could answer {method}"
            return [ToUpstream(error_response(their_id, ErrorCode.INTERNAL_ERROR, message))]
        request: JSON = {"method": method}
        if params:
            request["params"] = params
        call.asked[f"{self.target}-{their_id}"] = (their_id, request)
        if call.owner is None:
            return []  # parked already: the retry's answer goes out with the next round
        lease = self._leases[call.owner]
        if capability not in lease.capabilities:
            owner = call.owner
            self._forget(call)
            required = {capability: {}}
            refusal = error_response(
                call.local_id,
                ErrorCode.MISSING_REQUIRED_CLIENT_CAPABILITY,
                f"MCP target {self.target!r} needs the client capability {capability!r}",
                {"requiredCapabilities": required},
            )
            return [
                ToUpstream(error_response(their_id, ErrorCode.INTERNAL_ERROR, f"the client does not support {method}")),
                ToUpstream(_cancelled(call.up_id, "the client lacks a required capability")),
                ToLease(owner, refusal),
            ]
        if len(self._parked) >= self.max_parked:
            message = "too many calls are waiting for client input"
            return [ToUpstream(error_response(their_id, ErrorCode.INTERNAL_ERROR, message))]
        return self._park(call, call.owner)

    def _asker(self) -> _Call | None:
        """The call a server-to-client request most likely belongs to: the oldest interactive call a client
        is waiting on, else the oldest parked one (the session era does not say; see the module docstring)."""
        parked: _Call | None = None
        for call in self._calls.values():
            if call.method not in INTERACTIVE_METHODS:
                continue
            if call.owner is not None:
                return call
            if parked is None:
                parked = call
        return parked

    def _park(self, call: _Call, key: int) -> list[MuxAction]:
        """Answer the client with input_required; the upstream call waits for the client's retry."""
        lease = self._leases.get(key)
        if lease is not None:
            lease.calls.pop(call.local_id, None)
        local_id = call.local_id
        call.owner, call.local_token = None, None
        call.pending_id = os.urandom(12).hex()
        call.expires = self.clock() + self.input_ttl
        self._parked[call.pending_id] = call
        claims = {
            "v": 1,
            "w": self.worker,
            "p": call.pending_id,
            "t": self.target,
            "m": call.method,
            "n": _call_name(call.method, call.params),
            "a": arguments_digest(call.params),
        }
        result = {
            "resultType": "input_required",
            "inputRequests": {k: request for k, (_, request) in call.asked.items()},
            "requestState": self.codec.seal(claims),
        }
        return [ToLease(key, result_response(local_id, result))]

    def _target_notification(self, method: str, params: JSON) -> list[MuxAction]:
        if method == "notifications/progress":
            call = self._tokens.get(params.get("progressToken"))  # type: ignore[arg-type]
            if call is None or call.owner is None or call.local_token is None:
                return []
            forwarded = {**params, "progressToken": call.local_token}
            return [ToLease(call.owner, {"jsonrpc": "2.0", "method": method, "params": forwarded})]
        if method == "notifications/cancelled":
            their_id = params.get("requestId")
            for call in self._calls.values():
                for key, (asked_id, _) in list(call.asked.items()):
                    if asked_id == their_id:
                        del call.asked[key]
            return []
        return [Broadcast({"jsonrpc": "2.0", "method": method, "params": params})]

    # --- failure and expiry ---------------------------------------------------------------------------------
    def upstream_lost(self, reason: str, spare: Iterable[int] = ()) -> list[MuxAction]:
        """The session died: every call fails (parked ones are dropped), except the ``spare`` up ids,
        which the shell sends again on the fresh session."""
        kept = set(spare)
        actions: list[MuxAction] = []
        for call in list(self._calls.values()):
            if call.up_id in kept:
                continue
            owner = call.owner
            self._forget(call)
            if owner is not None:
                actions.append(ToLease(owner, error_response(call.local_id, ErrorCode.INTERNAL_ERROR, reason)))
        return actions

    def expire(self) -> list[MuxAction]:
        """Cancel the parked calls whose client never came back."""
        now = self.clock()
        actions: list[MuxAction] = []
        for call in [c for c in self._parked.values() if c.expires <= now]:
            for their_id, _ in call.asked.values():
                message = "the client did not answer in time"
                actions.append(ToUpstream(error_response(their_id, ErrorCode.INTERNAL_ERROR, message)))
            self._forget(call)
            if call.final is None:
                actions.append(ToUpstream(_cancelled(call.up_id, "the client did not answer in time")))
        return actions

    def _forget(self, call: _Call) -> None:
        self._calls.pop(call.up_id, None)
        if call.up_token is not None:
            self._tokens.pop(call.up_token, None)
        if call.pending_id is not None:
            self._parked.pop(call.pending_id, None)
        lease = self._leases.get(call.owner) if call.owner is not None else None
        if lease is not None and lease.calls.get(call.local_id) is call:
            del lease.calls[call.local_id]


def _cancelled(up_id: int, reason: Any) -> JSON:
    params: JSON = {"requestId": up_id}
    if isinstance(reason, str):
        params["reason"] = reason
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}


def _answer(their_id: RequestId, response: Any) -> JSON:
    if isinstance(response, dict):
        return result_response(their_id, response)
    return error_response(their_id, ErrorCode.INVALID_PARAMS, "the client's input response is not an object")


# ----------------------------------------------------------------------------------------------- the I/O shell

ChannelFactory = Callable[[TaskGroup], TargetChannel]


class SharedUpstream:
    """The shared upstream session of one session-era target on this worker (see the module docstring)."""

    def __init__(self, mux: UpstreamMux, open_channel: ChannelFactory) -> None:
        self.mux = mux
        self._open_channel = open_channel
        self._channel: TargetChannel | None = None
        self._generation = 0
        self._leases: dict[int, MemoryObjectSendStream[JSON]] = {}
        self._listeners: dict[object, Callable[[JSON], None]] = {}
        self._subscriptions: dict[str, int] = {}  # upstream resource URI -> listen streams wanting it
        self._ensure_lock = anyio.Lock()
        self._handshake: dict[str, asyncio.Future[JSON]] = {}
        self._internal_ids = itertools.count(1)
        self._tasks: TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = anyio.Event()
        self._stopped = anyio.Event()
        self._expiry_changed = anyio.Event()
        self._parked_seen = 0
        self._closing = False

    @property
    def target(self) -> str:
        return self.mux.target

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def capabilities(self) -> JSON | None:
        init = self.mux.initialize_result
        caps = init.get("capabilities") if init is not None else None
        return caps if isinstance(caps, dict) else None

    # --- life cycle -----------------------------------------------------------------------------------------
    async def _start(self) -> TaskGroup:
        if self._closing:
            raise TargetUnavailable(f"MCP target {self.target!r}: the gateway is shutting down")
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        await self._ready.wait()
        assert self._tasks is not None
        return self._tasks

    async def _run(self) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._ready.set()
            tasks.start_soon(self._expire_loop)
            await self._stopped.wait()
            tasks.cancel_scope.cancel()

    async def lease(self, client_capabilities: Any) -> SharedLease:
        """A per-request view of the target; connects (initialize) first if the session is not up."""
        await self.ensure()
        key = self.mux.open_lease(client_capabilities)
        send, receive = anyio.create_memory_object_stream[JSON](LEASE_BUFFER)
        self._leases[key] = send
        return SharedLease(self, key, receive)

    async def ensure(self) -> int:
        """Connect and initialize the upstream session unless it is up; returns its generation."""
        tasks = await self._start()
        async with self._ensure_lock:
            if self._channel is not None:
                return self._generation
            channel = self._open_channel(tasks)
            self._generation += 1
            generation = self._generation
            tasks.start_soon(self._pump, channel, generation)
            try:
                result = await self._call(channel, "initialize", self._initialize_params())
                await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            except (TargetUnavailable, TargetClosed, TimeoutError) as exc:
                self._generation += 1  # the pump of the failed channel reports nothing
                tasks.start_soon(_close_channel, channel)
                raise TargetUnavailable(f"MCP target {self.target!r}: initialize failed: {exc}") from exc
            self.mux.initialize_result = result
            self._channel = channel
            log.info("mcp_shared_session_ready", target=self.target, generation=generation)
            for uri in self._subscriptions:
                tasks.start_soon(self._internal, "resources/subscribe", {"uri": uri})
            return generation

    @staticmethod
    def _initialize_params() -> JSON:
        return {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": GATEWAY_CLIENT_CAPABILITIES,
            "clientInfo": GATEWAY_CLIENT_INFO,
        }

    async def _call(self, channel: TargetChannel, method: str, params: JSON) -> JSON:
        """A request of the gateway's own (string id, never a mux id), its answer awaited with a bound."""
        request_id = f"agw-{next(self._internal_ids)}"
        waiter: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._handshake[request_id] = waiter
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                await channel.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
                answer = await waiter
        finally:
            self._handshake.pop(request_id, None)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise TargetUnavailable(f"{method} refused: {answer.get('error')}")
        return result

    async def _internal(self, method: str, params: JSON) -> None:
        channel = self._channel
        if channel is None:
            return
        try:
            await self._call(channel, method, params)
        except (TargetUnavailable, TargetClosed, TimeoutError) as exc:
            log.info("mcp_shared_request_failed", target=self.target, method=method, error=str(exc))

    async def aclose(self) -> None:
        """End the upstream session (DELETE / stop the process) and the leases' waits. Idempotent."""
        if self._closing:
            return
        self._closing = True
        channel, self._channel = self._channel, None
        self._generation += 1
        for send in self._leases.values():
            send.close()
        with anyio.CancelScope(shield=True):
            if channel is not None:
                await _close_channel(channel)
            self._stopped.set()
            if self._runner is not None:
                await self._runner

    # --- sending and receiving ------------------------------------------------------------------------------
    async def _pump(self, channel: TargetChannel, generation: int) -> None:
        while True:
            try:
                message = await channel.receive()
            except (TargetClosed, TargetUnavailable) as exc:
                reason = str(exc) or f"MCP target {self.target!r} closed"
                for waiter in self._handshake.values():
                    if not waiter.done():
                        waiter.set_exception(TargetClosed(reason))
                self._lost(generation, reason)
                return
            request_id = message.get("id")
            if isinstance(request_id, str) and request_id in self._handshake and "method" not in message:
                waiter = self._handshake[request_id]
                if not waiter.done():
                    waiter.set_result(message)
                continue
            self._act(self.mux.from_upstream(message))

    def _lost(self, generation: int, reason: str, spare: Iterable[int] = ()) -> None:
        """The session of ``generation`` died: fail what waits on it; the next lease re-initializes."""
        if generation != self._generation or self._closing:
            return
        log.warning("mcp_shared_session_lost", target=self.target, reason=reason)
        channel, self._channel = self._channel, None
        self._generation += 1
        self._act(self.mux.upstream_lost(f"MCP target {self.target!r} failed: {reason}", spare))
        if channel is not None and self._tasks is not None:
            self._tasks.start_soon(_close_channel, channel)

    async def send_from_lease(self, key: int, message: JSON) -> None:
        """Carry out what the mux decides for one lease message; a request whose send finds the session
        already closed is sent once more on a fresh session (the target never read it)."""
        generation = await self.ensure()
        actions = self.mux.from_lease(key, message)
        for action in actions:
            if not isinstance(action, ToUpstream):
                self._act([action])
                continue
            up_id = action.message.get("id")
            try:
                await self._send(action.message, generation)
            except TargetClosed as exc:
                retry = isinstance(up_id, int) and "method" in action.message
                self._lost(generation, str(exc) or "closed", spare=(up_id,) if retry else ())
                if not retry or not self.mux.has_call(up_id):  # type: ignore[arg-type]
                    continue
                try:
                    generation = await self.ensure()
                    await self._send(action.message, generation)
                except (TargetClosed, TargetUnavailable) as again:
                    self._fail_call(up_id, f"MCP target {self.target!r} failed: {again}")
            except TargetUnavailable as exc:
                # The request may or may not have reached the target: fail this call only.
                self._fail_call(up_id, str(exc))

    def _fail_call(self, up_id: Any, reason: str) -> None:
        if isinstance(up_id, int) and self.mux.has_call(up_id):
            self._act(self.mux.from_upstream(error_response(up_id, ErrorCode.INTERNAL_ERROR, reason)))

    async def _send(self, message: JSON, generation: int) -> None:
        channel = self._channel
        if channel is None or generation != self._generation:
            raise TargetClosed("the shared session was replaced")
        await channel.send(message)

    def _act(self, actions: list[MuxAction]) -> None:
        for action in actions:
            if isinstance(action, ToLease):
                send = self._leases.get(action.lease)
                if send is None:
                    continue
                try:
                    send.send_nowait(action.message)
                except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    log.warning("mcp_lease_message_dropped", target=self.target, method=action.message.get("method"))
            elif isinstance(action, ToUpstream):
                if self._tasks is not None and self._channel is not None:
                    self._tasks.start_soon(self._send_quietly, action.message, self._generation)
            else:
                for listener in list(self._listeners.values()):
                    listener(action.message)
        if self.mux.parked > self._parked_seen:
            self._expiry_changed.set()  # a new deadline may come first
        self._parked_seen = self.mux.parked

    async def _send_quietly(self, message: JSON, generation: int) -> None:
        """Background sends (cancellations, answers to the target): a failure is the pump's to report."""
        try:
            await self._send(message, generation)
        except (TargetClosed, TargetUnavailable) as exc:
            log.info("mcp_shared_send_failed", target=self.target, error=str(exc))

    async def _expire_loop(self) -> None:
        while True:
            self._expiry_changed = anyio.Event()
            deadline = self.mux.next_expiry()
            if deadline is None:
                await self._expiry_changed.wait()
                continue
            with anyio.move_on_after(max(deadline - self.mux.clock(), 0.0)):
                await self._expiry_changed.wait()
            expired = self.mux.expire()
            if expired:
                self._act(expired)

    def release(self, key: int) -> None:
        """A lease ends: its calls are cancelled upstream in the background (safe under cancellation)."""
        send = self._leases.pop(key, None)
        if send is not None:
            send.close()
        self._act(self.mux.close_lease(key))

    # --- events for subscriptions/listen --------------------------------------------------------------------
    def add_listener(self, listener: Callable[[JSON], None]) -> Callable[[], None]:
        """Call ``listener`` with every list_changed / resources/updated notification; returns the remover."""
        token = object()
        self._listeners[token] = listener
        return lambda: self._listeners.pop(token, None)

    def subscribe(self, uri: str) -> None:
        """Ask the target for resources/updated of ``uri`` (counted: the first listen stream subscribes)."""
        count = self._subscriptions.get(uri, 0)
        self._subscriptions[uri] = count + 1
        if count == 0 and self._tasks is not None:
            self._tasks.start_soon(self._internal, "resources/subscribe", {"uri": uri})

    def unsubscribe(self, uri: str) -> None:
        count = self._subscriptions.get(uri, 0) - 1
        if count > 0:
            self._subscriptions[uri] = count
            return
        self._subscriptions.pop(uri, None)
        if count == 0 and self._tasks is not None and not self._closing:
            self._tasks.start_soon(self._internal, "resources/unsubscribe", {"uri": uri})


class SharedLease:
    """One client request's ``TargetChannel`` onto a ``SharedUpstream``."""

    def __init__(self, upstream: SharedUpstream, key: int, inbox: MemoryObjectReceiveStream[JSON]) -> None:
        self._upstream = upstream
        self._key = key
        self._inbox = inbox
        self._closed = False

    @property
    def target(self) -> str:
        return self._upstream.target

    @property
    def session_id(self) -> str | None:
        return None

    async def send(self, message: JSON) -> None:
        if self._closed:
            raise TargetClosed("lease closed")
        await self._upstream.send_from_lease(self._key, message)

    async def receive(self) -> JSON:
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TargetClosed(f"MCP target {self.target!r}: lease closed") from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._upstream.release(self._key)
            self._inbox.close()


async def _close_channel(channel: TargetChannel) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        await channel.aclose()


__all__ = [
    "DEFAULT_INPUT_TTL",
    "GATEWAY_CLIENT_CAPABILITIES",
    "Broadcast",
    "MuxAction",
    "RequestStateCodec",
    "SharedLease",
    "SharedUpstream",
    "ToLease",
    "ToUpstream",
    "UpstreamMux",
    "arguments_digest",
    "ephemeral_keyring",
    "strip_envelope",
]
