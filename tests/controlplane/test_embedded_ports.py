"""`agentgate run` gives every worker its own operator ports, with the default bases."""

from __future__ import annotations

from pathlib import Path

from controlplane.embedded import EmbeddedGateway, EmbeddedSettings, WorkerSlot


def _ports(command: list[str]) -> list[int]:
    return [int(command[command.index(flag) + 1]) for flag in ("--admin-port", "--metrics-port", "--readiness-port")]


def test_default_ports_of_many_workers_never_collide(tmp_path: Path) -> None:
    gateway = EmbeddedGateway(EmbeddedSettings(config_dir=tmp_path, workers=8))
    ports = [port for index in range(8) for port in _ports(gateway.worker_command(WorkerSlot("default/gw", index)))]
    assert len(ports) == len(set(ports)), ports
    assert _ports(gateway.worker_command(WorkerSlot("default/gw", 0))) == [15000, 15020, 15021]
    assert _ports(gateway.worker_command(WorkerSlot("default/gw", 1))) == [15001, 15022, 15023]


def test_a_disabled_port_stays_disabled_for_every_worker(tmp_path: Path) -> None:
    gateway = EmbeddedGateway(EmbeddedSettings(config_dir=tmp_path, workers=2, metrics_port=-1))
    assert _ports(gateway.worker_command(WorkerSlot("default/gw", 1)))[1] == -1
