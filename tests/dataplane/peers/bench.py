"""Quick throughput check: wrk against nginx directly, through Envoy (one worker) and through us.

    .venv/bin/python -m tests.dataplane.peers.bench [--duration 5] [--connections 32]

Not a test (the lead's bench/ will supersede it): it prints req/s for each path and our
share of Envoy's. `serve` mode is the proxy process it starts (uvloop, one worker).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from tests.conftest import free_port
from tests.dataplane.peers.nginx import run_nginx

ENVOY = os.path.join(os.path.dirname(sys.executable), "envoy")

_ENVOY_CONF = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: nginx}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: nginx
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: nginx
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
"""


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def wrk(port: int, duration: int, connections: int, path: str = "/small") -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  warning: {errors.group(1)} non-2xx responses", file=sys.stderr)
    return float(match.group(1)) if match else 0.0


def serve(listen_port: int, upstream_port: int) -> None:
    """The proxy under test, as the worker runs it: uvloop, one process."""
    import anyio

    from dataplane.http.server import ProxyServer
    from tests.dataplane.peers.config import simple_config

    async def main() -> None:
        server = ProxyServer()
        await server.apply(simple_config(listen_port, upstream_port))
        await server.run()

    anyio.run(main, backend_options={"use_uvloop": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--skip-envoy", action="store_true")
    parser.add_argument("mode", nargs="?", default="bench")
    parser.add_argument("ports", nargs="*", type=int)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(*args.ports)
        return
    upstream = free_port()
    results: dict[str, float] = {}
    with run_nginx(upstream):
        results["nginx direct"] = wrk(upstream, args.duration, args.connections)
        if not args.skip_envoy:
            folder = tempfile.mkdtemp(prefix="agentgate-envoy-")
            envoy_port = free_port()
            conf = os.path.join(folder, "envoy.yaml")
            with open(conf, "w") as file:
                file.write(_ENVOY_CONF.format(port=envoy_port, upstream=upstream))
            envoy = subprocess.Popen(
                [ENVOY, "-c", conf, "--concurrency", "1", "-l", "error", "--base-id", str(os.getpid() % 10000)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_port(envoy_port)
                results["envoy (1 worker)"] = wrk(envoy_port, args.duration, args.connections)
            finally:
                envoy.terminate()
                envoy.wait(timeout=10)
                shutil.rmtree(folder, ignore_errors=True)
        proxy_port = free_port()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tests.dataplane.peers.bench", "serve", str(proxy_port), str(upstream)],
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(proxy_port)
            results["agentgate (1 worker)"] = wrk(proxy_port, args.duration, args.connections)
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    for name, rate in results.items():
        print(f"{name:24s} {rate:10.0f} req/s")
    if results.get("envoy (1 worker)"):
        share = results["agentgate (1 worker)"] / results["envoy (1 worker)"]
        print(f"agentgate / envoy: {share:.0%}")


if __name__ == "__main__":
    main()
