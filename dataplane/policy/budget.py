"""Token budgets: at most N LLM tokens per period per key (for example 1,000,000 a day per namespace).

A budget is checked before the request (refused with 429 and Retry-After until the period ends
once exhausted) and charged with the real usage after the response. Usage may exceed what was
left: the remainder goes negative and every later request of the period is refused. Concurrent
requests admitted while a little was left can overshoot together; the budget bounds what is
started, not what is in flight.

Periods are calendar windows in UTC: minute, hour, day (from midnight), week (from Monday),
month (from the 1st); or a number of seconds, aligned to the Unix epoch (``86400`` equals
``day``). Every replica derives the period from its own clock, so around a boundary skewed clocks
disagree for as long as they are apart.

Local budgets count in the worker (each worker holds its own budget). Global budgets count in
Redis, one key per (budget, period, key) that expires shortly after its period: a ``check``
script reads the usage and a ``charge`` script adds to it, both by EVALSHA like the rate limits.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from dataplane.policy.ratelimit import (
    Clock,
    Decision,
    DecisionReason,
    LimitConfigError,
    LimitScope,
    StoreDownPolicy,
    bounded_key,
    validate_choice,
)
from dataplane.policy.redis_limit import (
    RedisClient,
    RedisReplyError,
    Script,
    StoreFallback,
    StoreUnavailable,
)

_OK = DecisionReason.OK
_OVER_LIMIT = DecisionReason.OVER_LIMIT


class BudgetPeriod(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


_SECONDS = {BudgetPeriod.MINUTE: 60, BudgetPeriod.HOUR: 3600, BudgetPeriod.DAY: 86400, BudgetPeriod.WEEK: 604800}
# 1970-01-01 was a Thursday: shifting by three days puts week boundaries on Mondays.
_WEEK_OFFSET = 3 * 86400
# A period's Redis key outlives the period by this much, so a replica whose clock lags still finds it.
_KEY_GRACE_MS = 60_000


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """``tokens`` per ``period`` per key (a BudgetPeriod, its name, or seconds)."""

    name: str
    tokens: int
    period: BudgetPeriod | str | float = BudgetPeriod.DAY
    scope: LimitScope | str = LimitScope.LOCAL
    on_store_down: StoreDownPolicy | str = StoreDownPolicy.FAIL_OPEN
    # Local usage entries kept per worker (about 0.3 KB each); the least recently used is dropped past this.
    max_keys: int = 50_000


def period_window(period: BudgetPeriod | float, now: float) -> tuple[int, float]:
    """The index of the period holding ``now`` (Unix seconds) and the seconds until it ends."""
    if period is BudgetPeriod.MONTH:
        moment = datetime.fromtimestamp(now, UTC)
        index = moment.year * 12 + moment.month - 1
        year, month = divmod(index + 1, 12)
        return index, datetime(year, month + 1, 1, tzinfo=UTC).timestamp() - now
    if isinstance(period, BudgetPeriod):
        length: float = _SECONDS[period]
        offset = _WEEK_OFFSET if period is BudgetPeriod.WEEK else 0
    else:
        length, offset = period, 0
    index = math.floor((now + offset) / length)
    return index, (index + 1) * length - offset - now


class TokenBudget(Protocol):
    """What the request path calls; local and global budgets both provide it."""

    spec: BudgetSpec

    async def check(self, key: str) -> Decision: ...

    async def charge(self, key: str, tokens: int) -> Decision: ...


def _decision(spec: BudgetSpec, used: int, reset: float) -> Decision:
    allowed = used < spec.tokens
    return Decision(
        allowed,
        spec.tokens,
        spec.tokens - used if allowed else 0,
        reset,
        0.0 if allowed else reset,
        _OK if allowed else _OVER_LIMIT,
        spec.name,
    )


class LocalBudget:
    """Usage per key for the current period, in this worker. An entry of a past period is the same
    as none, so those are dropped as new keys arrive; past ``max_keys`` the least recently used entry
    is dropped (its usage forgotten: the error is towards admitting)."""

    __slots__ = ("_clock", "_period", "_usage", "evicted", "spec")

    def __init__(self, spec: BudgetSpec, *, clock: Clock = time.time) -> None:
        self.spec = spec
        self._period: BudgetPeriod | float = spec.period  # type: ignore[assignment]
        self._clock = clock
        self._usage: OrderedDict[str, list[int]] = OrderedDict()  # key -> [period index, tokens used]
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._usage)

    def status(self, key: str) -> Decision:
        """Admit while the period's usage is below the budget; takes nothing."""
        index, reset = period_window(self._period, self._clock())
        entry = self._usage.get(bounded_key(key))
        used = entry[1] if entry is not None and entry[0] == index else 0
        return _decision(self.spec, used, reset)

    def debit(self, key: str, tokens: int) -> Decision:
        """Add real usage (negative amounts count as 0); ``allowed`` tells whether the next request
        would pass."""
        index, reset = period_window(self._period, self._clock())
        key = bounded_key(key)
        usage = self._usage
        entry = usage.get(key)
        if entry is None:
            self._make_room(index)
            entry = usage[key] = [index, 0]
        else:
            usage.move_to_end(key)
            if entry[0] != index:
                entry[0], entry[1] = index, 0
        entry[1] += max(tokens, 0)
        return _decision(self.spec, entry[1], reset)

    async def check(self, key: str) -> Decision:
        return self.status(key)

    async def charge(self, key: str, tokens: int) -> Decision:
        return self.debit(key, tokens)

    def _make_room(self, index: int) -> None:
        usage = self._usage
        for _ in range(2):
            if not usage or next(iter(usage.values()))[0] == index:
                break
            usage.popitem(last=False)
        while len(usage) >= self.spec.max_keys:
            usage.popitem(last=False)
            self.evicted += 1


# KEYS[1]: tokens used in the period. Returns them (0 before the first charge).
BUDGET_CHECK = Script.of("""
return tonumber(redis.call('GET', KEYS[1]) or '0')
""")

# KEYS[1]: tokens used in the period; ARGV[1]: tokens to add; ARGV[2]: ms the key outlives its period.
# Returns the new usage.
BUDGET_CHARGE = Script.of("""
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return used
""")


class RedisBudget:
    """A budget counted in Redis, shared by every worker and replica. ``clock`` is wall time (Unix
    seconds) and picks the period key."""

    __slots__ = ("_clock", "_period", "_prefix", "_redis", "fallback", "spec")

    def __init__(self, spec: BudgetSpec, redis: RedisClient, *, clock: Clock = time.time) -> None:
        self.spec = spec
        self._period: BudgetPeriod | float = spec.period  # type: ignore[assignment]
        self._redis = redis
        self._clock = clock
        self._prefix = f"{redis.settings.key_prefix}budget:{spec.name}:"
        self.fallback = StoreFallback("budget", spec.name, StoreDownPolicy(spec.on_store_down))
        redis.register(BUDGET_CHECK)
        redis.register(BUDGET_CHARGE)

    def redis_key(self, key: str, index: int) -> str:
        return f"{self._prefix}{index}:{bounded_key(key)}"

    async def check(self, key: str) -> Decision:
        index, reset = period_window(self._period, self._clock())
        try:
            used = await self._redis.run_script(BUDGET_CHECK, (self.redis_key(key, index),), ())
        except (StoreUnavailable, RedisReplyError) as exc:
            return self._store_down(exc)
        return _decision(self.spec, used if isinstance(used, int) else 0, reset)

    async def charge(self, key: str, tokens: int) -> Decision:
        index, reset = period_window(self._period, self._clock())
        ttl_ms = math.ceil(reset * 1000) + _KEY_GRACE_MS
        try:
            used = await self._redis.run_script(
                BUDGET_CHARGE, (self.redis_key(key, index),), (max(tokens, 0), ttl_ms)
            )
        except (StoreUnavailable, RedisReplyError) as exc:
            return self._store_down(exc)
        return _decision(self.spec, used if isinstance(used, int) else 0, reset)

    def _store_down(self, error: Exception) -> Decision:
        return self.fallback.decide(error, self.spec.tokens, self._redis.circuit.retry_in())


def compile_budget(spec: BudgetSpec, *, redis: RedisClient | None = None, clock: Clock = time.time) -> TokenBudget:
    """Validate ``spec`` and build its budget (config time). ``clock`` is wall time in Unix seconds.
    Raises LimitConfigError naming the field."""
    spec = validate_budget(spec, has_redis=redis is not None)
    if spec.scope is LimitScope.GLOBAL:
        assert redis is not None
        return RedisBudget(spec, redis, clock=clock)
    return LocalBudget(spec, clock=clock)


def validate_budget(spec: BudgetSpec, *, has_redis: bool) -> BudgetSpec:
    """``spec`` with its enums normalised; LimitConfigError naming the first bad field."""
    name = spec.name
    if not isinstance(name, str) or not name:
        raise LimitConfigError(str(name or ""), "name", "must be a non-empty string")
    for field, value in (("tokens", spec.tokens), ("max_keys", spec.max_keys)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LimitConfigError(name, field, f"must be a whole number >= 1, got {value!r}")
    period = spec.period
    if isinstance(period, int | float) and not isinstance(period, bool):
        if not math.isfinite(period) or period < 1:
            raise LimitConfigError(name, "period", f"must be at least 1 second, got {period!r}")
        period = float(period)
    else:
        period = validate_choice(name, "period", BudgetPeriod, period)
    scope = validate_choice(name, "scope", LimitScope, spec.scope)
    on_store_down = validate_choice(name, "on_store_down", StoreDownPolicy, spec.on_store_down)
    if scope is LimitScope.GLOBAL and not has_redis:
        raise LimitConfigError(name, "scope", "a global budget needs a Redis store, and none is configured")
    return BudgetSpec(name, spec.tokens, period, scope, on_store_down, spec.max_keys)


__all__ = [
    "BUDGET_CHARGE",
    "BUDGET_CHECK",
    "BudgetPeriod",
    "BudgetSpec",
    "LocalBudget",
    "RedisBudget",
    "TokenBudget",
    "compile_budget",
    "period_window",
    "validate_budget",
]
