"""Connection pools, one per (backend, target authority, client settings) in each worker.

HTTP/1.1 pools keep idle keep-alive connections on a LIFO stack (the most recently used
connection is the least likely to have been closed by the upstream), expire them after
the backend's idle timeout, and cap open connections at max_connections; a request that
finds the cap reached waits up to the connect timeout for a connection, then gets 503.
HTTP/2 pools multiplex streams over few connections, opening another only when every
connection is at the upstream's MAX_CONCURRENT_STREAMS.

A bodiless idempotent request is sent a second time (once) when the upstream provably
did not process it: a reused keep-alive connection closed before any response byte, or
an HTTP/2 stream refused by GOAWAY or REFUSED_STREAM.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping

import anyio

from dataplane.config.model import UpstreamCluster, UpstreamTarget
from dataplane.http.errors import (
    BackendUnavailable,
    PoolExhausted,
    ProxyError,
    RetryableUpstreamError,
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
)
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.http.stream import ByteStream
from dataplane.upstream.connect import open_connection
from dataplane.upstream.exchange import Exchange, UpstreamRequest
from dataplane.upstream.h1 import Http1Upstream
from dataplane.upstream.h2 import Http2Upstream
from shared.logging import get_logger

log = get_logger("dataplane.upstream")


class _WaitExpired(Exception):
    pass


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_exception(_WaitExpired())


def settings_key(cluster: UpstreamCluster) -> tuple[object, ...]:
    """What a connection was opened with: a pool only serves clusters that agree on it.

    TLS counts as on/off only: every config compile builds new SSLContext objects, and
    dropping every TLS pool on every update would cost more than letting established
    connections keep the context they were opened with (new ones use the new context).
    """
    return (cluster.name, cluster.protocol, cluster.ssl_context is not None, cluster.server_name)


class _Pool:
    """What both pool kinds share: identity, waiting for capacity, closing."""

    def __init__(self, cluster: UpstreamCluster, target: UpstreamTarget, limits: ProxyLimits) -> None:
        self.cluster = cluster
        self.target = target
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.last_used = self.loop.time()
        self._waiters: deque[asyncio.Future[object]] = deque()

    def _wake_one(self, value: object = None) -> bool:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(value)
                return True
        return False

    async def _wait(self, deadline: float) -> object:
        """Wait for capacity (None) or a handed-over connection; PoolExhausted past `deadline`."""
        waiter: asyncio.Future[object] = self.loop.create_future()
        self._waiters.append(waiter)
        timer = self.loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except _WaitExpired:
            cluster = self.cluster
            raise PoolExhausted(
                f"backend {cluster.name}: connection pool for {self.target.authority} exhausted "
                f"({cluster.max_connections} connections busy for {cluster.connect_timeout:g}s)"
            ) from None
        except BaseException:
            # Cancelled after a connection was handed over: give it back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._handback(waiter.result())
            raise
        finally:
            timer.cancel()

    def _handback(self, value: object) -> None:
        if value is None:
            self._wake_one()

    def _closed_error(self) -> BackendUnavailable:
        return BackendUnavailable(f"backend {self.cluster.name} was removed or changed while waiting")

    async def _connect(self, factory_protocol: asyncio.Protocol) -> asyncio.Transport:
        cluster = self.cluster
        target = self.target
        transport, _ = await open_connection(
            lambda: factory_protocol,
            target.host,
            target.port,
            authority=target.authority,
            ssl_context=cluster.ssl_context,
            server_name=cluster.server_name,
            connect_timeout=cluster.connect_timeout,
        )
        return transport


class Http1Pool(_Pool):
    """Keep-alive HTTP/1.1 connections to one target."""

    def __init__(self, cluster: UpstreamCluster, target: UpstreamTarget, limits: ProxyLimits) -> None:
        super().__init__(cluster, target, limits)
        self._idle: list[Http1Upstream] = []
        # Open plus connecting connections.
        self._count = 0

    @property
    def connection_count(self) -> int:
        return self._count

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def exchange(self, request: UpstreamRequest) -> Exchange:
        """Send a bodiless request and wait for its response head (retrying a stale connection once)."""
        conn = await self._acquire(fresh=False)
        try:
            conn.begin(request)
            await conn.response()
            return conn
        except RetryableUpstreamError as exc:
            if not request.retryable:
                raise
            log.debug("retrying on a fresh connection", reason=str(exc))
        except BaseException:
            conn.abort()
            raise
        conn = await self._acquire(fresh=True)
        try:
            conn.begin(request)
            await conn.response()
        except BaseException:
            conn.abort()
            raise
        return conn

    async def open(self, request: UpstreamRequest, body: bytes | None = None) -> Http1Upstream:
        """Send the head of a request whose body the caller streams next; with ``body``, send the
        whole request in one write (the request side is then complete; a caller that bounds its
        memory awaits ``drain()`` when ``write_paused``)."""
        conn = await self._acquire(fresh=False)
        try:
            conn.begin(request, body)
        except BaseException:
            conn.abort()
            raise
        return conn

    def _pop_idle(self) -> Http1Upstream | None:
        idle = self._idle
        if not idle:
            return None
        now = self.loop.time()
        timeout = self.cluster.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < timeout:
                return conn
            conn.close()
            self._count -= 1
        return None

    async def _acquire(self, *, fresh: bool) -> Http1Upstream:
        if self.closed:
            raise self._closed_error()
        self.last_used = self.loop.time()
        if not fresh:
            conn = self._pop_idle()
            if conn is not None:
                conn.lease()
                return conn
        deadline = self.loop.time() + self.cluster.connect_timeout
        while True:
            if self._count < self.cluster.max_connections:
                return await self._open_connection()
            handed = await self._wait(deadline)
            if self.closed:
                if isinstance(handed, Http1Upstream):
                    handed.close()
                raise self._closed_error()
            if isinstance(handed, Http1Upstream):
                handed.lease()
                return handed
            if not fresh:
                conn = self._pop_idle()
                if conn is not None:
                    conn.lease()
                    return conn

    async def _open_connection(self) -> Http1Upstream:
        self._count += 1
        try:
            stream = ByteStream(self.limits.connection_buffer_bytes)
            await self._connect(stream)
        except BaseException:
            self._count -= 1
            self._wake_one()
            raise
        conn = Http1Upstream(stream, self, self.target.authority, self.limits.max_response_head_bytes)
        conn.lease()
        return conn

    def _handback(self, value: object) -> None:
        if isinstance(value, Http1Upstream):
            self.release(value)
        else:
            self._wake_one()

    def release(self, conn: Http1Upstream) -> None:
        """A connection finished an exchange cleanly: hand it to a waiter or keep it idle."""
        if self.closed:
            conn.close()
            self._count -= 1
            return
        conn.idle_since = self.loop.time()
        if self._wake_one(conn):
            return
        self._idle.append(conn)

    def discard(self, conn: Http1Upstream) -> None:
        """A connection is gone (closed, reset, in doubt): its slot frees up."""
        self._count -= 1
        self._wake_one()

    def sweep(self, now: float) -> None:
        """Close idle connections past the idle timeout or closed by the upstream."""
        idle = self._idle
        timeout = self.cluster.idle_timeout
        kept: list[Http1Upstream] = []
        for conn in idle:
            if conn.usable and now - conn.idle_since < timeout:
                kept.append(conn)
            else:
                conn.close()
                self._count -= 1
        idle[:] = kept

    def close(self) -> None:
        """Close idle connections now; busy ones close when their exchange ends."""
        self.closed = True
        for conn in self._idle:
            conn.close()
            self._count -= 1
        self._idle.clear()
        while self._wake_one():
            pass

    @property
    def empty(self) -> bool:
        return self._count == 0


class Http2Pool(_Pool):
    """Multiplexed HTTP/2 connections to one target."""

    def __init__(self, cluster: UpstreamCluster, target: UpstreamTarget, limits: ProxyLimits) -> None:
        super().__init__(cluster, target, limits)
        self._connections: list[Http2Upstream] = []
        self._connecting: asyncio.Future[BaseException | None] | None = None
        tls = cluster.ssl_context is not None
        self._scheme = b"https" if tls else b"http"

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def exchange(self, request: UpstreamRequest) -> Exchange:
        for attempt in (0, 1):
            conn = await self._connection()
            exchange = conn.open_stream(request)
            try:
                await exchange.response()
                return exchange
            except RetryableUpstreamError as exc:
                if attempt or not request.retryable:
                    raise
                log.debug("retrying a refused stream", reason=str(exc))
            except BaseException:
                exchange.abort()
                raise
        raise AssertionError("unreachable")

    async def open(self, request: UpstreamRequest) -> Exchange:
        conn = await self._connection()
        return conn.open_stream(request)

    async def _connection(self) -> Http2Upstream:
        if self.closed:
            raise self._closed_error()
        self.last_used = self.loop.time()
        deadline = self.loop.time() + self.cluster.connect_timeout
        while True:
            for conn in self._connections:
                if conn.has_capacity:
                    return conn
            connecting = self._connecting
            if connecting is not None:
                failure = await asyncio.shield(connecting)
                if isinstance(failure, ProxyError):
                    raise type(failure)(failure.message)
                if failure is not None:
                    raise UpstreamConnectFailed(f"cannot connect to upstream {self.target.authority}: {failure}")
                continue
            if len(self._connections) < self.cluster.max_connections:
                await self._open_connection()
                continue
            await self._wait(deadline)
            if self.closed:
                raise self._closed_error()

    async def _open_connection(self) -> None:
        done: asyncio.Future[BaseException | None] = self.loop.create_future()
        self._connecting = done
        failure: BaseException | None = None
        try:
            conn = Http2Upstream(self, self.target.authority, self._scheme, self.limits)
            transport = await self._connect(conn)
            if self.cluster.ssl_context is not None:
                ssl_object = transport.get_extra_info("ssl_object")
                protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
                if protocol != "h2":
                    transport.close()
                    raise UpstreamConnectFailed(
                        f"upstream {self.target.authority} did not negotiate HTTP/2 over TLS (ALPN {protocol!r})"
                    )
            # Its SETTINGS carry the stream limit we must respect from the first request on.
            try:
                with anyio.fail_after(self.cluster.connect_timeout):
                    await conn.settings_received
            except TimeoutError:
                transport.close()
                raise UpstreamConnectTimeout(
                    f"upstream {self.target.authority} sent no HTTP/2 SETTINGS within {self.cluster.connect_timeout:g}s"
                ) from None
            except BaseException:
                transport.close()
                raise
            self._connections.append(conn)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._connecting = None
            done.set_result(failure if isinstance(failure, Exception) else None)

    def capacity_changed(self) -> None:
        self._wake_one()

    def retire(self, conn: Http2Upstream) -> None:
        """No new streams on `conn` (GOAWAY); it closes after its last stream."""
        if conn in self._connections:
            self._connections.remove(conn)
        self._wake_one()

    def discard(self, conn: Http2Upstream) -> None:
        self.retire(conn)

    def sweep(self, now: float) -> None:
        timeout = self.cluster.idle_timeout
        for conn in list(self._connections):
            if conn.active_streams == 0 and now - conn.idle_since >= timeout:
                self._connections.remove(conn)
                conn.close()

    def close(self) -> None:
        self.closed = True
        for conn in list(self._connections):
            if conn.active_streams == 0:
                conn.close()
            else:
                conn.goaway = True
        self._connections.clear()
        while self._wake_one():
            pass

    @property
    def empty(self) -> bool:
        return not self._connections


Pool = Http1Pool | Http2Pool


class UpstreamPools:
    """Every pool of a worker. Lookups by cluster identity are one dict probe on the hot path."""

    def __init__(self, limits: ProxyLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        # (id(cluster), target authority) -> pool: the per-request lookup. The pool holds the
        # cluster, so the id stays valid while the entry exists.
        self._by_identity: dict[tuple[int, str], Pool] = {}
        # (settings_key, authority) -> pool: where clusters with the same settings meet.
        self._pools: dict[tuple[tuple[object, ...], str], Pool] = {}

    def get(self, cluster: UpstreamCluster, target: UpstreamTarget) -> Pool:
        pool = self._by_identity.get((id(cluster), target.authority))
        if pool is not None and pool.cluster is cluster and not pool.closed:
            return pool
        return self._slow_get(cluster, target)

    def _slow_get(self, cluster: UpstreamCluster, target: UpstreamTarget) -> Pool:
        key = (settings_key(cluster), target.authority)
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool_class = Http2Pool if cluster.protocol == "http2" else Http1Pool
            pool = pool_class(cluster, target, self._limits)
            self._pools[key] = pool
        else:
            pool.cluster = cluster  # same connection settings: newer timeouts and limits apply
        self._by_identity[(id(cluster), target.authority)] = pool
        return pool

    def retain(self, backends: Mapping[str, UpstreamCluster]) -> None:
        """After a config swap: close pools whose backend or target is gone or whose client
        settings changed; in-flight exchanges on them finish first."""
        current: set[tuple[tuple[object, ...], str]] = set()
        for cluster in backends.values():
            cluster_key = settings_key(cluster)
            for target in cluster.targets:
                current.add((cluster_key, target.authority))
        for key, pool in list(self._pools.items()):
            if key not in current:
                pool.close()
                del self._pools[key]
            else:
                cluster = backends[pool.cluster.name]
                pool.cluster = cluster
        self._by_identity = {(id(pool.cluster), pool.target.authority): pool for pool in self._pools.values()}

    def sweep(self) -> None:
        """Expire idle connections; drop closed pools."""
        now = asyncio.get_running_loop().time()
        for pool in list(self._pools.values()):
            pool.sweep(now)
        for ident, pool in list(self._by_identity.items()):
            if pool.closed and pool.empty:
                del self._by_identity[ident]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._by_identity.clear()

    def pools(self) -> list[Pool]:
        return list(self._pools.values())
