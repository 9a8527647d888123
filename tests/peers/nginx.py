"""Debian's nginx as a real, fast upstream, started per test on free loopback ports."""

from __future__ import annotations

import shutil
import signal
import subprocess
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from tests.conftest import free_port
from tests.peers.process import LoggedProcess

# What the proxy tests expect; e2e tests use a body that echoes the request.
DEFAULT_BODY = "hello from nginx\\n"


@dataclass(frozen=True)
class Nginx:
    h1_port: int
    h2_port: int
    name: str


@asynccontextmanager
async def nginx(workdir: Path, name: str = "nginx", body: str = DEFAULT_BODY) -> AsyncIterator[Nginx]:
    """nginx on two ports (HTTP/1.1, and h2c prior knowledge), answering `body` (nginx variables
    allowed) with headers x-upstream (its name) and x-upstream-connection (nginx's serial number
    of the client connection: equal values prove keep-alive reuse). /small answers "ok"."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    h1, h2 = free_port(), free_port()
    root = workdir / name
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        pid {root}/nginx.pid;
        error_log stderr notice;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            client_body_temp_path {root}/body;
            proxy_temp_path {root}/proxy;
            fastcgi_temp_path {root}/fastcgi;
            uwsgi_temp_path {root}/uwsgi;
            scgi_temp_path {root}/scgi;
            server {{
                listen 127.0.0.1:{h1};
                listen 127.0.0.1:{h2} http2;
                location / {{
                    add_header x-upstream {name} always;
                    add_header x-upstream-connection $connection always;
                    return 200 "{body}";
                }}
                location = /small {{
                    return 200 "ok";
                }}
            }}
        }}
    """))
    process = await anyio.open_process([binary, "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
    proc = LoggedProcess(name, process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(proc._pump)
        try:
            # nginx logs "start worker process" once its listening sockets are open.
            await proc.wait_for(lambda line: "start worker process" in line.get("raw", ""), within=10)
            yield Nginx(h1, h2, name)
        finally:
            with anyio.CancelScope(shield=True):
                process.send_signal(signal.SIGQUIT)
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            tg.cancel_scope.cancel()
