"""Access and audit log: one JSON line per request, secrets redacted, written off the event loop.

The request path fills an `AccessRecord` as it learns things (route, identity, MCP tool, decision,
tokens...) and finishes it once (`AccessRecord.finish`); `AccessLog.emit` appends the finished record to
a bounded in-memory queue, which costs the event loop a deque append (and, when the queue was empty,
waking the writer). A writer thread turns records into lines through a structlog logger named
``access`` (redaction, JSON rendering) and writes whatever accumulated as one batch, so a busy worker
makes one write per batch, not per line. When the writer falls behind by ``max_pending`` records, new
ones are dropped and counted (``on_drop``), never waited for.

Redaction (`redact`, `redact_headers`): every string of a line goes through `redact` before rendering,
whatever field it is in: ``Bearer``/``Basic``/... credentials, JWT-looking strings, well-known API key
shapes (``sk-...``, ``ghp_...``, ``AKIA...``), secret query parameters (``access_token=``, ``api_key=``,
``sig=``...), ``authorization:``/``cookie:``-style pairs and URL passwords become ``[REDACTED]``.

Where lines go: stdout by default (`StreamSink`; batches are cut at line boundaries into writes of at most
PIPE_BUF bytes, so workers sharing one stdout pipe never interleave within a line), or a file
(`FileSink`) rotated by size: past ``max_bytes`` the file becomes ``<path>.1`` (``.1`` becomes ``.2``...,
``backups`` kept) and a new one is opened. Rotation by size needs nothing outside the process (containers
often have no logrotate); `FileSink.reopen` also lets an external rotator rename the file and have the
next batch go to a new one (wire it to SIGHUP). Each worker process needs its own file: two processes
rotating one file would rename it under each other.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import structlog

from shared.logging import get_logger

log = get_logger("dataplane.observability.access_log")

REDACTED: Final = "[REDACTED]"
# A string field longer than this is cut (a hostile path or tool name must not make megabyte lines).
MAX_FIELD_CHARS: Final = 1024
# Writes to a pipe of at most this many bytes are atomic (POSIX PIPE_BUF on Linux).
PIPE_BUF: Final = 4096

# --- redaction -------------------------------------------------------------------------------------

# Headers whose values are credentials, whole.
SENSITIVE_HEADERS: Final = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "apikey",
    "x-auth-token", "x-access-token", "x-goog-api-key", "x-amz-security-token", "x-csrf-token",
    "mcp-session-id", "x-agentgate-api-key",
})
# Query parameters (and key=value pairs) whose values are credentials.
SENSITIVE_PARAMS: Final = frozenset({
    "access_token", "id_token", "refresh_token", "token", "api_key", "apikey", "api-key", "key", "secret",
    "client_secret", "password", "passwd", "pwd", "sig", "signature", "auth", "authorization", "code",
    "jwt", "assertion", "session", "sessionid", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
})


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


# The patterns run on a lower-cased copy (case-sensitive matching of literal alternatives lets `re` skip
# positions by their first character: about ten times faster than IGNORECASE) and report where the secret
# value is (group "v", or "t"); `redact` then rebuilds the original text around those spans.
_PAIR_PATTERN = r"(?:" + _alternatives(SENSITIVE_HEADERS) + r")[\"']?\s*[:=]\s*[\"']?(?P<v>[^\"'\r\n]*)"
_PARAM_PATTERN = r"(?:^|[?&;])(?:" + _alternatives(SENSITIVE_PARAMS) + r")=(?P<v>[^&#\s]*)"
_SCHEME_PATTERN = (
    r"(?:bearer|basic|digest|negotiate|apikey|api-key|dpop|aws4-hmac-sha256)\s+(?P<v>[^\s\"',;]+)"
    r"|token\s+(?P<t>[a-z0-9._~+/=-]{16,})"  # GitHub's scheme, only with a credential-like value
)
_USERINFO_PATTERN = r"://[^/\s:@]*:(?P<v>[^/\s@]*)@"
# (pattern, must start at a name boundary); the boundary is checked by `redact`, not by a slow lookbehind.
_SEPARATOR_RULES = ((re.compile(_PAIR_PATTERN), True), (re.compile(_PARAM_PATTERN), False))
_SCHEME = re.compile(_SCHEME_PATTERN)
_USERINFO = re.compile(_USERINFO_PATTERN)
_IGNORECASE_RULES = tuple(
    (re.compile(pattern, re.IGNORECASE), boundary)
    for pattern, boundary in ((_PAIR_PATTERN, True), (_PARAM_PATTERN, False), (_SCHEME_PATTERN, True),
                              (_USERINFO_PATTERN, False))
)
# Secrets recognised by their shape, replaced whole (case matters here: "eyJ", "AKIA"). None is shorter than
# 16 characters (a JWS header alone, {"alg":"..."}, is 16), so shorter strings skip this search.
_SHAPES = re.compile(
    # JWS (3 parts) and JWE (5 parts): the header always starts with base64url('{"').
    r"eyJ[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){2,4}"
    # Well-known API key shapes.
    r"|(?:sk-(?:ant-|proj-|svcacct-)?[A-Za-z0-9_-]{16,}|xox[abposr]-[A-Za-z0-9-]{10,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35})"
)
_MIN_SHAPE_CHARS: Final = 16


def _value_spans(pattern: re.Pattern[str], low: str, boundary: bool, spans: list[tuple[int, int]]) -> None:
    position = 0
    while (match := pattern.search(low, position)) is not None:
        start = match.start()
        if boundary and start and (low[start - 1].isalnum() or low[start - 1] in "_-"):
            position = start + 1  # "my-authorization:" is not the header; look again just after
            continue
        group = match.lastgroup or "v"
        if match.end(group) > match.start(group):
            spans.append(match.span(group))
        position = max(match.end(), start + 1)


def redact(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``[REDACTED]`` (see the module docstring).
    Cut to `MAX_FIELD_CHARS` first, so the cost is bounded; strings with no ':', '=', '@', whitespace and
    under 16 characters (most config names) cost a few membership tests."""
    if len(text) > MAX_FIELD_CHARS:
        text = text[:MAX_FIELD_CHARS] + "..."
    spans: list[tuple[int, int]] = []
    low = text.lower()
    if len(low) != len(text):  # lower() changed lengths (rare Unicode): match the original, ignoring case
        for pattern, boundary in _IGNORECASE_RULES:
            _value_spans(pattern, text, boundary, spans)
    else:
        if ":" in text or "=" in text:
            for pattern, boundary in _SEPARATOR_RULES:
                _value_spans(pattern, low, boundary, spans)
        if " " in text or "\t" in text:
            _value_spans(_SCHEME, low, True, spans)
        if "@" in text:
            _value_spans(_USERINFO, low, False, spans)
    if len(text) >= _MIN_SHAPE_CHARS:
        spans.extend(match.span() for match in _SHAPES.finditer(text))
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    cursor = 0
    for start, end in spans:
        if start < cursor:  # inside a span already redacted
            continue
        pieces += (text[cursor:start], REDACTED)
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def redact_headers(
    headers: Iterable[tuple[str | bytes, str | bytes]], extra: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Headers for a log line: credential headers (`SENSITIVE_HEADERS` and ``extra``, e.g. a policy's
    API key header) show ``[REDACTED]``, every other value goes through `redact`."""
    hidden = SENSITIVE_HEADERS | {name.lower() for name in extra}
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        out.append((name, REDACTED if name in hidden else redact(value)))
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


def redact_event(_logger: object, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: `redact` every string in the event, nested ones included."""
    return {key: _redact_value(value) for key, value in event_dict.items()}


# --- the record --------------------------------------------------------------------------------------


def path_without_query(target: str) -> str:
    """'/mcp?session=x' -> '/mcp': the log never carries a query string."""
    cut = target.find("?")
    return target if cut < 0 else target[:cut]


@dataclass(slots=True)
class AccessRecord:
    """One request as the log line will show it; the request path sets fields as it learns them and calls
    `finish` once. Strings default to "" (not known / not applicable) and are left out of the line."""

    method: str = ""
    authority: str = ""
    path: str = ""  # without the query: see `path_without_query`
    gateway: str = ""
    listener: str = ""
    route: str = ""
    backend: str = ""
    status: int = 0  # 0: no response was sent
    reason: str = ""  # the detailed reason (a Refused.reason, a RequestReason value); "" when ok
    principal: str = ""  # the authenticated identity
    source_namespace: str = ""
    source_address: str = ""  # "ip:port" of the client
    upstream_address: str = ""  # "host:port" of the endpoint that answered
    trace_id: str = ""
    mcp_method: str = ""
    mcp_target: str = ""
    mcp_tool: str = ""
    a2a_method: str = ""
    a2a_task: str = ""
    a2a_context: str = ""
    a2a_state: str = ""
    llm_provider: str = ""
    llm_model: str = ""  # as the client asked (an alias, perhaps)
    llm_provider_model: str = ""  # the provider's name for it, as sent upstream
    llm_input_tokens: int | None = None
    llm_output_tokens: int | None = None
    llm_first_token_ms: float | None = None  # streams: from the request to the answer's first chunk
    llm_usage_estimated: bool = False  # the provider reported no usage: the tokens are the gateway's estimate
    decision: str = ""  # "allow" | "deny" when authorization rules decided
    decision_policy: str = ""  # the Policy whose rule decided
    decision_rule: str = ""  # e.g. "deny[0]"
    # Wall clock for the timestamp, monotonic for the duration.
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    duration: float = 0.0
    finished: bool = False

    def note_decision(self, allowed: bool, policy: str = "", rule: str = "") -> None:
        """The authorization outcome and the rule that made it (the last decision wins)."""
        self.decision = "allow" if allowed else "deny"
        self.decision_policy = policy
        self.decision_rule = rule

    def finish(self, status: int | None = None, reason: str | None = None, *, now: float | None = None) -> bool:
        """Stop the clock; False (nothing changed) when already finished, so error paths can call it freely."""
        if self.finished:
            return False
        self.duration = (time.perf_counter() if now is None else now) - self.started
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        self.finished = True
        return True

    def fields(self) -> dict[str, Any]:
        """The line's fields, every string redacted: core ones always, the others when set, protocol
        sections (``mcp``, ``a2a``, ``llm``) and the authorization ``decision`` when they apply."""
        r = redact
        out: dict[str, Any] = {
            "timestamp": _iso(self.started_at),
            "duration_ms": round(self.duration * 1000.0, 3),
            "status": self.status,
            "method": r(self.method),
            "authority": r(self.authority),
            "path": r(self.path),
            "gateway": r(self.gateway),
            "listener": r(self.listener),
            "route": r(self.route),
            "backend": r(self.backend),
            "reason": r(self.reason) if self.reason else "ok",
        }
        for key in _OPTIONAL_FIELDS:
            value = getattr(self, key)
            if value:
                out[key] = r(value)
        if self.decision:
            out["decision"] = {"result": r(self.decision), "policy": r(self.decision_policy),
                               "rule": r(self.decision_rule)}
        if self.mcp_method:
            out["mcp"] = _present(method=self.mcp_method, target=self.mcp_target, tool=self.mcp_tool)
        if self.a2a_method:
            out["a2a"] = _present(
                method=self.a2a_method, task=self.a2a_task, context=self.a2a_context, state=self.a2a_state
            )
        if self.llm_model or self.llm_provider:
            llm = _present(provider=self.llm_provider, model=self.llm_model, provider_model=self.llm_provider_model)
            if self.llm_input_tokens is not None:
                llm["input_tokens"] = self.llm_input_tokens
            if self.llm_output_tokens is not None:
                llm["output_tokens"] = self.llm_output_tokens
            if self.llm_first_token_ms is not None:
                llm["time_to_first_token_ms"] = self.llm_first_token_ms
            if self.llm_usage_estimated:
                llm["usage_estimated"] = True
            out["llm"] = llm
        return out


_OPTIONAL_FIELDS: Final = ("principal", "source_namespace", "source_address", "upstream_address", "trace_id")


def _present(**values: str) -> dict[str, Any]:
    return {key: redact(value) for key, value in values.items() if value}


class _SecondCache:
    """ISO-8601 timestamps: the part up to the second is formatted once per second (the writer thread only)."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""


_SECOND = _SecondCache()


def _iso(wall: float) -> str:
    """'2026-01-02T03:04:05.678Z' (UTC, milliseconds)."""
    second = int(wall)
    cache = _SECOND
    if cache.second != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.second, cache.prefix = second, prefix  # a racing thread writes an equally valid pair
    else:
        prefix = cache.prefix
    return f"{prefix}.{min(int((wall - second) * 1000 + 0.5), 999):03d}Z"


# --- sinks ---------------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where batches of lines go; called from the writer thread only."""

    def write_lines(self, lines: list[bytes]) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """A binary stream (stdout by default): batches cut into writes of at most PIPE_BUF bytes at line
    boundaries, each flushed, so processes sharing the stream never split each other's lines."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream

    def write_lines(self, lines: list[bytes]) -> None:
        stream = self._stream or sys.stdout.buffer
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > PIPE_BUF:
                stream.write(b"".join(chunk))
                stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            stream.write(b"".join(chunk))
            stream.flush()

    def close(self) -> None:
        """The stream is the caller's (stdout): left open."""


class FileSink:
    """Appends to ``path``; past ``max_bytes`` rotates to ``path.1``..``path.<backups>`` (see the module
    docstring). `reopen` is safe from any thread: the next batch goes to a freshly opened file."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError(f"access log rotation: max_bytes must be > 0, backups >= 0 (got {max_bytes}, {backups})")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._reopen = False

    def reopen(self) -> None:
        self._reopen = True

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")  # noqa: SIM115 (kept open across batches, closed by close/rotate)
        self._size = handle.tell()
        return handle

    def write_lines(self, lines: list[bytes]) -> None:
        if self._reopen:
            self._reopen = False
            self.close()
        handle = self._file or self._open()
        self._file = handle
        for line in lines:
            if self._size and self._size + len(line) > self.max_bytes:
                handle.flush()
                handle = self._rotate()
            handle.write(line)
            self._size += len(line)
        handle.flush()

    def _rotate(self) -> BinaryIO:
        self.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
            if self.path.exists():
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()
        return self._file

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


# --- the writer ----------------------------------------------------------------------------------------


class _Lines:
    """The end of the structlog chain: keeps what the renderer produced for the current batch."""

    def __init__(self) -> None:
        self.batch: list[bytes] = []

    def msg(self, message: str) -> None:
        self.batch.append(message.encode("utf-8", "replace") + b"\n")

    info = msg


def _access_logger() -> tuple[_Lines, Any]:
    """A structlog logger named ``access`` that redacts, renders JSON and appends lines to its `_Lines`."""
    lines = _Lines()
    logger = structlog.wrap_logger(
        lines,
        # `AccessRecord.fields` redacted every string already; `redact_event` is for other loggers.
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    ).bind(logger="access")
    return lines, logger


class AccessLog:
    """Queue + writer thread; see the module docstring. `start` before `emit`, `close` at shutdown
    (writes what is queued). ``max_pending``: queued records past which new ones are dropped."""

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        max_pending: int = 65536,
        idle_flush: float = 0.5,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.sink: Sink = sink or StreamSink()
        self.max_pending = max_pending
        self.dropped = 0
        self.write_errors = 0
        self._idle_flush = idle_flush
        self._on_drop = on_drop
        self._pending: deque[AccessRecord] = deque()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._enqueued = 0
        self._written = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        # The writer thread's logger, and one for `render` (other threads), so the two never share a batch.
        self._lines, self._logger = _access_logger()
        self._render_lines, self._render_logger = _access_logger()

    def start(self) -> AccessLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self._thread.start()
        return self

    def emit(self, record: AccessRecord) -> None:
        """Queue a record for writing (finishing it if the caller did not). Never blocks."""
        if not record.finished:
            record.finish()
        pending = self._pending
        if len(pending) >= self.max_pending or self._closing:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        pending.append(record)
        self._enqueued += 1
        if len(pending) == 1:
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Block (a thread, a test; not the event loop) until everything emitted so far is written."""
        target = self._enqueued
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._written >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the thread, close the sink."""
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            self._thread = None
        self.sink.close()

    def render(self, record: AccessRecord) -> bytes:
        """One record as its log line (redacted JSON), as the writer thread makes it; for tests and the
        bench (one caller thread at a time)."""
        self._render_logger.info("request", **record.fields())
        return self._render_lines.batch.pop()

    def _run(self) -> None:
        pending = self._pending
        while True:
            self._wake.wait(self._idle_flush)
            self._wake.clear()
            count = 0
            batch = self._lines.batch
            while pending:
                record = pending.popleft()
                count += 1
                try:
                    self._logger.info("request", **record.fields())
                except Exception as exc:  # a record that cannot render must not stop the writer
                    log.warning("access log record not rendered", error=repr(exc))
            if batch:
                try:
                    self.sink.write_lines(batch)
                except OSError as exc:
                    self.write_errors += 1
                    log.warning("access log write failed; batch lost", lines=len(batch), error=str(exc))
                batch.clear()
            if count:
                with self._progress:
                    self._written += count
                    self._progress.notify_all()
            if self._closing and not pending:
                return
