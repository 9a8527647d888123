"""The quickstart's MCP half, end to end with real processes: `agentgate run` on the shipped
examples/quickstart config (ports rewritten to free ones, a fresh session key), the shipped
clock server over streamable HTTP, the notes server over stdio started by the worker, and the
official SDK client (in this process, then the shipped examples/quickstart/mcp_client.py)."""

from __future__ import annotations

import base64
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import yaml
from mcp import Client
from mcp.types import TextContent

from tests.conftest import free_port
from tests.e2e.harness import AGENTGATE, REPO, logged_process

pytestmark = pytest.mark.anyio

QUICKSTART = REPO / "examples" / "quickstart"
CLOCK_SERVER = REPO / "examples" / "mcp-servers" / "clock_server.py"
NOTES_SERVER = REPO / "examples" / "mcp-servers" / "notes_server.py"
MCP_CLIENT = QUICKSTART / "mcp_client.py"


def _load(path: Path) -> ModuleType:
    """Import an example server by path (examples/mcp-servers is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


clock = _load(CLOCK_SERVER)
notes = _load(NOTES_SERVER)


# --- the example servers' pure cores ------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [("(2 + 3) * 7 / 2", 17.5), ("2 ** 10", 1024), ("-7 // 2", -4), ("7 % 3", 1), ("+1.5e3", 1500.0)],
)
def test_calculate_evaluates_arithmetic(expression: str, value: float) -> None:
    assert clock.calculate(expression) == value


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("__import__('os')", "only numbers"),
        ("x + 1", "only numbers"),
        ("(1).real", "only numbers"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("9 ** 9 ** 9", "exponent"),
        ("(10 ** 1000) ** 1000", "bits"),
        (" * ".join(["7 ** 1024"] * 6), "bits"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("1e308 * 10", "too large"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 600, "longer than"),
    ],
)
def test_calculate_refuses_anything_but_bounded_arithmetic(expression: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        clock.calculate(expression)


@pytest.mark.parametrize("below", [0, 2, 3, 10, 11, 1000, 10_007])
def test_count_primes_segments_cover_the_range_once(below: int) -> None:
    naive = [n for n in range(2, below) if all(n % d for d in range(2, int(n**0.5) + 1))]
    segments = clock.prime_segments(below)
    assert len(segments) <= clock.PRIME_SEGMENTS
    assert [p for low, high in segments for p in clock.primes_in(low, high)] == naive


def test_notebook_searches_every_word_and_survives_a_restart_through_its_file(tmp_path: Path) -> None:
    store = tmp_path / "notes.json"
    book = notes.NoteBook(store)
    first = book.add("Groceries", "milk and eggs", ["Home", " home ", ""])
    book.add("Gateway", "federate MCP servers", ["work"])
    assert first.id == 1 and first.tags == ["home"] and first.uri == "note://1"
    assert [n.title for n in book.search("MILK eggs")] == ["Groceries"]
    assert book.search("milk federate") == []
    assert [n.title for n in book.all()] == ["Gateway", "Groceries"]
    assert [n.title for n in book.all("WORK")] == ["Gateway"]

    reopened = notes.NoteBook(store)
    assert [n.model_dump() for n in reopened.all()] == [n.model_dump() for n in book.all()]
    assert reopened.add("Third", "").id == 3


# --- end to end ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_quickstart(folder: Path, gateway_port: int, clock_port: int) -> None:
    """The shipped quickstart YAML with its fixed ports replaced, plus the Secret run.sh would write."""
    for source in sorted(QUICKSTART.glob("*.yaml")):
        if source.name == "mcp-session-key.yaml":  # a checkout's own key, if run.sh ever ran here
            continue
        documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(source.read_text()) if d]
        for doc in documents:
            kind, spec = doc["kind"], doc.get("spec") or {}
            if kind == "Gateway":
                for listener in spec["listeners"]:
                    listener["port"] = gateway_port
            elif kind == "Backend" and "static" in spec:
                spec["static"]["port"] = free_port()  # the echo upstream: not started here
            elif kind == "Backend" and "mcp" in spec:
                for target in spec["mcp"]["targets"]:
                    if "static" in target:
                        assert target["name"] == "clock", target
                        target["static"]["port"] = clock_port
        (folder / source.name).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mcp-session-key", "namespace": "default"},
        "stringData": {"current": base64.b64encode(os.urandom(32)).decode()},
    }
    (folder / "mcp-session-key.yaml").write_text(yaml.safe_dump(secret))


def _text(content: list[Any]) -> str:
    return "".join(block.text for block in content if isinstance(block, TextContent))


async def exercise(url: str) -> None:
    """What a user does through the gateway: list both servers' tools, call each, read, stream progress."""
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total))

    async with Client(url, mode="legacy", read_timeout_seconds=30) as client:
        assert client.server_info is not None and client.server_info.name == "agentgate"
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"clock__now", "clock__calculate", "clock__count_primes"} <= names
        assert {"notes__add_note", "notes__list_notes", "notes__search_notes"} <= names

        calculated = await client.call_tool("clock__calculate", {"expression": "(2 + 3) * 7 / 2"})
        assert not calculated.is_error and calculated.structured_content == {"result": 17.5}

        added = await client.call_tool(
            "notes__add_note", {"title": "e2e", "body": "through the gateway", "tags": ["Test"]}
        )
        assert not added.is_error and added.structured_content is not None
        assert added.structured_content["id"] == 1 and added.structured_content["tags"] == ["test"]

        found = await client.call_tool("notes__search_notes", {"query": "GATEWAY"})
        assert [n["title"] for n in (found.structured_content or {})["notes"]] == ["e2e"]

        note = await client.read_resource("mcp-target://notes/note://1")
        assert "through the gateway" in "".join(getattr(c, "text", "") for c in note.contents)

        primes = await client.call_tool("clock__count_primes", {"below": 1000}, progress_callback=on_progress)
        assert primes.structured_content == {"below": 1000, "count": 168, "largest": 997}
        assert progress and progress[-1] == (10, 10)

        refused = await client.call_tool("clock__calculate", {"expression": "__import__('os')"})
        assert refused.is_error and "only numbers" in _text(refused.content)


async def test_quickstart_federates_the_stdio_and_http_servers_for_the_sdk_client(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port = free_port()
    url = f"http://127.0.0.1:{gateway_port}/mcp"
    # The stdio target's command is `python`: the venv's, as run.sh puts it first on PATH.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    clock_command = [sys.executable, str(CLOCK_SERVER), "--port", "0"]
    async with logged_process("clock", clock_command) as clock_server:
        listening = await clock_server.wait_for("mcp server listening")
        write_quickstart(folder, gateway_port, listening["port"])
        command = [
            *AGENTGATE, "run", "--config", str(folder), "--xds-port", str(free_port()),
            "--admin-port", "-1", "--metrics-port", "-1", "--readiness-port", "-1",
            "--controlplane-metrics-port", "-1", "--drain-timeout", "5",
        ]  # fmt: skip
        async with logged_process("run", command, env=env) as run:
            await run.wait_for("worker ready", within=30)
            backend = run.find(lambda line: line.get("event") == "status" and line.get("name") == "tools")
            assert backend is not None and backend["status"]["conditions"][0]["reason"] == "Accepted"

            try:
                with anyio.fail_after(60):
                    await exercise(url)
                    # The shipped client script, as the quickstart tells users to run it.
                    script = await anyio.run_process([sys.executable, str(MCP_CLIENT), url], check=False)
            except Exception as exc:
                log = "\n".join(run.raw[-15:])
                raise AssertionError(f"MCP through the gateway failed; gateway log tail:\n{log}") from exc
            output = script.stdout.decode()
            assert script.returncode == 0, script.stderr.decode()[-2000:]
            assert "clock__count_primes" in output and "notes__add_note" in output
            assert '"count": 78498' in output and "resource mcp-target://notes/note://1" in output

            stdio_pids = [line["pid"] for line in run.lines if line.get("event") == "mcp_stdio_started"]
            assert len(stdio_pids) >= 2, "the worker starts one notes server per session"
            run.signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await run.process.wait()
            assert run.process.returncode == 0, run.raw[-20:]
    assert not [pid for pid in stdio_pids if _alive(pid)], "notes servers must not outlive the gateway"
