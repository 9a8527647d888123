"""Global rate limits shared by every worker and replica through Redis.

Each check is one EVALSHA of a Lua token-bucket script, so the read-refill-take-write of a bucket
is atomic in Redis whatever the number of workers. Scripts are loaded with SCRIPT LOAD when a
connection opens, and again if Redis answers NOSCRIPT (restart, SCRIPT FLUSH, failover).

The client is a small RESP2 client on an asyncio Protocol rather than redis-py: measured here on
loopback, a redis-py ``evalsha`` costs about 150 µs of Python per call against about 30 µs for a
bare protocol, and the limiter needs only EVALSHA, SCRIPT LOAD, AUTH and SELECT. One pipelined
connection per worker carries every concurrent call (replies come back in request order), so there
is no pool to wait on; Redis executes commands one at a time anyway.

When Redis is down or slow: each call has a short timeout; a refused connection, or
``timeouts_to_open`` timeouts in a row, open a circuit so a dead Redis is not hit on every request;
after a backoff (doubling, with jitter) one call probes it again. Meanwhile each limit decides as
configured (fail open: admit; fail closed: refuse with 503), counts, and logs at most once per
interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

import anyio

from dataplane.policy.ratelimit import (
    Clock,
    Decision,
    DecisionReason,
    LimitConfigError,
    LimitSpec,
    StoreDownPolicy,
    bounded_key,
    default_cost,
)
from shared.logging import get_logger

log = get_logger("dataplane.policy.limits")

_OK = DecisionReason.OK
_OVER_LIMIT = DecisionReason.OVER_LIMIT

# A RESP2 reply: simple string (str), error (RedisReplyError), integer, bulk (bytes or None), array.
Reply: TypeAlias = "str | int | bytes | RedisReplyError | list[Reply] | None"
Arg = bytes | str | int | float


class RedisReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class RespProtocolError(Exception):
    """Bytes from the server that are not RESP2: the connection is dropped."""


class StoreUnavailable(Exception):
    """Redis could not answer in time: down, slow, unreachable, or the circuit is open."""


class _CallTimedOut(Exception):
    pass


class _ConnectionLost(Exception):
    pass


# -- RESP2 (sans-I/O) ------------------------------------------------------------------------------


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(float(arg)).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_INCOMPLETE = object()


class RespParser:
    """Turns bytes from Redis into replies. Keeps a partial reply until the rest arrives; bounds
    what a broken or hostile server can make it hold."""

    __slots__ = ("_buffer", "max_bulk", "max_depth", "max_items", "max_line")

    def __init__(
        self, *, max_bulk: int = 1 << 20, max_items: int = 1 << 16, max_depth: int = 8, max_line: int = 1 << 16
    ) -> None:
        self._buffer = b""
        self.max_line = max_line
        self.max_bulk = max_bulk
        self.max_items = max_items
        self.max_depth = max_depth

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buffer + data if self._buffer else data
        replies: list[Reply] = []
        pos = 0
        end = len(buf)
        while pos < end:
            parsed = self._parse(buf, pos, 0)
            if parsed is _INCOMPLETE:
                break
            reply, pos = parsed  # type: ignore[misc]
            replies.append(reply)
        self._buffer = buf[pos:]
        if len(self._buffer) > self.max_bulk + self.max_line:
            raise RespProtocolError("reply larger than the parser accepts")
        return replies

    def _parse(self, buf: bytes, pos: int, depth: int) -> tuple[Reply, int] | object:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > self.max_line:
                raise RespProtocolError("RESP line too long")
            return _INCOMPLETE
        kind = buf[pos]
        line = buf[pos + 1 : eol]
        after = eol + 2
        try:
            if kind == 0x3A:  # ':'
                return int(line), after
            if kind == 0x24:  # '$'
                size = int(line)
                if size < 0:
                    return None, after
                if size > self.max_bulk:
                    raise RespProtocolError(f"bulk string of {size} bytes")
                if len(buf) < after + size + 2:
                    return _INCOMPLETE
                if buf[after + size : after + size + 2] != b"\r\n":
                    raise RespProtocolError("bulk string not terminated by CRLF")
                return buf[after : after + size], after + size + 2
            if kind == 0x2A:  # '*'
                count = int(line)
                if count < 0:
                    return None, after
                if count > self.max_items or depth >= self.max_depth:
                    raise RespProtocolError("array too large or too deep")
                items: list[Reply] = []
                for _ in range(count):
                    parsed = self._parse(buf, after, depth + 1)
                    if parsed is _INCOMPLETE:
                        return _INCOMPLETE
                    item, after = parsed  # type: ignore[misc]
                    items.append(item)
                return items, after
            if kind == 0x2B:  # '+'
                return line.decode("utf-8", "replace"), after
            if kind == 0x2D:  # '-'
                return RedisReplyError(line.decode("utf-8", "replace")), after
        except ValueError:
            raise RespProtocolError(f"malformed RESP line {line[:32]!r}") from None
        raise RespProtocolError(f"unknown RESP type byte {bytes([kind])!r}")


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, computed here so EVALSHA needs no round trip first."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())

    def command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
        return encode_command((b"EVALSHA", self.sha, len(keys), *keys, *args))


# -- availability: circuit and throttled logging (pure, clocked) ---------------------------------


class Circuit:
    """Closed while Redis answers. A failure opens it for a backoff (doubling from ``initial`` to
    ``maximum``, with jitter between half and all of it); then one caller probes, and success
    closes it. While open, calls fail at once instead of waiting on a dead server."""

    __slots__ = ("_backoff", "_clock", "_jitter", "_retry_at", "closed", "initial", "maximum", "opened")

    def __init__(
        self,
        *,
        initial: float = 0.5,
        maximum: float = 10.0,
        clock: Clock = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._jitter = jitter
        self._backoff = 0.0
        self._retry_at = 0.0
        self.closed = True
        self.opened = 0  # times the circuit opened: a metric

    def allows(self) -> bool:
        """May a call try Redis now? An open circuit lets one probe through per backoff window."""
        if self.closed:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff
        return True

    def failed(self) -> bool:
        """Record a failure; True when it opened a closed circuit."""
        was_closed = self.closed
        self._backoff = self.initial if was_closed else min(self.maximum, self._backoff * 2)
        self._retry_at = self._clock() + self._backoff * (0.5 + 0.5 * self._jitter())
        self.closed = False
        if was_closed:
            self.opened += 1
        return was_closed

    def succeeded(self) -> bool:
        """Record a success; True when it closed an open circuit."""
        was_open = not self.closed
        self.closed = True
        self._backoff = 0.0
        return was_open

    def retry_in(self) -> float:
        return 0.0 if self.closed else max(0.0, self._retry_at - self._clock())


class LogThrottle:
    """At most one log line per ``interval`` seconds for one recurring condition; reports how many
    were suppressed in between, so a dead Redis under load does not flood the logs."""

    __slots__ = ("_clock", "_next", "_suppressed", "interval")

    def __init__(self, interval: float = 10.0, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -math.inf
        self._suppressed = 0

    def ready(self) -> int | None:
        """The number suppressed since the last line if a line may be logged now, else None."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self.interval
        return suppressed


# -- the client -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where Redis is and how long to wait for it. ``from_url`` reads ``redis://[user:pass@]host:port/db``
    (``rediss://`` for TLS)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 0.5
    call_timeout: float = 0.1
    timeouts_to_open: int = 3
    initial_backoff: float = 0.5
    max_backoff: float = 10.0
    max_pending: int = 10_000
    key_prefix: str = "agentgate:"

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> RedisSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise LimitConfigError("redis", "url", f"scheme must be redis or rediss, got {parts.scheme!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise LimitConfigError("redis", "url", "port is not a number in 1-65535") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise LimitConfigError("redis", "url", f"database must be a number, got {path!r}")
        settings = cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl_context=ssl.create_default_context() if parts.scheme == "rediss" else None,
        )
        return replace(settings, **overrides)  # type: ignore[arg-type]

    def validate(self) -> RedisSettings:
        for field in ("connect_timeout", "call_timeout", "initial_backoff", "max_backoff"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise LimitConfigError("redis", field, f"must be a finite number > 0, got {value!r}")
        for field in ("timeouts_to_open", "max_pending"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise LimitConfigError("redis", field, f"must be a whole number >= 1, got {value!r}")
        if self.max_backoff < self.initial_backoff:
            raise LimitConfigError("redis", "max_backoff", "must not be below initial_backoff")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _expire(waiter: asyncio.Future[Reply]) -> None:
    if not waiter.done():
        waiter.set_exception(_CallTimedOut())


class _Connection(asyncio.Protocol):
    """One pipelined connection: requests are written as they come, replies resolve the waiters in
    order. A waiter that timed out or was cancelled stays in line and its reply is dropped."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = RespParser()
        self.pending: deque[asyncio.Future[Reply]] = deque()
        self.closed = False
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except RespProtocolError as exc:
            log.error("redis_protocol_error", error=str(exc))
            self.close()
            return
        pending = self.pending
        for reply in replies:
            if not pending:
                log.error("redis_protocol_error", error="reply without a request")
                self.close()
                return
            waiter = pending.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending()
        self._on_lost(self)

    def send(self, payload: bytes) -> asyncio.Future[Reply]:
        waiter: asyncio.Future[Reply] = self.loop.create_future()
        self.pending.append(waiter)
        assert self.transport is not None
        self.transport.write(payload)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail_pending()

    def _fail_pending(self) -> None:
        self.closed = True
        pending = self.pending
        while pending:
            waiter = pending.popleft()
            if not waiter.done():
                waiter.set_exception(_ConnectionLost())


class RedisClient:
    """A worker's connection to Redis, with a per-call timeout and a circuit breaker.

    Use as ``async with RedisClient(settings) as redis:``; the connection opens on first use.
    Counters for the metrics: ``calls``, ``timeouts``, ``failures`` (refused or lost connections,
    timeouts), ``rejected`` (calls refused at once: circuit open or too many in flight), and
    ``circuit.opened``.
    """

    def __init__(self, settings: RedisSettings, *, clock: Clock = time.monotonic) -> None:
        self.settings = settings.validate()
        self.circuit = Circuit(initial=settings.initial_backoff, maximum=settings.max_backoff, clock=clock)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._scripts: dict[str, Script] = {}
        self._timeouts_in_row = 0
        self._closed = False
        self.calls = 0
        self.timeouts = 0
        self.failures = 0
        self.rejected = 0

    async def __aenter__(self) -> RedisClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def register(self, script: Script) -> None:
        """Load ``script`` on every new connection (and on NOSCRIPT)."""
        self._scripts[script.sha] = script

    async def execute(self, *args: Arg) -> Reply:
        """Run one command; an error reply raises RedisReplyError, no answer StoreUnavailable."""
        return await self._call(encode_command(args))

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """EVALSHA ``script``; on NOSCRIPT load it and run it once more."""
        payload = script.command(keys, args)
        try:
            return await self._call(payload)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        self._scripts[script.sha] = script
        await self._call(encode_command((b"SCRIPT", b"LOAD", script.source)))
        return await self._call(payload)

    async def _call(self, payload: bytes, *, retry: bool = True) -> Reply:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        if len(conn.pending) >= self.settings.max_pending:
            self.rejected += 1
            raise StoreUnavailable(f"redis {self.settings.address}: {len(conn.pending)} calls in flight")
        self.calls += 1
        waiter = conn.send(payload)
        timer = conn.loop.call_later(self.settings.call_timeout, _expire, waiter)
        try:
            reply = await waiter
        except _CallTimedOut:
            self._timed_out(conn)
            raise StoreUnavailable(
                f"redis {self.settings.address}: no reply within {self.settings.call_timeout:g}s"
            ) from None
        except _ConnectionLost:
            self.failures += 1
            if retry and not self._closed:
                # Most often a connection the server (or a load balancer) closed while idle, found
                # closed only on use: once more on a new one. Should Redis have run the command
                # before dying, a bucket loses one token too many.
                return await self._call(payload, retry=False)
            raise StoreUnavailable(f"redis {self.settings.address}: connection lost") from None
        finally:
            timer.cancel()
        self._timeouts_in_row = 0
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def _timed_out(self, conn: _Connection) -> None:
        self.timeouts += 1
        self.failures += 1
        self._timeouts_in_row += 1
        if self._timeouts_in_row >= self.settings.timeouts_to_open and not conn.closed:
            self._timeouts_in_row = 0
            conn.close()
            self._open_circuit(f"{self.settings.timeouts_to_open} calls in a row timed out")

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connection(self) -> _Connection:
        """The open connection, opening it if the circuit allows; StoreUnavailable otherwise."""
        if self._closed:
            raise StoreUnavailable("redis client closed")
        connecting = self._connecting
        if connecting is not None:
            if not self.circuit.closed:  # a probe is under way: do not queue behind it
                self.rejected += 1
                raise StoreUnavailable(f"redis {self.settings.address}: reconnecting")
            return await asyncio.shield(connecting)
        if not self.circuit.allows():
            self.rejected += 1
            raise StoreUnavailable(
                f"redis {self.settings.address}: unavailable, next try in {self.circuit.retry_in():.1f}s"
            )
        connecting = self._connecting = asyncio.get_running_loop().create_future()
        try:
            conn = await self._open()
        except BaseException as exc:
            reason = _describe(exc)
            if isinstance(exc, Exception):  # not a cancellation of this caller: Redis failed
                self.failures += 1
                self._open_circuit(reason)
            failure = StoreUnavailable(f"redis {self.settings.address}: {reason}")
            connecting.set_exception(failure)
            connecting.exception()  # retrieved: nobody may be waiting
            if isinstance(exc, Exception):
                raise failure from None
            raise
        else:
            if self.circuit.succeeded():
                log.info("redis_recovered", address=self.settings.address)
            self._conn = conn
            connecting.set_result(conn)
            return conn
        finally:
            self._connecting = None

    async def _open(self) -> _Connection:
        settings = self.settings
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            with anyio.fail_after(settings.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._lost),
                    settings.host,
                    settings.port,
                    ssl=settings.ssl_context,
                    server_hostname=settings.host if settings.ssl_context is not None else None,
                )
                setup: list[tuple[Arg, ...]] = []
                if settings.password is not None:
                    auth: tuple[Arg, ...] = (b"AUTH", settings.password)
                    setup.append(auth if settings.username is None else (b"AUTH", settings.username, settings.password))
                if settings.db:
                    setup.append((b"SELECT", settings.db))
                setup.extend((b"SCRIPT", b"LOAD", script.source) for script in self._scripts.values())
                waiters = [conn.send(encode_command(command)) for command in setup]
                for waiter in waiters:
                    reply = await waiter
                    if isinstance(reply, RedisReplyError):
                        raise reply
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    def _open_circuit(self, reason: str) -> None:
        if self.circuit.failed():
            log.warning(
                "redis_unavailable", address=self.settings.address, error=reason,
                retry_in=round(self.circuit.retry_in(), 3),
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, RedisReplyError):
        return f"setup refused: {exc}"
    if isinstance(exc, _ConnectionLost):
        return "connection lost during setup"
    return type(exc).__name__


# -- what a limit does without its store -----------------------------------------------------------


class StoreFallback:
    """The configured behaviour of one Redis-backed limit or budget when Redis cannot answer:
    the decision (admit or refuse with 503), the counts (``admitted``, ``refused``: metrics) and a
    throttled warning."""

    __slots__ = ("_throttle", "admitted", "kind", "name", "policy", "refused")

    def __init__(self, kind: str, name: str, policy: StoreDownPolicy, *, clock: Clock = time.monotonic) -> None:
        self.kind = kind
        self.name = name
        self.policy = policy
        self._throttle = LogThrottle(10.0, clock)
        self.admitted = 0
        self.refused = 0

    def decide(self, error: Exception, limit: int, retry_after: float) -> Decision:
        fail_open = self.policy is StoreDownPolicy.FAIL_OPEN
        if fail_open:
            self.admitted += 1
        else:
            self.refused += 1
        suppressed = self._throttle.ready()
        if suppressed is not None:
            log.warning(
                "limit_store_down", kind=self.kind, limit=self.name, behaviour=self.policy.value,
                error=str(error), suppressed=suppressed,
            )
        if fail_open:
            return Decision(True, limit, limit, 0.0, 0.0, DecisionReason.STORE_DOWN, self.name)
        wait = max(1.0, retry_after)
        return Decision(False, limit, 0, wait, wait, DecisionReason.STORE_DOWN, self.name)


# -- the global token bucket -----------------------------------------------------------------------

# KEYS[1]: the bucket, a hash {t: tokens, ts: milliseconds}.
# ARGV: capacity, refill per millisecond, cost, "1" to charge unconditionally, now in ms ("" = Redis TIME).
# Returns {allowed, floor(tokens left), ms until full, ms until the request could pass}.
# A full bucket is the same as none, so the key expires once it would have refilled.
TOKEN_BUCKET = Script.of("""
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local charge = ARGV[4] == '1'
local now = tonumber(ARGV[5])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if not tokens or not ts then
  tokens = capacity
elseif now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
else
  now = ts
end
local need = math.min(math.max(cost, 1), capacity)
local allowed = charge or tokens + 1e-6 >= need
local retry = 0
if allowed then
  tokens = math.min(capacity, tokens - cost)
  if cost ~= 0 then
    redis.call('HSET', KEYS[1], 't', tokens, 'ts', now)
    redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate) + 1000)
  end
  if charge and tokens + 1e-6 < 1 then
    allowed = false
    retry = math.ceil((1 - tokens) / rate)
  end
else
  retry = math.ceil((need - tokens) / rate)
end
return {allowed and 1 or 0, math.floor(tokens), math.ceil((capacity - tokens) / rate), retry}
""")


class GlobalRateLimiter:
    """A token bucket per key in Redis, shared by every worker and replica; the same semantics as
    LocalRateLimiter (``check`` takes, ``charge`` takes unconditionally and may leave debt).

    ``clock`` (seconds) replaces the Redis server's clock: tests drive refills with it. Leave it
    None in production so replicas with skewed clocks still agree.
    """

    __slots__ = (
        "_capacity_arg", "_clock", "_default_cost", "_prefix", "_rate_arg", "_redis", "fallback", "name", "spec",
    )

    def __init__(self, spec: LimitSpec, redis: RedisClient, *, clock: Clock | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._redis = redis
        self._clock = clock
        self._prefix = f"{redis.settings.key_prefix}rl:{spec.name}:"
        self._capacity_arg = b"%d" % spec.capacity
        self._rate_arg = repr(spec.refill / spec.per / 1000.0).encode()
        self._default_cost = default_cost(spec)
        self.fallback = StoreFallback("rate_limit", spec.name, StoreDownPolicy(spec.on_store_down))
        redis.register(TOKEN_BUCKET)

    async def check(self, key: str, cost: int | None = None) -> Decision:
        return await self._run(key, self._default_cost if cost is None else cost, b"0")

    async def charge(self, key: str, amount: int) -> Decision:
        return await self._run(key, amount, b"1")

    async def _run(self, key: str, cost: int, charge: bytes) -> Decision:
        now = b"" if self._clock is None else repr(self._clock() * 1000.0).encode()
        redis = self._redis
        try:
            reply = await redis.run_script(
                TOKEN_BUCKET,
                (self._prefix + bounded_key(key),),
                (self._capacity_arg, self._rate_arg, cost, charge, now),
            )
            allowed, tokens, reset_ms, retry_ms = reply  # type: ignore[misc]
        except (StoreUnavailable, RedisReplyError, ValueError, TypeError) as exc:
            return self.fallback.decide(exc, self.spec.capacity, redis.circuit.retry_in())
        return Decision(
            allowed == 1,
            self.spec.capacity,
            tokens if tokens > 0 else 0,
            reset_ms / 1000.0,
            retry_ms / 1000.0,
            _OK if allowed == 1 else _OVER_LIMIT,
            self.name,
        )


__all__ = [
    "TOKEN_BUCKET",
    "Circuit",
    "GlobalRateLimiter",
    "LogThrottle",
    "RedisClient",
    "RedisReplyError",
    "RedisSettings",
    "RespParser",
    "RespProtocolError",
    "Script",
    "StoreFallback",
    "StoreUnavailable",
    "encode_command",
]
