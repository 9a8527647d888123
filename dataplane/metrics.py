"""Where the worker's metrics used to live; they are in `dataplane.observability.metrics` now (one home for
request, protocol, policy and xDS metrics). Kept so existing imports (the ADS client, the worker) work."""

from __future__ import annotations

from dataplane.observability.metrics import WorkerMetrics

__all__ = ["WorkerMetrics"]
