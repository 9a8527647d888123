"""Global limits through a real redis-server: the Lua bucket, two workers sharing one limit, Redis
stopped or paused mid-test (fail open, fail closed, counted, logged, recovered), and the RESP and
circuit cores on their own."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from dataplane.policy.ratelimit import DecisionReason, LimitConfigError, LimitSpec, compile_limit, refusal_status
from dataplane.policy.redis_limit import (
    TOKEN_BUCKET,
    Circuit,
    GlobalRateLimiter,
    LogThrottle,
    RedisClient,
    RedisReplyError,
    RedisSettings,
    RespParser,
    RespProtocolError,
    StoreUnavailable,
    encode_command,
)
from tests.conftest import free_port
from tests.peers.redis import redis_server

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(port: int, **overrides: object) -> RedisSettings:
    return RedisSettings.from_url(f"redis://127.0.0.1:{port}/0", **overrides)


def global_limit(
    redis: RedisClient, capacity: int, refill: float, per: float, clock: FakeClock | None = None, **fields: object
) -> GlobalRateLimiter:
    spec = LimitSpec("tools", capacity, refill, per, scope="global", **fields)  # type: ignore[arg-type]
    limiter = compile_limit(spec, redis=redis, clock=clock)
    assert isinstance(limiter, GlobalRateLimiter)
    return limiter


# -- RESP and the pure cores -------------------------------------------------------------------------


def test_encode_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command((b"SET", "k", 12, 0.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\n0.5\r\n"


REPLIES = b"+OK\r\n:-42\r\n$5\r\nhello\r\n$-1\r\n*3\r\n:1\r\n*1\r\n$0\r\n\r\n*-1\r\n-NOSCRIPT No matching script\r\n"


def test_parser_reads_every_resp2_type() -> None:
    replies = RespParser().feed(REPLIES)
    assert replies[:5] == ["OK", -42, b"hello", None, [1, [b""], None]]
    assert isinstance(replies[5], RedisReplyError)
    assert replies[5].code == "NOSCRIPT"
    assert len(replies) == 6


def test_parser_gives_the_same_replies_whatever_the_chunking() -> None:
    whole = RespParser().feed(REPLIES)
    for size in (1, 2, 3, 7):
        parser = RespParser()
        replies = []
        for start in range(0, len(REPLIES), size):
            replies.extend(parser.feed(REPLIES[start : start + size]))
        assert [str(r) if isinstance(r, RedisReplyError) else r for r in replies] == [
            str(r) if isinstance(r, RedisReplyError) else r for r in whole
        ]


@pytest.mark.parametrize(
    "data",
    [b"?what\r\n", b":12x\r\n", b"$5\r\nhelloXX", b"$99999999\r\n", b"*99999999\r\n", b"+" + b"a" * 70_000],
)
def test_parser_refuses_what_is_not_resp(data: bytes) -> None:
    with pytest.raises(RespProtocolError):
        RespParser().feed(data)


def test_parser_refuses_arrays_nested_too_deep() -> None:
    with pytest.raises(RespProtocolError):
        RespParser(max_depth=4).feed(b"*1\r\n" * 5 + b":1\r\n")


def test_circuit_opens_fails_fast_probes_once_and_doubles_its_backoff() -> None:
    clock = FakeClock()
    circuit = Circuit(initial=1.0, maximum=4.0, clock=clock, jitter=lambda: 1.0)
    assert circuit.allows()
    assert circuit.failed()  # opened
    assert circuit.opened == 1
    assert not circuit.allows()
    assert circuit.retry_in() == pytest.approx(1.0)
    clock.advance(1.0)
    assert circuit.allows()  # the probe
    assert not circuit.allows()  # only one per window
    assert not circuit.failed()  # already open: backoff doubles
    assert circuit.retry_in() == pytest.approx(2.0)
    clock.advance(2.0)
    circuit.allows()
    circuit.failed()
    clock.advance(4.0)
    circuit.allows()
    circuit.failed()
    assert circuit.retry_in() == pytest.approx(4.0)  # capped
    clock.advance(4.0)
    assert circuit.allows()
    assert circuit.succeeded()
    assert circuit.closed
    assert circuit.retry_in() == 0.0
    assert circuit.opened == 1


def test_log_throttle_lets_one_line_per_interval_and_counts_the_rest() -> None:
    clock = FakeClock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.ready() == 0
    assert [throttle.ready() for _ in range(5)] == [None] * 5
    clock.advance(10.0)
    assert throttle.ready() == 5


def test_settings_from_url() -> None:
    parsed = RedisSettings.from_url("rediss://agent:s%40cret@redis.internal:6380/2", call_timeout=0.02)
    assert (parsed.host, parsed.port, parsed.db) == ("redis.internal", 6380, 2)
    assert (parsed.username, parsed.password) == ("agent", "s@cret")
    assert parsed.ssl_context is not None
    assert parsed.call_timeout == 0.02


@pytest.mark.parametrize(
    ("url", "overrides", "field"),
    [
        ("http://127.0.0.1", {}, "url"),
        ("redis://127.0.0.1:99999", {}, "url"),
        ("redis://127.0.0.1/zero", {}, "url"),
        ("redis://127.0.0.1", {"call_timeout": 0}, "call_timeout"),
        ("redis://127.0.0.1", {"max_pending": 0}, "max_pending"),
        ("redis://127.0.0.1", {"initial_backoff": 5.0, "max_backoff": 1.0}, "max_backoff"),
    ],
)
def test_invalid_redis_settings_name_the_field(url: str, overrides: dict[str, object], field: str) -> None:
    with pytest.raises(LimitConfigError) as caught:
        RedisSettings.from_url(url, **overrides).validate()
    assert caught.value.field == field


# -- against redis-server ----------------------------------------------------------------------------


async def test_lua_bucket_takes_refills_and_expires_the_key() -> None:
    clock = FakeClock()
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        limit = global_limit(redis, capacity=5, refill=1, per=1.0, clock=clock)
        decisions = [await limit.check("agent-a") for _ in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
        refused = decisions[5]
        assert refused.reason is DecisionReason.OVER_LIMIT
        assert refused.retry_after == pytest.approx(1.0, abs=0.002)
        assert refused.reset == pytest.approx(5.0, abs=0.002)
        assert refusal_status(refused) == 429
        # The key lives until the bucket would be full again (+1 s), then a full bucket is no key.
        ttl = await redis.execute("PTTL", "agentgate:rl:tools:agent-a")
        assert isinstance(ttl, int)
        assert 5000 < ttl <= 6000
        clock.advance(1.0)
        assert (await limit.check("agent-a")).allowed
        assert not (await limit.check("agent-a")).allowed
        assert (await limit.check("agent-b")).allowed  # another key, another bucket


async def test_lua_bucket_on_the_redis_server_clock() -> None:
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        limit = global_limit(redis, capacity=3, refill=1, per=3600.0)
        assert [(await limit.check("k")).allowed for _ in range(4)] == [True, True, True, False]


async def test_charge_leaves_debt_in_redis() -> None:
    clock = FakeClock()
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        limit = global_limit(redis, capacity=1000, refill=1000, per=60.0, clock=clock, unit="tokens")
        assert (await limit.check("ns")).remaining == 1000  # tokens: the default check takes nothing
        assert (await limit.check("ns", cost=300)).remaining == 700  # an estimate ...
        assert (await limit.charge("ns", -300)).remaining == 1000  # ... handed back
        assert (await limit.charge("ns", -300)).remaining == 1000  # never above the capacity
        charged = await limit.charge("ns", 1500)
        assert not charged.allowed
        refused = await limit.check("ns", cost=0)
        assert not refused.allowed
        assert refused.retry_after == pytest.approx(501 * 0.06, abs=0.002)
        clock.advance(501 * 0.06)
        assert (await limit.check("ns", cost=0)).allowed


async def test_two_workers_share_one_limit() -> None:
    async with (
        redis_server() as server,
        RedisClient(settings(server.port)) as worker_a,
        RedisClient(settings(server.port)) as worker_b,
    ):
        limits = [global_limit(worker_a, 10, 1, 3600.0), global_limit(worker_b, 10, 1, 3600.0)]
        results: list[bool] = []

        async def hammer(index: int) -> None:
            for _ in range(10):
                results.append((await limits[index].check("shared")).allowed)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in (0, 1, 0, 1):
                    tg.start_soon(hammer, index)
        assert len(results) == 40
        assert results.count(True) == 10
        assert worker_a.calls > 0
        assert worker_b.calls > 0


async def test_script_flushed_from_redis_is_loaded_again() -> None:
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        limit = global_limit(redis, 5, 1, 60.0)
        assert (await limit.check("k")).remaining == 4
        assert await redis.execute("SCRIPT", "EXISTS", TOKEN_BUCKET.sha) == [1]  # loaded with the connection
        await redis.execute("SCRIPT", "FLUSH")
        assert (await limit.check("k")).remaining == 3
        assert await redis.execute("SCRIPT", "EXISTS", TOKEN_BUCKET.sha) == [1]


async def test_redis_stopped_mid_test_fails_open_or_closed_then_recovers() -> None:
    clock = FakeClock()
    port = free_port()
    redis = RedisClient(settings(port, initial_backoff=1.0, max_backoff=2.0), clock=clock)
    lenient = global_limit(redis, 100, 1, 60.0, on_store_down="fail_open")
    strict = compile_limit(
        LimitSpec("strict", 100, 1, 60.0, scope="global", on_store_down="fail_closed"), redis=redis
    )
    assert isinstance(strict, GlobalRateLimiter)
    async with redis:
        async with redis_server(port):
            assert (await lenient.check("k")).reason is DecisionReason.OK
            assert (await strict.check("k")).allowed
        # Redis is gone.
        with capture_logs() as logs:
            opened = await lenient.check("k")
            closed = await strict.check("k")
            for _ in range(5):
                await lenient.check("k")
        assert opened.allowed
        assert opened.reason is DecisionReason.STORE_DOWN
        assert not closed.allowed
        assert closed.reason is DecisionReason.STORE_DOWN
        assert refusal_status(closed) == 503
        assert closed.retry_after >= 1.0
        assert lenient.fallback.admitted == 6
        assert strict.fallback.refused == 1
        assert redis.circuit.opened == 1  # a refused connect opened the circuit ...
        assert redis.failures in (1, 2)  # (+1 if the first call still found the dead connection)
        assert redis.rejected == 6  # ... and the rest failed fast without touching the network
        events = [entry["event"] for entry in logs]
        assert events.count("redis_unavailable") == 1
        assert events.count("limit_store_down") == 2  # one per limit: the rest are throttled

        # Back on the same port: after the backoff one call probes, reconnects, and limits work again.
        async with redis_server(port):
            assert (await strict.check("k")).reason is DecisionReason.STORE_DOWN  # still backing off
            clock.advance(2.0)
            with capture_logs() as logs:
                recovered = await strict.check("k")
            assert recovered.allowed
            assert recovered.reason is DecisionReason.OK
            assert recovered.remaining == 99  # a new server: a new bucket
            assert redis.circuit.closed
            assert [entry["event"] for entry in logs] == ["redis_recovered"]
            assert (await lenient.check("k")).reason is DecisionReason.OK


async def test_slow_redis_times_out_opens_the_circuit_and_recovers() -> None:
    clock = FakeClock()
    async with redis_server() as server:
        admin = RedisClient(settings(server.port, call_timeout=5.0))
        redis = RedisClient(
            settings(server.port, call_timeout=0.2, timeouts_to_open=2, initial_backoff=1.0, max_backoff=1.0),
            clock=clock,
        )
        async with admin, redis:
            limit = global_limit(redis, 10, 1, 60.0, on_store_down="fail_closed")
            assert (await limit.check("k")).allowed
            # Writes (scripts that write) block until UNPAUSE; reads such as CLIENT UNPAUSE do not.
            assert await admin.execute("CLIENT", "PAUSE", 30_000, "WRITE") == "OK"
            with anyio.fail_after(5):
                first = await limit.check("k")
                second = await limit.check("k")
                third = await limit.check("k")
            assert [d.reason for d in (first, second, third)] == [DecisionReason.STORE_DOWN] * 3
            assert not any(d.allowed for d in (first, second, third))
            assert redis.timeouts == 2
            assert redis.circuit.opened == 1
            assert redis.rejected == 1  # the third never waited
            assert limit.fallback.refused == 3
            assert await admin.execute("CLIENT", "UNPAUSE") == "OK"
            clock.advance(1.0)
            with anyio.fail_after(5):
                again = await limit.check("k")
            assert again.allowed
            assert again.reason is DecisionReason.OK


async def test_connection_closed_by_the_server_is_replaced_transparently() -> None:
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        admin = RedisClient(settings(server.port))
        async with admin:
            limit = global_limit(redis, 10, 1, 60.0, on_store_down="fail_closed")
            assert (await limit.check("k")).remaining == 9
            killed = await admin.execute("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert killed == 1
            after = await limit.check("k")
            assert after.allowed
            assert after.reason is DecisionReason.OK
            assert after.remaining == 8
            assert redis.circuit.opened == 0


async def test_password_and_database_from_the_url() -> None:
    async with redis_server(extra_args=("--requirepass", "s3cret")) as server:
        wrong = RedisClient(RedisSettings.from_url(f"redis://:nope@127.0.0.1:{server.port}/0"))
        async with wrong:
            with pytest.raises(StoreUnavailable, match="setup refused"):
                await wrong.execute("PING")
        right = RedisClient(RedisSettings.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3"))
        async with right:
            limit = global_limit(right, 2, 1, 60.0)
            assert (await limit.check("k")).remaining == 1
            assert await right.execute("EXISTS", "agentgate:rl:tools:k") == 1
            await right.execute("SELECT", 0)  # the same connection, now on database 0
            assert await right.execute("EXISTS", "agentgate:rl:tools:k") == 0


async def test_error_reply_is_not_a_crash() -> None:
    async with redis_server() as server, RedisClient(settings(server.port)) as redis:
        await redis.execute("SET", "agentgate:rl:tools:k", "a string, not a hash")
        limit = global_limit(redis, 10, 1, 60.0, on_store_down="fail_closed")
        decision = await limit.check("k")  # WRONGTYPE from the script: handled as a store failure
        assert decision.reason is DecisionReason.STORE_DOWN
        assert not decision.allowed
        with pytest.raises(RedisReplyError):
            await redis.execute("NOSUCHCOMMAND")
        assert (await limit.check("other")).allowed  # the connection is still good


async def test_call_to_nothing_listening_is_store_unavailable() -> None:
    async with RedisClient(settings(free_port(), connect_timeout=2.0)) as redis:
        with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="refused"):
            await redis.execute("PING")
        with pytest.raises(StoreUnavailable, match="next try"):
            await redis.execute("PING")
