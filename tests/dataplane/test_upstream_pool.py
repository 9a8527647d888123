"""Upstream connection pools: reuse order, expiry, doubt, limits, config updates, connect timeout."""

from __future__ import annotations

import asyncio
import socket

import anyio
import httpx
import pytest

from dataplane.http.errors import PoolExhausted, UpstreamConnectTimeout
from dataplane.upstream.exchange import UpstreamRequest
from dataplane.upstream.pool import Http1Pool, UpstreamPools
from tests.conftest import free_port
from tests.dataplane.peers.config import backend, compile_resources, listener, route, simple_config, target
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy

pytestmark = pytest.mark.anyio


def get(path: bytes = b"/") -> UpstreamRequest:
    return UpstreamRequest(b"GET", path, b"upstream", [], False, None)


async def fetch(pool: Http1Pool, path: bytes = b"/") -> bytes:
    """One bodiless exchange, read to the end (which returns the connection to the pool)."""
    exchange = await pool.exchange(get(path))
    body, complete = exchange.take_body()
    while not complete:
        piece = await exchange.read()
        body += piece
        complete = not piece
    return body


async def answer_with_connection_number(exchange: H1Exchange) -> None:
    await exchange.respond(200, b"%d" % exchange.connection_number)


def cluster_for(port: int, **options: object) -> object:
    config = compile_resources(
        listener(free_port()),
        backend(**options),
        target("default/app", port),
        route(),  # type: ignore[arg-type]
    )
    return config.backends["default/app"]


async def test_idle_connections_are_reused_most_recent_first() -> None:
    release = anyio.Event()
    both_arrived = anyio.Event()
    arrivals = 0

    async def hold_first_two(exchange: H1Exchange) -> None:
        nonlocal arrivals
        arrivals += 1
        if arrivals <= 2:
            if arrivals == 2:
                both_arrived.set()
            await release.wait()
        await answer_with_connection_number(exchange)

    async with H1Peer(hold_first_two) as peer:
        cluster = cluster_for(peer.port)
        pools = UpstreamPools()
        pool = pools.get(cluster, cluster.targets[0])  # type: ignore[attr-defined]
        assert isinstance(pool, Http1Pool)
        with anyio.fail_after(5):
            first = await pool.open(get(b"/1"))  # sent; its answer is read later
            second_task_result: list[bytes] = []

            async def second() -> None:
                second_task_result.append(await fetch(pool, b"/2"))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(second)
                await both_arrived.wait()
                release.set()
            # Connection 2 went back to the pool first; connection 1 follows now.
            await first.response()
            body, complete = first.take_body()
            while not complete:
                piece = await first.read()
                body += piece
                complete = not piece
            assert (body, second_task_result) == (b"1", [b"2"])
            assert (pool.connection_count, pool.idle_count) == (2, 2)
            # LIFO: connection 1 was released last, so it serves next.
            assert await fetch(pool, b"/3") == b"1"
        pools.close()


async def test_expired_and_closed_idle_connections_are_not_used() -> None:
    async with H1Peer(answer_with_connection_number) as peer:
        cluster = cluster_for(peer.port, idle_timeout=30)
        pools = UpstreamPools()
        pool = pools.get(cluster, cluster.targets[0])  # type: ignore[attr-defined]
        assert isinstance(pool, Http1Pool)
        with anyio.fail_after(5):
            assert await fetch(pool) == b"1"
            # The sweeper closes connections idle past the timeout.
            pool.sweep(asyncio.get_running_loop().time() + 31)
            assert (pool.connection_count, pool.idle_count) == (0, 0)
            assert await fetch(pool) == b"2"
            # An idle connection older than the timeout is skipped at acquire time too.
            pool._idle[0].idle_since -= 31
            assert await fetch(pool) == b"3"
            assert pool.connection_count == 1
        pools.close()


async def test_connection_with_stray_bytes_after_a_response_is_discarded() -> None:
    port = free_port()

    async def overlong(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/stray":
            # Two bytes more than announced: the connection can no longer be trusted.
            await exchange.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")
            await anyio.sleep_forever()
        await answer_with_connection_number(exchange)

    async with H1Peer(overlong) as peer, running_proxy(simple_config(port, peer.port)) as server:
        async with httpx.AsyncClient() as client:
            stray = await client.get(f"http://127.0.0.1:{port}/stray")
            after = await client.get(f"http://127.0.0.1:{port}/after")
        pool = server.pools.pools()[0]
        assert isinstance(pool, Http1Pool)
    assert stray.text == "ok"
    assert after.text == "2"  # a new connection: the first one was in doubt


async def test_upstream_connection_close_is_honoured() -> None:
    port = free_port()

    async def closing(exchange: H1Exchange) -> None:
        await exchange.respond(200, b"%d" % exchange.connection_number, [(b"connection", b"close")])

    async with H1Peer(closing) as peer, running_proxy(simple_config(port, peer.port)) as server:
        async with httpx.AsyncClient() as client:
            bodies = [(await client.get(f"http://127.0.0.1:{port}/")).text for _ in range(3)]
        assert server.pools.pools()[0].connection_count == 0
    assert bodies == ["1", "2", "3"]


async def test_waiting_request_gets_the_connection_released_by_another() -> None:
    port = free_port()
    first_arrived = anyio.Event()
    release = anyio.Event()

    async def first_waits(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/first":
            first_arrived.set()
            await release.wait()
        await answer_with_connection_number(exchange)

    async with H1Peer(first_waits) as peer:
        config = compile_resources(
            listener(port), backend(max_connections=1, connect_timeout=5), target("default/app", peer.port), route()
        )
        async with running_proxy(config) as server, httpx.AsyncClient() as a, httpx.AsyncClient() as b:
            results: dict[str, str] = {}

            async def call(client: httpx.AsyncClient, path: str) -> None:
                results[path] = (await client.get(f"http://127.0.0.1:{port}/{path}")).text

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(call, a, "first")
                    await first_arrived.wait()
                    tasks.start_soon(call, b, "second")
                    await anyio.wait_all_tasks_blocked()
                    pool = server.pools.pools()[0]
                    assert pool.connection_count == 1  # the second request waits, it does not connect
                    release.set()
    assert results == {"first": "1", "second": "1"}
    assert peer.connections == 1


async def test_pool_wait_times_out_as_pool_exhausted() -> None:
    release = anyio.Event()

    async def held(exchange: H1Exchange) -> None:
        await release.wait()
        await exchange.respond(200, b"x")

    async with H1Peer(held) as peer:
        cluster = cluster_for(peer.port, max_connections=1, connect_timeout=0.1)
        pools = UpstreamPools()
        pool = pools.get(cluster, cluster.targets[0])  # type: ignore[attr-defined]
        assert isinstance(pool, Http1Pool)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(fetch, pool)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(PoolExhausted, match="exhausted"):
                    await fetch(pool)
                release.set()
        pools.close()


async def test_connections_survive_a_config_update_that_keeps_the_backend() -> None:
    port = free_port()
    async with (
        H1Peer(answer_with_connection_number) as peer,
        running_proxy(simple_config(port, peer.port, version="v1")) as server,
    ):
        async with httpx.AsyncClient() as client:
            before = (await client.get(f"http://127.0.0.1:{port}/")).text
            await server.apply(simple_config(port, peer.port, version="v2"))
            after = (await client.get(f"http://127.0.0.1:{port}/")).text
        assert (before, after) == ("1", "1")
        # A config without the backend closes its pool.
        empty = compile_resources(listener(port), route(backends=[("default/other", 1)]), version="v3")
        await server.apply(empty)
        assert server.pools.pools() == []
    assert peer.connections == 1


async def test_connect_timeout_is_504() -> None:
    # A listener with a full accept queue: the kernel drops further SYNs, so connects hang.
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    filler = socket.create_connection(black_hole.getsockname())
    try:
        cluster = cluster_for(black_hole.getsockname()[1], connect_timeout=0.2)
        pools = UpstreamPools()
        pool = pools.get(cluster, cluster.targets[0])  # type: ignore[attr-defined]
        with anyio.fail_after(5), pytest.raises(UpstreamConnectTimeout) as raised:
            await fetch(pool)  # type: ignore[arg-type]
        assert raised.value.status == 504 and "timed out after 0.2s" in raised.value.message
        assert pool.connection_count == 0
        pools.close()
    finally:
        filler.close()
        black_hole.close()
