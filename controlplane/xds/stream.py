"""What SotW and Delta streams share: identity, nonces, and the reconnect window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controlplane.snapshot import ResponseCache, Snapshot
from controlplane.xds.records import Feedback, NackRecord, Outgoing, TypeStatus
from shared.resources import TYPE_ORDER

# A reconnecting proxy subscribes to its types in one burst. Until every type has been
# requested (or this many seconds passed) the server cannot know everything the proxy
# holds, so removing something a not-yet-subscribed type still refers to could leave the
# proxy with a dangling reference: pushes wait for the burst.
DEFAULT_RECONNECT_WINDOW = 0.25


class AdsStream:
    """Base of SotwStream and DeltaStream: sans-I/O protocol state of one ADS stream."""

    kind = ""

    def __init__(self, node_id: str, gateway: str, *, reconnect_window: float = DEFAULT_RECONNECT_WINDOW) -> None:
        self.node_id = node_id
        self.gateway = gateway
        # The snapshot the last plan brought this stream to.
        self.planned: Snapshot | None = None
        # A request changed what the client should hold (subscription, NACK, new type).
        self.dirty = False
        # Set when a first request of a type says the client already holds resources.
        self.reconnecting = False
        self._reconnect_window = reconnect_window
        self._opened_at: float | None = None
        self._nonces = 0
        self.types: dict[str, Any] = {}

    def _opened(self, now: float) -> None:
        if self._opened_at is None:
            self._opened_at = now

    def _next_nonce(self) -> str:
        self._nonces += 1
        return str(self._nonces)

    def hold_until(self) -> float | None:
        """While a reconnecting client is still subscribing, when pushing may start anyway."""
        if not self.reconnecting or self._opened_at is None or len(self.types) >= len(TYPE_ORDER):
            return None
        return self._opened_at + self._reconnect_window

    def handle(self, request: Any, now: float, wall_time: float) -> Feedback:
        raise NotImplementedError

    def plan(
        self, snapshot: Snapshot, responses: ResponseCache, now: float, history: Sequence[Snapshot] = ()
    ) -> list[Outgoing]:
        """Responses that bring the client to `snapshot`; `history` (newest first) maps old versions to sets."""
        raise NotImplementedError

    def status(self, current: Snapshot | None) -> list[TypeStatus]:
        raise NotImplementedError

    def last_nacks(self) -> list[NackRecord]:
        return [s.last_nack for s in self.types.values() if s.last_nack is not None]
