"""stdio MCP targets: a local process speaking newline-delimited JSON-RPC, as one `TargetChannel`.

Framing (MCP "Transports: stdio"): one JSON-RPC message per line on the process's stdin and
stdout, no embedded newlines (compact JSON escapes every control character, so `encode`
never emits one). The server must write only MCP messages to stdout; a line that is not a
JSON object is logged and skipped rather than ending the session, because real servers leak
banners and debug prints there. stderr is free-form logging: each line goes to structlog
(truncated, tagged with target and pid) and the last few are kept for the crash message.

Lifecycle, and why:
- One process per MCP session (per channel). A stdio server speaks to exactly one client and
  keeps that client's state (initialize result, subscriptions, in-flight ids), so two sessions
  cannot share one process. A session resumed on another worker finds no process there and
  gets a fresh one; the HTTP layer re-initializes it.
- Started on demand: the first `send`/`receive` or an explicit `start()`.
- `aclose()` follows the spec's stdio shutdown order: close stdin, wait `stdin_grace`, SIGTERM,
  wait `terminate_grace`, SIGKILL, then reap. The process runs in its own session (process
  group) and signals go to the group, so wrappers such as `npx` do not leave children behind.
  Shutdown is shielded from cancellation: a cancelled owner never leaves a running child.
- A crash ends the channel: a pending `receive()` raises `TargetClosed` naming the exit code
  and the tail of stderr. If a leftover child of the group keeps stdout open after the
  process exited, the group is killed so the session still ends. The next session starts the
  command again, after a delay from the shared `SpawnBackoff` when the previous starts of that
  target failed (could not spawn, or exited on their own within `healthy_after` seconds):
  capped exponential, and concurrent starts are spaced by the delay too, so a crash-looping
  server cannot fork-bomb a worker.
- Memory is bounded: a stdout line over `max_line_bytes` is a protocol error that stops the
  process and closes the channel; stderr lines are truncated; at most `queue_size` decoded
  messages wait for `receive()`, after which the pipe pushes back on the server.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dataplane.config.model import McpStdioTarget
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.jsonrpc import decode_json, encode
from shared.logging import get_logger

log = get_logger("agentgate.mcp.stdio")

_READ_CHUNK = 65536
_NOISE_PREVIEW = 200


@dataclass(frozen=True, slots=True)
class StdioLimits:
    """Bounds of one stdio channel (seconds and bytes)."""

    max_line_bytes: int = 8 * 1024 * 1024
    max_stderr_line_bytes: int = 2048
    stderr_tail_lines: int = 20
    queue_size: int = 8
    # A server that stops reading its stdin for this long is treated as unavailable.
    write_timeout: float = 30.0
    stdin_grace: float = 2.0
    terminate_grace: float = 2.0
    # After the process exits, how long to wait for its last stderr lines.
    drain_timeout: float = 1.0


DEFAULT_LIMITS = StdioLimits()


class LineSplitter:
    """Splits a byte stream into lines of at most `max_line` bytes (sans-I/O).

    With `truncate`, a longer line yields its first `max_line` bytes and the rest up to the
    next newline is dropped; without it, `feed` raises `LineTooLong` once the pending
    partial line exceeds the bound, so memory never grows past it (plus one chunk).
    """

    __slots__ = ("_buffer", "_max_line", "_skipping", "_truncate")

    def __init__(self, max_line: int, *, truncate: bool = False) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._truncate = truncate
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines `data` finishes, without their newline (a trailing CR stays)."""
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._buffer += data[start:end]
                self._take(lines)
            start = end + 1
        if not self._skipping:
            self._buffer += data[start:]
            if len(self._buffer) > self._max_line:
                if not self._truncate:
                    raise LineTooLong(self._max_line)
                lines.append(bytes(self._buffer[: self._max_line]))
                self._buffer.clear()
                self._skipping = True
        return lines

    def flush(self) -> bytes:
        """The unterminated rest at end of stream (empty if none)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def _take(self, lines: list[bytes]) -> None:
        line = bytes(self._buffer)
        self._buffer.clear()
        if len(line) > self._max_line:
            if not self._truncate:
                raise LineTooLong(self._max_line)
            line = line[: self._max_line]
        lines.append(line)


class LineTooLong(ValueError):
    """A stdout line exceeded the channel's bound."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"line over {limit} bytes")
        self.limit = limit


@dataclass(slots=True)
class _Starts:
    failures: int = 0
    not_before: float = -math.inf


class SpawnBackoff:
    """Per-target restart pacing, shared by every stdio channel of a worker.

    A start fails when the command cannot be spawned or the process exits on its own within
    `healthy_after` seconds. After n consecutive failures the next start waits
    `min(cap, base * 2**(n-1))`; each start in that state also pushes the following one back
    by the same delay, so concurrent sessions do not spawn together. Any other end resets.
    `clock` and `sleep` are injectable so tests need no real waiting.
    """

    def __init__(
        self,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        healthy_after: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.base = base
        self.cap = cap
        self.healthy_after = healthy_after
        self.clock = clock
        self.sleep = sleep
        self._targets: dict[str, _Starts] = {}

    def delay(self, failures: int) -> float:
        """The pause after `failures` consecutive failed starts."""
        return 0.0 if failures <= 0 else min(self.cap, self.base * 2 ** min(failures - 1, 62))

    def failures(self, target: str) -> int:
        starts = self._targets.get(target)
        return starts.failures if starts is not None else 0

    def claim_start(self, target: str) -> float:
        """Reserve the next start slot of `target`; returns how long to wait for it."""
        starts = self._targets.get(target)
        if starts is None or starts.failures == 0:
            return 0.0
        now = self.clock()
        slot = max(now, starts.not_before)
        starts.not_before = slot + self.delay(starts.failures)
        return slot - now

    def record_failure(self, target: str) -> None:
        starts = self._targets.setdefault(target, _Starts())
        starts.failures += 1
        starts.not_before = self.clock() + self.delay(starts.failures)

    def record_exit(self, target: str, *, ran_for: float, stopped_by_us: bool) -> None:
        """Classify a process end: stopped by us or ran long enough resets; otherwise a failure."""
        if stopped_by_us or ran_for >= self.healthy_after:
            self._targets.pop(target, None)
        else:
            self.record_failure(target)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by {name} (exit code {returncode})"
    return f"exited with code {returncode}"


class StdioChannel:
    """One MCP session with a process started from an `McpStdioTarget` (see the module docstring).

    Background reading runs in `task_group` (the owner's, living at least as long as the
    session); the owner must `aclose()` the channel. One task may `receive()` at a time;
    `send()` may be called concurrently with it. `backoff` is the worker's one instance, shared
    by every channel, so restarts of a target are paced across sessions. `environ` replaces the
    inherited environment (default: the proxy's) under the target's `env`.
    """

    def __init__(
        self,
        target: McpStdioTarget,
        *,
        task_group: anyio.abc.TaskGroup,
        backoff: SpawnBackoff,
        limits: StdioLimits = DEFAULT_LIMITS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._target = target
        self._task_group = task_group
        self._backoff = backoff
        self._limits = limits
        self._environ = environ
        self._process: anyio.abc.Process | None = None
        self._started_at = 0.0
        self._start_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._stop_lock = anyio.Lock()
        self._outbox: MemoryObjectSendStream[JSON]
        self._inbox: MemoryObjectReceiveStream[JSON]
        self._outbox, self._inbox = anyio.create_memory_object_stream[JSON](limits.queue_size)
        self._stderr_tail: deque[str] = deque(maxlen=limits.stderr_tail_lines)
        self._stdout_done = anyio.Event()
        self._stderr_done = anyio.Event()
        self._finished = anyio.Event()
        self._pumps: anyio.CancelScope | None = None
        self._closing = False
        self._start_claimed = False
        self._stopped_by_us = False
        self._protocol_error: str | None = None
        self._close_reason = f"stdio target {target.name!r} closed"

    @property
    def target(self) -> str:
        return self._target.name

    @property
    def session_id(self) -> str | None:
        """stdio has no upstream session id: the process is the session."""
        return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Spawn the process (idempotent); raises TargetUnavailable naming the command if it cannot."""
        if self._process is not None:
            return
        name = self._target.name
        async with self._start_lock:
            if self._process is not None:
                return
            if self._closing:
                raise TargetClosed(self._close_reason)
            # One slot per channel, however many tasks race into start().
            wait = 0.0 if self._start_claimed else self._backoff.claim_start(name)
            self._start_claimed = True
        if wait > 0:
            # Outside the lock, so aclose() during the pause does not wait for it.
            log.info("mcp_stdio_start_delayed", target=name, seconds=round(wait, 3))
            await self._backoff.sleep(wait)
        async with self._start_lock:
            if self._process is not None:
                return
            if self._closing:
                raise TargetClosed(self._close_reason)
            env = {**(os.environ if self._environ is None else self._environ), **dict(self._target.env)}
            try:
                process = await anyio.open_process(
                    [self._target.command, *self._target.args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=self._target.working_dir,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                self._backoff.record_failure(name)
                why = exc.strerror or str(exc)
                log.warning("mcp_stdio_spawn_failed", target=name, command=self._target.command, error=why)
                raise TargetUnavailable(
                    f"stdio target {name!r}: cannot start command {self._target.command!r}: {why}"
                ) from exc
            self._process = process
            self._started_at = self._backoff.clock()
            log.info("mcp_stdio_started", target=name, pid=process.pid, command=self._target.command)
            self._task_group.start_soon(self._run, process)

    async def send(self, message: JSON) -> None:
        """Write one message as one line; raises TargetClosed once the process is gone.

        The line is handed to the pipe whole before any wait, so a timeout or a cancel while
        the server is slow to read never leaves half a message on the wire (it is still sent).
        """
        await self.start()
        process = self._process
        assert process is not None and process.stdin is not None
        if self._finished.is_set() or self._closing:
            raise TargetClosed(self._close_reason)
        line = encode(message) + b"\n"
        async with self._write_lock:
            try:
                with anyio.fail_after(self._limits.write_timeout):
                    await process.stdin.send(line)
            except TimeoutError:
                raise TargetUnavailable(
                    f"stdio target {self.target!r} did not read its input for {self._limits.write_timeout}s"
                ) from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RuntimeError):
                # RuntimeError: uvloop's write() on a transport the process closed.
                raise TargetClosed(self._current_reason("stopped reading its input")) from None

    async def receive(self) -> JSON:
        """The next message from the process; TargetClosed (with exit code and stderr tail) when it ended."""
        await self.start()
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TargetClosed(self._close_reason) from None

    async def aclose(self) -> None:
        """Stop the process (stdin EOF, SIGTERM, SIGKILL, each after a grace period) and reap it."""
        with anyio.CancelScope(shield=True):
            async with self._start_lock:  # a spawn in progress finishes first, so none is orphaned
                self._closing = True
            process = self._process
            if process is None:
                self._outbox.close()
                self._inbox.close()
                self._finished.set()
                return
            if process.returncode is None:
                self._stopped_by_us = True
            await self._stop(process)
            with anyio.move_on_after(self._limits.drain_timeout):
                await self._finished.wait()
            if not self._finished.is_set() and self._pumps is not None:
                # A pump is blocked (e.g. on a full queue nobody reads): cut it loose.
                self._pumps.cancel()
            await self._finished.wait()
            self._inbox.close()

    # --- background --------------------------------------------------------------------------

    async def _run(self, process: anyio.abc.Process) -> None:
        """Own the process: pump its output until stdout ends, then stop, reap and report."""
        try:
            with anyio.CancelScope() as pumps:
                self._pumps = pumps
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump_stderr, process)
                    tg.start_soon(self._watch_exit, process, pumps)
                    await self._pump_stdout(process)
                    # stdout ended: the process exited, closed it, or broke the framing.
                    await self._stop(process)
                    with anyio.move_on_after(self._limits.drain_timeout):
                        await self._stderr_done.wait()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop(process)
                await process.aclose()
                self._finish(process)

    async def _watch_exit(self, process: anyio.abc.Process, pumps: anyio.CancelScope) -> None:
        """End the session when the process exits even if a leftover child still holds stdout open."""
        await process.wait()
        with anyio.move_on_after(self._limits.drain_timeout):
            await self._stdout_done.wait()
        if not self._stdout_done.is_set():
            # Its process group outlived it (e.g. `sleep &` in a shell wrapper). The group id cannot
            # have been reused while the pipe's holder lives, so kill the group, then stop reading.
            log.warning("mcp_stdio_orphans_killed", target=self._target.name, pid=process.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            pumps.cancel()

    async def _pump_stdout(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        splitter = LineSplitter(self._limits.max_line_bytes)
        name = self._target.name
        try:
            while True:
                try:
                    chunk = await process.stdout.receive(_READ_CHUNK)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                for line in splitter.feed(chunk):
                    message = self._decode(line, process.pid)
                    if message is not None:
                        await self._outbox.send(message)
        except LineTooLong as exc:
            self._protocol_error = f"sent a stdout line over {exc.limit} bytes (protocol error)"
            log.error("mcp_stdio_line_too_long", target=name, pid=process.pid, limit=exc.limit)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the receiving side was closed: nobody wants more messages
        finally:
            self._stdout_done.set()

    def _decode(self, line: bytes, pid: int) -> JSON | None:
        if not line.strip():
            return None
        try:
            value = decode_json(line)
        except ValueError as exc:
            reason = str(exc)
        else:
            if type(value) is dict:
                return value
            reason = f"a JSON {type(value).__name__}, not an object"
        preview = line[:_NOISE_PREVIEW].decode("utf-8", "replace")
        log.warning("mcp_stdio_noise_skipped", target=self._target.name, pid=pid, reason=reason, line=preview)
        return None

    async def _pump_stderr(self, process: anyio.abc.Process) -> None:
        assert process.stderr is not None
        splitter = LineSplitter(self._limits.max_stderr_line_bytes, truncate=True)
        try:
            while True:
                try:
                    chunk = await process.stderr.receive(_READ_CHUNK)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break
                for line in splitter.feed(chunk):
                    self._log_stderr(line, process.pid)
            rest = splitter.flush()
            if rest:
                self._log_stderr(rest, process.pid)
        finally:
            self._stderr_done.set()

    def _log_stderr(self, line: bytes, pid: int) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        self._stderr_tail.append(text)
        log.info("mcp_stdio_stderr", target=self._target.name, pid=pid, line=text)

    async def _stop(self, process: anyio.abc.Process) -> None:
        """The spec's stdio shutdown order; idempotent and safe to call from several tasks."""
        with anyio.CancelScope(shield=True):
            async with self._stop_lock:
                if process.returncode is None and process.stdin is not None:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await process.stdin.aclose()
                    with anyio.move_on_after(self._limits.stdin_grace):
                        await process.wait()
                for signum, grace in ((signal.SIGTERM, self._limits.terminate_grace), (signal.SIGKILL, None)):
                    if process.returncode is not None:
                        break
                    log.info("mcp_stdio_signal", target=self._target.name, pid=process.pid, signal=signum.name)
                    _signal_group(process, signum)
                    if grace is not None:
                        with anyio.move_on_after(grace):
                            await process.wait()
                await process.wait()

    def _finish(self, process: anyio.abc.Process) -> None:
        """Record how the process ended, for the backoff and for the TargetClosed message."""
        name = self._target.name
        ran_for = self._backoff.clock() - self._started_at
        self._backoff.record_exit(name, ran_for=ran_for, stopped_by_us=self._stopped_by_us)
        if self._stopped_by_us:
            self._close_reason = f"stdio target {name!r} closed"
        else:
            self._close_reason = self._current_reason(self._protocol_error or "closed its stdout")
            reason, returncode = self._close_reason, process.returncode
            log.warning("mcp_stdio_exited", target=name, pid=process.pid, returncode=returncode, reason=reason)
        self._outbox.close()
        self._finished.set()

    def _current_reason(self, what: str) -> str:
        process = self._process
        returncode = process.returncode if process is not None else None
        reason = f"stdio target {self._target.name!r} {what}"
        if self._protocol_error is None and returncode is not None:
            reason = f"stdio target {self._target.name!r} {_describe_exit(returncode)}"
        if self._stderr_tail:
            reason += "; stderr: " + " | ".join(self._stderr_tail)[-1000:]
        return reason


def _signal_group(process: anyio.abc.Process, signum: signal.Signals) -> None:
    """Signal the process group (the child leads it: start_new_session), else the child alone."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
