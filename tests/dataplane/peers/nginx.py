"""nginx (Debian's) as a fast keep-alive HTTP/1.1 upstream, run from a temporary config."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        # $connection is nginx's serial number of the client connection: equal values
        # prove keep-alive reuse.
        location / {{
            add_header x-upstream-connection $connection;
            return 200 "hello from nginx\\n";
        }}
        location = /small {{
            return 200 "ok";
        }}
    }}
}}
"""


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Poll the port until nginx accepts (bounded); fail fast if nginx exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nginx did not listen on {port} within {timeout}s")


@contextmanager
def run_nginx(port: int) -> Iterator[int]:
    """Start nginx on 127.0.0.1:`port`; yields the port and stops nginx on exit."""
    folder = tempfile.mkdtemp(prefix="agentgate-nginx-")
    try:
        conf = os.path.join(folder, "nginx.conf")
        with open(conf, "w") as file:
            file.write(_CONF.format(dir=folder, port=port))
        process = subprocess.Popen(
            [NGINX, "-c", conf, "-p", folder, "-e", os.path.join(folder, "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, process)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
