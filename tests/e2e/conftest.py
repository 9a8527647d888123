"""End-to-end fixtures: a config folder, two nginx upstreams, a control plane and a worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.harness import (
    GATEWAY_CLASS,
    LoggedProcess,
    WorkerPorts,
    backend_yaml,
    controlplane_command,
    dataplane_command,
    gateway_yaml,
    logged_process,
    route_yaml,
    write_documents,
)
from tests.peers.nginx import Nginx, nginx


@dataclass
class Stack:
    folder: Path
    blue: Nginx
    green: Nginx
    gateway_port: int
    xds_port: int
    controlplane: LoggedProcess
    controlplane_metrics_port: int
    worker: LoggedProcess
    worker_ports: WorkerPorts

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def write_route(self, backends: list[tuple[str, int]], **kwargs: Any) -> None:
        write_documents(self.folder / "route.yaml", route_yaml("web", "gw", backends, **kwargs))


def write_base(folder: Path, gateway_port: int, blue: Nginx, green: Nginx) -> None:
    write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)]))
    write_documents(
        folder / "backends.yaml",
        backend_yaml("blue", blue.h1_port),
        backend_yaml("green", green.h1_port),
        backend_yaml("blue-h2", blue.h2_port, protocol="HTTP2"),
    )


# Each upstream answers with its name, the request line and the X-Forwarded-For it received.
@pytest.fixture
async def upstreams(tmp_path: Path) -> AsyncIterator[tuple[Nginx, Nginx]]:
    async with (
        nginx(tmp_path, "blue", body="blue $request_method $uri $http_x_forwarded_for\\n") as blue,
        nginx(tmp_path, "green", body="green $request_method $uri $http_x_forwarded_for\\n") as green,
    ):
        yield blue, green


@pytest.fixture
async def stack(tmp_path: Path, upstreams: tuple[Nginx, Nginx]) -> AsyncIterator[Stack]:
    blue, green = upstreams
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port, xds_port = free_port(), free_port()
    write_base(folder, gateway_port, blue, green)
    write_documents(folder / "route.yaml", route_yaml("web", "gw", [("blue", 1)]))
    ports = WorkerPorts.free()
    metrics_port = free_port()
    async with logged_process("controlplane", controlplane_command(folder, xds_port, metrics_port)) as cp:
        await cp.wait_for("control plane serving")
        async with logged_process("worker", dataplane_command(xds_port, "default/gw", ports)) as worker:
            await worker.wait_for("worker ready")
            yield Stack(folder, blue, green, gateway_port, xds_port, cp, metrics_port, worker, ports)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c
