"""StatusWriter: the translator's statuses and the proxies' rejections, written back to Kubernetes.

Inputs are synchronous and cheap (`submit`, `set_rejections`, `record_nack`): the reconcile pass
that publishes snapshots only records what it wants and never waits for the API server. A
background task (`run`) writes, while this replica leads:

- only what changed: each object's last written body is remembered, and an object is read
  before it is written, so a body the server already holds is not written again;
- through the status subresource, PUT with the resourceVersion just read; a 409 Conflict reads
  again and retries (`conflict_retries` times), other failures retry later with backoff;
- HTTPRoute parent entries of other controllers untouched (controlplane.status.merge);
- gathered for `batch_delay` and paced by a token bucket (`qps`, `burst`);
- Warning Events for NACKs, aggregated (controlplane.status.events).

On taking over (`set_leading(True)`) every object is read and written if it differs: the full
current status, once. On stepping down the writes in flight are cancelled.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from controlplane.status.events import PendingEvent, event_body, event_name
from controlplane.status.kube import KubeApiError, KubeJson
from controlplane.status.merge import merged_status, timestamp, with_rejection
from controlplane.status.nacks import Rejection
from controlplane.translate import CONTROLLER_NAME
from controlplane.translate.translator import ObjectStatus
from shared.logging import get_logger

log = get_logger("controlplane.status")

ObjectId = tuple[str, str, str]  # kind, namespace, name


@dataclass(frozen=True)
class StatusWriterSettings:
    controller_name: str = CONTROLLER_NAME
    # Writes per second, and how many may go at once after a quiet time.
    qps: float = 20.0
    burst: int = 50
    # Reads and writes of one object after 409 Conflicts before it waits for the next round.
    conflict_retries: int = 3
    # Seconds changes are gathered before a round of writes.
    batch_delay: float = 0.05
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take` waits for one."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.rate, self.burst = rate, max(1, burst)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.burst)
        self._at = clock()

    async def take(self) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await self._sleep((1 - self._tokens) / self.rate)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _serialized(body: Mapping[str, Any] | None) -> str:
    return json.dumps(body, sort_keys=True, default=str)


class StatusWriter:
    def __init__(
        self,
        client: KubeJson,
        settings: StatusWriterSettings | None = None,
        *,
        identity: str = "",
        now: Callable[[], datetime] = _utc_now,
        limiter: TokenBucket | None = None,
    ) -> None:
        self.client = client
        self.settings = settings or StatusWriterSettings()
        self.identity = identity
        self._now = now
        self._limiter = limiter or TokenBucket(self.settings.qps, self.settings.burst)
        self._desired: dict[ObjectId, dict[str, Any]] = {}
        self._rejections: dict[str, str] = {}
        # What the server held after our last write or check, as the body we wanted then.
        self._written: dict[ObjectId, str] = {}
        self._pending: dict[ObjectId, None] = {}  # an ordered set
        self._events: dict[tuple[str, ...], PendingEvent] = {}
        self._event_counts: dict[tuple[str, str], int] = {}  # (namespace, name) -> count written
        self._uids: dict[tuple[str, str], str] = {}
        self.leading = False
        self._leading = anyio.Event()
        self._wake = anyio.Event()
        self._term: anyio.CancelScope | None = None
        # Counters for tests and logs.
        self.writes = 0
        self.conflicts = 0

    # --- inputs (never block) --------------------------------------------------------------------

    def submit(self, statuses: Iterable[ObjectStatus]) -> None:
        """The statuses of one translation: every object this controller reports on."""
        desired = {(s.kind, s.namespace, s.name): s.status for s in statuses}
        for key in self._desired.keys() - desired.keys():
            if key[0] == "HTTPRoute" and key in self._written:
                self._mark(key)  # our parent entries must go
            else:
                self._written.pop(key, None)
        self._desired = desired
        for key in desired:
            if self._written.get(key) != _serialized(self._target(key)):
                self._mark(key)

    def set_rejections(self, rejections: Mapping[str, str]) -> None:
        """Gateway "namespace/name" -> why connected proxies reject its current config (none: all accept)."""
        before = self._rejections
        changed = {g for g in rejections.keys() | before.keys() if rejections.get(g) != before.get(g)}
        self._rejections = dict(rejections)
        for gateway in sorted(changed):
            namespace, _, name = gateway.partition("/")
            key = ("Gateway", namespace, name)
            if key in self._desired:
                self._mark(key)
        if changed:
            log.info("proxy rejections", gateways=sorted(changed), rejecting=sorted(rejections))

    def record_nack(self, rejection: Rejection) -> None:
        """One NACK: an Event occurrence (dropped while another replica leads: it has its own proxies)."""
        if not self.leading:
            return
        key = rejection.aggregation_key
        namespace, _, name = rejection.nack.gateway.partition("/")
        at = timestamp(datetime.fromtimestamp(rejection.nack.at, UTC))
        pending = self._events.get(key)
        if pending is None:
            self._events[key] = PendingEvent(namespace, name, event_name(name, key), rejection.describe(), 1, at, at)
        else:
            pending.count += 1
            pending.last = at
        self._wake.set()

    def set_leading(self, leading: bool) -> None:
        """Start writing (everything is checked once) or stop (writes in flight are cancelled)."""
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self._written.clear()
            for key in self._desired:
                self._mark(key)
            self._leading.set()
        else:
            self._leading = anyio.Event()
            self._events.clear()
            if self._term is not None:
                self._term.cancel()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._events)

    # --- the writing task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Write while leading, until cancelled."""
        while True:
            await self._leading.wait()
            with anyio.CancelScope() as scope:
                self._term = scope
                await self._serve_term()
            self._term = None

    async def _serve_term(self) -> None:
        failures = 0
        while True:
            if not self.pending:
                self._wake = anyio.Event()
                await self._wake.wait()
                await anyio.sleep(self.settings.batch_delay)  # gather the rest of a burst of changes
            if await self.flush():
                delay = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(failures, 20))
                failures += 1
                await anyio.sleep(delay * (0.5 + random.random() / 2))
            else:
                failures = 0

    async def flush(self) -> int:
        """One round: every pending object and Event. Returns how many must be tried again later."""
        if not self.leading:
            return 0
        retry = 0
        while self._pending:
            key = next(iter(self._pending))
            del self._pending[key]
            await self._limiter.take()
            try:
                await self._write(key)
            except KubeApiError as exc:
                if exc.retryable or exc.conflict:
                    self._mark(key, wake=False)
                    retry += 1
                    log.warning("status write failed, will retry", kind=key[0], namespace=key[1], name=key[2],
                                error=str(exc))
                    break  # the API is struggling: back off before the rest
                log.error("status write refused", kind=key[0], namespace=key[1], name=key[2], error=str(exc))
                self._written[key] = _serialized(self._target(key))  # until it changes again
        while self._events and not retry:
            key, pending = next(iter(self._events.items()))
            del self._events[key]
            await self._limiter.take()
            try:
                await self._write_event(pending)
            except KubeApiError as exc:
                if exc.retryable or exc.conflict:
                    self._events.setdefault(key, pending)
                    retry += 1
                    log.warning("event write failed, will retry", gateway=pending.gateway, error=str(exc))
                    break
                log.error("event write refused", namespace=pending.namespace, gateway=pending.gateway, error=str(exc))
        return retry + (len(self._pending) if retry else 0)

    def _mark(self, key: ObjectId, *, wake: bool = True) -> None:
        self._pending[key] = None
        if wake:
            self._wake.set()

    def _target(self, key: ObjectId) -> dict[str, Any] | None:
        """What we want the object's status to say (None: an HTTPRoute we no longer report on)."""
        desired = self._desired.get(key)
        if desired is None:
            return None
        kind, namespace, name = key
        return with_rejection(kind, desired, self._rejections.get(f"{namespace}/{name}"))

    async def _write(self, key: ObjectId) -> None:
        kind, namespace, name = key
        target = self._target(key)
        if target is None and kind != "HTTPRoute":
            return
        for _ in range(self.settings.conflict_retries + 1):
            try:
                current = await self.client.get(kind, namespace, name)
            except KubeApiError as exc:
                if exc.status == 404:
                    self._written.pop(key, None)  # deleted meanwhile: its watch event brings a new translation
                    return
                raise
            if kind == "Gateway":
                self._uids[(namespace, name)] = str((current.get("metadata") or {}).get("uid") or "")
            status = merged_status(
                kind, current.get("status"), target, self.settings.controller_name, timestamp(self._now())
            )
            if status == (current.get("status") or {}):
                self._done(key, target)
                return
            try:
                await self.client.replace_status(kind, namespace, name, {**current, "status": status})
            except KubeApiError as exc:
                if not exc.conflict:
                    raise
                self.conflicts += 1
                log.debug("status conflict, reading again", kind=kind, namespace=namespace, name=name)
                continue
            self._done(key, target)
            self.writes += 1
            log.info("status written", kind=kind, namespace=namespace, name=name,
                     generation=(current.get("metadata") or {}).get("generation"))
            return
        raise KubeApiError(409, "Conflict", f"{kind} {namespace}/{name}: still conflicting after "
                                            f"{self.settings.conflict_retries} retries")

    def _done(self, key: ObjectId, target: dict[str, Any] | None) -> None:
        if target is None:
            self._written.pop(key, None)  # our HTTPRoute entries are gone: nothing more to do for it
        else:
            self._written[key] = _serialized(target)

    async def _gateway_uid(self, namespace: str, name: str) -> str:
        uid = self._uids.get((namespace, name))
        if uid is None:
            try:
                gateway = await self.client.get("Gateway", namespace, name)
                uid = str((gateway.get("metadata") or {}).get("uid") or "")
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
                uid = ""
            self._uids[(namespace, name)] = uid
        return uid

    async def _write_event(self, pending: PendingEvent) -> None:
        """Create the Event, or count on an existing one (ours, or a predecessor's of the same name)."""
        where = (pending.namespace, pending.name)
        known = self._event_counts.get(where)
        if known is not None:
            count = known + pending.count
            try:
                await self.client.merge_patch(
                    "Event", pending.namespace, pending.name, {"count": count, "lastTimestamp": pending.last}
                )
                self._event_counts[where] = count
                log.info("event updated", gateway=f"{pending.namespace}/{pending.gateway}", event_name=pending.name,
                         count=count)
                return
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
                del self._event_counts[where]  # expired (events have a TTL): create it again
        uid = await self._gateway_uid(pending.namespace, pending.gateway)
        body = event_body(pending, uid, pending.count, self.identity)
        try:
            await self.client.create("Event", pending.namespace, body)
            count = pending.count
        except KubeApiError as exc:
            if exc.status != 409:
                raise
            touched = await self.client.merge_patch(
                "Event", pending.namespace, pending.name, {"lastTimestamp": pending.last}
            )
            count = int(touched.get("count") or 1) + pending.count
            await self.client.merge_patch("Event", pending.namespace, pending.name, {"count": count})
        self._event_counts[where] = count
        log.info("event written", gateway=f"{pending.namespace}/{pending.gateway}", event_name=pending.name,
                 reason=body["reason"], count=count)
