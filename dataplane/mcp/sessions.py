"""Per-worker registry of live federated MCP sessions (session era, streamable HTTP downstream).

A live session is one ``McpFederation``, one ``TargetChannel`` per target, and a pump task per
channel feeding the federation; it runs in its own task (owning a task group for the pumps and
stdio processes), because it outlives the HTTP requests that use it. The client only holds the
sealed token (session.py), so a worker that never saw a session resumes it: streamable-HTTP targets
reconnect with their upstream session ids, targets without one (stdio, legacy SSE) get a fresh
upstream session with an internal initialize handshake. Idle sessions close after
``session_idle_timeout``; DELETE closes the upstream sessions.

Messages for the client are routed to an open stream: a response to the POST of the request it
answers, a progress notification to the request that owns its token, a server-to-client request
(elicitation, sampling, ping) to the oldest open request stream (the federation does not say which
call caused it; a tool call waiting on it is the likely one), else the standalone GET stream;
other notifications to the GET stream, else the oldest request stream. With no stream open they
are dropped and logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dataplane.config.model import McpStdioTarget, McpStreamableHttpTarget, UpstreamCluster
from dataplane.mcp.channel import JSON, TargetChannel, TargetClosed, TargetUnavailable
from dataplane.mcp.federation import Action, FederationConfig, McpFederation, SendToClient
from dataplane.mcp.http_channel import SESSION_EXPIRED, StreamableHttpChannel
from dataplane.mcp.jsonrpc import RequestId
from dataplane.mcp.session import SessionClaims, SessionKeyring, SessionRejected, SessionTokenCodec
from dataplane.mcp.sse_channel import LegacySseChannel
from dataplane.mcp.stdio import SpawnBackoff, StdioChannel
from shared.logging import get_logger

log = get_logger("dataplane.mcp.sessions")

# Bounds on waits that have no configured value: closing a target, a resumed target's handshake.
CLOSE_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 30.0
# Messages queued for one client request stream before further notifications are dropped.
STREAM_BUFFER = 256


class SessionNotFound(Exception):
    """The session id does not name a live or resumable session (HTTP 404)."""


@dataclass(slots=True, eq=False)
class _Waiter:
    """One client request in flight: where its messages go."""

    request_id: RequestId
    progress_token: Any
    send: MemoryObjectSendStream[JSON]


@dataclass(slots=True, eq=False)
class FederatedSession:
    """One client's federated session on this worker."""

    cluster: UpstreamCluster
    federation: McpFederation
    channels: dict[str, TargetChannel]
    idle_timeout: float
    token: str | None = None
    claims: SessionClaims | None = None
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # client requests in flight: idle expiry waits for them
    closed: anyio.Event = field(default_factory=anyio.Event)
    _ready: anyio.Event = field(default_factory=anyio.Event)
    _tasks: TaskGroup | None = None
    _runner: asyncio.Task[None] | None = None
    _waiters: list[_Waiter] = field(default_factory=list)
    _listener: MemoryObjectSendStream[JSON] | None = None
    _listener_end: MemoryObjectReceiveStream[JSON] | None = None
    _send_locks: dict[str, anyio.Lock] = field(default_factory=dict)
    _closing: bool = False
    _closer: asyncio.Task[None] | None = None
    on_closed: Callable[[FederatedSession], None] | None = None

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self, handshake: tuple[str, ...] = ()) -> None:
        """Run the session in its own task and ready the ``handshake`` targets of a resumed session.

        Processes start on first send, so a fresh session's failures reach the federation (failure mode).
        """
        self._runner = asyncio.get_running_loop().create_task(self._run())
        await self._ready.wait()
        assert self._tasks is not None
        self.active += 1  # not idle while resuming
        try:
            for name in handshake:
                await self._handshake(self.channels[name])
        except (TargetUnavailable, TargetClosed, TimeoutError) as exc:
            await self.aclose(end_upstream=False)
            raise SessionNotFound(f"cannot resume the session: {exc}") from exc
        finally:
            self.active -= 1
            self.last_used = time.monotonic()
        for name, channel in self.channels.items():
            self._send_locks[name] = anyio.Lock()
            self._tasks.start_soon(self._pump, name, channel)

    async def _run(self) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._ready.set()
            tasks.start_soon(self._expire_when_idle)
            await self.closed.wait()
            tasks.cancel_scope.cancel()

    async def _expire_when_idle(self) -> None:
        while not self._closing:
            # While requests run, closing one touches last_used, so there is no need to look sooner.
            left = self.last_used + self.idle_timeout - time.monotonic()
            await anyio.sleep(self.idle_timeout if self.active else max(left, 0.05))
            if self.active == 0 and time.monotonic() - self.last_used >= self.idle_timeout:
                log.info("mcp_session_idle", backend=self.cluster.name)
                self._close_soon(end_upstream=False)
                return

    def _close_soon(self, *, end_upstream: bool = True) -> None:
        """Close from inside the session's own tasks (which ``aclose`` waits for) without deadlock."""
        if not self._closing:
            self._closer = asyncio.get_running_loop().create_task(self.aclose(end_upstream=end_upstream))

    async def _handshake(self, channel: TargetChannel) -> None:
        """Ready a resumed target: a fresh upstream session where it has no session id (stdio, legacy
        SSE), else a ping proving its upstream session still lives (a DELETEd or expired one answers
        404, so the gateway answers 404 too rather than serving a dead session)."""
        if channel.session_id is not None:
            await self._call(channel, "ping", {})
            return
        version = self.claims.protocol_version if self.claims is not None else "2025-06-18"
        params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "agentgate", "version": "0"}}
        await self._call(channel, "initialize", params)
        await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    @staticmethod
    async def _call(channel: TargetChannel, method: str, params: JSON) -> None:
        """One request straight to a channel (before the pumps run), its answer awaited with a bound."""
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await channel.send({"jsonrpc": "2.0", "id": "gw-resume", "method": method, "params": params})
            while True:
                answer = await channel.receive()
                if answer.get("id") == "gw-resume" and "method" not in answer:
                    break
        if "error" in answer:
            raise TargetUnavailable(f"MCP target {channel.target!r} refused {method}: {answer['error']}")

    async def aclose(self, *, end_upstream: bool = True) -> None:
        """Stop the session's tasks; ``end_upstream`` also ends the upstream HTTP sessions (DELETE),
        which an idle expiry must not do: another worker may be serving the session. Idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        if self.on_closed is not None:
            self.on_closed(self)
        for waiter in self._waiters:
            waiter.send.close()
        if self._listener is not None:
            self._listener.close()
        with anyio.CancelScope(shield=True):
            for channel in self.channels.values():
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    if isinstance(channel, StreamableHttpChannel):
                        await channel.aclose(end_session=end_upstream)
                    else:
                        await channel.aclose()
            self.closed.set()
            if self._runner is not None:
                await self._runner

    @property
    def is_closed(self) -> bool:
        return self._closing

    # --- client side --------------------------------------------------------------------------
    def open_request(self, request_id: RequestId, progress_token: Any) -> MemoryObjectReceiveStream[JSON]:
        """Register a client request before submitting it; its messages arrive on the returned stream."""
        send, receive = anyio.create_memory_object_stream[JSON](STREAM_BUFFER)
        self._waiters.append(_Waiter(request_id, progress_token, send))
        self.active += 1
        return receive

    def open_listener(self) -> MemoryObjectReceiveStream[JSON]:
        """The standalone (GET) stream; a newer one replaces an older one, which ends."""
        if self._listener is not None:
            self._listener.close()
        send, receive = anyio.create_memory_object_stream[JSON](STREAM_BUFFER)
        if self._closing:
            send.close()
        self._listener, self._listener_end = send, receive
        return receive

    def close_listener(self, receive: MemoryObjectReceiveStream[JSON]) -> None:
        receive.close()
        if self._listener_end is receive:
            self._listener = self._listener_end = None

    def close_request(self, request_id: RequestId) -> None:
        for waiter in self._waiters:
            if waiter.request_id == request_id:
                self._waiters.remove(waiter)
                waiter.send.close()
                self.active -= 1
                self.last_used = time.monotonic()
                return

    async def submit(self, message: JSON) -> None:
        """Hand one client message to the federation and carry out what it decides."""
        self.last_used = time.monotonic()
        self._act(self.federation.receive_from_client(message))

    def abandon(self, request_id: RequestId) -> None:
        """The client stopped waiting (timeout, disconnect): cancel the request upstream and forget it,
        so a late answer is dropped by the federation instead of looking for a stream."""
        params = {"requestId": request_id, "reason": "the client stopped waiting"}
        self._act(
            self.federation.receive_from_client(
                {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}
            )
        )

    # --- target side --------------------------------------------------------------------------
    async def _pump(self, name: str, channel: TargetChannel) -> None:
        while True:
            try:
                message = await channel.receive()
            except (TargetClosed, TargetUnavailable) as exc:
                if not self._closing:
                    self._act(self.federation.target_failed(name, str(exc) or f"MCP target {name!r} closed"))
                    if isinstance(exc, TargetClosed):
                        self._target_gone(name, exc)
                return
            self._act(self.federation.receive_from_target(name, message))

    async def _send(self, name: str, message: JSON) -> None:
        channel = self.channels.get(name)
        if channel is None:
            self._act(self.federation.target_failed(name, f"MCP target {name!r} is not connected"))
            return
        try:
            async with self._send_locks[name]:
                await channel.send(message)
        except (TargetUnavailable, TargetClosed) as exc:
            log.warning("mcp_target_failed", backend=self.cluster.name, target=name, error=str(exc))
            self._act(self.federation.target_failed(name, str(exc) or f"MCP target {name!r} failed"))
            if isinstance(exc, TargetClosed):
                self._target_gone(name, exc)

    def _target_gone(self, name: str, exc: TargetClosed) -> None:
        """An upstream session that expired ends this session: the next request resumes it, which
        answers 404 if the upstream really forgot it, so the client re-initializes."""
        if str(exc) == SESSION_EXPIRED:
            log.info("mcp_upstream_session_expired", backend=self.cluster.name, target=name)
            self._close_soon()

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToClient):
                self._to_client(action.message)
            elif self._tasks is not None and not self._closing:
                # A send to an HTTP target waits for the response head; never hold up the others.
                self._tasks.start_soon(self._send, action.target, action.message)

    def _to_client(self, message: JSON) -> None:
        stream = self._route(message)
        if stream is None:
            log.info("mcp_client_message_dropped", backend=self.cluster.name, method=message.get("method"))
            return
        try:
            stream.send_nowait(message)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.warning("mcp_client_message_dropped", backend=self.cluster.name, method=message.get("method"))

    def _route(self, message: JSON) -> MemoryObjectSendStream[JSON] | None:
        if "method" not in message:
            request_id = message.get("id")
            return next((w.send for w in self._waiters if w.request_id == request_id), None)
        oldest = self._waiters[0].send if self._waiters else None
        if "id" in message:
            return oldest or self._listener
        if message["method"] == "notifications/progress":
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            found = next((w.send for w in self._waiters if w.progress_token == token), None)
            if found is not None:
                return found
        return self._listener or oldest


class McpSessions:
    """The live sessions of one worker, keyed by their sealed token."""

    def __init__(self, clock: Any = time.time) -> None:
        self._sessions: dict[str, FederatedSession] = {}
        # Per backend name, rebuilt when a new config brings a new cluster object (so at most one per backend).
        self._codecs: dict[str, tuple[UpstreamCluster, SessionTokenCodec, FederationConfig]] = {}
        self._backoff = SpawnBackoff()
        self._resuming: dict[str, anyio.Lock] = {}
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def _compiled(self, cluster: UpstreamCluster) -> tuple[SessionTokenCodec, FederationConfig]:
        """The codec and federation rules of a backend, built once per compiled cluster."""
        entry = self._codecs.get(cluster.name)
        if entry is None or entry[0] is not cluster:
            settings = cluster.mcp
            assert settings is not None
            keyring = SessionKeyring([(key.key_id, key.key) for key in settings.session_keys])
            entry = (cluster, SessionTokenCodec(keyring, cluster.name), FederationConfig.from_settings(settings))
            self._codecs[cluster.name] = entry
        return entry[1], entry[2]

    def _build(
        self, cluster: UpstreamCluster, claims: SessionClaims | None
    ) -> tuple[FederatedSession, tuple[str, ...]]:
        settings = cluster.mcp
        assert settings is not None
        _, config = self._compiled(cluster)
        channels: dict[str, TargetChannel] = {}
        handshake: list[str] = []
        session = FederatedSession(cluster, McpFederation(config), channels, settings.session_idle_timeout)
        session.claims = claims
        for target in settings.targets:
            upstream_id = claims.upstream(target.name) if claims is not None else None
            if isinstance(target, McpStreamableHttpTarget):
                version = claims.protocol_version if upstream_id is not None and claims is not None else None
                channels[target.name] = StreamableHttpChannel(
                    target,
                    cluster,
                    session_id=upstream_id,
                    protocol_version=version,
                    max_message_bytes=settings.max_body_bytes,
                )
                if claims is not None:
                    handshake.append(target.name)
            elif isinstance(target, McpStdioTarget):
                channels[target.name] = _LazyStdio(target, self._backoff, session)
                if claims is not None:
                    handshake.append(target.name)
            else:
                channels[target.name] = LegacySseChannel(target, cluster, max_message_bytes=settings.max_body_bytes)
                if claims is not None:
                    handshake.append(target.name)
        return session, tuple(handshake)

    async def create(self, cluster: UpstreamCluster) -> FederatedSession:
        """A fresh session for an initialize request (the token is issued when its result arrives)."""
        session, _ = self._build(cluster, None)
        session.on_closed = self.discard
        await session.start()
        return session

    def issue(self, session: FederatedSession, protocol_version: str) -> str:
        """Seal the token of a session whose initialize succeeded, and register it."""
        codec, _ = self._compiled(session.cluster)
        upstream = [(name, channel.session_id) for name, channel in session.channels.items()]
        claims = codec.new_claims(protocol_version, upstream, now=self._clock())
        token = codec.seal(claims)
        session.claims, session.token = claims, token
        self._sessions[token] = session
        return token

    async def find(self, cluster: UpstreamCluster, token: str) -> FederatedSession:
        """The live session of ``token``, resuming it here if this worker never saw it; SessionNotFound if none."""
        session = self._sessions.get(token)
        if session is not None and session.cluster.name == cluster.name:
            return session
        codec, _ = self._compiled(cluster)
        claims = codec.open(token, now=self._clock())
        if isinstance(claims, SessionRejected):
            raise SessionNotFound(f"session id rejected: {claims.reason}")
        # Concurrent first requests of one session on this worker resume it once.
        lock = self._resuming.setdefault(token, anyio.Lock())
        try:
            async with lock:
                session = self._sessions.get(token)
                if session is not None:
                    return session
                session, handshake = self._build(cluster, claims)
                session.token = token
                session.on_closed = self.discard
                await session.start(handshake)
                log.info("mcp_session_resumed", backend=cluster.name, session=claims.session_hex)
                self._sessions[token] = session
                return session
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._resuming.pop(token, None)

    def discard(self, session: FederatedSession) -> None:
        if session.token is not None and self._sessions.get(session.token) is session:
            del self._sessions[session.token]

    async def end(self, session: FederatedSession) -> None:
        """DELETE: close the upstream sessions and forget the session here."""
        self.discard(session)
        await session.aclose()

    async def aclose(self) -> None:
        """Close every session (worker shutdown); upstream sessions stay for other workers to resume."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.aclose(end_upstream=False)


class _LazyStdio:
    """A StdioChannel needs the session's task group, which exists only once the session runs."""

    def __init__(self, target: McpStdioTarget, backoff: SpawnBackoff, session: FederatedSession) -> None:
        self._target_config = target
        self._backoff = backoff
        self._session = session
        self._channel: StdioChannel | None = None

    def _get(self) -> StdioChannel:
        if self._channel is None:
            tasks = self._session._tasks
            if tasks is None:
                raise TargetUnavailable(f"stdio target {self._target_config.name!r}: session not running")
            self._channel = StdioChannel(self._target_config, task_group=tasks, backoff=self._backoff)
        return self._channel

    @property
    def target(self) -> str:
        return self._target_config.name

    @property
    def session_id(self) -> str | None:
        return None

    async def start(self) -> None:
        await self._get().start()

    async def send(self, message: JSON) -> None:
        channel = self._get()
        await channel.start()
        await channel.send(message)

    async def receive(self) -> JSON:
        return await self._get().receive()

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()


__all__ = ["FederatedSession", "McpSessions", "SessionNotFound"]
