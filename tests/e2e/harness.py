"""Run real agentgate processes and real upstreams for end-to-end tests.

Processes log structlog JSON lines; tests wait for a specific event on that stream (under
a deadline) instead of sleeping or polling, so they are both fast and deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import yaml
from anyio.streams.text import TextReceiveStream

from tests.conftest import free_port

AGENTGATE = [sys.executable, "-m", "shared.cli"]
REPO = Path(__file__).resolve().parents[2]

LogMatcher = Callable[[dict[str, Any]], bool]


def event(name: str, **fields: Any) -> LogMatcher:
    """Match a structlog line by its event name and any field values."""

    def match(line: dict[str, Any]) -> bool:
        return line.get("event") == name and all(line.get(k) == v for k, v in fields.items())

    return match


@dataclass
class LoggedProcess:
    """A child process whose JSON log lines are collected and can be awaited."""

    name: str
    process: anyio.abc.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def _pump(self) -> None:
        assert self.process.stderr is not None
        buffer = ""
        async for chunk in TextReceiveStream(self.process.stderr):
            buffer += chunk
            *complete, buffer = buffer.split("\n")
            for line in complete:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self._changed.set()
            self._changed = anyio.Event()
        self._changed.set()

    def find(self, match: LogMatcher, start: int = 0) -> dict[str, Any] | None:
        for line in self.lines[start:]:
            if match(line):
                return line
        return None

    async def wait_for(self, match: LogMatcher | str, *, start: int = 0, within: float = 15.0) -> dict[str, Any]:
        """Wait until a log line matches (an event name or a predicate); fail with the log tail."""
        matcher: LogMatcher = (lambda line: line.get("event") == match) if isinstance(match, str) else match
        try:
            with anyio.fail_after(within):
                while True:
                    found = self.find(matcher, start)
                    if found is not None:
                        return found
                    if self.process.returncode is not None and self._changed.is_set():
                        raise AssertionError(f"{self.name} exited ({self.process.returncode}) before the log line")
                    await self._changed.wait()
        except TimeoutError:
            tail = "\n".join(self.raw[-30:])
            raise AssertionError(f"{self.name}: no matching log line within {within}s; last lines:\n{tail}") from None

    async def wait_for_count(
        self, match: LogMatcher, count: int, *, start: int = 0, within: float = 15.0
    ) -> list[dict[str, Any]]:
        """Wait until `count` lines after `start` match; return them."""
        try:
            with anyio.fail_after(within):
                while True:
                    found = [line for line in self.lines[start:] if match(line)]
                    if len(found) >= count:
                        return found[:count]
                    if self.process.returncode is not None and self._changed.is_set():
                        raise AssertionError(f"{self.name} exited ({self.process.returncode})")
                    await self._changed.wait()
        except TimeoutError:
            tail = "\n".join(self.raw[-30:])
            raise AssertionError(f"{self.name}: fewer than {count} matching lines in {within}s:\n{tail}") from None

    def mark(self) -> int:
        """A position in the log; `wait_for(..., start=mark)` only looks at later lines."""
        return len(self.lines)

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)


@asynccontextmanager
async def logged_process(
    name: str, command: list[str], *, env: Mapping[str, str] | None = None
) -> AsyncIterator[LoggedProcess]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await anyio.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=full_env
    )
    proc = LoggedProcess(name, process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(proc._pump)
        try:
            yield proc
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(15):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                if process.stdin is not None:
                    await process.stdin.aclose()
            tg.cancel_scope.cancel()


def controlplane_command(config: Path, xds_port: int, metrics_port: int = -1) -> list[str]:
    return [*AGENTGATE, "controlplane", "--config", str(config), "--xds-address", f"127.0.0.1:{xds_port}",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)]


@dataclass(frozen=True)
class WorkerPorts:
    admin: int
    metrics: int
    readiness: int

    @classmethod
    def free(cls) -> WorkerPorts:
        return cls(free_port(), free_port(), free_port())


def dataplane_command(xds_port: int, gateway: str, ports: WorkerPorts, *, mode: str = "delta",
                      node_id: str = "") -> list[str]:
    return [*AGENTGATE, "dataplane", "--xds", f"127.0.0.1:{xds_port}", "--gateway", gateway,
            "--xds-mode", mode, "--node-id", node_id or f"e2e-{ports.admin}", "--stats-host", "127.0.0.1",
            "--admin-port", str(ports.admin), "--metrics-port", str(ports.metrics),
            "--readiness-port", str(ports.readiness), "--drain-timeout", "5"]


# --- config folder ----------------------------------------------------------------------

GATEWAY_CLASS = """
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: agentgate}
spec: {controllerName: agentgate.dev/gateway-controller}
"""


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def gateway_yaml(name: str, listeners: list[tuple[str, int]], namespace: str = "default") -> str:
    return _dump({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gatewayClassName": "agentgate",
            "listeners": [{"name": n, "protocol": "HTTP", "port": p} for n, p in listeners],
        },
    })


def backend_yaml(name: str, port: int, *, protocol: str = "HTTP1", namespace: str = "default") -> str:
    return _dump({
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Backend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"protocol": protocol, "static": {"host": "127.0.0.1", "port": port}},
    })


def route_yaml(name: str, gateway: str, backends: list[tuple[str, int]], *, path: str = "/",
               set_headers: Mapping[str, str] | None = None, namespace: str = "default") -> str:
    rule: dict[str, Any] = {"matches": [{"path": {"type": "PathPrefix", "value": path}}]}
    if set_headers:
        rule["filters"] = [{
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": k, "value": v} for k, v in set_headers.items()]},
        }]
    rule["backendRefs"] = [{"group": "agentgate.dev", "kind": "Backend", "name": b, "weight": w} for b, w in backends]
    return _dump({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"parentRefs": [{"name": gateway}], "rules": [rule]},
    })


def write_documents(path: Path, *documents: str) -> None:
    """Write atomically (rename), as editors and ConfigMap updates do, so a watcher never sees half a file."""
    tmp = path.with_suffix(".tmp~")
    tmp.write_text("---\n".join(textwrap.dedent(d).strip() + "\n" for d in documents))
    tmp.replace(path)


# --- upstream ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Nginx:
    h1_port: int
    h2_port: int
    name: str


@asynccontextmanager
async def nginx(workdir: Path, name: str = "nginx") -> AsyncIterator[Nginx]:
    """nginx answering every path with its own name (h1 on one port, h2c prior knowledge on another)."""
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
                    return 200 "{name} $request_method $uri $http_x_forwarded_for\\n";
                }}
            }}
        }}
    """))
    process = await anyio.open_process([binary, "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
    proc = LoggedProcess(name, process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump_plain, proc)
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


async def _pump_plain(proc: LoggedProcess) -> None:
    """nginx logs plain text: wrap each line as {"raw": line} so LoggedProcess can match it."""
    assert proc.process.stderr is not None
    buffer = ""
    async for chunk in TextReceiveStream(proc.process.stderr):
        buffer += chunk
        *complete, buffer = buffer.split("\n")
        for line in complete:
            proc.raw.append(line)
            proc.lines.append({"raw": line})
        proc._changed.set()
        proc._changed = anyio.Event()
    proc._changed.set()
