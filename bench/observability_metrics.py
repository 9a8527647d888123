"""What request metrics and the access log cost per request.

Metrics: `WorkerMetrics.record_*` with children bound at config apply (`prepare`) against calling
prometheus_client's ``labels(...)`` per request. Access log: what the event loop pays per request
(build and fill an `AccessRecord`, finish it, `emit`), what the writer thread pays per line (redact,
render JSON through structlog) and the end-to-end rate into a file; against rendering and writing each
line on the calling thread. Prints microseconds per operation (best of ``--repeat`` runs).

    .venv/bin/python bench/observability_metrics.py [--count 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from dataplane.config.compile import compile_config
from dataplane.observability.access_log import AccessLog, AccessRecord, FileSink, redact
from dataplane.observability.metrics import WorkerMetrics
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TARGET

GW, LISTENER_NAME, ROUTE_NAME, BACKEND_NAME = "ns/gw", "ns/gw/http", "ns/mcp/0", "ns/tools"


def best_of(repeat: int, count: int, body: Callable[[int], None]) -> float:
    """Microseconds per operation: the fastest of `repeat` runs of `body(count)`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        body(count)
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def prepared_metrics() -> WorkerMetrics:
    resources = {
        LISTENER: {LISTENER_NAME: pb.Listener(name=LISTENER_NAME, gateway=GW, port=8080,
                                              protocol=pb.LISTENER_PROTOCOL_HTTP)},
        BACKEND: {BACKEND_NAME: pb.Backend(name=BACKEND_NAME, mcp=pb.McpBackend(
            session_keys=[pb.McpSessionKey(id="k", key=bytes(32))]))},
        TARGET: {"ns/tools/clock": pb.Target(name="ns/tools/clock", backend=BACKEND_NAME,
                                             mcp=pb.McpServer(name="clock", stdio={"command": "x"}))},
        ROUTE: {ROUTE_NAME: pb.Route(name=ROUTE_NAME, listeners=[LISTENER_NAME], route_key="ns/mcp",
                                     backends=[pb.BackendRef(backend=BACKEND_NAME, weight=1)])},
    }
    metrics = WorkerMetrics(CollectorRegistry(), gateway=GW)
    metrics.prepare(compile_config(resources, version="bench"))
    return metrics


def bench_metrics(count: int, repeat: int) -> None:
    metrics = prepared_metrics()

    def request(n: int) -> None:
        record = metrics.record_request
        for _ in range(n):
            record(LISTENER_NAME, ROUTE_NAME, BACKEND_NAME, 200, "ok", 0.0042)

    def request_uncached(n: int) -> None:
        requests, duration = metrics.requests, metrics.request_duration
        for _ in range(n):
            labels = (GW, LISTENER_NAME, ROUTE_NAME, BACKEND_NAME, "2xx", "ok")
            requests.labels(*labels).inc()
            duration.labels(*labels).observe(0.0042)

    def mcp(n: int) -> None:
        record = metrics.record_mcp
        for _ in range(n):
            record(BACKEND_NAME, "tools/call", "clock", "now", tool_exists=True, outcome="ok", duration=0.01)

    def llm(n: int) -> None:
        record = metrics.record_llm
        for _ in range(n):
            record("openai", "chat", "gpt-4o", input_tokens=812, output_tokens=95, duration=1.2,
                   time_to_first_chunk=0.21)

    def decisions(n: int) -> None:
        limit, authz = metrics.record_rate_limit, metrics.record_authorization
        for _ in range(n):
            limit("per-agent", allowed=True)
            authz("ns/tenants", allowed=True)

    print("metrics (µs per call)")
    print(f"  record_request, bound children      {best_of(repeat, count, request):6.2f}")
    print(f"  same with labels() per request      {best_of(repeat, count, request_uncached):6.2f}")
    print(f"  record_mcp (tools/call + duration)  {best_of(repeat, count, mcp):6.2f}")
    print(f"  record_llm (2 token obs, dur, ttfc) {best_of(repeat, count, llm):6.2f}")
    print(f"  rate limit + authorization          {best_of(repeat, count, decisions):6.2f}")


def filled_record() -> AccessRecord:
    record = AccessRecord(method="POST", authority="gw.example.com:8080", path="/mcp", gateway=GW,
                          listener=LISTENER_NAME)
    record.route, record.backend = ROUTE_NAME, BACKEND_NAME
    record.principal, record.source_address = "spiffe://cluster.local/ns/agents/sa/planner", "10.0.0.7:51234"
    record.mcp_method, record.mcp_target, record.mcp_tool = "tools/call", "clock", "now"
    record.note_decision(True, "ns/tenants", "allow[0]")
    record.upstream_address, record.trace_id = "127.0.0.1:9000", "4bf92f3577b34da6a3ce929d0e0e4736"
    return record


def bench_access_log(count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "access.log"
        access = AccessLog(FileSink(path, max_bytes=1 << 40), max_pending=count + 1).start()
        # Measured against a queue the writer drains concurrently, as in a worker.

        def loop_side(n: int) -> None:
            emit = access.emit
            for _ in range(n):
                record = filled_record()
                record.finish(200)
                emit(record)
            access.flush(timeout=120)

        def loop_side_only(n: int) -> None:
            for _ in range(n):
                filled_record().finish(200)

        render = access.render
        sample = filled_record()
        sample.finish(200)

        def render_only(n: int) -> None:
            for _ in range(n):
                render(sample)

        def inline(n: int) -> None:
            """The alternative: render and write each line on the calling thread (what the loop would pay)."""
            fd = os.open(Path(folder) / "inline.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for _ in range(n):
                    record = filled_record()
                    record.finish(200)
                    os.write(fd, render(record))
            finally:
                os.close(fd)

        emit_only_count = min(count, access.max_pending - 1)
        paused = AccessLog(FileSink(Path(folder) / "paused.log"), max_pending=emit_only_count + 1)

        def emit_only(n: int) -> None:
            # The writer is not started: the pure cost of the queue append.
            for _ in range(n):
                paused.emit(sample)
            paused._pending.clear()

        strings = ["ns/mcp/0", "gw.example.com:8080", "/v1/chat/completions", "10.0.0.7:51234"]

        def redaction(n: int) -> None:
            for _ in range(n // len(strings)):
                for text in strings:
                    redact(text)

        print("access log (µs per request)")
        print(f"  fill + finish an AccessRecord        {best_of(repeat, count, loop_side_only):6.2f}")
        print(f"  emit (queue append)                  {best_of(repeat, emit_only_count, emit_only):6.2f}")
        print(f"  redact one field (4 typical values)  {best_of(repeat, count, redaction):6.2f}")
        print(f"  render one line (writer thread)      {best_of(repeat, count, render_only):6.2f}")
        print(f"  fill+emit+write to file, end to end  {best_of(repeat, count, loop_side):6.2f}")
        print(f"  inline render + write() per line     {best_of(repeat, count, inline):6.2f}")
        access.close()
        lines = sum(1 for _ in path.open("rb"))
        print(f"  ({lines} lines written by the writer thread, {access.dropped} dropped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bench_metrics(args.count, args.repeat)
    bench_access_log(args.count // 4, args.repeat)


if __name__ == "__main__":
    main()
