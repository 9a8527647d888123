"""Incremental (Delta) protocol state of one ADS stream (xds.md, "Semantics (Delta)").

Sans-I/O like sotw.py. The server tracks, per type, which version of each resource the
client holds, so it sends only what differs. Subscription changes apply even when the
request's nonce is stale; ACK/NACK only count for a response still awaiting an answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshot import (
    WILDCARD,
    DeltaTypeState,
    Resource,
    ResponseCache,
    Snapshot,
    Subscription,
    plan_delta,
    with_nonce,
)
from controlplane.xds.records import (
    Feedback,
    FeedbackKind,
    NackRecord,
    Outgoing,
    SyncState,
    TypeStatus,
    check_type_url,
)
from controlplane.xds.stream import AdsStream

# Responses awaiting an answer, per type; older ones are forgotten (their answers become stale).
_OUTSTANDING = 32


@dataclass(frozen=True, slots=True)
class _Sent:
    """A response awaiting its answer, and what the client held before it (to undo on NACK)."""

    version: str
    at: float
    upserts: tuple[Resource, ...]
    removals: tuple[str, ...]
    before: dict[str, str | None]


@dataclass
class _TypeState:
    subscription: Subscription
    known: dict[str, str] = field(default_factory=dict)
    forced: set[str] = field(default_factory=set)
    must_respond: bool = False
    parked_version: str | None = None
    sent_version: str = ""
    acked_version: str = ""
    last_nack: NackRecord | None = None
    outstanding: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)


class DeltaStream(AdsStream):
    """Per-type subscriptions, client-held versions and ACK/NACK state of one Delta stream."""

    kind = "delta"
    types: dict[str, _TypeState]

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest, now: float, wall_time: float) -> Feedback:
        type_url = request.type_url
        check_type_url(type_url)
        self._opened(now)
        state = self.types.get(type_url)
        subscribe = list(request.resource_names_subscribe)
        if state is None:
            # Wildcard if the first request names nothing or names "*".
            wildcard = not subscribe or WILDCARD in subscribe
            state = self.types[type_url] = _TypeState(Subscription(wildcard), must_respond=wildcard)
            state.known.update(request.initial_resource_versions)
            self.reconnecting = self.reconnecting or bool(state.known)
            self.dirty = True
        self._change_subscription(state, subscribe, request.resource_names_unsubscribe,
                                  request.initial_resource_versions)
        nonce = request.response_nonce
        sent = state.outstanding.get(nonce) if nonce else None
        if sent is None:
            kind = FeedbackKind.STALE if nonce else FeedbackKind.SUBSCRIBE
            return Feedback(kind, type_url, nonce=nonce)
        # Answers come in order: every response before this one has been answered already.
        while state.outstanding:
            answered, _ = state.outstanding.popitem(last=False)
            if answered == nonce:
                break
        if request.HasField("error_detail"):
            nack = NackRecord(
                self.node_id, self.gateway, type_url, sent.version, nonce,
                request.error_detail.code, request.error_detail.message, wall_time,
            )
            state.last_nack = nack
            state.parked_version = sent.version
            self._undo(state, sent)
            self.dirty = True
            return Feedback(FeedbackKind.NACK, type_url, sent.version, nonce, nack=nack)
        state.acked_version = sent.version
        return Feedback(FeedbackKind.ACK, type_url, sent.version, nonce, latency=now - sent.at)

    def _change_subscription(
        self, state: _TypeState, subscribe: list[str], unsubscribe: Iterable[str], initial: Mapping[str, str]
    ) -> None:
        subscription = state.subscription
        wildcard, names = subscription.wildcard, set(subscription.names)
        for name in subscribe:
            if name == WILDCARD:
                wildcard = True
                continue
            names.add(name)
            if name not in initial:
                # Newly subscribed: sent even if the client might hold it (reported removed if absent).
                state.forced.add(name)
        for name in unsubscribe:
            if name == WILDCARD:
                wildcard = False
                continue
            names.discard(name)
            state.forced.discard(name)
        updated = Subscription(wildcard, frozenset(names))
        if updated != subscription:
            state.subscription = updated
            # What the client no longer wants, it drops by itself: forget it.
            for name in [n for n in state.known if not updated.wants(n)]:
                del state.known[name]
            self.dirty = True
        if state.forced:
            self.dirty = True

    @staticmethod
    def _undo(state: _TypeState, sent: _Sent) -> None:
        """A NACKed response was not applied: the client holds what it held before it.

        Names a later response changed again are left alone.
        """
        known = state.known
        changed = [r.name for r in sent.upserts if known.get(r.name) == r.version]
        changed += [name for name in sent.removals if name not in known]
        for name in changed:
            previous = sent.before[name]
            if previous is None:
                known.pop(name, None)
            else:
                known[name] = previous

    def plan(
        self, snapshot: Snapshot, responses: ResponseCache, now: float, history: Sequence[Snapshot] = ()
    ) -> list[Outgoing]:
        """Upserts, then removals, each in make-before-break order (Delta needs no history)."""
        views = {
            type_url: DeltaTypeState(
                s.subscription, s.known, frozenset(s.forced), s.must_respond, s.parked_version
            )
            for type_url, s in self.types.items()
        }
        outgoing: list[Outgoing] = []
        for push in plan_delta(snapshot, views):
            state = self.types[push.type_url]
            known = state.known
            before = {r.name: known.get(r.name) for r in push.upserts}
            before.update((name, known.pop(name, None)) for name in push.removals)
            known.update((r.name, r.version) for r in push.upserts)
            nonce = self._next_nonce()
            state.outstanding[nonce] = _Sent(push.system_version, now, push.upserts, push.removals, before)
            if len(state.outstanding) > _OUTSTANDING:
                state.outstanding.popitem(last=False)
            state.sent_version = push.system_version
            if push.system_version != state.parked_version:
                state.parked_version = None
            body = responses.delta(
                self.gateway, push.type_url, push.system_version, push.upserts, push.removals, complete=push.complete
            )
            outgoing.append(Outgoing(push.type_url, push.system_version, nonce, with_nonce(body, nonce)))
        for state in self.types.values():
            state.forced.clear()
            state.must_respond = False
        self.planned = snapshot
        self.dirty = False
        return outgoing

    def status(self, current: Snapshot | None) -> list[TypeStatus]:
        behind = current is None or current is not self.planned
        out = []
        for type_url, state in self.types.items():
            if state.parked_version is not None:
                sync = SyncState.NACKED
            elif behind or state.outstanding:
                sync = SyncState.STALE
            else:
                sync = SyncState.SYNCED
            out.append(
                TypeStatus(
                    type_url, state.sent_version, state.acked_version, sync,
                    tuple(state.subscription.describe()), state.last_nack,
                )
            )
        return out
