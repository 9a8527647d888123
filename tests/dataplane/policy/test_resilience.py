"""Retry decisions, backoff with full jitter, target choice and body replay: the pure core, fake clocks."""

from __future__ import annotations

import pytest

from dataplane.config.model import UpstreamCluster, UpstreamTarget
from dataplane.config.policy import RetrySettings
from dataplane.http.errors import (
    BackendUnavailable,
    PoolExhausted,
    RetryableUpstreamError,
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
)
from dataplane.http.messages import Headers
from dataplane.policy.resilience import (
    ReplayableBody,
    RetryState,
    backoff_delay,
    failure_kind,
    next_target,
    retries_failure,
    retries_mcp_method,
    retries_status,
)

pytestmark = pytest.mark.anyio


def retry(attempts: int = 3, **options: object) -> RetrySettings:
    return RetrySettings(attempts=attempts, **options)  # type: ignore[arg-type]


class Body:
    """A body source handing out fixed pieces, counting reads."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        return self.pieces.pop(0) if self.pieces else b""

    @property
    def trailers(self) -> Headers:
        return [(b"x-trailer", b"1")]


# --- what is retryable ------------------------------------------------------------------------


def test_failures_map_to_envoy_retry_conditions() -> None:
    assert failure_kind(UpstreamConnectFailed("refused")) == "connect-failure"
    assert failure_kind(UpstreamConnectTimeout("slow")) == "connect-failure"
    assert failure_kind(UpstreamReset("closed")) == "reset"
    assert failure_kind(RetryableUpstreamError("stale")) == "reset"
    # A full local pool, a missing backend or a garbled response: another try would not help.
    assert failure_kind(PoolExhausted("busy")) is None
    assert failure_kind(BackendUnavailable("gone")) is None
    assert failure_kind(UpstreamProtocolError("garbage")) is None


def test_default_conditions_are_connect_failure_and_reset_and_5xx_implies_both() -> None:
    default = retry()
    assert retries_failure(default, "connect-failure") and retries_failure(default, "reset")
    assert not retries_status(default, 503)
    only_5xx = retry(on=frozenset({"5xx"}))
    assert retries_failure(only_5xx, "connect-failure") and retries_failure(only_5xx, "reset")
    assert retries_status(only_5xx, 500) and retries_status(only_5xx, 599)
    assert not retries_status(only_5xx, 499) and not retries_status(only_5xx, 200)
    only_connect = retry(on=frozenset({"connect-failure"}))
    assert not retries_failure(only_connect, "reset")


def test_status_codes_narrow_the_5xx_condition() -> None:
    settings = retry(on=frozenset({"5xx"}), status_codes=frozenset({503, 504}))
    assert retries_status(settings, 503) and retries_status(settings, 504)
    assert not retries_status(settings, 500)


def test_tools_call_is_not_retried_unless_configured() -> None:
    assert not retries_mcp_method(retry(), "tools/call")
    assert retries_mcp_method(retry(), "tools/list") and retries_mcp_method(retry(), "resources/read")
    assert retries_mcp_method(retry(retry_non_idempotent_mcp=True), "tools/call")
    assert not retries_mcp_method(None, "tools/list") and not retries_mcp_method(retry(0), "tools/list")


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_with_full_jitter() -> None:
    settings = retry(backoff_base=0.1, backoff_max=0.5)
    top = [backoff_delay(settings, n, rand=lambda: 0.999999) for n in range(1, 6)]
    assert [round(d, 3) for d in top] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff_delay(settings, 3, rand=lambda: 0.0) == 0.0
    assert backoff_delay(settings, 2, rand=lambda: 0.5) == pytest.approx(0.1)
    # A huge retry number neither overflows nor passes the cap.
    assert backoff_delay(settings, 500, rand=lambda: 0.5) == pytest.approx(0.25)


def test_retry_state_counts_attempts_and_stops_at_the_limit() -> None:
    state = RetryState(retry(2, backoff_base=0.1, backoff_max=1.0), rand=lambda: 0.5)
    assert state.decide("reset", now=0.0) == pytest.approx(0.05)
    assert state.decide("connect-failure", now=1.0) == pytest.approx(0.1)
    assert state.decide("reset", now=2.0) is None
    assert state.retries == 2


def test_retry_state_refuses_causes_the_policy_does_not_name() -> None:
    state = RetryState(retry(3, on=frozenset({"connect-failure"})), rand=lambda: 0.5)
    assert state.decide("reset", now=0.0) is None
    assert state.decide(503, now=0.0) is None
    assert state.decide("connect-failure", now=0.0) is not None
    assert RetryState(None).decide("connect-failure", now=0.0) is None


def test_no_retry_whose_backoff_ends_past_the_deadline() -> None:
    state = RetryState(retry(5, backoff_base=1.0, backoff_max=1.0), deadline=10.0, rand=lambda: 0.5)
    assert state.decide("reset", now=9.0) == pytest.approx(0.5)
    assert state.decide("reset", now=9.6) is None  # 9.6 + 0.5 passes 10


def test_try_timeout_is_cut_to_what_the_deadline_leaves() -> None:
    state = RetryState(retry(), deadline=10.0)
    assert state.try_timeout(3.0, now=2.0) == 3.0
    assert state.try_timeout(3.0, now=8.5) == pytest.approx(1.5)
    assert state.try_timeout(None, now=8.0) == pytest.approx(2.0)
    assert state.try_timeout(3.0, now=11.0) == 0.0
    assert RetryState(retry()).try_timeout(None, now=5.0) is None


# --- target choice ----------------------------------------------------------------------------


def test_next_target_prefers_one_not_tried() -> None:
    a, b, c = (UpstreamTarget(name, "127.0.0.1", 80 + i, 1) for i, name in enumerate("abc"))
    cluster = UpstreamCluster("ns/app", targets=(a, b, c))
    assert next_target(cluster, [a], rand=lambda: 0.0) == b  # the weighted pick was a: skip it
    assert next_target(cluster, [a, b], rand=lambda: 0.0) == c
    assert next_target(cluster, [a, b, c], rand=lambda: 0.0) == a  # all tried: by weight again
    assert next_target(cluster, [a], rand=lambda: 0.99) == c


def test_next_target_skips_zero_weight_targets() -> None:
    a = UpstreamTarget("a", "127.0.0.1", 80, 1)
    off = UpstreamTarget("off", "127.0.0.1", 81, 0)
    assert next_target(UpstreamCluster("ns/app", targets=(off, a)), [a], rand=lambda: 0.0) == a


# --- body replay ------------------------------------------------------------------------------


async def read_all(reader: object) -> bytes:
    out = b""
    while data := await reader.read():  # type: ignore[attr-defined]
        out += data
    return out


async def test_a_small_body_is_buffered_and_replayed_whole() -> None:
    source = Body(b"abc", b"def")
    body = ReplayableBody(source, cap=16)
    await body.prime()
    assert body.complete and body.can_replay and source.reads == 3
    assert await read_all(body.reader()) == b"abcdef"
    assert await read_all(body.reader()) == b"abcdef"
    assert body.can_replay and source.reads == 3
    assert body.reader().trailers == [(b"x-trailer", b"1")]


async def test_a_body_over_the_cap_streams_and_is_then_not_replayable() -> None:
    source = Body(b"a" * 10, b"b" * 10, b"c" * 10)
    body = ReplayableBody(source, cap=16)
    await body.prime()
    assert not body.complete and body.can_replay  # 20 bytes held, nothing sent yet
    assert await read_all(body.reader()) == b"a" * 10 + b"b" * 10 + b"c" * 10
    assert not body.can_replay
    state = RetryState(retry(), body=body)
    assert state.decide("reset", now=0.0) is None


async def test_an_unprimed_body_replays_only_until_its_first_read() -> None:
    body = ReplayableBody(Body(b"x"), cap=16)
    state = RetryState(retry(), body=body, rand=lambda: 0.0)
    assert state.decide("connect-failure", now=0.0) == 0.0  # nothing read: a connect failure retries
    reader = body.reader()
    assert await reader.read() == b"x"
    assert state.decide("connect-failure", now=0.0) is None
