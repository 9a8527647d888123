"""Debian's redis-server, started per test on a free loopback port (no persistence), for the global
limits and budgets. Readiness is its "Ready to accept connections" log line, not a sleep."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tests.conftest import free_port
from tests.peers.process import LoggedProcess, logged_process


@dataclass(frozen=True)
class RedisServer:
    port: int
    process: LoggedProcess

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_binary() -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if shutil.which(binary) is None:
        raise AssertionError("redis-server is not installed (Debian package redis-server; `make test` installs it)")
    return binary


@asynccontextmanager
async def redis_server(
    port: int | None = None, *, extra_args: tuple[str, ...] = (), within: float = 15.0
) -> AsyncIterator[RedisServer]:
    """redis-server on 127.0.0.1:``port`` (a free one by default), ready when this yields, stopped
    (SIGTERM, then SIGKILL) when the block ends. Start it again with the same port to simulate a
    restart. DEBUG is enabled for loopback clients; ``extra_args`` are more redis-server options."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="agentgate-redis-") as workdir:
        # Redis logs to stdout (logfile ""); exec through sh with stdout sent to the stderr pipe that
        # LoggedProcess reads (opening /dev/stderr fails when that pipe is a socket, as under uvloop).
        command = [
            "sh", "-c", 'exec "$0" "$@" 1>&2',
            redis_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", workdir,
            "--logfile", "",
            "--enable-debug-command", "local",
            *extra_args,
        ]
        async with logged_process(f"redis-{port}", command) as process:
            await process.wait_for(lambda line: "Ready to accept connections" in line.get("raw", ""), within=within)
            yield RedisServer(port, process)
