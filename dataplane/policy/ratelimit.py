"""Rate limits: the config model, the decision every limit returns, local token buckets, and the
429 response a refusal becomes.

A limit is a token bucket of ``capacity`` tokens refilled continuously at ``refill`` tokens per
``per`` seconds, one bucket per key. The key is an opaque string the caller computed (from a CEL
expression: an identity, a tool, a namespace), so this module knows nothing about requests.

Local limits (``scope=local``) live in the worker: each worker enforces its own bucket, so N
workers admit up to N times the limit. Global limits (``scope=global``, see ``redis_limit``) are
shared by every worker and replica through Redis.

Units: ``requests`` limits take one token per request: ``check(key)`` means cost 1. ``tokens``
limits count LLM tokens, whose number is only known after the response: ``check(key)`` means
cost 0, which admits while the bucket is not exhausted and takes nothing, and ``charge(key, used)``
takes the real usage afterwards, which may leave the bucket in debt (refusing until the refill pays
it back). An explicit ``cost`` (an estimate) overrides either default.

Response headers: ``x-ratelimit-limit``, ``x-ratelimit-remaining`` and ``x-ratelimit-reset``
(seconds until the bucket is full again) by default: the form Envoy's rate-limit filters emit and
the one most clients parse. ``HeaderStyle.DRAFT`` emits ``RateLimit-Limit/Remaining/Reset`` of
draft-ietf-httpapi-ratelimit-headers-00 to -06 instead (later drafts moved to structured
``RateLimit``/``RateLimit-Policy`` fields that few clients read yet). A refusal adds
``retry-after`` in whole seconds (at least 1).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from dataplane.policy.redis_limit import RedisClient

Clock = Callable[[], float]
E = TypeVar("E", bound=StrEnum)

# Float slack when comparing tokens: a client that waits exactly ``retry_after`` must pass.
TOKEN_EPSILON = 1e-6

# Keys longer than this are replaced by their SHA-256 so one caller-chosen key (a long header value)
# cannot grow a worker's memory or a Redis key without bound.
MAX_KEY_LENGTH = 256


class LimitConfigError(ValueError):
    """A limit or budget that cannot be compiled; names the offending field."""

    def __init__(self, name: str, field: str, message: str) -> None:
        super().__init__(f"{name or '<unnamed>'}: {field}: {message}")
        self.name = name
        self.field = field
        self.message = message


class LimitUnit(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


class LimitScope(StrEnum):
    LOCAL = "local"  # per worker process
    GLOBAL = "global"  # shared through Redis


class StoreDownPolicy(StrEnum):
    """What a global limit decides when Redis is down or slow."""

    FAIL_OPEN = "fail_open"  # admit: availability over enforcement
    FAIL_CLOSED = "fail_closed"  # refuse with 503: enforcement over availability


class DecisionReason(StrEnum):
    """Why a decision came out as it did: the reason label of the limit metrics."""

    OK = "ok"
    OVER_LIMIT = "over_limit"
    STORE_DOWN = "store_down"


# Module constants: an enum attribute lookup costs about 0.2 µs, which the hot path does not pay.
_OK = DecisionReason.OK
_OVER_LIMIT = DecisionReason.OVER_LIMIT
_STORE_DOWN = DecisionReason.STORE_DOWN


class HeaderStyle(StrEnum):
    X_RATELIMIT = "x-ratelimit"
    DRAFT = "draft"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A rate limit as configured: ``capacity`` tokens (the burst), refilled at ``refill`` tokens
    every ``per`` seconds. ``requestsPerMinute: 100`` is ``capacity=100, refill=100, per=60``."""

    name: str
    capacity: int
    refill: float
    per: float = 60.0
    unit: LimitUnit | str = LimitUnit.REQUESTS
    scope: LimitScope | str = LimitScope.LOCAL
    on_store_down: StoreDownPolicy | str = StoreDownPolicy.FAIL_OPEN
    # Local buckets kept per worker (about 0.3 KB each); the least recently used is dropped past this.
    max_keys: int = 50_000


@dataclass(slots=True)
class Decision:
    """The outcome of one check or charge. Treat as read-only: it is not frozen because a frozen
    dataclass costs about 1.5 µs to build here against 0.3 µs, on every request.

    ``remaining`` is the whole tokens left (0 when exhausted or in debt); ``reset`` the seconds
    until the bucket is full again (or the budget period ends); ``retry_after`` the seconds until
    the same request could pass (0.0 when allowed).
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float
    reason: DecisionReason = DecisionReason.OK
    policy: str = ""


class RateLimiter(Protocol):
    """What the request path calls; local and global limits both provide it."""

    spec: LimitSpec

    async def check(self, key: str, cost: int | None = None) -> Decision: ...

    async def charge(self, key: str, amount: int) -> Decision: ...


def default_cost(spec: LimitSpec) -> int:
    """What ``check(key)`` takes: one request, or (for token limits) nothing but a look."""
    return 0 if spec.unit == LimitUnit.TOKENS else 1


def bounded_key(key: str) -> str:
    """The key itself, or its SHA-256 when longer than MAX_KEY_LENGTH."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class LocalRateLimiter:
    """Token buckets for one limit, in this worker.

    One OrderedDict entry ``[tokens, updated_at]`` per key: a check refills the bucket from the
    elapsed time and takes from it, O(1), with no timer or task per bucket. A full bucket is the
    same as no bucket, so idle keys are dropped for free when the least recently used entry is
    found full; past ``max_keys`` the least recently used entry is dropped even if not full (that
    key restarts with a full bucket: under memory pressure the error is towards admitting).
    """

    __slots__ = ("_buckets", "_capacity", "_clock", "_default_cost", "_rate", "evicted", "max_keys", "name", "spec")

    def __init__(self, spec: LimitSpec, *, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self.name = spec.name
        self._capacity = float(spec.capacity)
        self._rate = spec.refill / spec.per  # tokens per second
        self._default_cost = default_cost(spec)
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.max_keys = spec.max_keys
        # Buckets dropped before they were full (the cap was reached): a metric.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: int | None = None) -> Decision:
        """Take ``cost`` tokens (default: 1 for requests, 0 for tokens) if the bucket holds them, and
        at least one token for ``cost=0``.

        A cost above the capacity is admitted only from a full bucket and leaves it in debt, so
        an oversized request is slowed down rather than refused forever.
        """
        if cost is None:
            cost = self._default_cost
        now = self._clock()
        capacity = self._capacity
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._new_bucket(key, now)
            tokens = bucket[0]
        else:
            self._buckets.move_to_end(key)
            tokens = bucket[0]
            if now > bucket[1]:
                tokens += (now - bucket[1]) * self._rate
                if tokens > capacity:
                    tokens = capacity
        need = 1.0 if cost <= 1 else min(float(cost), capacity)
        if tokens + TOKEN_EPSILON >= need:
            tokens -= cost
            bucket[0] = tokens
            bucket[1] = now
            return Decision(
                True, self.spec.capacity, int(tokens) if tokens > 0 else 0, (capacity - tokens) / self._rate, 0.0,
                _OK, self.name,
            )
        return self._decision(False, tokens, (need - tokens) / self._rate)

    def debit(self, key: str, amount: int) -> Decision:
        """Take ``amount`` tokens unconditionally (real usage after the response); the bucket may go
        into debt. A negative amount gives tokens back (an estimate taken by ``take`` that was too
        high), never above the capacity. ``allowed`` tells whether the next request would pass."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._new_bucket(key, now)
        else:
            self._buckets.move_to_end(key)
            if now > bucket[1]:
                bucket[0] = min(self._capacity, bucket[0] + (now - bucket[1]) * self._rate)
        tokens = bucket[0] - amount
        if tokens > self._capacity:  # a negative amount hands back an estimate, up to full
            tokens = self._capacity
        bucket[0] = tokens
        bucket[1] = now
        allowed = tokens + TOKEN_EPSILON >= 1.0
        return self._decision(allowed, tokens, 0.0 if allowed else (1.0 - tokens) / self._rate)

    async def check(self, key: str, cost: int | None = None) -> Decision:
        return self.take(key, cost)

    async def charge(self, key: str, amount: int) -> Decision:
        return self.debit(key, amount)

    def _new_bucket(self, key: str, now: float) -> list[float]:
        """The bucket of a key not found as given: a long key's (stored hashed), or a new full one."""
        key = bounded_key(key)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
            if now > bucket[1]:
                bucket[0] = min(self._capacity, bucket[0] + (now - bucket[1]) * self._rate)
                bucket[1] = now
            return bucket
        self._make_room(now)
        bucket = buckets[key] = [self._capacity, now]
        return bucket

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        # Drop up to two idle (refilled) buckets per new key: memory follows the active keys.
        for _ in range(2):
            if not buckets:
                return
            oldest = next(iter(buckets.values()))
            if oldest[0] + (now - oldest[1]) * self._rate < self._capacity:
                break
            buckets.popitem(last=False)
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)
            self.evicted += 1

    def _decision(self, allowed: bool, tokens: float, retry_after: float) -> Decision:
        return Decision(
            allowed,
            self.spec.capacity,
            int(tokens) if tokens > 0 else 0,
            (self._capacity - tokens) / self._rate,
            retry_after,
            _OK if allowed else _OVER_LIMIT,
            self.name,
        )


def compile_limit(spec: LimitSpec, *, redis: RedisClient | None = None, clock: Clock | None = None) -> RateLimiter:
    """Validate ``spec`` and build its limiter (config time, never on the request path).

    ``clock``: monotonic seconds for local buckets (default ``time.monotonic``); for global
    limits, ``None`` uses the Redis server's clock (one clock for every replica) and a callable
    overrides it (tests). Raises LimitConfigError naming the field.
    """
    spec = validate_limit(spec, has_redis=redis is not None)
    if spec.scope is LimitScope.GLOBAL:
        # Imported here: redis_limit builds on this module's types.
        from dataplane.policy.redis_limit import GlobalRateLimiter

        assert redis is not None
        return GlobalRateLimiter(spec, redis, clock=clock)
    return LocalRateLimiter(spec, clock=clock or time.monotonic)


def validate_limit(spec: LimitSpec, *, has_redis: bool) -> LimitSpec:
    """``spec`` with its enums normalised; LimitConfigError naming the first bad field."""
    name = spec.name
    if not isinstance(name, str) or not name:
        raise LimitConfigError(str(name or ""), "name", "must be a non-empty string")
    _positive_int(name, "capacity", spec.capacity)
    _positive_number(name, "refill", spec.refill)
    _positive_number(name, "per", spec.per)
    _positive_int(name, "max_keys", spec.max_keys)
    unit = validate_choice(name, "unit", LimitUnit, spec.unit)
    scope = validate_choice(name, "scope", LimitScope, spec.scope)
    on_store_down = validate_choice(name, "on_store_down", StoreDownPolicy, spec.on_store_down)
    if scope is LimitScope.GLOBAL and not has_redis:
        raise LimitConfigError(name, "scope", "a global limit needs a Redis store, and none is configured")
    return LimitSpec(name, spec.capacity, float(spec.refill), float(spec.per), unit, scope, on_store_down,
                     spec.max_keys)


def _positive_int(name: str, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LimitConfigError(name, field, f"must be a whole number >= 1, got {value!r}")


def _positive_number(name: str, field: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise LimitConfigError(name, field, f"must be a finite number > 0, got {value!r}")


def validate_choice(name: str, field: str, kind: type[E], value: object) -> E:
    """``value`` as a member of ``kind``; LimitConfigError listing the choices otherwise."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise LimitConfigError(name, field, f"must be one of {allowed}, got {value!r}") from None


def tightest(decisions: Iterable[Decision]) -> Decision | None:
    """The decision to answer with when several limits apply: a refusal with the longest wait,
    else the allowance with the fewest tokens left. Every limit checked has already taken its
    tokens (as in Envoy: an allowed limit is not refunded when another refuses)."""
    best: Decision | None = None
    for decision in decisions:
        if best is None:
            best = decision
        elif not decision.allowed:
            if best.allowed or decision.retry_after > best.retry_after:
                best = decision
        elif best.allowed and decision.remaining < best.remaining:
            best = decision
    return best


def refusal_status(decision: Decision) -> int:
    """429 when the limit was reached; 503 when a fail-closed limit could not reach its store (the
    client did nothing wrong, the limiter is unavailable)."""
    return 503 if decision.reason is _STORE_DOWN else 429


_NAMES = {
    HeaderStyle.X_RATELIMIT: (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset"),
    HeaderStyle.DRAFT: (b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"),
}


def response_headers(decision: Decision, style: HeaderStyle = HeaderStyle.X_RATELIMIT) -> list[tuple[bytes, bytes]]:
    """Headers for a response the decision applied to: the quota fields (omitted when the store was
    down, as nothing is known), and ``retry-after`` on a refusal."""
    headers: list[tuple[bytes, bytes]] = []
    if decision.reason is not _STORE_DOWN:
        limit, remaining, reset = _NAMES[style]
        headers.append((limit, str(decision.limit).encode()))
        headers.append((remaining, str(decision.remaining).encode()))
        headers.append((reset, str(math.ceil(decision.reset)).encode()))
    if not decision.allowed:
        headers.append((b"retry-after", str(max(1, math.ceil(decision.retry_after))).encode()))
    return headers


__all__ = [
    "MAX_KEY_LENGTH",
    "TOKEN_EPSILON",
    "Clock",
    "Decision",
    "DecisionReason",
    "HeaderStyle",
    "LimitConfigError",
    "LimitScope",
    "LimitSpec",
    "LimitUnit",
    "LocalRateLimiter",
    "RateLimiter",
    "StoreDownPolicy",
    "bounded_key",
    "compile_limit",
    "default_cost",
    "refusal_status",
    "response_headers",
    "tightest",
    "validate_choice",
    "validate_limit",
]
