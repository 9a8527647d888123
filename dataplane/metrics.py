"""Worker metrics (Prometheus). One registry per worker process; names are agentgate_dataplane_*."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WorkerMetrics:
    """The xDS-side metrics a worker exports; request metrics arrive with the observability work."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.xds_connected = Gauge(
            "agentgate_dataplane_xds_connected", "1 while the ADS stream to the control plane is up.",
            registry=self.registry,
        )
        self.xds_updates = Counter(
            "agentgate_dataplane_xds_updates_total", "Discovery responses handled, by type and result (ack|nack).",
            ["type", "result"], registry=self.registry,
        )
        self.xds_reconnects = Counter(
            "agentgate_dataplane_xds_reconnects_total", "ADS stream (re)connect attempts.", registry=self.registry,
        )
        self.config_ready = Gauge(
            "agentgate_dataplane_config_ready", "1 once a first config has been applied.", registry=self.registry,
        )
