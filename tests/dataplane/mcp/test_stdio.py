"""stdio MCP targets through `StdioChannel`, against real processes: the official SDK server and misbehaving peers."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from dataplane.config.model import McpStdioTarget
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.stdio import LineSplitter, LineTooLong, SpawnBackoff, StdioChannel, StdioLimits, _describe_exit

pytestmark = pytest.mark.anyio

SERVERS = Path(__file__).resolve().parents[2] / "peers" / "mcp_servers"
SDK_SERVER = str(SERVERS / "stdio_tools_server.py")
RAW_SERVER = str(SERVERS / "stdio_raw_server.py")
FAST = StdioLimits(stdin_grace=0.3, terminate_grace=0.3, drain_timeout=1.0)


def sdk_target(name: str = "tools") -> McpStdioTarget:
    return McpStdioTarget(name=name, command=sys.executable, args=(SDK_SERVER,))


def raw_target(mode: str, *extra: str, name: str = "raw") -> McpStdioTarget:
    return McpStdioTarget(name=name, command=sys.executable, args=(RAW_SERVER, mode, *extra))


@asynccontextmanager
async def open_channel(
    target: McpStdioTarget, *, backoff: SpawnBackoff | None = None, limits: StdioLimits = FAST
) -> AsyncIterator[StdioChannel]:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            channel = StdioChannel(target, task_group=tg, backoff=backoff or SpawnBackoff(), limits=limits)
            try:
                yield channel
            finally:
                await channel.aclose()


async def until_response(channel: StdioChannel, request_id: int) -> tuple[list[JSON], JSON]:
    """Everything the server sent before the response to `request_id`, and that response."""
    before: list[JSON] = []
    with anyio.fail_after(15):
        while True:
            message = await channel.receive()
            if message.get("id") == request_id and "method" not in message:
                return before, message
            before.append(message)


def request(request_id: int, method: str, params: dict[str, Any] | None = None) -> JSON:
    message: JSON = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def gone(pid: int) -> bool:
    """True when no process (not even a zombie) has that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the real protocol, official SDK server ----------------------------------------------------


async def test_sdk_server_speaks_mcp_through_the_channel() -> None:
    # A generous stdin grace: it ends as soon as the server exits, and this server exits at EOF.
    patient = StdioLimits(stdin_grace=10.0)
    with structlog.testing.capture_logs() as logs:
        async with open_channel(sdk_target(), limits=patient) as channel:
            await channel.send(
                request(
                    1,
                    "initialize",
                    {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
                )
            )
            _, init = await until_response(channel, 1)
            assert init["result"]["protocolVersion"] == "2025-11-25"
            assert init["result"]["serverInfo"]["name"] == "stdio-tools"
            await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

            await channel.send(request(2, "tools/list"))
            _, listed = await until_response(channel, 2)
            assert {tool["name"] for tool in listed["result"]["tools"]} == {"echo", "work", "crash"}

            params = {"name": "work", "arguments": {"steps": 3}, "_meta": {"progressToken": "tok-1"}}
            await channel.send(request(3, "tools/call", params))
            notes, called = await until_response(channel, 3)
            assert called["result"]["content"][0]["text"] == "done 3"
            progress = [n["params"] for n in notes if n.get("method") == "notifications/progress"]
            assert [(p["progressToken"], p["progress"], p["total"]) for p in progress] == [
                ("tok-1", 1, 3),
                ("tok-1", 2, 3),
                ("tok-1", 3, 3),
            ]
            logged = [n["params"] for n in notes if n.get("method") == "notifications/message"]
            assert logged == [{"level": "info", "logger": "stdio-tools", "data": "working 3 steps"}]

            await channel.send(request(4, "ping"))
            _, pong = await until_response(channel, 4)
            assert pong["result"] == {}
            pid = channel.pid
            assert pid is not None
        assert channel.session_id is None
        assert gone(pid)

    stderr = [entry for entry in logs if entry["event"] == "mcp_stdio_stderr"]
    assert {"target": "tools", "pid": pid, "line": "stdio-tools server starting"}.items() <= stderr[0].items()
    # A polite server exits at stdin EOF: no signal was needed.
    assert not [entry for entry in logs if entry["event"] == "mcp_stdio_signal"]


async def test_process_exit_mid_call_ends_receive_with_exit_code_and_stderr_tail() -> None:
    async with open_channel(sdk_target()) as channel:
        await channel.send(
            request(1, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}})
        )
        await until_response(channel, 1)
        await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await channel.send(request(2, "tools/call", {"name": "crash", "arguments": {"code": 7}}))
        with anyio.fail_after(15), pytest.raises(TargetClosed) as closed:
            await until_response(channel, 2)
        assert "exited with code 7" in str(closed.value)
        assert "fatal: crashing on purpose with 7" in str(closed.value)
        # The session is over: sending and receiving keep failing the same way.
        with pytest.raises(TargetClosed, match="exited with code 7"):
            await channel.send(request(3, "ping"))
        with anyio.fail_after(5), pytest.raises(TargetClosed):
            await channel.receive()


async def test_command_not_found_is_target_unavailable_naming_the_command() -> None:
    backoff = SpawnBackoff()
    target = McpStdioTarget(name="missing", command="agentgate-no-such-mcp-server")
    async with open_channel(target, backoff=backoff) as channel:
        with anyio.fail_after(5), pytest.raises(TargetUnavailable, match="agentgate-no-such-mcp-server"):
            await channel.send(request(1, "ping"))
        assert channel.pid is None
    assert backoff.failures("missing") == 1
    assert backoff.claim_start("missing") > 0  # the next session of that target waits its turn


async def test_working_dir_and_env_reach_the_process(tmp_path: Path) -> None:
    script = (
        "import json, os, sys; sys.stdin.readline(); "
        "print(json.dumps({'jsonrpc': '2.0', 'id': 1, 'result': "
        "{'cwd': os.getcwd(), 'x': os.environ.get('AGENTGATE_X'), 'path': 'PATH' in os.environ}}), flush=True)"
    )
    target = McpStdioTarget(
        name="env", command=sys.executable, args=("-c", script), env=(("AGENTGATE_X", "42"),), working_dir=str(tmp_path)
    )
    async with open_channel(target) as channel:
        await channel.send(request(1, "ping"))
        _, response = await until_response(channel, 1)
    assert response["result"] == {"cwd": str(tmp_path), "x": "42", "path": True}


# --- shutdown ------------------------------------------------------------------------------------


async def test_aclose_kills_a_server_that_ignores_stdin_eof_and_sigterm_within_the_grace_bound() -> None:
    limits = StdioLimits(stdin_grace=0.2, terminate_grace=0.2)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            channel = StdioChannel(raw_target("ignore-eof"), task_group=tg, backoff=SpawnBackoff(), limits=limits)
            await channel.start()
            with anyio.fail_after(10):
                ready = await channel.receive()  # its SIGTERM handler is installed by now
            assert ready["method"] == "notifications/ready"
            pid = channel.pid
            assert pid is not None
            started = anyio.current_time()
            with anyio.fail_after(5):
                await channel.aclose()
            elapsed = anyio.current_time() - started
            await channel.aclose()  # idempotent
    assert elapsed < 0.2 + 0.2 + 1.5
    assert gone(pid)
    signals = [entry["signal"] for entry in logs if entry["event"] == "mcp_stdio_signal"]
    assert signals == ["SIGTERM", "SIGKILL"]
    with pytest.raises(TargetClosed, match="closed"):
        await channel.send(request(1, "ping"))


async def test_aclose_before_start_spawns_nothing() -> None:
    async with anyio.create_task_group() as tg:
        channel = StdioChannel(sdk_target(), task_group=tg, backoff=SpawnBackoff(), limits=FAST)
        await channel.aclose()
        with pytest.raises(TargetClosed):
            await channel.send(request(1, "ping"))
        assert channel.pid is None


async def test_aclose_finishes_while_a_flooding_server_fills_the_queue_nobody_reads() -> None:
    flood = 'import sys\nwhile True:\n    sys.stdout.write(\'{"jsonrpc":"2.0","method":"n"}\\n\')\n'
    target = McpStdioTarget(name="flood", command=sys.executable, args=("-c", flood))
    limits = StdioLimits(queue_size=1, stdin_grace=0.2, terminate_grace=0.2, drain_timeout=0.2)
    async with anyio.create_task_group() as tg:
        channel = StdioChannel(target, task_group=tg, backoff=SpawnBackoff(), limits=limits)
        with anyio.fail_after(10):
            assert (await channel.receive())["method"] == "n"
            pid = channel.pid
            assert pid is not None
            await channel.aclose()
    assert gone(pid)
    with pytest.raises(TargetClosed):
        await channel.receive()


async def test_exit_is_noticed_and_leftover_children_killed_when_they_hold_stdout_open() -> None:
    script = 'sleep 60 & echo "{\\"jsonrpc\\":\\"2.0\\",\\"method\\":\\"child\\",\\"params\\":{\\"pid\\":$!}}"; exit 5'
    target = McpStdioTarget(name="wrapper", command="/bin/sh", args=("-c", script))
    limits = StdioLimits(stdin_grace=0.2, terminate_grace=0.2, drain_timeout=0.2)
    async with open_channel(target, limits=limits) as channel:
        with anyio.fail_after(10):
            child = (await channel.receive())["params"]["pid"]
            # A pidfd pins that very process and turns readable when it dies: no polling.
            pidfd = os.pidfd_open(child)
            try:
                with pytest.raises(TargetClosed, match="exited with code 5"):
                    await channel.receive()
                await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)


# --- restart backoff -----------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_crash_looping_server_restarts_with_capped_exponential_backoff() -> None:
    fake = FakeTime()
    backoff = SpawnBackoff(base=1.0, cap=4.0, healthy_after=10.0, clock=fake.clock, sleep=fake.sleep)
    for attempt in range(5):
        async with open_channel(raw_target("crash", name="flaky"), backoff=backoff) as channel:
            with anyio.fail_after(10), pytest.raises(TargetClosed) as closed:
                await channel.receive()
            assert "exited with code 3" in str(closed.value)
            assert "boot failed: missing config" in str(closed.value)
        assert backoff.failures("flaky") == attempt + 1
    assert fake.sleeps == [1.0, 2.0, 4.0, 4.0]

    # The same target then comes up healthy: it waits its turn once, and a clean stop resets the count.
    async with open_channel(raw_target("echo", name="flaky"), backoff=backoff) as channel:
        await channel.send(request(1, "ping"))
        _, response = await until_response(channel, 1)
        assert response["result"] == {"echo": "ping"}
    assert fake.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.failures("flaky") == 0


def test_backoff_spaces_concurrent_starts_and_forgets_long_runs() -> None:
    fake = FakeTime()
    backoff = SpawnBackoff(base=0.5, cap=30.0, healthy_after=10.0, clock=fake.clock, sleep=fake.sleep)
    assert backoff.claim_start("a") == 0.0
    backoff.record_exit("a", ran_for=0.1, stopped_by_us=False)
    backoff.record_exit("a", ran_for=0.1, stopped_by_us=False)
    # Three sessions arriving together are spaced by the delay, not spawned at once.
    assert [backoff.claim_start("a") for _ in range(3)] == [1.0, 2.0, 3.0]
    assert backoff.claim_start("b") == 0.0
    backoff.record_exit("a", ran_for=60.0, stopped_by_us=False)  # crashed after a long healthy run
    assert backoff.failures("a") == 0
    assert backoff.claim_start("a") == 0.0
    assert backoff.delay(100) == 30.0


# --- framing and bounds --------------------------------------------------------------------------


async def test_oversized_stdout_line_is_a_protocol_error_that_stops_the_process() -> None:
    limits = StdioLimits(max_line_bytes=1024 * 1024, stdin_grace=0.2, terminate_grace=0.2)
    async with open_channel(raw_target("huge-line", str(8 * 1024 * 1024)), limits=limits) as channel:
        await channel.send(request(1, "ping"))
        with anyio.fail_after(10), pytest.raises(TargetClosed, match="over 1048576 bytes") as closed:
            await channel.receive()
        assert "protocol error" in str(closed.value)
        pid = channel.pid
        assert pid is not None
    assert gone(pid)


async def test_non_json_noise_on_stdout_is_logged_and_skipped() -> None:
    with structlog.testing.capture_logs() as logs:
        async with open_channel(raw_target("echo")) as channel:
            await channel.send(request(1, "tools/list"))
            before, response = await until_response(channel, 1)
            await channel.send(request(2, "ping"))
            _, second = await until_response(channel, 2)
    assert before == []
    assert response == {"jsonrpc": "2.0", "id": 1, "result": {"echo": "tools/list"}}
    assert second["result"] == {"echo": "ping"}
    noise = [entry for entry in logs if entry["event"] == "mcp_stdio_noise_skipped"]
    assert [entry["line"] for entry in noise] == ["hello from a chatty server, not JSON", "[1, 2, 3]"]
    assert noise[1]["reason"] == "a JSON list, not an object"
    assert any(e["event"] == "mcp_stdio_stderr" and e["line"] == "echo server ready" for e in logs)


def test_line_splitter_reassembles_lines_across_chunks() -> None:
    splitter = LineSplitter(16)
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n{"b":2}\r\n{"c"') == [b'{"a":1}', b'{"b":2}\r']
    assert splitter.feed(b":3}\n") == [b'{"c":3}']
    assert splitter.flush() == b""


def test_line_splitter_bounds_a_line_without_newline() -> None:
    splitter = LineSplitter(8)
    splitter.feed(b"12345678")
    with pytest.raises(LineTooLong):
        splitter.feed(b"9")
    with pytest.raises(LineTooLong):
        LineSplitter(8).feed(b"123456789\nok\n")


def test_line_splitter_truncates_long_stderr_lines_and_drops_the_rest() -> None:
    splitter = LineSplitter(4, truncate=True)
    assert splitter.feed(b"abcdefgh") == [b"abcd"]
    assert splitter.feed(b"ijk\nxy") == []
    assert splitter.feed(b"\nlonger-line\n") == [b"xy", b"long"]
    splitter.feed(b"tail")
    assert splitter.flush() == b"tail"


def test_signal_exit_is_described() -> None:
    assert _describe_exit(-signal.SIGKILL) == "was killed by SIGKILL (exit code -9)"
    assert _describe_exit(0) == "exited with code 0"
