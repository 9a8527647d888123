"""Local token buckets: the bucket math on a fake clock, bounded memory, headers, config errors."""

from __future__ import annotations

import pytest

from dataplane.policy.ratelimit import (
    MAX_KEY_LENGTH,
    Decision,
    DecisionReason,
    HeaderStyle,
    LimitConfigError,
    LimitScope,
    LimitSpec,
    LimitUnit,
    LocalRateLimiter,
    StoreDownPolicy,
    compile_limit,
    refusal_status,
    response_headers,
    tightest,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(
    capacity: int = 3, refill: float = 1, per: float = 1.0, **fields: object
) -> tuple[LocalRateLimiter, FakeClock]:
    clock = FakeClock()
    compiled = compile_limit(LimitSpec("test", capacity, refill, per, **fields), clock=clock)  # type: ignore[arg-type]
    assert isinstance(compiled, LocalRateLimiter)
    return compiled, clock


def test_bucket_admits_capacity_then_refuses_with_time_to_next_token() -> None:
    bucket, _ = limiter(capacity=3, refill=1, per=1.0)
    assert [bucket.take("k").remaining for _ in range(3)] == [2, 1, 0]
    refused = bucket.take("k")
    assert not refused.allowed
    assert refused.reason is DecisionReason.OVER_LIMIT
    assert refused.retry_after == pytest.approx(1.0)
    assert refused.reset == pytest.approx(3.0)
    assert refused.limit == 3
    assert refused.policy == "test"


def test_bucket_refills_continuously_and_never_above_capacity() -> None:
    bucket, clock = limiter(capacity=3, refill=1, per=1.0)
    for _ in range(3):
        bucket.take("k")
    clock.advance(0.5)
    half = bucket.take("k")
    assert not half.allowed
    assert half.retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.take("k").allowed
    clock.advance(3600)
    assert [bucket.take("k").allowed for _ in range(4)] == [True, True, True, False]


def test_requests_per_minute_spec() -> None:
    bucket, clock = limiter(capacity=100, refill=100, per=60.0)
    assert sum(bucket.take("agent").allowed for _ in range(150)) == 100
    clock.advance(0.6)  # one token every 0.6 s
    assert bucket.take("agent").allowed
    assert not bucket.take("agent").allowed


def test_keys_have_independent_buckets() -> None:
    bucket, _ = limiter(capacity=1)
    assert bucket.take("tool-a").allowed
    assert not bucket.take("tool-a").allowed
    assert bucket.take("tool-b").allowed


def test_cost_takes_that_many_tokens_all_or_nothing() -> None:
    bucket, _ = limiter(capacity=10, refill=1, per=1.0)
    assert bucket.take("k", cost=7).remaining == 3
    refused = bucket.take("k", cost=4)
    assert not refused.allowed
    assert refused.remaining == 3  # nothing taken
    assert refused.retry_after == pytest.approx(1.0)


def test_cost_above_capacity_passes_only_from_a_full_bucket_and_leaves_debt() -> None:
    bucket, clock = limiter(capacity=10, refill=1, per=1.0)
    big = bucket.take("k", cost=25)
    assert big.allowed
    assert big.remaining == 0
    # 15 tokens of debt: the next request waits until the bucket holds 1 again.
    refused = bucket.take("k")
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(16.0)
    clock.advance(16)
    assert bucket.take("k").allowed


def test_token_unit_probe_then_charge_real_usage_into_debt() -> None:
    bucket, clock = limiter(capacity=1000, refill=1000, per=60.0, unit=LimitUnit.TOKENS)
    probe = bucket.take("ns")  # a token limit's default cost is 0: a look that takes nothing
    assert probe.allowed
    assert probe.remaining == 1000
    assert bucket.take("ns", cost=100).remaining == 900  # an explicit estimate is taken
    assert bucket.debit("ns", -100).remaining == 1000  # ... and handed back once the real usage is known
    assert bucket.debit("ns", -100).remaining == 1000  # never above the capacity
    charged = bucket.debit("ns", 1500)  # more than was left
    assert not charged.allowed
    assert charged.remaining == 0
    assert not bucket.take("ns", cost=0).allowed
    # 500 tokens of debt plus one token to admit, at 1000 tokens per 60 s.
    assert bucket.take("ns", cost=0).retry_after == pytest.approx(501 * 0.06)
    clock.advance(501 * 0.06)
    assert bucket.take("ns", cost=0).allowed


@pytest.mark.anyio
async def test_async_interface_is_the_same_bucket() -> None:
    bucket, _ = limiter(capacity=2)
    assert (await bucket.check("k")).allowed
    charged = await bucket.charge("k", 1)
    assert not charged.allowed
    assert not (await bucket.check("k")).allowed


def test_memory_is_bounded_by_max_keys_least_recently_used_first() -> None:
    bucket, _ = limiter(capacity=5, max_keys=100)
    bucket.take("hot")
    for i in range(1000):
        bucket.take(f"key-{i}")
        if i % 10 == 0:
            bucket.take("hot")  # kept recent: never evicted
    assert len(bucket) == 100
    assert bucket.evicted == 1000 + 1 - 100
    # Still drained (101 takes of 5 tokens): an evicted key would have restarted full.
    assert not bucket.take("hot").allowed


def test_idle_full_buckets_are_dropped_without_counting_as_evictions() -> None:
    bucket, clock = limiter(capacity=2, refill=1, per=1.0, max_keys=1000)
    for i in range(500):
        bucket.take(f"burst-{i}")
    assert len(bucket) == 500
    clock.advance(2)  # every bucket refilled: the same as no bucket
    for i in range(300):
        bucket.take(f"later-{i}")
    assert len(bucket) <= 300
    assert bucket.evicted == 0


def test_long_keys_are_hashed_and_stay_distinct() -> None:
    bucket, _ = limiter(capacity=1)
    first = "x" * 10_000 + "1"
    second = "x" * 10_000 + "2"
    assert bucket.take(first).allowed
    assert bucket.take(second).allowed
    assert not bucket.take(first).allowed
    assert all(len(key) <= MAX_KEY_LENGTH for key in bucket._buckets)


def test_headers_of_an_allowed_request() -> None:
    decision = Decision(True, 100, 42, 17.2, 0.0, DecisionReason.OK, "p")
    assert response_headers(decision) == [
        (b"x-ratelimit-limit", b"100"),
        (b"x-ratelimit-remaining", b"42"),
        (b"x-ratelimit-reset", b"18"),
    ]


def test_headers_and_status_of_a_refusal() -> None:
    bucket, _ = limiter(capacity=1, refill=1, per=10.0)
    bucket.take("k")
    refused = bucket.take("k")
    assert refusal_status(refused) == 429
    assert dict(response_headers(refused, HeaderStyle.DRAFT)) == {
        b"ratelimit-limit": b"1",
        b"ratelimit-remaining": b"0",
        b"ratelimit-reset": b"10",
        b"retry-after": b"10",
    }


def test_retry_after_is_at_least_one_second() -> None:
    decision = Decision(False, 10, 0, 0.01, 0.01, DecisionReason.OVER_LIMIT, "p")
    assert dict(response_headers(decision))[b"retry-after"] == b"1"


def test_store_down_refusal_is_503_without_quota_headers() -> None:
    decision = Decision(False, 10, 0, 2.0, 2.0, DecisionReason.STORE_DOWN, "p")
    assert refusal_status(decision) == 503
    assert response_headers(decision) == [(b"retry-after", b"2")]


def test_tightest_prefers_the_longest_refusal_then_the_fewest_remaining() -> None:
    a = Decision(True, 10, 5, 1.0, 0.0)
    b = Decision(True, 10, 2, 1.0, 0.0)
    c = Decision(False, 10, 0, 1.0, 3.0, DecisionReason.OVER_LIMIT)
    d = Decision(False, 10, 0, 1.0, 9.0, DecisionReason.OVER_LIMIT)
    assert tightest([a, b]) is b
    assert tightest([a, c, b, d]) is d
    assert tightest([]) is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (LimitSpec("", 1, 1), "name"),
        (LimitSpec("x", 0, 1), "capacity"),
        (LimitSpec("x", 1.5, 1), "capacity"),  # type: ignore[arg-type]
        (LimitSpec("x", True, 1), "capacity"),
        (LimitSpec("x", 1, 0), "refill"),
        (LimitSpec("x", 1, float("nan")), "refill"),
        (LimitSpec("x", 1, 1, per=-1), "per"),
        (LimitSpec("x", 1, 1, per=float("inf")), "per"),
        (LimitSpec("x", 1, 1, unit="bytes"), "unit"),
        (LimitSpec("x", 1, 1, scope="cluster"), "scope"),
        (LimitSpec("x", 1, 1, on_store_down="maybe"), "on_store_down"),
        (LimitSpec("x", 1, 1, max_keys=0), "max_keys"),
        (LimitSpec("x", 1, 1, scope="global"), "scope"),  # no Redis configured
    ],
)
def test_invalid_spec_names_the_field(spec: LimitSpec, field: str) -> None:
    with pytest.raises(LimitConfigError) as caught:
        compile_limit(spec)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_spec_accepts_enum_values_as_strings() -> None:
    compiled = compile_limit(LimitSpec("x", 5, 5, 60, unit="tokens", scope="local", on_store_down="fail_closed"))
    assert compiled.spec.unit is LimitUnit.TOKENS
    assert compiled.spec.scope is LimitScope.LOCAL
    assert compiled.spec.on_store_down is StoreDownPolicy.FAIL_CLOSED
