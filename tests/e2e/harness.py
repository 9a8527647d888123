"""Run real agentgate processes and real upstreams for end-to-end tests.

Processes log structlog JSON lines; tests wait for a specific event on that stream (under
a deadline) instead of sleeping or polling, so they are both fast and deterministic.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import free_port
from tests.peers.process import REPO, LoggedProcess, event, logged_process

__all__ = ["REPO", "LoggedProcess", "event", "logged_process"]

AGENTGATE = [sys.executable, "-m", "shared.cli"]

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


