"""State-of-the-world protocol state of one ADS stream (xds.md, "Semantics (SotW)").

Sans-I/O: `handle` takes a decoded request and says what it meant; `plan` turns the
current snapshot into the responses to write. Each type URL is its own sub-stream with
its own version, nonce and ACK/NACK state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshot import (
    WILDCARD,
    Resource,
    ResponseCache,
    Snapshot,
    SotwTypeState,
    Subscription,
    plan_sotw,
    sotw_desired,
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

# Sets recently sent per type, so a NACK can say which one the client still holds.
_RECENT_SETS = 4


@dataclass
class _TypeState:
    subscription: Subscription = field(default_factory=Subscription)
    # True once the client named resources (or "*"): an empty list then means "none".
    named: bool = False
    held: Mapping[str, Resource] = field(default_factory=dict)
    sent_version: str | None = None
    sent_nonce: str = ""
    sent_at: float = 0.0
    awaiting_ack: bool = False
    acked_version: str = ""
    parked_version: str | None = None
    last_nack: NackRecord | None = None
    # version_info of the first request: what a reconnecting client says it holds.
    claimed_version: str = ""
    recent: OrderedDict[str, Mapping[str, Resource]] = field(default_factory=OrderedDict)


class SotwStream(AdsStream):
    """Per-type versions, nonces, subscriptions and ACK/NACK state of one SotW stream."""

    kind = "sotw"
    types: dict[str, _TypeState]

    def handle(self, request: discovery_pb2.DiscoveryRequest, now: float, wall_time: float) -> Feedback:
        type_url = request.type_url
        check_type_url(type_url)
        self._opened(now)
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = _TypeState(claimed_version=request.version_info)
            self.reconnecting = self.reconnecting or bool(request.version_info)
        elif request.response_nonce != state.sent_nonce:
            # Not an answer to the latest response of this type: ignore it entirely.
            return Feedback(FeedbackKind.STALE, type_url, request.version_info, request.response_nonce)
        self._subscribe(state, request.resource_names)
        if not state.sent_nonce:
            return Feedback(FeedbackKind.SUBSCRIBE, type_url)
        version = state.sent_version or ""
        nonce = state.sent_nonce
        state.awaiting_ack = False
        if request.HasField("error_detail"):
            nack = NackRecord(
                self.node_id, self.gateway, type_url, version, nonce,
                request.error_detail.code, request.error_detail.message, wall_time,
            )
            state.last_nack = nack
            state.parked_version = version
            # The client keeps what it accepted last (its version_info); retention must see that.
            accepted = request.version_info
            state.held = state.recent.get(accepted, {}) if accepted else {}
            self.dirty = True
            return Feedback(FeedbackKind.NACK, type_url, version, nonce, nack=nack)
        state.acked_version = version
        return Feedback(FeedbackKind.ACK, type_url, version, nonce, latency=now - state.sent_at)

    def _subscribe(self, state: _TypeState, resource_names: list[str]) -> None:
        names = frozenset(resource_names)
        if WILDCARD in names:
            subscription = Subscription(True, names - {WILDCARD})
        elif names:
            subscription = Subscription(False, names)
        else:
            # Legacy wildcard: an empty list means "everything" only until something was named.
            subscription = Subscription(False) if state.named else Subscription(True)
        state.named = state.named or bool(names)
        if subscription != state.subscription or state.sent_version is None:
            state.subscription = subscription
            self.dirty = True

    def _adopt_claims(self, history: Sequence[Snapshot]) -> None:
        """Turn a reconnecting client's versions back into the sets it holds (versions are content hashes).

        The wanted set is not sent again; an older one found in `history` is what the
        make-before-break plan starts from. An unknown version counts as holding nothing.
        """
        for type_url, state in self.types.items():
            claimed = state.claimed_version
            if state.sent_version is not None or not claimed:
                continue
            state.claimed_version = ""
            for index, past in enumerate(history):
                chosen, version = sotw_desired(past, type_url, state.subscription)
                if version == claimed:
                    state.held = dict(chosen)
                    state.acked_version = claimed
                    state.recent[claimed] = state.held
                    if index == 0:  # already the current set: nothing to send
                        state.sent_version = claimed
                    break

    def plan(
        self, snapshot: Snapshot, responses: ResponseCache, now: float, history: Sequence[Snapshot] = ()
    ) -> list[Outgoing]:
        """The responses that bring the client to `snapshot`, in make-before-break order."""
        self._adopt_claims(history if history and history[0] is snapshot else (snapshot, *history))
        views = {
            type_url: SotwTypeState(s.subscription, s.held, s.sent_version, s.parked_version)
            for type_url, s in self.types.items()
        }
        outgoing: list[Outgoing] = []
        for push in plan_sotw(snapshot, views):
            state = self.types[push.type_url]
            held = {r.name: r for r in push.resources}
            nonce = self._next_nonce()
            state.held = held
            state.sent_version = push.version
            state.sent_nonce = nonce
            state.sent_at = now
            state.awaiting_ack = True
            state.parked_version = None
            state.recent[push.version] = held
            state.recent.move_to_end(push.version)
            if len(state.recent) > _RECENT_SETS:
                state.recent.popitem(last=False)
            body = responses.sotw(self.gateway, push.type_url, push.version, push.resources)
            outgoing.append(Outgoing(push.type_url, push.version, nonce, with_nonce(body, nonce)))
        self.planned = snapshot
        self.dirty = False
        return outgoing

    def status(self, current: Snapshot | None) -> list[TypeStatus]:
        behind = current is None or current is not self.planned
        out = []
        for type_url, state in self.types.items():
            if state.parked_version is not None:
                sync = SyncState.NACKED
            elif behind or state.awaiting_ack or state.sent_version is None:
                sync = SyncState.STALE
            else:
                sync = SyncState.SYNCED
            out.append(
                TypeStatus(
                    type_url, state.sent_version or "", state.acked_version, sync,
                    tuple(state.subscription.describe()), state.last_nack,
                )
            )
        return out
