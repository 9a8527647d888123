"""What observability costs per request end to end: GET through one agentgate worker in front of nginx.

Rows (127.0.0.1, one run, the same wrk load; each row its own `agentgate run --workers 1`):
  baseline                  access log off, tracing off (request metrics are always recorded: the
                            worker has no switch for them, so this is the floor)
  metrics + access log      --access-log FILE (one JSON line per request, written by its thread)
  + tracing, sampled 1.0    --otlp-endpoint (OTLP/HTTP to a sink in this process) --trace-sampling 1.0:
                            a server and a client span per request, exported in batches
  + tracing, sampled 0.01   the same at 0.01: mostly unsampled requests (ids propagated, nothing recorded)

Every row must answer 200 before it is measured; any non-2xx under load counts as an error.

    .venv/bin/python bench/observability_proxy.py [--duration 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from http_proxy import Result, _table, free_port, http_ok, nginx, process, run_wrk, wait_until


class _OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (reads and drops the body, answers 200 with an empty response)."""

    spans_bytes = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        _OtlpSink.spans_bytes += len(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _OtlpSink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def agentgate(workdir: Path, upstream: int, name: str, flags: list[str]) -> Iterator[int]:
    """`agentgate run` with one worker and `flags`, a route / to nginx; yields the listener port."""
    port, readiness = free_port(), free_port()
    folder = workdir / name
    folder.mkdir()
    documents: list[dict[str, Any]] = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "agentgate"},
         "spec": {"controllerName": "agentgate.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "bench", "namespace": "default"},
         "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "protocol": "HTTP", "port": port}]}},
        {"apiVersion": "agentgate.dev/v1alpha1", "kind": "Backend",
         "metadata": {"name": "nginx", "namespace": "default"},
         "spec": {"static": {"host": "127.0.0.1", "port": upstream}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
         "metadata": {"name": "web", "namespace": "default"},
         "spec": {"parentRefs": [{"name": "bench"}],
                  "rules": [{"backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": "nginx"}]}]}},
    ]  # fmt: skip
    (folder / "bench.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "agentgate"), "run", "--config", str(folder), "--workers", "1",
        "--xds-port", str(free_port()), "--admin-port", "-1", "--metrics-port", str(free_port()),
        "--readiness-port", str(readiness), "--controlplane-metrics-port", "-1", "--log-level", "warning", *flags,
    ]  # fmt: skip
    with process(cmd, workdir / f"{name}.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), f"{name} readiness")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), f"{name} listener")
        yield port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per row")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-obs-") as tmp, otlp_sink() as endpoint:
        workdir = Path(tmp)
        access_log = str(workdir / "access.log")
        tracing = ["--access-log", access_log, "--otlp-endpoint", endpoint, "--otlp-protocol", "http"]
        rows = [
            ("baseline", ["--access-log", "off"]),
            ("metrics + access log", ["--access-log", access_log]),
            ("+ tracing, sampled 1.0", [*tracing, "--trace-sampling", "1.0"]),
            ("+ tracing, sampled 0.01", [*tracing, "--trace-sampling", "0.01"]),
        ]
        with nginx(workdir) as upstream:
            for index, (name, flags) in enumerate(rows):
                with agentgate(workdir, upstream, f"row{index}", flags) as port:
                    run_wrk(name, port, 1, args.connections)  # warm up
                    results.append(run_wrk(name, port, args.duration, args.connections))
    print(f"\nGET / through one worker, wrk -t1 -c{args.connections} -d{args.duration}s")
    _table(results)
    base = results[0]
    print()
    for result in results[1:]:
        ratio = result.rps / base.rps if base.rps else float("nan")
        print(
            f"{result.name:24} / baseline: req/s {ratio:5.2f}   p50 {result.p50_ms - base.p50_ms:+6.2f} ms"
            f"   p99 {result.p99_ms - base.p99_ms:+6.2f} ms"
        )
    print(f"OTLP bytes received: {_OtlpSink.spans_bytes}")
    return 1 if any(result.errors for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
