"""Access log: redaction of every secret shape, the line schema, the writer thread, file rotation."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from dataplane.observability.access_log import (
    PIPE_BUF,
    REDACTED,
    AccessLog,
    AccessRecord,
    FileSink,
    StreamSink,
    path_without_query,
    redact,
    redact_event,
    redact_headers,
)

JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtbG9uZy1lbm91Z2g"
)
JWE = "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a2V5.aXY.Y2lwaGVydGV4dA.dGFn"


# --- redaction -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Bearer {JWT}", JWT),
        ("Bearer opaque-token-123", "opaque-token-123"),
        ("bearer lowercase-scheme", "lowercase-scheme"),
        ("Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
        ("DPoP proof-bound-token", "proof-bound-token"),
        ("Authorization: Digest username=alice, response=6629fae4", "6629fae4"),
        ("authorization: Negotiate YIIKHQYGKwYB", "YIIKHQYGKwYB"),
        ('{"Authorization": "Bearer abc"}', "abc"),
        ("Cookie: session=s3cr3t; theme=dark", "s3cr3t"),
        ("set-cookie=sid=s3cr3t", "s3cr3t"),
        ("X-Api-Key: key-0123456789", "key-0123456789"),
        ("api-key=abc123", "abc123"),
        ("x-goog-api-key: AIzaSyA-1234567890abcdefghijklmnopqrstu", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
        ("/v1/models?api_key=abc123&page=2", "abc123"),
        ("/callback?code=one-time-code&state=xyz", "one-time-code"),
        ("?access_token=tok123", "tok123"),
        ("a=1&key=k-value", "k-value"),
        ("/s3/object?X-Amz-Signature=deadbeef&X-Amz-Credential=AKID", "deadbeef"),
        ("https://alice:hunter2@db.example.com/x", "hunter2"),
        (f"principal was {JWT} yesterday", JWT),
        (JWT, JWT),
        (JWE, JWE),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."),
        ("sk-proj-AbCdEfGhIjKlMnOpQrStUvWx", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx"),
        ("sk-ant-api03-AbCdEfGhIjKlMnOpQrSt", "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt"),
        ("token ghp_0123456789abcdefghijABCDEFGHIJ", "ghp_0123456789abcdefghijABCDEFGHIJ"),
        ("github_pat_11ABCDEFG0123456789_abcdef", "github_pat_11ABCDEFG0123456789_abcdef"),
        ("glpat-abcdefghij0123456789", "glpat-abcdefghij0123456789"),
        ("xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
        ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("İ Authorization: Bearer unicode-before", "unicode-before"),
    ],
)
def test_every_secret_shape_is_redacted(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert REDACTED in redacted


@pytest.mark.parametrize(
    "text",
    [
        "default/mcp/0", "ns/gw/http", "gateway.example.com:8443", "10.0.0.1:51234", "http://host:8080/path",
        "/v1/chat/completions", "tools/call", "clock__now", "token expired", "credential_missing",
        "my-authorization: not-the-header", "monkey=1", "2026-01-02T03:04:05.678Z", "4bf92f3577b34da6a3ce929d0e0e4736",
    ],
)
def test_ordinary_values_pass_unchanged(text: str) -> None:
    assert redact(text) == text


def test_surrounding_text_is_kept() -> None:
    assert redact("GET /x?a=1&token=abc&b=2 done") == f"GET /x?a=1&token={REDACTED}&b=2 done"
    assert redact(f"x {JWT} y") == f"x {REDACTED} y"
    assert redact("https://u:p@h/x") == f"https://u:{REDACTED}@h/x"


def test_long_values_are_cut_before_matching() -> None:
    redacted = redact("a" * 5000 + JWT)
    assert len(redacted) < 1100
    assert redacted.endswith("...")


def test_redact_headers_hides_credential_headers_and_secret_shapes() -> None:
    headers = [
        (b"Authorization", b"Bearer abc"), (b"cookie", b"a=b"), ("X-Tenant-Key", "tenant-secret"),
        ("proxy-authorization", "Basic Zm9v"), (b"accept", b"application/json"), ("x-forwarded-for", JWT),
    ]
    assert redact_headers(headers, extra=["x-tenant-key"]) == [
        ("authorization", REDACTED), ("cookie", REDACTED), ("x-tenant-key", REDACTED),
        ("proxy-authorization", REDACTED), ("accept", "application/json"), ("x-forwarded-for", REDACTED),
    ]


def test_redact_event_processor_walks_nested_values() -> None:
    event = {"event": "x", "headers": {"authorization": "Bearer abc"}, "list": [JWT, 3], "n": 1}
    assert redact_event(None, "info", event) == {
        "event": "x", "headers": {"authorization": f"Bearer {REDACTED}"}, "list": [REDACTED, 3], "n": 1,
    }


# --- the record -----------------------------------------------------------------------------------------


def full_record(**overrides: Any) -> AccessRecord:
    record = AccessRecord(
        method="POST", authority="gw.example.com:8080", path=path_without_query("/mcp?session=abc"),
        gateway="ns/gw", listener="ns/gw/http", route="ns/mcp/0", backend="ns/tools", principal="alice",
        source_namespace="agents", source_address="10.0.0.7:51234", upstream_address="127.0.0.1:9000",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", mcp_method="tools/call", mcp_target="clock", mcp_tool="now",
        started_at=1_700_000_000.25, started=100.0,
    )
    record.note_decision(False, "ns/tenants", "deny[0]")
    for key, value in overrides.items():
        setattr(record, key, value)
    return record


def test_finish_happens_once() -> None:
    record = AccessRecord(started=10.0)
    assert record.finish(200, now=10.5)
    assert not record.finish(500, "timeout", now=99.0)
    assert (record.status, record.reason, record.duration, record.finished) == (200, "", 0.5, True)


def test_line_schema() -> None:
    record = full_record()
    record.finish(403, "authorization_denied", now=100.0125)
    line = json.loads(AccessLog().render(record))
    assert line == {
        "logger": "access", "event": "request", "timestamp": "2023-11-14T22:13:20.250Z", "duration_ms": 12.5,
        "status": 403, "method": "POST", "authority": "gw.example.com:8080", "path": "/mcp", "gateway": "ns/gw",
        "listener": "ns/gw/http", "route": "ns/mcp/0", "backend": "ns/tools", "reason": "authorization_denied",
        "principal": "alice", "source_namespace": "agents", "source_address": "10.0.0.7:51234",
        "upstream_address": "127.0.0.1:9000", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "decision": {"result": "deny", "policy": "ns/tenants", "rule": "deny[0]"},
        "mcp": {"method": "tools/call", "target": "clock", "tool": "now"},
    }


def test_a2a_and_llm_sections_appear_when_set() -> None:
    record = AccessRecord(
        a2a_method="SendMessage", a2a_task="t-1", a2a_context="c-1", a2a_state="completed",
        llm_provider="openai", llm_model="gpt-4o", llm_input_tokens=120, llm_output_tokens=0,
    )
    record.finish(200)
    line = json.loads(AccessLog().render(record))
    assert line["a2a"] == {"method": "SendMessage", "task": "t-1", "context": "c-1", "state": "completed"}
    assert line["llm"] == {"provider": "openai", "model": "gpt-4o", "input_tokens": 120, "output_tokens": 0}
    assert line["reason"] == "ok"
    assert "mcp" not in line and "decision" not in line and "principal" not in line


def test_secrets_in_any_field_never_reach_the_line() -> None:
    record = full_record(
        path=f"/v1/{JWT}", authority="user:pw@evil", principal=JWT, mcp_tool=f"Bearer {JWT}",
        a2a_method="SendMessage", a2a_task="sk-proj-AbCdEfGhIjKlMnOpQrStUvWx", llm_model="authorization: Basic Zm9v",
    )
    record.finish(200)
    text = AccessLog().render(record).decode()
    for secret in (JWT, "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx", "Zm9v"):
        assert secret not in text
    assert json.loads(text)["principal"] == REDACTED


# --- the writer -----------------------------------------------------------------------------------------


def written_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_writer_thread_writes_every_emitted_record_in_order() -> None:
    stream = io.BytesIO()
    access = AccessLog(StreamSink(stream)).start()
    try:
        for index in range(500):
            access.emit(AccessRecord(route=f"ns/r/{index}", status=200))  # emit finishes unfinished records
        assert access.flush(timeout=10)
    finally:
        access.close()
    lines = written_lines(stream.getvalue())
    assert [line["route"] for line in lines] == [f"ns/r/{index}" for index in range(500)]
    assert all(line["logger"] == "access" for line in lines)


class RecordingStream(io.BytesIO):
    """Keeps each write() apart to check how batches are cut."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


def test_stream_writes_are_cut_at_line_boundaries_within_pipe_buf() -> None:
    stream = RecordingStream()
    lines = [json.dumps({"n": index, "pad": "x" * 300}).encode() + b"\n" for index in range(100)]
    StreamSink(stream).write_lines(lines)
    assert b"".join(stream.writes) == b"".join(lines)
    assert len(stream.writes) > 1
    assert all(len(chunk) <= PIPE_BUF and chunk.endswith(b"\n") for chunk in stream.writes)


class BlockingSink:
    """A sink stuck in write() until released: the event loop side must not notice."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lines: list[bytes] = []

    def write_lines(self, lines: list[bytes]) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.lines += lines

    def close(self) -> None:
        pass


def test_a_stuck_sink_never_blocks_emit_and_overflow_is_dropped_and_counted() -> None:
    sink = BlockingSink()
    drops: list[int] = []
    access = AccessLog(sink, max_pending=10, on_drop=lambda: drops.append(1)).start()
    try:
        access.emit(AccessRecord(route="first"))
        assert sink.entered.wait(10)  # the writer holds "first" and is stuck writing it
        for index in range(25):
            access.emit(AccessRecord(route=f"r{index}"))
        assert access.dropped == 15 and len(drops) == 15
        sink.release.set()
        assert access.flush(timeout=10)
    finally:
        sink.release.set()
        access.close()
    assert [json.loads(line)["route"] for line in sink.lines] == ["first"] + [f"r{index}" for index in range(10)]


def test_close_writes_what_is_queued() -> None:
    stream = io.BytesIO()
    access = AccessLog(StreamSink(stream), idle_flush=60).start()
    for index in range(3):
        access.emit(AccessRecord(route=f"r{index}"))
    access.close()
    assert [line["route"] for line in written_lines(stream.getvalue())] == ["r0", "r1", "r2"]
    access.emit(AccessRecord(route="late"))
    assert access.dropped == 1


# --- files -----------------------------------------------------------------------------------------------


def test_file_output_rotates_by_size_and_keeps_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"
    access = AccessLog(FileSink(path, max_bytes=2000, backups=2)).start()
    try:
        for index in range(60):
            access.emit(AccessRecord(route=f"ns/route/{index}", status=200))
            if index % 7 == 0:
                assert access.flush(timeout=10)  # several batches, so rotation happens between and within them
        assert access.flush(timeout=10)
    finally:
        access.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["access.log", "access.log.1", "access.log.2"]
    for name in files:
        assert (path.parent / name).stat().st_size <= 2000
    kept = [
        line["route"]
        for name in ("access.log.2", "access.log.1", "access.log")
        for line in written_lines((path.parent / name).read_bytes())
    ]
    # The newest lines, in order, with nothing lost between the files that are kept.
    assert kept == [f"ns/route/{index}" for index in range(60 - len(kept), 60)]
    assert len(kept) >= 15  # three files of about 2000 bytes


def test_reopen_follows_an_external_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    sink = FileSink(path)
    access = AccessLog(sink).start()
    try:
        access.emit(AccessRecord(route="before"))
        assert access.flush(timeout=10)
        path.rename(tmp_path / "access.log.old")  # what logrotate does, then it sends SIGHUP
        sink.reopen()
        access.emit(AccessRecord(route="after"))
        assert access.flush(timeout=10)
    finally:
        access.close()
    assert [line["route"] for line in written_lines((tmp_path / "access.log.old").read_bytes())] == ["before"]
    assert [line["route"] for line in written_lines(path.read_bytes())] == ["after"]


def test_rotation_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        FileSink(tmp_path / "x.log", max_bytes=0)
