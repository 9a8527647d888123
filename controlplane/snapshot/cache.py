"""The snapshot of every Gateway, and a way for discovery streams to wait for the next one.

Call its methods from the event loop's thread: `set_snapshot` wakes waiting streams
through anyio events, which are not thread-safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import anyio

from controlplane.snapshot.model import Snapshot, build_snapshot, empty_snapshot
from controlplane.snapshot.references import check_consistency
from controlplane.snapshot.responses import ResponseCache
from shared.resources import ResourceMap

# Snapshots remembered per Gateway, so a reconnecting SotW proxy's versions map back to sets.
DEFAULT_HISTORY = 8


class SnapshotCache:
    """One immutable, internally consistent snapshot per Gateway ("namespace/name")."""

    def __init__(self, responses: ResponseCache | None = None, *, history: int = DEFAULT_HISTORY) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._history: dict[str, deque[Snapshot]] = {}
        self._history_size = history
        self._removed: set[str] = set()
        self._changed: dict[str, anyio.Event] = {}
        self.responses = responses or ResponseCache()

    def set_snapshot(self, gateway: str, resources: ResourceMap) -> Snapshot:
        """Publish a Gateway's resources; returns the current snapshot object.

        Unchanged content returns the very same object and wakes nobody. Raises
        SnapshotInconsistent (naming each dangling reference) and keeps the previous one.
        """
        snapshot = build_snapshot(gateway, resources, self._snapshots.get(gateway))  # checks types and names first
        check_consistency(gateway, resources)
        return self._publish(snapshot, removed=False)

    def remove_snapshot(self, gateway: str) -> None:
        """Serve an empty snapshot, so connected proxies drop everything of this Gateway."""
        self._publish(empty_snapshot(gateway), removed=True)

    def _publish(self, snapshot: Snapshot, *, removed: bool) -> Snapshot:
        gateway = snapshot.gateway
        if removed:
            self._removed.add(gateway)
        else:
            self._removed.discard(gateway)
        current = self._snapshots.get(gateway)
        if current is not None and current.version == snapshot.version:
            return current
        self._snapshots[gateway] = snapshot
        self._history.setdefault(gateway, deque(maxlen=self._history_size)).appendleft(snapshot)
        self.responses.retain(snapshot)
        event = self._changed.pop(gateway, None)
        if event is not None:
            event.set()
        return snapshot

    def get_snapshot(self, gateway: str) -> Snapshot | None:
        """The snapshot served for a Gateway (empty once removed); None before the first one."""
        return self._snapshots.get(gateway)

    def history(self, gateway: str) -> Sequence[Snapshot]:
        """Recent snapshots of a Gateway, newest (the current one) first."""
        return tuple(self._history.get(gateway, ()))

    def gateways(self) -> list[str]:
        """Gateways being served, sorted; removed ones are left out."""
        return sorted(g for g in self._snapshots if g not in self._removed)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot held, removed Gateways' empty ones included, sorted by Gateway."""
        return [self._snapshots[g] for g in sorted(self._snapshots)]

    async def wait_for_change(self, gateway: str, known: Snapshot | None) -> Snapshot:
        """Return the Gateway's snapshot as soon as it exists and is not `known`."""
        while True:
            current = self._snapshots.get(gateway)
            if current is not None and current is not known:
                return current
            event = self._changed.get(gateway)
            if event is None:
                event = self._changed[gateway] = anyio.Event()
            await event.wait()
