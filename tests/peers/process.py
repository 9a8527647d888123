"""Child processes whose log lines tests can await, instead of sleeping or polling.

A JSON line (our structlog output) is matched by its fields; any other line (nginx,
a traceback) is kept as {"raw": line}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

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
                    parsed = json.loads(line)
                except json.JSONDecodeError:
                    parsed = None
                # Plain-text lines (nginx, tracebacks) are kept as {"raw": line} so they can be matched too.
                self.lines.append(parsed if isinstance(parsed, dict) else {"raw": line})
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
