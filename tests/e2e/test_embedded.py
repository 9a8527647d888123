"""`agentgate run`: control plane plus workers from one folder, workers sharing a port."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import write_base
from tests.e2e.harness import AGENTGATE, event, logged_process, route_yaml, write_documents
from tests.peers.nginx import Nginx

pytestmark = pytest.mark.anyio


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_run_serves_with_two_workers_restarts_a_dead_one_and_stops_cleanly(
    tmp_path: Path, upstreams: tuple[Nginx, Nginx]
) -> None:
    blue, green = upstreams
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port = free_port()
    url = f"http://127.0.0.1:{gateway_port}/"
    close = {"connection": "close"}  # a new connection per request, so SO_REUSEPORT spreads them
    write_base(folder, gateway_port, blue, green)
    write_documents(folder / "route.yaml", route_yaml("web", "gw", [("blue", 1)]))
    command = [
        *AGENTGATE, "run", "--config", str(folder), "--workers", "2", "--xds-port", str(free_port()),
        "--admin-port", "-1", "--metrics-port", "-1", "--readiness-port", "-1",
        "--controlplane-metrics-port", "-1", "--drain-timeout", "5",
    ]
    pids: list[int] = []
    async with logged_process("run", command) as run:
        started = [await run.wait_for(event("worker started", worker=i)) for i in (0, 1)]
        pids = [line["pid"] for line in started]
        ready = await run.wait_for_count(event("worker ready"), 2)
        assert len({line["node_id"] for line in ready}) == 2

        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(20):
                reply = await client.get(url, headers=close)
                assert reply.status_code == 200 and reply.headers["x-upstream"] == "blue"

            # Kill one worker: the other keeps the port; the supervisor starts a replacement.
            mark = run.mark()
            os.kill(pids[0], signal.SIGKILL)
            await run.wait_for("worker exited, restarting", start=mark)
            for _ in range(10):
                assert (await client.get(url, headers=close)).status_code == 200
            restarted = await run.wait_for(event("worker started", worker=0), start=mark, within=30)
            pids[0] = restarted["pid"]
            await run.wait_for(event("worker ready"), start=mark, within=30)

            # A config edit reaches both workers.
            mark = run.mark()
            write_documents(folder / "route.yaml", route_yaml("web", "gw", [("green", 1)]))
            await run.wait_for_count(event("config applied", type="Route"), 2, start=mark)
            for _ in range(10):
                assert (await client.get(url, headers=close)).headers["x-upstream"] == "green"

        run.signal(signal.SIGTERM)
        with anyio.fail_after(20):
            await run.process.wait()
        assert run.process.returncode == 0, run.raw[-20:]
        # Each worker drained and exited on SIGTERM by itself; none had to be killed.
        assert run.find(event("worker did not drain in time, killing")) is None, run.raw[-20:]
    assert not [pid for pid in pids if _alive(pid)], "workers must not outlive `agentgate run`"
