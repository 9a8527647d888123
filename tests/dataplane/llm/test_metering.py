"""MeteredSink: passes every call through, charges the usage once, and a failing charge never
reaches the response path."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from dataplane.http.messages import Headers
from dataplane.llm.metering import MeteredSink
from dataplane.llm.usage import TokenUsage
from tests.dataplane.llm.test_usage import OPENAI_STREAM, SSE_HEADERS

pytestmark = pytest.mark.anyio


class RecordingSink:
    """The downstream end of a response, recording what reached it."""

    def __init__(self) -> None:
        self.started = False
        self.calls: list[tuple[str, object]] = []

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        self.started = True
        self.calls.append(("start", (status, headers, content_length, body, end)))

    async def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    async def end(self, trailers: Headers) -> None:
        self.calls.append(("end", trailers))

    def abort(self) -> None:
        self.calls.append(("abort", None))


async def test_every_call_passes_through_unchanged_and_the_usage_is_charged_once() -> None:
    charged: list[int] = []

    async def charge(tokens: int) -> None:
        charged.append(tokens)

    inner = RecordingSink()
    sink = MeteredSink(inner, charge)
    assert not sink.started
    await sink.start(200, list(SSE_HEADERS), None, OPENAI_STREAM[:10], False)
    await sink.write(OPENAI_STREAM[10:])
    await sink.end([(b"x-trailer", b"1")])
    assert sink.started
    assert inner.calls == [
        ("start", (200, SSE_HEADERS, None, OPENAI_STREAM[:10], False)),
        ("write", OPENAI_STREAM[10:]),
        ("end", [(b"x-trailer", b"1")]),
    ]
    assert await sink.settle() == TokenUsage(400, 200, 600)
    assert await sink.settle() is None  # once
    assert charged == [600]


async def test_a_failing_charge_is_logged_not_raised_and_nothing_is_charged_before_a_head() -> None:
    async def broken(tokens: int) -> None:
        raise ConnectionResetError("redis went away")

    sink = MeteredSink(RecordingSink(), broken)
    assert await sink.settle() is None  # no response head went out: nothing was read
    sink = MeteredSink(RecordingSink(), broken)
    await sink.start(200, list(SSE_HEADERS), None, OPENAI_STREAM, False)
    sink.abort()
    with capture_logs() as logs:
        assert await sink.settle() == TokenUsage(400, 200, 600)
    (warning,) = [entry for entry in logs if entry["event"] == "token usage not charged"]
    assert warning["log_level"] == "warning" and warning["tokens"] == 600 and "redis went away" in warning["error"]
