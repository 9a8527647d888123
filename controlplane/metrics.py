"""Control plane xDS metrics (Prometheus), registered into a caller-given registry.

Label values are bounded: `type` is the short type name (Route, Backend, ...), `stream`
is sotw|delta, and snapshot info has one series per Gateway, read from the cache at
scrape time so a replaced version never lingers as a stale series.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.snapshot import SnapshotCache
from shared.resources import TYPE_ORDER, short_name

# Push to ACK: a proxy compiles and swaps config in milliseconds; seconds means trouble.
_PUSH_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry, cache: SnapshotCache | None = None) -> None:
        self.connected_proxies = Gauge(
            "agentgate_xds_connected_proxies", "ADS streams open now, by stream kind (sotw|delta).",
            ["stream"], registry=registry,
        )
        self.pushes = Counter(
            "agentgate_xds_pushes_total", "Discovery responses sent, by resource type.", ["type"], registry=registry,
        )
        self.acks = Counter(
            "agentgate_xds_acks_total", "Discovery responses ACKed by proxies, by resource type.",
            ["type"], registry=registry,
        )
        self.nacks = Counter(
            "agentgate_xds_nacks_total", "Discovery responses rejected (NACKed) by proxies, by resource type.",
            ["type"], registry=registry,
        )
        self.push_ack_seconds = Histogram(
            "agentgate_xds_push_ack_seconds", "Time from sending a discovery response to its ACK, by resource type.",
            ["type"], buckets=_PUSH_ACK_BUCKETS, registry=registry,
        )
        for stream in ("sotw", "delta"):
            self.connected_proxies.labels(stream)
        # Children per type URL, resolved once (and exported at 0 from the start, so rate() works).
        self._pushes = {t: self.pushes.labels(short_name(t)) for t in TYPE_ORDER}
        self._acks = {t: self.acks.labels(short_name(t)) for t in TYPE_ORDER}
        self._nacks = {t: self.nacks.labels(short_name(t)) for t in TYPE_ORDER}
        self._push_ack = {t: self.push_ack_seconds.labels(short_name(t)) for t in TYPE_ORDER}
        if cache is not None:
            registry.register(SnapshotInfoCollector(cache))

    def pushed(self, type_url: str) -> None:
        self._pushes[type_url].inc()

    def acked(self, type_url: str, latency: float | None) -> None:
        self._acks[type_url].inc()
        if latency is not None:
            self._push_ack[type_url].observe(latency)

    def nacked(self, type_url: str) -> None:
        self._nacks[type_url].inc()


class SnapshotInfoCollector(Collector):
    """agentgate_xds_snapshot_info{gateway,version} = 1, plus the resource count per Gateway."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "agentgate_xds_snapshot_info", "The snapshot version served per Gateway (always 1).",
            labels=["gateway", "version"],
        )
        counts = GaugeMetricFamily(
            "agentgate_xds_snapshot_resources", "Resources in the snapshot served per Gateway.", labels=["gateway"],
        )
        for gateway in self._cache.gateways():
            snapshot = self._cache.get_snapshot(gateway)
            if snapshot is None:
                continue
            info.add_metric([gateway, snapshot.version], 1)
            counts.add_metric([gateway], snapshot.resource_count())
        yield info
        yield counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing without collecting keeps registration free of a scrape of the cache.
        yield GaugeMetricFamily("agentgate_xds_snapshot_info", "", labels=["gateway", "version"])
        yield GaugeMetricFamily("agentgate_xds_snapshot_resources", "", labels=["gateway"])
