"""`agentgate run`: the control plane and its proxy workers from one folder, on one machine.

The control plane runs in this process; each Gateway found in the folder gets N worker
processes (`agentgate dataplane`) that subscribe over loopback exactly as they would in a
cluster, share their listener ports through SO_REUSEPORT, and are restarted with backoff
if they die. Gateways that appear or vanish while running gain or lose their workers.
Workers hold a pipe to this process on stdin and stop when it closes, so killing the
parent never leaves orphans serving stale config.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import Process

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.token_review import KubeApiConfig
from shared.logging import get_logger
from shared.signals import stop_on_signal

log = get_logger("embedded")

RESTART_BACKOFF_MAX = 10.0


@dataclass(frozen=True)
class EmbeddedSettings:
    config_dir: Path
    workers: int = 1
    host: str = "127.0.0.1"
    xds_port: int = 9977
    # Each worker k (0, 1, ...) uses base + k; -1 disables that endpoint.
    admin_port: int = 15000
    metrics_port: int = 15020
    readiness_port: int = 15021
    controlplane_metrics_port: int = 9978
    xds_mode: Literal["delta", "sotw"] = "delta"
    drain_timeout: float = 10.0
    log_level: str = "info"
    # The Kubernetes API for TokenReview of service-account tokens (`--kubeconfig`, or in-cluster).
    kube_api: KubeApiConfig | None = None
    # Worker observability flags, passed on (None: the worker's default, i.e. the OTEL_* environment).
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http"] | None = None
    trace_sampling: float | None = None
    # "stdout", "off", or a path: worker k of Gateway NS/NAME then writes PATH.NS.NAME.k (a file per process).
    access_log: str = "stdout"


@dataclass
class WorkerSlot:
    gateway: str
    index: int
    process: Process | None = None
    stopping: bool = False
    stopped: anyio.Event = field(default_factory=anyio.Event)


class EmbeddedGateway:
    """Supervises the in-process control plane and one group of worker processes per Gateway."""

    def __init__(self, settings: EmbeddedSettings) -> None:
        self.settings = settings
        self.control_plane = ControlPlane(
            ControlPlaneSettings(
                config_dir=settings.config_dir,
                xds_address=f"{settings.host}:{settings.xds_port}",
                metrics_host=settings.host,
                metrics_port=settings.controlplane_metrics_port,
                kube_api=settings.kube_api,
            )
        )
        self.slots: dict[str, list[WorkerSlot]] = {}
        self._next_index = 0
        self._changed = anyio.Event()

    def _port(self, base: int, index: int, stride: int = 1) -> int:
        """Worker ``index``'s port from ``base``. Metrics and readiness use stride 2: their default
        bases (15020, 15021) are adjacent, so ``base + index`` would give worker 1 worker 0's port."""
        return -1 if base < 0 else base + stride * index

    def worker_command(self, slot: WorkerSlot) -> list[str]:
        s = self.settings
        return [
            sys.executable, "-m", "shared.cli", "dataplane",
            "--xds", f"{s.host}:{self.control_plane.xds_port}",
            "--gateway", slot.gateway,
            "--node-id", f"{slot.gateway.replace('/', '.')}.worker-{slot.index}",
            "--xds-mode", s.xds_mode,
            "--admin-host", s.host,
            "--stats-host", s.host,
            "--admin-port", str(self._port(s.admin_port, slot.index)),
            "--metrics-port", str(self._port(s.metrics_port, slot.index, 2)),
            "--readiness-port", str(self._port(s.readiness_port, slot.index, 2)),
            "--drain-timeout", str(s.drain_timeout),
            "--log-level", s.log_level,
            "--stop-on-stdin-close",
            "--access-log", self.access_log_target(slot),
            *(["--otlp-endpoint", s.otlp_endpoint] if s.otlp_endpoint is not None else []),
            *(["--otlp-protocol", s.otlp_protocol] if s.otlp_protocol is not None else []),
            *(["--trace-sampling", repr(s.trace_sampling)] if s.trace_sampling is not None else []),
        ]

    def access_log_target(self, slot: WorkerSlot) -> str:
        """Where worker ``slot`` writes its access log: two processes must never rotate one file."""
        target = self.settings.access_log
        if target in ("stdout", "off"):
            return target
        return f"{target}.{slot.gateway.replace('/', '.')}.{slot.index}"

    async def _supervise(self, slot: WorkerSlot) -> None:
        delay = 0.5
        try:
            while not slot.stopping:
                command = self.worker_command(slot)
                process = await anyio.open_process(command, stdin=subprocess.PIPE, stdout=None, stderr=None)
                slot.process = process
                log.info("worker started", gateway=slot.gateway, worker=slot.index, pid=process.pid)
                code = await process.wait()
                if slot.stopping:
                    break
                log.error("worker exited, restarting", gateway=slot.gateway, worker=slot.index, exit_code=code,
                          retry_in=delay)
                await anyio.sleep(delay)  # restart pacing after a crash
                delay = min(delay * 2, RESTART_BACKOFF_MAX)
        finally:
            slot.stopped.set()

    async def _stop_slot(self, slot: WorkerSlot) -> None:
        slot.stopping = True
        process = slot.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(self.settings.drain_timeout + 5):
                await process.wait()
            if process.returncode is None:
                log.warning("worker did not drain in time, killing", gateway=slot.gateway, worker=slot.index)
                process.kill()
                await process.wait()
            if process.stdin is not None:
                await process.stdin.aclose()
        await slot.stopped.wait()

    def _served_gateways(self) -> set[str]:
        cache = self.control_plane.cache
        return {gw for gw in cache.gateways() if cache.get_snapshot(gw) is not None}

    async def _reconcile_workers(self, tg: anyio.abc.TaskGroup) -> None:
        wanted = self._served_gateways()
        for gateway in sorted(wanted - set(self.slots)):
            slots = []
            for _ in range(self.settings.workers):
                slot = WorkerSlot(gateway, self._next_index)
                self._next_index += 1
                slots.append(slot)
                tg.start_soon(self._supervise, slot)
            self.slots[gateway] = slots
        for gateway in sorted(set(self.slots) - wanted):
            log.info("gateway gone, stopping its workers", gateway=gateway)
            for slot in self.slots.pop(gateway):
                tg.start_soon(self._stop_slot, slot)

    async def run(self) -> None:
        stop = anyio.Event()
        self.control_plane.on_reconcile(lambda _report: self._changed.set())
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal, stop)
            await tg.start(self.control_plane.run)
            async with anyio.create_task_group() as workers:
                while not stop.is_set():
                    self._changed = anyio.Event()
                    await self._reconcile_workers(workers)
                    async with anyio.create_task_group() as wait:
                        wait.start_soon(_set_then_cancel, self._changed, wait.cancel_scope)
                        wait.start_soon(_set_then_cancel, stop, wait.cancel_scope)
                log.info("stopping workers")
                for slots in self.slots.values():
                    for slot in slots:
                        workers.start_soon(self._stop_slot, slot)
            tg.cancel_scope.cancel()
        log.info("stopped")

async def _set_then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
