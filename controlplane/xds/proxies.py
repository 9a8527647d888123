"""Which proxies are connected now, and the NACKs of those that left: the debug service's view."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from controlplane.snapshot import Snapshot
from controlplane.xds.records import NackRecord, TypeStatus

DEFAULT_NACK_HISTORY = 100


class StreamState(Protocol):
    """What the registry needs of a SotwStream or DeltaStream."""

    kind: str
    node_id: str
    gateway: str

    def status(self, current: Snapshot | None) -> list[TypeStatus]: ...

    def last_nacks(self) -> list[NackRecord]: ...


@dataclass(eq=False)
class ProxyConnection:
    """One ADS stream of one proxy."""

    state: StreamState
    peer: str
    connected_at: float  # Unix time
    requests: int = 0

    @property
    def node_id(self) -> str:
        return self.state.node_id

    @property
    def gateway(self) -> str:
        return self.state.gateway

    @property
    def kind(self) -> str:
        return self.state.kind


class ConnectedProxies:
    """Live streams plus a bounded history of the last NACKs of disconnected ones."""

    def __init__(self, nack_history: int = DEFAULT_NACK_HISTORY) -> None:
        self._connections: set[ProxyConnection] = set()
        self._history: deque[NackRecord] = deque(maxlen=nack_history)
        self._changed: anyio.Event | None = None

    def add(self, connection: ProxyConnection) -> None:
        self._connections.add(connection)
        self.changed()

    def remove(self, connection: ProxyConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
            self._history.extend(sorted(connection.state.last_nacks(), key=lambda n: n.at))
            self.changed()

    def connections(self, gateway: str = "") -> list[ProxyConnection]:
        """Sorted by gateway, node id, then connection time; all gateways if none is given."""
        selected = [c for c in self._connections if not gateway or c.gateway == gateway]
        return sorted(selected, key=lambda c: (c.gateway, c.node_id, c.connected_at))

    def recent_nacks(self, gateway: str = "") -> list[NackRecord]:
        """NACKs of disconnected proxies, oldest first."""
        return [n for n in self._history if not gateway or n.gateway == gateway]

    def changed(self) -> None:
        """Something about the connections changed: wake `wait_until` callers."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, re-checking after each change (no polling)."""
        while not predicate():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
