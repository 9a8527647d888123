"""The exporter side of tracing: failures are counted and logged at most once per interval, never
raised. Exports run on the BatchSpanProcessor's own thread, never on the event loop.

The OTLP exporters and the SDK log through the standard `logging` module (a line per failed batch or
per dropped span); `OtelLogBridge` takes those records off the `opentelemetry` logger tree and
passes them to our structured log, one line per distinct message per interval with a count of the
ones held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Final

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shared.logging import get_logger

log = get_logger("dataplane.tracing")

# At most one line per kind of trouble per this many seconds.
LOG_INTERVAL_S: Final = 30.0


class Throttle:
    """Lets one event per key through per interval and counts the rest (thread-safe)."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        # key -> (monotonic time of the last line, events held back since)
        self._state: dict[str, tuple[float, int]] = {}

    def admit(self, key: str) -> int | None:
        """None to stay quiet, else how many events were held back since the last line."""
        now = time.monotonic()
        with self._lock:
            last, held = self._state.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._state[key] = (last, held + 1)
                return None
            self._state[key] = (now, 0)
            return held


class GuardedExporter(SpanExporter):
    """Wraps an OTLP exporter: nothing it raises leaves export(); failed batches are logged (throttled)."""

    def __init__(self, inner: SpanExporter, endpoint: str, protocol: str, throttle: Throttle) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._protocol = protocol
        self._throttle = throttle
        self._failing = False
        self.dropped_spans = 0
        self.exported_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as error:  # an exporter bug must not kill the processor thread
            result = SpanExportResult.FAILURE
            detail = f"{type(error).__name__}: {error}"
        else:
            detail = ""
        if result is SpanExportResult.SUCCESS:
            self.exported_spans += len(spans)
            if self._failing:
                self._failing = False
                log.info("trace export recovered", endpoint=self._endpoint, protocol=self._protocol)
            return result
        self._failing = True
        self.dropped_spans += len(spans)
        held = self._throttle.admit("export failed")
        if held is not None:
            log.warning(
                "trace export failed; spans dropped",
                endpoint=self._endpoint,
                protocol=self._protocol,
                spans=len(spans),
                dropped_total=self.dropped_spans,
                failures_not_logged=held,
                error=detail or None,
            )
        return result

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception as error:
            log.warning("trace exporter shutdown failed", error=f"{type(error).__name__}: {error}")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self._inner.force_flush(timeout_millis)
        except Exception:
            return False


class OtelLogBridge(logging.Handler):
    """Receives the `opentelemetry.*` library log records (warnings and up) and logs each distinct
    message at most once per interval through structlog, with the count of those held back."""

    def __init__(self, throttle: Throttle) -> None:
        super().__init__(logging.WARNING)
        self._throttle = throttle

    def emit(self, record: logging.LogRecord) -> None:
        try:
            held = self._throttle.admit(f"{record.name}:{record.msg}")
            if held is None:
                return
            level = "error" if record.levelno >= logging.ERROR else "warning"
            getattr(log, level)(
                "opentelemetry: " + record.getMessage(), otel_logger=record.name, similar_not_logged=held
            )
        except Exception:  # logging must never fail the exporting thread
            self.handleError(record)


_OTEL_LOGGER: Final = "opentelemetry"
_installed: list[OtelLogBridge] = []
_original_propagate = True
_install_lock = threading.Lock()


def install_log_bridge(throttle: Throttle) -> OtelLogBridge:
    """Route the OpenTelemetry libraries' log records through a bridge (until `remove_log_bridge`)."""
    global _original_propagate
    bridge = OtelLogBridge(throttle)
    logger = logging.getLogger(_OTEL_LOGGER)
    with _install_lock:
        if not _installed:
            _original_propagate = logger.propagate
        _installed.append(bridge)
        logger.addHandler(bridge)
        logger.propagate = False
    return bridge


def remove_log_bridge(bridge: OtelLogBridge) -> None:
    logger = logging.getLogger(_OTEL_LOGGER)
    with _install_lock:
        if bridge in _installed:
            _installed.remove(bridge)
            logger.removeHandler(bridge)
            if not _installed:
                logger.propagate = _original_propagate
