"""Per-worker registry of live federated MCP sessions (session era and legacy HTTP+SSE downstream).

A live session is one ``McpFederation``, one ``TargetChannel`` per target, and a pump task per
channel feeding the federation; it runs in its own task (owning a task group for the pumps and
stdio processes), because it outlives the HTTP requests that use it. The client only holds the
sealed token (session.py), so a worker that never saw a session resumes it: streamable-HTTP targets
reconnect with their upstream session ids, targets without one (stdio, legacy SSE) get a fresh
upstream session with an internal initialize handshake. Idle sessions close after
``session_idle_timeout``; DELETE closes the upstream sessions.

Messages for the client go to an ``EventStream``: a response to the stream of the request it
answers, a progress notification to the request that owns its token, a server-to-client request
(elicitation, sampling, ping) to the oldest unanswered request (the federation does not say which
call caused it; a tool call waiting on it is the likely one), else the standalone (GET) stream;
other notifications to the standalone stream, else the oldest request. With no stream they are
dropped and logged. A legacy HTTP+SSE session has one stream (``open_funnel``) that takes all.

Resumption (2025-11-25 basic/transports, "Resumability and Redelivery"): events are numbered per
stream, and their SSE id ``<session instance>.<r|g><stream number>.<seq>`` names the stream, so a
GET with Last-Event-ID finds it. Each stream keeps its newest events (``ReplayLimits``: count and
bytes) while a reader is attached and for ``window`` seconds after it detaches; a request whose
client disconnected stays pending upstream for that window (a disconnect is not a cancel), then
is cancelled. The instance part is random per ``FederatedSession`` object, so resumption is per
worker: another worker (or this one after the session closed here) does not know the stream,
although it resumes the session itself from the token.

Deadlines: every request has one (the endpoint's bound: the route's timeout, else the caller's
policy requestTimeout, else the worker default); at the deadline the federation answers it with
-32001 "Request timed out" on its stream and cancels it upstream, whether or not a client is
reading. Upstream attempts (the caller's policy, ``submit(..., resilience)``): a request sent with a
per-try timeout gets one loop timer, which asks the federation (``attempt_timed_out``) whether to
cancel and retry or fail it; a send that got no response (``TargetUnavailable.failure``: connect
failure, reset, 5xx) is offered to ``retry_attempt`` first, and a retry waits its backoff in a task of
its own, then goes out only if its request is still pending. stdio channels never set a failure, so
a crashed process is not retried mid-request (its restart is the channel's own business).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup

from dataplane.config.model import McpStdioTarget, McpStreamableHttpTarget, UpstreamCluster
from dataplane.config.policy import ResilienceSettings
from dataplane.http.stream import Wakeup
from dataplane.mcp.channel import JSON, TargetChannel, TargetClosed, TargetUnavailable
from dataplane.mcp.federation import (
    REQUEST_TIMEOUT,
    Action,
    FederationConfig,
    McpFederation,
    SendToClient,
    SendToTarget,
)
from dataplane.mcp.http_channel import SESSION_EXPIRED, StreamableHttpChannel
from dataplane.mcp.jsonrpc import RequestId, encode, error_response
from dataplane.mcp.modern_channel import ModernTargetChannel, is_modern_only
from dataplane.mcp.session import SessionClaims, SessionKeyring, SessionRejected, SessionTokenCodec
from dataplane.mcp.sse_channel import LegacySseChannel
from dataplane.mcp.stdio import SpawnBackoff, StdioChannel
from dataplane.observability.metrics import CallOutcome, RequestReason, WorkerMetrics
from dataplane.observability.tracing import NOOP_CLIENT_SPAN, ClientSpan, ServerSpan
from shared.logging import get_logger

log = get_logger("dataplane.mcp.sessions")

# Bounds on waits that have no configured value: closing a target, a resumed target's handshake.
CLOSE_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 30.0
# The HTTP+SSE transport's protocol version, which only a legacy downstream session negotiates.
LEGACY_PROTOCOL_VERSION: Final = "2024-11-05"
_EVENT_ID: Final = re.compile(r"([A-Za-z0-9_-]{1,32}\.[rg][0-9]{1,18})\.([0-9]{1,18})")


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    """What each session keeps of its streams for Last-Event-ID resumption; fixed when the worker starts."""

    events: int = 256  # newest events kept per stream
    bytes: int = 1 << 20  # encoded bytes kept per stream (the newest event always stays)
    window: float = 60.0  # seconds a disconnected stream stays resumable
    retained_streams: int = 64  # disconnected streams kept per session; past it the oldest is forgotten


DEFAULT_REPLAY: Final = ReplayLimits()


class SessionNotFound(Exception):
    """The session id does not name a live or resumable session (HTTP 404)."""


class RequestIdInUse(Exception):
    """The client reused the id of a request that is still pending in this session."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One message on a stream: ``data`` is its encoded JSON; ``final`` marks the response ending a request stream."""

    seq: int
    message: JSON
    data: bytes
    final: bool


@dataclass(frozen=True, slots=True)
class EventPosition:
    """What a Last-Event-ID names: a stream key and the last event the client saw on it."""

    stream: str
    seq: int

    @property
    def of_request(self) -> bool:
        """A request's (POST) stream, as opposed to a standalone (GET) one."""
        return self.stream[self.stream.rfind(".") + 1] == "r"


def parse_event_id(value: str) -> EventPosition | None:
    """The position a Last-Event-ID names, or None if the gateway never issued such an id."""
    match = _EVENT_ID.fullmatch(value.strip())
    if match is None:
        return None
    return EventPosition(match[1], int(match[2]))


class EventStream:
    """One SSE stream of a session: a request's, the standalone one, or a legacy session's only one.

    Events are numbered from 1 (0 is the priming event, which carries no message). The newest stay
    in a buffer bounded by ``ReplayLimits`` so a client that lost the connection resumes after the
    last id it saw; a stream built with ``keep=False`` (legacy, not resumable) drops them once read.
    One reader at a time: attaching a newer one (a resumption) ends the older one.
    """

    __slots__ = (
        "_bytes",
        "_changed",
        "_events",
        "_keep",
        "_limits",
        "_next",
        "cancelled",
        "closed",
        "deadline",
        "detached_at",
        "exposed",
        "finished",
        "key",
        "progress_token",
        "reader",
        "request_id",
    )

    def __init__(
        self,
        key: str,
        limits: ReplayLimits,
        *,
        request_id: RequestId | None = None,
        progress_token: Any = None,
        deadline: float = math.inf,
        keep: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.key = key
        self.request_id = request_id
        self.progress_token = progress_token
        self.deadline = deadline
        self.finished = False  # the final response is in (request streams)
        self.closed = False  # nothing more will come: session closed, stream replaced or forgotten
        self.cancelled = False  # the client cancelled the request: it ends without a response
        self.exposed = False  # an event id went out, so the client may resume the stream
        self.reader = 0  # the attached reader's number; 0 when none
        self.detached_at: float | None = None  # set while kept for resumption without a reader
        self._limits = limits
        self._keep = keep
        self._events: deque[StreamEvent] = deque()
        self._bytes = 0
        self._next = 1
        # A stream lives for one request: a Wakeup on the session's loop costs far less than an anyio Event.
        self._changed = Wakeup(loop)

    def event_id(self, seq: int) -> str:
        return f"{self.key}.{seq}"

    @property
    def last_seq(self) -> int:
        return self._next - 1

    def append(self, message: JSON, *, final: bool = False) -> None:
        """Number and keep one message, evicting the oldest past the bounds, and wake the reader."""
        if self.closed or self.finished:
            return
        data = encode(message)
        events = self._events
        events.append(StreamEvent(self._next, message, data, final))
        self._next += 1
        self._bytes += len(data)
        limits = self._limits
        while len(events) > 1 and (len(events) > limits.events or self._bytes > limits.bytes):
            self._bytes -= len(events.popleft().data)
        if final:
            self.finished = True
        self.notify()

    def since(self, seq: int) -> list[StreamEvent]:
        """The kept events after ``seq`` (from the oldest kept one if some were evicted)."""
        events = self._events
        if not events or events[-1].seq <= seq:
            return []
        return list(itertools.islice(events, max(seq + 1 - events[0].seq, 0), None))

    async def next(self, cursor: int, reader: int) -> list[StreamEvent]:
        """The events after ``cursor``, waiting for some; [] once the stream ended for this reader
        (finished and read, closed, or taken over by a newer reader)."""
        batch = await self._wait(cursor, reader, None)
        assert batch is not None
        return batch

    async def next_within(self, cursor: int, reader: int, seconds: float) -> list[StreamEvent] | None:
        """``next``, or None when nothing came within ``seconds`` (one timer, no cancel scope)."""
        return await self._wait(cursor, reader, seconds)

    async def _wait(self, cursor: int, reader: int, seconds: float | None) -> list[StreamEvent] | None:
        deadline: float | None = None
        while self.reader == reader:
            batch = self.since(cursor)
            if batch:
                if batch[0].seq > cursor + 1:
                    log.warning("mcp_stream_events_lost", stream=self.key, lost=batch[0].seq - cursor - 1)
                if not self._keep:
                    self._events.clear()
                    self._bytes = 0
                return batch
            if self.closed or self.finished:
                return []
            if seconds is not None and deadline is None:
                deadline = self._changed.loop.time() + seconds
            if not await self._changed.wait(deadline):
                return None
        return []

    def notify(self) -> None:
        """Wake the reader (new event, close, or a newer reader took over)."""
        self._changed.notify()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.notify()


class _Outbox:
    """The messages waiting for one target's sender task, oldest first."""

    __slots__ = ("_changed", "_messages")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._messages: deque[JSON] = deque()
        self._changed = Wakeup(loop)

    def put(self, message: JSON) -> None:
        self._messages.append(message)
        self._changed.notify()

    async def get(self) -> JSON:
        messages = self._messages
        while not messages:
            await self._changed.wait()
        return messages.popleft()


@dataclass(slots=True, eq=False)
class FederatedSession:
    """One client's federated session on this worker."""

    cluster: UpstreamCluster
    federation: McpFederation
    channels: dict[str, TargetChannel]
    idle_timeout: float
    replay: ReplayLimits = DEFAULT_REPLAY
    token: str | None = None
    claims: SessionClaims | None = None
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # what keeps the session from idling: pending requests, a legacy stream, a resume
    closed: anyio.Event = field(default_factory=anyio.Event)
    # Random per session object: event ids of another worker's (or an earlier) copy never match here.
    instance: str = field(default_factory=lambda: secrets.token_urlsafe(6))
    _ready: anyio.Event = field(default_factory=anyio.Event)
    _tasks: TaskGroup | None = None
    _runner: asyncio.Task[None] | None = None
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _readers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _streams: dict[str, EventStream] = field(default_factory=dict)  # resumable streams by key
    _requests: list[EventStream] = field(default_factory=list)  # unanswered requests, oldest first
    _retained: list[EventStream] = field(default_factory=list)  # detached but resumable, oldest first
    _standalone: EventStream | None = None
    _funnel: EventStream | None = None
    _loop: asyncio.AbstractEventLoop | None = None  # the loop the session runs on, once started
    # The deadline watcher sleeps until _watch_at; _watch_nudge wakes it sooner (a nearer deadline).
    _watch_at: float = math.inf
    _watch_nudge: Wakeup = field(default_factory=Wakeup)
    _outboxes: dict[str, _Outbox] = field(default_factory=dict)  # per target, drained by its sender task
    _closing: bool = False
    _closer: asyncio.Task[None] | None = None
    on_closed: Callable[[FederatedSession], None] | None = None
    # Builds the 2026-07-28 channel for a target found to speak only that era (see _modern_only_swap).
    to_modern: Callable[[str], TargetChannel] | None = None
    _initializing: dict[str, JSON] = field(default_factory=dict)  # initialize sent per target, until answered
    # Per-try timers of upstream attempts, cancelled when the session closes.
    _try_timers: set[asyncio.TimerHandle] = field(default_factory=set)
    # Observability (see `_Attempt`): the worker's metrics, the span of the request being submitted, and
    # the upstream requests in flight by (target, gateway id).
    metrics: WorkerMetrics | None = None
    _parent: ServerSpan | None = None
    _attempts: dict[tuple[str, int], _Attempt] = field(default_factory=dict)

    # --- life cycle ---------------------------------------------------------------------------
    async def start(self, handshake: tuple[str, ...] = ()) -> None:
        """Run the session in its own task and ready the ``handshake`` targets of a resumed session.

        Processes start on first send, so a fresh session's failures reach the federation (failure mode).
        """
        self._loop = loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run())
        await self._ready.wait()
        assert self._tasks is not None
        self.active += 1  # not idle while resuming
        try:
            for name in handshake:
                await self._handshake(name)
        except (TargetUnavailable, TargetClosed, TimeoutError) as exc:
            await self.aclose(end_upstream=False)
            raise SessionNotFound(f"cannot resume the session: {exc}") from exc
        finally:
            self.active -= 1
            self.last_used = time.monotonic()
        for name in self.channels:
            self._outboxes[name] = outbox = _Outbox(loop)
            self._tasks.start_soon(self._pump, name)
            self._tasks.start_soon(self._sender, name, outbox)

    async def _run(self) -> None:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._ready.set()
            tasks.start_soon(self._expire_when_idle)
            tasks.start_soon(self._watch_streams)
            await self.closed.wait()
            tasks.cancel_scope.cancel()

    async def _expire_when_idle(self) -> None:
        while not self._closing:
            # While requests run, settling one touches last_used, so there is no need to look sooner.
            left = self.last_used + self.idle_timeout - time.monotonic()
            await anyio.sleep(self.idle_timeout if self.active else max(left, 0.05))
            if self.active == 0 and time.monotonic() - self.last_used >= self.idle_timeout:
                log.info("mcp_session_idle", backend=self.cluster.name)
                self.close_soon(end_upstream=False)
                return

    async def _watch_streams(self) -> None:
        """Answer requests at their deadline; forget disconnected streams once the replay window passed.

        It sleeps until the nearest of those times; a request or a detached stream only wakes it when
        it brings a nearer one (``_wake_watch``), so a request with the usual bound costs it nothing.
        """
        nudge = self._watch_nudge
        while True:
            now = time.monotonic()
            for stream in [s for s in self._requests if s.deadline <= now]:
                self._expire(stream)
            while (retained_until := self._retention_end()) <= now:
                self._forget(self._retained[0])
            wake_at = min(retained_until, min((s.deadline for s in self._requests), default=math.inf))
            self._watch_at = wake_at
            await nudge.wait(nudge.loop.time() + (wake_at - now) if wake_at < math.inf else None)

    def _wake_watch(self, at: float) -> None:
        """Something is due at ``at``: wake the watcher if it sleeps past that."""
        if at < self._watch_at:
            self._watch_at = at
            self._watch_nudge.notify()

    def _retention_end(self) -> float:
        """When the oldest disconnected stream stops being resumable (inf if there is none)."""
        detached_at = self._retained[0].detached_at if self._retained else None
        return math.inf if detached_at is None else detached_at + self.replay.window

    def close_soon(self, *, end_upstream: bool = True) -> None:
        """Close from inside the session's own tasks (which ``aclose`` waits for) without deadlock."""
        if not self._closing:
            self._closer = asyncio.get_running_loop().create_task(self.aclose(end_upstream=end_upstream))

    async def _handshake(self, name: str) -> None:
        """Ready a resumed target: a fresh upstream session where it has no session id (stdio, legacy
        SSE, a 2026-07-28-only target), else a ping proving its upstream session still lives (a DELETEd
        or expired one answers 404, so the gateway answers 404 too rather than serving a dead session)."""
        channel = self.channels[name]
        if channel.session_id is not None:
            await self._call(channel, "ping", {})
            return
        version = self.claims.protocol_version if self.claims is not None else "2025-06-18"
        params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "agentgate", "version": "0"}}
        answer = await self._call(channel, "initialize", params, refused_ok=True)
        if "error" in answer and self._modern_only_swap(name, answer) is not None:
            answer = await self._call(self.channels[name], "initialize", params, refused_ok=True)
        if "error" in answer:
            raise TargetUnavailable(f"MCP target {name!r} refused initialize: {answer['error']}")
        await self.channels[name].send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    @staticmethod
    async def _call(channel: TargetChannel, method: str, params: JSON, *, refused_ok: bool = False) -> JSON:
        """One request straight to a channel (before the pumps run), its answer awaited with a bound."""
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await channel.send({"jsonrpc": "2.0", "id": "gw-resume", "method": method, "params": params})
            while True:
                answer = await channel.receive()
                if answer.get("id") == "gw-resume" and "method" not in answer:
                    break
        if "error" in answer and not refused_ok:
            raise TargetUnavailable(f"MCP target {channel.target!r} refused {method}: {answer['error']}")
        return answer

    def _modern_only_swap(self, name: str, answer: JSON) -> TargetChannel | None:
        """A streamable-HTTP target that refused a session-era initialize because it speaks only
        2026-07-28 gets a ModernTargetChannel instead (the federation never notices); None otherwise."""
        old = self.channels.get(name)
        if self.to_modern is None or not isinstance(old, StreamableHttpChannel) or not is_modern_only(answer):
            return None
        log.info("mcp_target_modern_only", backend=self.cluster.name, target=name)
        channel = self.channels[name] = self.to_modern(name)
        if self._tasks is not None:
            self._tasks.start_soon(old.aclose)
        return channel

    async def aclose(self, *, end_upstream: bool = True) -> None:
        """Stop the session's tasks; ``end_upstream`` also ends the upstream HTTP sessions (DELETE),
        which an idle expiry must not do: another worker may be serving the session. Idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        if self.on_closed is not None:
            self.on_closed(self)
        for timer in self._try_timers:
            timer.cancel()
        self._try_timers.clear()
        for (name, _), attempt in list(self._attempts.items()):
            self._end_attempt(name, attempt, CallOutcome.ERROR, RequestReason.CLIENT_CLOSED)
        self._attempts.clear()
        for stream in (*self._requests, *self._streams.values()):
            stream.close()
        if self._funnel is not None:
            self._funnel.close()
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

    # --- client side: streams -------------------------------------------------------------------
    def _new_key(self, kind: str) -> str:
        return f"{self.instance}.{kind}{next(self._numbers)}"

    def open_request(self, request_id: RequestId, progress_token: Any, timeout: float) -> EventStream:
        """Register a client request before submitting it; its messages go to the returned stream, and
        ``timeout`` seconds from now the session answers it with -32001 (progress notifications do not
        push that back: see federation.py). RequestIdInUse if pending."""
        for pending in self._requests:
            if pending.request_id == request_id:
                raise RequestIdInUse(f"request id {request_id!r} is already in use")
        stream = EventStream(
            self._new_key("r"),
            self.replay,
            request_id=request_id,
            progress_token=progress_token,
            deadline=time.monotonic() + timeout,
            loop=self._loop,
        )
        if self._closing:
            stream.close()
            return stream
        self._requests.append(stream)
        if self._funnel is None:
            self._streams[stream.key] = stream
        self.active += 1
        self._wake_watch(stream.deadline)
        return stream

    def open_standalone(self) -> EventStream:
        """A fresh standalone (GET) stream; it replaces the previous one, whose reader ends."""
        if self._standalone is not None:
            self._forget(self._standalone)
        stream = EventStream(self._new_key("g"), self.replay, loop=self._loop)
        if self._closing:
            stream.close()
            return stream
        self._streams[stream.key] = stream
        self._standalone = stream
        return stream

    @property
    def requests_pending(self) -> int:
        return len(self._requests)

    def end_standalone(self) -> None:
        """End the standalone stream (a draining worker): the client reopens it, on another worker."""
        if self._standalone is not None:
            self._forget(self._standalone)

    def open_funnel(self) -> EventStream:
        """Legacy HTTP+SSE: the one stream every message for the client goes to; it keeps the session
        alive (no idle expiry) and keeps no event once read (that transport cannot resume)."""
        stream = EventStream(self._new_key("l"), self.replay, keep=False, loop=self._loop)
        if self._closing:
            stream.close()
            return stream
        self._funnel = stream
        self.active += 1
        return stream

    def stream(self, key: str) -> EventStream | None:
        """The resumable stream of that key (see ``parse_event_id``), if this session object still has it."""
        return self._streams.get(key)

    def attach(self, stream: EventStream) -> int:
        """Become the stream's reader (a previous reader ends); returns the number ``next`` and
        ``detach`` take."""
        reader = next(self._readers)
        stream.reader = reader
        if stream.detached_at is not None:
            stream.detached_at = None
            self._retained.remove(stream)
        stream.notify()
        return reader

    def detach(self, stream: EventStream, reader: int) -> None:
        """The reader is done (its client got the end, or went away). A stream whose event ids the
        client saw stays resumable for the replay window (an unanswered request stays pending
        upstream meanwhile); one it never saw an id of is forgotten now, cancelling what it waits for."""
        if stream.reader != reader:
            return
        stream.reader = 0
        if self._closing or stream.closed:
            return
        if not stream.exposed:
            self._forget(stream)
            return
        stream.detached_at = time.monotonic()
        self._retained.append(stream)
        if len(self._retained) > self.replay.retained_streams:
            self._forget(self._retained[0])
        self._wake_watch(self._retention_end())

    def _forget(self, stream: EventStream) -> None:
        """Drop a stream for good; a request nobody can receive the answer of any more is cancelled."""
        self._streams.pop(stream.key, None)
        if stream.detached_at is not None:
            stream.detached_at = None
            self._retained.remove(stream)
        if stream is self._standalone:
            self._standalone = None
        if stream in self._requests:
            self._requests.remove(stream)
            self._settled()
            self._cancel_upstream(stream.request_id, "the client went away")
        stream.close()

    def _settled(self) -> None:
        self.active -= 1
        self.last_used = time.monotonic()

    def _expire(self, stream: EventStream) -> None:
        """A request reached its deadline: the federation answers it (-32001) and cancels it upstream."""
        assert stream.request_id is not None
        self._act(self._abandoned(self.federation.expire(stream.request_id), RequestReason.TIMEOUT))
        if stream in self._requests:  # the federation held nothing for it: answer here all the same
            self._requests.remove(stream)
            self._settled()
            self._deliver(stream, error_response(stream.request_id, REQUEST_TIMEOUT, "Request timed out"))

    def _cancel_upstream(self, request_id: RequestId | None, reason: str) -> None:
        """Tell the federation the client stopped waiting, so it cancels upstream and drops a late answer."""
        params = {"requestId": request_id, "reason": reason}
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}
        self._act(self._abandoned(self.federation.receive_from_client(cancel), RequestReason.CLIENT_CLOSED))

    async def submit(
        self, message: JSON, resilience: ResilienceSettings | None = None, span: ServerSpan | None = None
    ) -> None:
        """Hand one client message to the federation and carry out what it decides; ``resilience`` is
        the caller's policy for a request (per-try timeout and retries of its upstream attempts);
        ``span`` the request's server span, parent of a client span per upstream request it causes."""
        self.last_used = time.monotonic()
        cancelled = message.get("method") == "notifications/cancelled"
        if cancelled:
            self._client_cancelled(message.get("params"))
        if span is not None and (span.recording or span.trace_id or self.metrics is not None):
            self._parent = span
        try:
            actions = self.federation.receive_from_client(message, resilience)
            if cancelled:
                actions = self._abandoned(actions, RequestReason.CLIENT_CLOSED)
            self._act(actions)
        finally:
            self._parent = None

    # --- observability: one client span and one MCP metric per upstream request attempt -----------------
    def _track(self, action: SendToTarget, parent: ServerSpan, attempt: int) -> None:
        """Note an upstream request of ``action`` (not yet sent) as an attempt of the request of ``parent``."""
        message = action.message
        up_id = message.get("id")
        if type(up_id) is int and "method" in message:
            self._attempts[(action.target, up_id)] = _Attempt(parent, attempt)

    def _sending(self, name: str, message: JSON) -> JSON:
        """Start the attempt's span as its message goes out; the message with the span's W3C context in
        ``params._meta`` (SEP-414: stdio targets have no headers; HTTP targets read it the same way)."""
        up_id = message.get("id")
        method = message.get("method")
        attempt = self._attempts.get((name, up_id)) if type(up_id) is int and method is not None else None
        if attempt is None:
            return message
        params = message.get("params")
        attempt.method = method if isinstance(method, str) else ""
        if attempt.method == "tools/call" and isinstance(params, dict) and isinstance(params.get("name"), str):
            attempt.tool = params["name"]
        attempt.started = time.perf_counter()
        call = attempt.parent.mcp_span(
            name, attempt.method, tool=attempt.tool or None, attempt=attempt.attempt,
            stdio=isinstance(self.channels.get(name), _LazyStdio), request_id=up_id,
        )  # fmt: skip
        attempt.call = call
        if call is NOOP_CLIENT_SPAN:
            return message
        return {**message, "params": call.inject_into_mcp_meta(params if isinstance(params, dict) else None)}

    def _answered(self, name: str, message: JSON) -> ServerSpan | None:
        """End the attempt ``message`` answers; the span of the client request it was for (None: untracked)."""
        up_id = message.get("id")
        if type(up_id) is int and self._attempts:
            attempt = self._attempts.pop((name, up_id), None)
            if attempt is not None:
                failed = "error" in message
                self._end_attempt(
                    name, attempt, CallOutcome.ERROR if failed else CallOutcome.OK,
                    RequestReason.UPSTREAM_ERROR if failed else RequestReason.OK,
                )  # fmt: skip
                return attempt.parent
        return None

    def _failed(self, name: str, up_id: object, reason: RequestReason) -> _Attempt | None:
        """An attempt that got no answer (failure, timeout): ended, and returned for its retry."""
        attempt = self._attempts.pop((name, up_id), None) if type(up_id) is int else None
        if attempt is not None:
            self._end_attempt(name, attempt, CallOutcome.ERROR, reason)
        return attempt

    def _target_down(self, name: str, reason: RequestReason) -> None:
        for key in [key for key in self._attempts if key[0] == name]:
            self._end_attempt(name, self._attempts.pop(key), CallOutcome.ERROR, reason)

    def _end_attempt(self, name: str, attempt: _Attempt, outcome: CallOutcome, reason: RequestReason) -> None:
        attempt.call.end(reason=reason.value)
        metrics = self.metrics
        if metrics is not None and attempt.started:
            metrics.record_mcp(
                self.cluster.name, attempt.method, name, attempt.tool, tool_exists=True, outcome=outcome,
                duration=time.perf_counter() - attempt.started,
            )  # fmt: skip

    def _abandoned(self, actions: list[Action], reason: RequestReason) -> list[Action]:
        """End the attempts that ``actions`` cancel upstream (their request expired, or its client cancelled
        it or went away): their spans and samples end now, not when the session closes."""
        if self._attempts:
            for action in actions:
                if type(action) is SendToTarget and action.message.get("method") == "notifications/cancelled":
                    params = action.message.get("params")
                    self._failed(action.target, params.get("requestId") if isinstance(params, dict) else None, reason)
        return actions

    def _retried(self, name: str, up_id: object, reason: RequestReason, actions: list[Action]) -> list[Action]:
        """End a failed attempt; its retry (in ``actions``) is the next attempt of the same request."""
        attempt = self._failed(name, up_id, reason)
        if attempt is not None:
            for action in actions:
                if type(action) is SendToTarget and action.message.get("method") != "notifications/cancelled":
                    self._track(action, attempt.parent, attempt.attempt + 1)
        return actions

    def _client_cancelled(self, params: Any) -> None:
        """The client cancelled a request: end its stream with no response, which the spec says a
        receiver of a cancellation should not send."""
        request_id = params.get("requestId") if isinstance(params, dict) else None
        stream = next((s for s in self._requests if s.request_id == request_id), None)
        if stream is None:
            return
        self._requests.remove(stream)
        self._settled()
        stream.cancelled = True
        stream.close()

    # --- target side --------------------------------------------------------------------------
    async def _pump(self, name: str) -> None:
        while True:
            channel = self.channels[name]  # re-read: a modern-only target's channel is replaced once
            try:
                message = await channel.receive()
            except (TargetClosed, TargetUnavailable) as exc:
                if not self._closing:
                    self._target_down(name, RequestReason.UPSTREAM_ERROR)
                    self._act(self.federation.target_failed(name, str(exc) or f"MCP target {name!r} closed"))
                    if isinstance(exc, TargetClosed):
                        self._target_gone(name, exc)
                return
            sent = self._initializing.get(name)
            if sent is not None and "method" not in message and message.get("id") == sent.get("id"):
                del self._initializing[name]
                if "error" in message and self._modern_only_swap(name, message) is not None:
                    self._outboxes[name].put(sent)  # the same initialize, now over discover
                    continue
            if "method" not in message and self._attempts:
                # What the federation sends on this answer (the routed call after a catalog walk, the next
                # page of a list) belongs to the same client request: its attempts are children of that span.
                self._parent = self._answered(name, message)
            try:
                self._act(self.federation.receive_from_target(name, message))
            finally:
                self._parent = None

    async def _sender(self, name: str, outbox: _Outbox) -> None:
        """Send a target's messages one at a time, in order: a send to an HTTP target waits for the
        response head, and a target's messages must not overtake each other."""
        while True:
            await self._send(name, await outbox.get())

    async def _send(self, name: str, message: JSON) -> None:
        channel = self.channels.get(name)
        if channel is None:
            self._act(self.federation.target_failed(name, f"MCP target {name!r} is not connected"))
            return
        if message.get("method") == "initialize":
            self._initializing[name] = message
        if self._attempts:
            message = self._sending(name, message)
        try:
            await channel.send(message)
        except (TargetUnavailable, TargetClosed) as exc:
            up_id = message.get("id")
            if isinstance(exc, TargetUnavailable) and exc.failure is not None and type(up_id) is int:
                retry = self.federation.retry_attempt(name, up_id, exc.failure)
                if retry is not None:
                    log.info("mcp_target_retry", backend=self.cluster.name, target=name, error=str(exc))
                    self._act(self._retried(name, up_id, RequestReason.UPSTREAM_ERROR, [retry]))
                    return
            log.warning("mcp_target_failed", backend=self.cluster.name, target=name, error=str(exc))
            self._failed(name, up_id, RequestReason.UPSTREAM_ERROR)
            self._act(self.federation.target_failed(name, str(exc) or f"MCP target {name!r} failed"))
            if isinstance(exc, TargetClosed):
                self._target_gone(name, exc)

    def _target_gone(self, name: str, exc: TargetClosed) -> None:
        """An upstream session that expired ends this session: the next request resumes it, which
        answers 404 if the upstream really forgot it, so the client re-initializes."""
        if str(exc) == SESSION_EXPIRED:
            log.info("mcp_upstream_session_expired", backend=self.cluster.name, target=name)
            self.close_soon()

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is SendToClient:
                self._to_client(action.message)
            elif self._tasks is not None and not self._closing:
                assert type(action) is SendToTarget
                if self._parent is not None:
                    self._track(action, self._parent, 0)
                if action.try_timeout is not None:
                    self._time_attempt(action)
                if action.delay > 0:
                    self._tasks.start_soon(self._send_later, action)
                    continue
                # Each target's sender task sends in turn, so a slow target never holds up the others.
                outbox = self._outboxes.get(action.target)
                if outbox is not None:
                    outbox.put(action.message)
                else:  # not a target of this session: _send reports it to the federation
                    self._tasks.start_soon(self._send, action.target, action.message)

    def _time_attempt(self, action: SendToTarget) -> None:
        """Start the per-try timer of a request (its backoff included: the try starts once it is sent)."""
        up_id = action.message.get("id")
        if type(up_id) is not int or self._loop is None or action.try_timeout is None:
            return
        timers = self._try_timers

        def expired() -> None:
            timers.discard(handle)
            if not self._closing:
                actions = self.federation.attempt_timed_out(action.target, up_id)
                self._act(self._retried(action.target, up_id, RequestReason.TIMEOUT, actions))

        handle = self._loop.call_later(action.delay + action.try_timeout, expired)
        timers.add(handle)

    async def _send_later(self, action: SendToTarget) -> None:
        """A retry after its backoff, unless its request was answered, cancelled or expired meanwhile."""
        await anyio.sleep(action.delay)
        up_id = action.message.get("id")
        if self._closing or type(up_id) is not int or not self.federation.is_pending(action.target, up_id):
            return
        outbox = self._outboxes.get(action.target)
        if outbox is not None:
            outbox.put(action.message)

    def _to_client(self, message: JSON) -> None:
        if "method" not in message:
            request_id = message.get("id")
            requests = self._requests
            for index, stream in enumerate(requests):
                if stream.request_id == request_id:
                    del requests[index]
                    self._settled()
                    self._deliver(stream, message)
                    return
            log.info("mcp_client_response_dropped", backend=self.cluster.name, id=request_id)
            return
        target = self._funnel or self._route(message)
        if target is None:
            log.info("mcp_client_message_dropped", backend=self.cluster.name, method=message.get("method"))
            return
        target.append(message)

    def _deliver(self, stream: EventStream, response: JSON) -> None:
        """The final response of a request: on its own stream, or a legacy session's only one."""
        if self._funnel is None:
            stream.append(response, final=True)
            return
        self._funnel.append(response)
        stream.close()

    def _route(self, message: JSON) -> EventStream | None:
        oldest = self._requests[0] if self._requests else None
        if "id" in message:
            return oldest or self._standalone
        if message["method"] == "notifications/progress":
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            if token is not None:
                found = next((s for s in self._requests if s.progress_token == token), None)
                if found is not None:
                    return found
        return self._standalone or oldest


@dataclass(slots=True, eq=False)
class _Attempt:
    """One upstream request in flight (an attempt: a retry is another), for its client span and its
    ``agentgate_mcp_requests_total`` sample: per target of a fan-out, with its own duration and outcome."""

    parent: ServerSpan
    attempt: int
    call: ClientSpan = NOOP_CLIENT_SPAN
    method: str = ""
    tool: str = ""
    started: float = 0.0


class McpSessions:
    """The live sessions of one worker, keyed by their sealed token."""

    def __init__(self, clock: Any = time.time, replay: ReplayLimits = DEFAULT_REPLAY) -> None:
        self._sessions: dict[str, FederatedSession] = {}
        # Per backend name, rebuilt when a new config brings a new cluster object (so at most one per backend):
        # the codec, the federation rules, and the same rules for legacy HTTP+SSE clients (one more version).
        self._codecs: dict[str, tuple[UpstreamCluster, SessionTokenCodec, FederationConfig, FederationConfig]] = {}
        self.replay = replay
        self._backoff = SpawnBackoff()
        self._resuming: dict[str, anyio.Lock] = {}
        self._clock = clock
        # (backend, target) pairs found to speak 2026-07-28 only: later sessions start on the modern channel.
        self._modern_only: set[tuple[str, str]] = set()
        # The worker's metrics, given to every session built from now on (None: not recorded).
        self.metrics: WorkerMetrics | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def _compiled(
        self, cluster: UpstreamCluster, *, legacy: bool = False
    ) -> tuple[SessionTokenCodec, FederationConfig]:
        """The codec and federation rules of a backend, built once per compiled cluster."""
        entry = self._codecs.get(cluster.name)
        if entry is None or entry[0] is not cluster:
            settings = cluster.mcp
            assert settings is not None
            keyring = SessionKeyring([(key.key_id, key.key) for key in settings.session_keys])
            config = FederationConfig.from_settings(settings)
            versions = (*config.supported_versions, LEGACY_PROTOCOL_VERSION)
            entry = (
                cluster,
                SessionTokenCodec(keyring, cluster.name),
                config,
                replace(config, supported_versions=versions),
            )
            self._codecs[cluster.name] = entry
        return entry[1], entry[3] if legacy else entry[2]

    def _build(
        self, cluster: UpstreamCluster, claims: SessionClaims | None, *, legacy: bool = False
    ) -> tuple[FederatedSession, tuple[str, ...]]:
        settings = cluster.mcp
        assert settings is not None
        _, config = self._compiled(cluster, legacy=legacy)
        channels: dict[str, TargetChannel] = {}
        handshake: list[str] = []
        session = FederatedSession(
            cluster, McpFederation(config), channels, settings.session_idle_timeout, replay=self.replay
        )
        session.claims = claims
        session.metrics = self.metrics

        def to_modern(name: str) -> TargetChannel:
            self._modern_only.add((cluster.name, name))
            target = settings.target(name)
            assert isinstance(target, McpStreamableHttpTarget)
            return ModernTargetChannel(target, cluster, max_message_bytes=settings.max_body_bytes)

        session.to_modern = to_modern
        for target in settings.targets:
            upstream_id = claims.upstream(target.name) if claims is not None else None
            if isinstance(target, McpStreamableHttpTarget) and (cluster.name, target.name) in self._modern_only:
                channels[target.name] = to_modern(target.name)
                if claims is not None:
                    handshake.append(target.name)
            elif isinstance(target, McpStreamableHttpTarget):
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

    async def create(self, cluster: UpstreamCluster, *, legacy: bool = False) -> FederatedSession:
        """A fresh session for an initialize request (the token is issued when its result arrives).

        ``legacy``: for an HTTP+SSE (2024-11-05) client, which may negotiate that version too; such a
        session gets no token (its stream holds it) and is not registered here.
        """
        session, _ = self._build(cluster, None, legacy=legacy)
        session.on_closed = self.discard
        await session.start()
        return session

    def issue(self, session: FederatedSession, protocol_version: str) -> str:
        """Seal the token of a session whose initialize succeeded, and register it.

        Raises SessionTokenTooLong when the upstream session ids do not fit in a token.
        """
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

    def end_streams(self) -> None:
        """A draining worker ends the standing GET streams, which would otherwise hold its connections
        open until the drain deadline; requests in flight finish."""
        for session in self._sessions.values():
            session.end_standalone()

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


__all__ = [
    "DEFAULT_REPLAY",
    "LEGACY_PROTOCOL_VERSION",
    "EventPosition",
    "EventStream",
    "FederatedSession",
    "McpSessions",
    "ReplayLimits",
    "RequestIdInUse",
    "SessionNotFound",
    "StreamEvent",
    "parse_event_id",
]
