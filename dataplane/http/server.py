"""The proxy server of one worker: listening sockets, connection tasks, config swaps, draining.

`apply` is make-before-break: it binds the sockets a new config needs first (with
SO_REUSEPORT, so the worker processes of a gateway share each port and a changed listener
can be re-bound beside its predecessor), and only if every bind succeeds swaps the
config reference in one assignment, then stops accepting on sockets the config dropped.
Connections accepted there finish their in-flight request and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from dataplane.config.model import ListenerGroup, RuntimeConfig, ServerTlsSettings
from dataplane.http.h1server import Http1Connection
from dataplane.http.h2server import PREFACE, Http2Connection
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.http.proxy import ProxyHandler
from dataplane.http.stream import ByteStream, ReadTimeout
from dataplane.policy.chain import WorkerPolicies
from dataplane.upstream.pool import UpstreamPools
from shared.logging import get_logger

log = get_logger("dataplane.server")

_BACKLOG = 1024
_POOL_SWEEP_INTERVAL = 5.0
_ACCEPT_RETRY_DELAY = 0.1

Connection = Http1Connection | Http2Connection


class ListenerBindError(Exception):
    """A listener's socket could not be bound; the update was not applied."""

    def __init__(self, failures: list[tuple[ListenerGroup, OSError]]) -> None:
        self.failures = failures
        self.listeners = tuple(name for group, _ in failures for name in group.listener_names)
        parts = [
            f"cannot bind listener {', '.join(group.listener_names) or '?'} on "
            f"{group.address}:{group.port}: {exc.strerror or exc}"
            for group, exc in failures
        ]
        super().__init__("; ".join(parts))


class _BoundListener:
    """One listening socket and the connections it accepted."""

    def __init__(self, group: ListenerGroup, sock: socket.socket) -> None:
        self.key = (group.address, group.port)
        self.bind_key = group.bind_key
        self.names = group.listener_names
        self.tls: ServerTlsSettings | None = group.tls
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.connections: set[Connection] = set()
        self.scope = anyio.CancelScope()
        self.accepting = False
        self.stopped = False

    def stop(self) -> None:
        """Stop accepting; accepted connections finish their request in progress and close."""
        self.stopped = True
        if self.accepting:
            self.scope.cancel()  # the accept loop closes the socket as it leaves
        else:
            self.sock.close()
        for conn in list(self.connections):
            conn.drain()


def bind_socket(address: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address or "0.0.0.0", port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyServer:
    """Serves the listeners of the applied `RuntimeConfig`. Use `run()` in a task group, or
    `async with ProxyServer() as server:`."""

    def __init__(self, limits: ProxyLimits = DEFAULT_LIMITS, reuse_port: bool = True) -> None:
        self.limits = limits
        self._reuse_port = reuse_port
        self.pools = UpstreamPools(limits)
        self._handler = ProxyHandler(self.pools)
        self._listeners: dict[tuple[str, int, str | None], _BoundListener] = {}
        self._connections: set[Connection] = set()
        self._tasks: TaskGroup | None = None
        self._task_group_cm: TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._all_closed: anyio.Event | None = None
        self._shutting_down = False

    # --- state -------------------------------------------------------------------------------
    @property
    def config(self) -> RuntimeConfig:
        return self._handler.config

    @property
    def in_flight(self) -> int:
        """Requests between their head and their last byte."""
        return self._handler.in_flight

    @property
    def bound_ports(self) -> dict[tuple[str, int], int]:
        """Configured (address, port) -> the port actually bound (differs for port 0)."""
        return {listener.key: listener.port for listener in self._listeners.values() if not listener.stopped}

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # --- config ------------------------------------------------------------------------------
    @property
    def policies(self) -> WorkerPolicies:
        """The worker's compiled policy cores (token caches, buckets, Redis clients)."""
        return self._handler.policies

    async def apply(self, config: RuntimeConfig) -> None:
        """Bind new sockets, swap the config, stop removed sockets. Raises ListenerBindError
        (and changes nothing) when a socket cannot be bound."""
        if self._shutting_down:
            raise RuntimeError("the proxy server is shutting down")
        # Policy cores compile first: a section they refuse is a NACK, not a 500 at request time.
        self._handler.prepare(config)
        wanted = {group.bind_key: group for group in config.listeners.values()}
        bound: list[tuple[ListenerGroup, socket.socket]] = []
        failures: list[tuple[ListenerGroup, OSError]] = []
        for bind_key, group in wanted.items():
            if bind_key in self._listeners:
                continue
            try:
                bound.append((group, bind_socket(group.address, group.port, reuse_port=self._reuse_port)))
            except OSError as exc:
                failures.append((group, exc))
        if failures:
            for _, sock in bound:
                sock.close()
            raise ListenerBindError(failures)
        self._handler.config = config
        for group, sock in bound:
            listener = _BoundListener(group, sock)
            self._listeners[group.bind_key] = listener
            if self._tasks is not None:
                self._tasks.start_soon(self._accept, listener)
            log.info(
                "listening",
                listeners=list(group.listener_names),
                address=group.address,
                port=listener.port,
                tls=group.tls is not None,
            )
        for bind_key in [key for key in self._listeners if key not in wanted]:
            listener = self._listeners.pop(bind_key)
            listener.stop()
            log.info("listener removed", listeners=list(listener.names), address=listener.key[0], port=listener.port)
        # LLM providers are pooled as clusters of their own: their warm connections survive an update too.
        self.pools.retain({**config.backends, **self._handler.llm.provider_clusters()})

    # --- serving ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until `shutdown` finishes (or the caller cancels)."""
        async with anyio.create_task_group() as tasks:
            self._start(tasks)
            assert self._stop is not None
            await self._stop.wait()
            tasks.cancel_scope.cancel()

    async def __aenter__(self) -> ProxyServer:
        cm = anyio.create_task_group()
        tasks = await cm.__aenter__()
        self._task_group_cm = cm
        self._start(tasks)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if not self._shutting_down:
            await self.shutdown(0)
        cm = self._task_group_cm
        assert cm is not None
        cm.cancel_scope.cancel()
        try:
            return await cm.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and group.exceptions == (exc,):
                return False  # the caller's own exception, unwrapped
            raise

    def _start(self, tasks: TaskGroup) -> None:
        self._tasks = tasks
        self._stop = anyio.Event()
        for listener in self._listeners.values():
            tasks.start_soon(self._accept, listener)
        tasks.start_soon(self._sweep_pools)

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (keep-alive answers say `connection:
        close`, idle connections close now, HTTP/2 gets GOAWAY), close what remains at the
        deadline."""
        self._shutting_down = True
        self._all_closed = anyio.Event()
        for listener in self._listeners.values():
            listener.stop()
        self._listeners.clear()
        for conn in list(self._connections):
            conn.drain()
        self._handler.begin_drain()
        if self._connections:
            with anyio.move_on_after(drain_timeout):
                await self._all_closed.wait()
        if self._connections:
            report = log.warning if drain_timeout > 0 else log.debug
            report("drain deadline reached", connections=len(self._connections), in_flight=self.in_flight)
            for conn in list(self._connections):
                conn.abort()
        # Protocol sessions (MCP stdio processes, upstream channels) end with the worker.
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._handler.aclose()
        self.pools.close()
        if self._stop is not None:
            self._stop.set()

    async def _sweep_pools(self) -> None:
        while True:
            await anyio.sleep(_POOL_SWEEP_INTERVAL)
            self.pools.sweep()

    async def _accept(self, listener: _BoundListener) -> None:
        loop = asyncio.get_running_loop()
        tasks = self._tasks
        assert tasks is not None
        if listener.stopped:
            return  # removed before this task first ran; stop() closed the socket
        listener.accepting = True
        try:
            with listener.scope:
                while True:
                    try:
                        sock, _ = await loop.sock_accept(listener.sock)
                    except OSError as exc:
                        if listener.stopped:
                            return
                        # EMFILE and friends: back off instead of spinning.
                        log.warning("accept failed", port=listener.port, reason=str(exc))
                        await anyio.sleep(_ACCEPT_RETRY_DELAY)
                        continue
                    tasks.start_soon(self._serve_connection, sock, listener)
        finally:
            listener.accepting = False
            listener.sock.close()

    async def _serve_connection(self, sock: socket.socket, listener: _BoundListener) -> None:
        """Handshake, choose HTTP/1.1 or HTTP/2, serve until the connection ends. Never raises."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        stream = ByteStream(limits.connection_buffer_bytes)
        tls = listener.tls
        try:
            if tls is not None:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: stream, sock, ssl=tls.ssl_context, ssl_handshake_timeout=limits.tls_handshake_timeout
                )
                ssl_object = transport.get_extra_info("ssl_object")
                use_h2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
                initial = b""
            else:
                await loop.connect_accepted_socket(lambda: stream, sock)
                initial, use_h2 = await self._sniff(stream)
                if not initial:
                    stream.close()
                    return
        except (OSError, ssl.SSLError, TimeoutError, ReadTimeout) as exc:
            log.debug("connection setup failed", port=listener.port, reason=str(exc) or type(exc).__name__)
            stream.abort()
            with contextlib.suppress(OSError):
                sock.close()
            return
        connection_class = Http2Connection if use_h2 else Http1Connection
        conn = connection_class(
            stream,
            self._handler,
            limits,
            listener_key=listener.key,
            server_port=listener.port,
            scheme=b"https" if tls is not None else b"http",
        )
        listener.connections.add(conn)
        self._connections.add(conn)
        if listener.stopped or self._shutting_down:
            conn.drain()
        try:
            await conn.serve(initial)
        except Exception as exc:  # a bug must cost one connection, never the worker
            log.warning("connection failed", port=listener.port, error=f"{type(exc).__name__}: {exc}", exc_info=True)
        finally:
            stream.close()
            listener.connections.discard(conn)
            self._connections.discard(conn)
            if self._all_closed is not None and not self._connections:
                self._all_closed.set()

    async def _sniff(self, stream: ByteStream) -> tuple[bytes, bool]:
        """First bytes of a cleartext connection, and whether they open HTTP/2 (prior knowledge)."""
        deadline = asyncio.get_running_loop().time() + self.limits.header_read_timeout
        data = await stream.receive(deadline)
        while data and len(data) < len(PREFACE) and PREFACE.startswith(data):
            more = await stream.receive(deadline)
            if not more:
                return b"", False
            data += more
        return data, data.startswith(PREFACE)
