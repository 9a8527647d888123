"""Token budgets: calendar periods, check before / charge after, overshoot, refusal, rollover on a
fake clock, locally and in a real redis-server (period keys that expire)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dataplane.policy.budget import (
    BudgetPeriod,
    BudgetSpec,
    LocalBudget,
    RedisBudget,
    compile_budget,
    period_window,
)
from dataplane.policy.ratelimit import DecisionReason, LimitConfigError, refusal_status, response_headers
from dataplane.policy.redis_limit import RedisClient, RedisSettings
from tests.conftest import free_port
from tests.peers.redis import redis_server


def at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[misc]


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- periods -----------------------------------------------------------------------------------------


def test_day_period_ends_at_utc_midnight() -> None:
    index, left = period_window(BudgetPeriod.DAY, at(2026, 3, 1, 23, 59, 30))
    assert left == pytest.approx(30.0)
    next_index, _ = period_window(BudgetPeriod.DAY, at(2026, 3, 2, 0, 0, 0))
    assert next_index == index + 1


def test_week_period_starts_on_monday() -> None:
    monday = at(2026, 3, 2)  # a Monday
    index, left = period_window(BudgetPeriod.WEEK, monday)
    assert left == pytest.approx(7 * 86400)
    assert period_window(BudgetPeriod.WEEK, monday - 1)[0] == index - 1


def test_month_period_follows_the_calendar() -> None:
    index, left = period_window(BudgetPeriod.MONTH, at(2026, 2, 28, 12))
    assert left == pytest.approx(12 * 3600)
    assert period_window(BudgetPeriod.MONTH, at(2026, 3, 1))[0] == index + 1
    december, left = period_window(BudgetPeriod.MONTH, at(2026, 12, 31, 23))
    assert left == pytest.approx(3600)
    assert period_window(BudgetPeriod.MONTH, at(2027, 1, 1))[0] == december + 1


def test_numeric_period_is_aligned_to_the_epoch() -> None:
    assert period_window(86400.0, at(2026, 3, 1, 6)) == period_window(BudgetPeriod.DAY, at(2026, 3, 1, 6))
    assert period_window(600.0, 1200.0 + 59) == (2, pytest.approx(541.0))


# -- local -------------------------------------------------------------------------------------------


def local_budget(tokens: int, now: float, **fields: object) -> tuple[LocalBudget, WallClock]:
    clock = WallClock(now)
    budget = compile_budget(BudgetSpec("dev-team-budget", tokens, **fields), clock=clock)  # type: ignore[arg-type]
    assert isinstance(budget, LocalBudget)
    return budget, clock


def test_check_then_charge_past_the_remainder_then_refuse_until_the_period_ends() -> None:
    budget, clock = local_budget(1_000_000, at(2026, 3, 1, 22))
    first = budget.status("dev-team")
    assert first.allowed
    assert first.remaining == 1_000_000
    assert first.reset == pytest.approx(2 * 3600)
    assert budget.debit("dev-team", 999_000).remaining == 1000
    assert budget.status("dev-team").allowed  # 1000 left: the next request may start
    over = budget.debit("dev-team", 5000)  # usage is what it is: 4000 over
    assert not over.allowed
    refused = budget.status("dev-team")
    assert not refused.allowed
    assert refused.reason is DecisionReason.OVER_LIMIT
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(2 * 3600)
    assert refusal_status(refused) == 429
    assert dict(response_headers(refused))[b"retry-after"] == b"7200"
    assert budget.status("production").allowed  # another key
    # Midnight UTC: a new period, a new budget.
    clock.now = at(2026, 3, 2, 0, 0, 1)
    assert budget.status("dev-team").remaining == 1_000_000
    assert budget.debit("dev-team", 10).remaining == 999_990


@pytest.mark.anyio
async def test_async_interface() -> None:
    budget, _ = local_budget(100, at(2026, 3, 1), period="hour")
    assert (await budget.check("ns")).allowed
    assert not (await budget.charge("ns", 100)).allowed
    assert not (await budget.check("ns")).allowed


def test_negative_usage_counts_as_nothing() -> None:
    budget, _ = local_budget(100, at(2026, 3, 1))
    assert budget.debit("ns", -50).remaining == 100


def test_local_usage_is_bounded_and_past_periods_go_first() -> None:
    budget, clock = local_budget(100, at(2026, 3, 1, 12), period="hour", max_keys=50)
    for i in range(50):
        budget.debit(f"ns-{i}", 1)
    clock.now = at(2026, 3, 1, 13, 0, 1)
    for i in range(50):
        budget.debit(f"new-{i}", 1)
    assert len(budget) == 50
    assert budget.evicted == 0  # last hour's entries were dropped as worthless
    for i in range(20):
        budget.debit(f"more-{i}", 1)
    assert len(budget) == 50
    assert budget.evicted == 20


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (BudgetSpec("", 10), "name"),
        (BudgetSpec("b", 0), "tokens"),
        (BudgetSpec("b", 10, period="fortnight"), "period"),
        (BudgetSpec("b", 10, period=0.5), "period"),
        (BudgetSpec("b", 10, period=float("inf")), "period"),
        (BudgetSpec("b", 10, scope="everywhere"), "scope"),
        (BudgetSpec("b", 10, on_store_down="shrug"), "on_store_down"),
        (BudgetSpec("b", 10, max_keys=-1), "max_keys"),
        (BudgetSpec("b", 10, scope="global"), "scope"),  # no Redis configured
    ],
)
def test_invalid_budget_names_the_field(spec: BudgetSpec, field: str) -> None:
    with pytest.raises(LimitConfigError) as caught:
        compile_budget(spec)
    assert caught.value.field == field


# -- Redis -------------------------------------------------------------------------------------------


def redis_budget(redis: RedisClient, tokens: int, clock: WallClock, **fields: object) -> RedisBudget:
    spec = BudgetSpec("dev-team-budget", tokens, scope="global", **fields)  # type: ignore[arg-type]
    budget = compile_budget(spec, redis=redis, clock=clock)
    assert isinstance(budget, RedisBudget)
    return budget


@pytest.mark.anyio
async def test_redis_budget_shared_by_two_workers_with_period_keys_that_expire() -> None:
    clock = WallClock(at(2026, 3, 1, 23, 0))
    async with redis_server() as server:
        settings = RedisSettings.from_url(server.url)
        async with RedisClient(settings) as worker_a, RedisClient(settings) as worker_b:
            budget_a = redis_budget(worker_a, 1_000_000, clock)
            budget_b = redis_budget(worker_b, 1_000_000, clock)
            assert (await budget_a.check("dev-team")).remaining == 1_000_000
            assert (await budget_a.charge("dev-team", 600_000)).remaining == 400_000
            assert (await budget_b.check("dev-team")).remaining == 400_000  # the other worker sees it
            over = await budget_b.charge("dev-team", 700_000)
            assert not over.allowed
            refused = await budget_a.check("dev-team")
            assert not refused.allowed
            assert refused.retry_after == pytest.approx(3600)
            # The period's key expires a minute after the period ends.
            index, _ = period_window(BudgetPeriod.DAY, clock.now)
            key = budget_a.redis_key("dev-team", index)
            assert await worker_a.execute("GET", key) == b"1300000"
            ttl = await worker_a.execute("PTTL", key)
            assert isinstance(ttl, int)
            assert 3600_000 < ttl <= 3660_000
            # Midnight: the next period's key starts from nothing.
            clock.now = at(2026, 3, 2, 0, 0, 5)
            fresh = await budget_b.check("dev-team")
            assert fresh.allowed
            assert fresh.remaining == 1_000_000
            assert (await budget_a.charge("dev-team", 5)).remaining == 999_995


@pytest.mark.anyio
async def test_redis_budget_without_redis_follows_its_store_down_policy() -> None:
    clock = WallClock(at(2026, 3, 1))
    settings = RedisSettings.from_url(f"redis://127.0.0.1:{free_port()}/0")
    async with RedisClient(settings) as redis:
        lenient = redis_budget(redis, 100, clock)
        strict = compile_budget(
            BudgetSpec("strict", 100, scope="global", on_store_down="fail_closed"), redis=redis, clock=clock
        )
        assert isinstance(strict, RedisBudget)
        admitted = await lenient.check("ns")
        assert admitted.allowed
        assert admitted.reason is DecisionReason.STORE_DOWN
        refused = await strict.check("ns")
        assert not refused.allowed
        assert refusal_status(refused) == 503
        assert (await strict.charge("ns", 10)).reason is DecisionReason.STORE_DOWN  # usage lost, counted
        assert lenient.fallback.admitted == 1
        assert strict.fallback.refused == 2
