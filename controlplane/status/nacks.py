"""What connected proxies reject, read from the xDS server's `ConnectedProxies` (the same view the
debug service shows), for Events and Gateway status.

The xDS server keeps, per stream and type, the last NACK and whether the proxy still rejects
what it was last sent (SyncState.NACKED until a newer config is pushed to it). Two things come
out of that view:

- occurrences: each NACK seen once (identified by proxy, type and nonce), for Events;
- rejections: per Gateway, the proxies that reject its current config now, for its status.

A NACK is seen by the replica the proxy is connected to; only the leader writes, so a NACK of a
proxy connected to another replica shows in that replica's logs, metrics and debug service only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controlplane.snapshot import SnapshotCache
from controlplane.xds.proxies import ConnectedProxies
from controlplane.xds.records import NackRecord, SyncState
from shared.logging import get_logger
from shared.resources import short_name

log = get_logger("controlplane.status")

# Resource names an Event message lists before it only counts the rest.
_NAMES_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Rejection:
    """One NACK, with the names of the resources it concerns."""

    nack: NackRecord
    resource_names: tuple[str, ...]

    @property
    def aggregation_key(self) -> tuple[str, str, str, str]:
        """Same proxy, type and error: the same Event (its count goes up)."""
        return (self.nack.gateway, self.nack.node_id, self.nack.type_url, self.nack.message)

    def describe(self) -> str:
        names = list(self.resource_names[:_NAMES_SHOWN])
        if len(self.resource_names) > _NAMES_SHOWN:
            names.append(f"and {len(self.resource_names) - _NAMES_SHOWN} more")
        shown = f" ({', '.join(names)})" if names else ""
        return (
            f"proxy {self.nack.node_id} rejected {short_name(self.nack.type_url)} version {self.nack.version}"
            f"{shown} [{self.nack.type_url}]: {self.nack.message}"
        )


def rejected_names(cache: SnapshotCache, nack: NackRecord) -> tuple[str, ...]:
    """The resources of the NACKed type the error names; if it names none, every one of that type
    in the Gateway's snapshot (the proxy rejects an update as a whole)."""
    snapshot = cache.get_snapshot(nack.gateway)
    if snapshot is None:
        return ()
    names = sorted(snapshot.resources(nack.type_url))
    named = tuple(name for name in names if name in nack.message)
    return named or tuple(names)


class NackWatcher:
    """Follows `ConnectedProxies`: reports new NACKs and the per-Gateway rejections as they change."""

    def __init__(
        self,
        proxies: ConnectedProxies,
        cache: SnapshotCache,
        on_nack: Callable[[Rejection], None],
        on_rejections: Callable[[dict[str, str]], None],
    ) -> None:
        self._proxies = proxies
        self._cache = cache
        self._on_nack = on_nack
        self._on_rejections = on_rejections
        self._seen: set[tuple[str, str, str]] = set()
        self._rejections: dict[str, str] = {}

    def scan(self) -> bool:
        """Look once; report what is new. True when something was reported."""
        reported = False
        live: set[tuple[str, str, str]] = set()
        rejecting: dict[str, list[str]] = {}
        for connection in self._proxies.connections():
            current = self._cache.get_snapshot(connection.gateway)
            for type_status in connection.state.status(current):
                nack = type_status.last_nack
                if nack is None:
                    continue
                identity = (nack.node_id, nack.type_url, nack.nonce)
                live.add(identity)
                rejection = Rejection(nack, rejected_names(self._cache, nack))
                if identity not in self._seen:
                    self._seen.add(identity)
                    self._on_nack(rejection)
                    reported = True
                if type_status.state is SyncState.NACKED:
                    rejecting.setdefault(connection.gateway, []).append(rejection.describe())
        self._seen &= live  # forget streams that ended: their records cannot come back
        rejections = {gateway: _summary(lines) for gateway, lines in sorted(rejecting.items())}
        if rejections != self._rejections:
            self._rejections = rejections
            self._on_rejections(dict(rejections))
            reported = True
        return reported

    async def run(self) -> None:
        """Scan on every change of the connections until cancelled (no polling)."""
        while True:
            await self._proxies.wait_until(self.scan)


def _summary(lines: Iterable[str]) -> str:
    listed = sorted(set(lines))
    return "Proxies reject the current config: " + "; ".join(listed)
