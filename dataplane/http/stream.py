"""A socket as an asyncio Protocol with awaitable reads and immediate writes.

Why not anyio's SocketStream: every receive and send there costs a checkpoint and a
queue round trip, which on the per-request path of a proxy is a large share of the CPU
budget. This protocol hands the connection's bytes over in one piece when a reader
asks, writes straight to the (uvloop) transport, and keeps both directions bounded:
reading pauses once `read_limit` bytes wait unconsumed, and writers await `drain()`
while the transport's write buffer is above its high-water mark. Cancellation from anyio
cancel scopes works because every wait is a plain future the task awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast


class StreamClosed(Exception):
    """The peer closed or reset the connection while we still needed it."""


class ReadTimeout(Exception):
    """No bytes arrived before the read deadline."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout())


class ByteStream(asyncio.Protocol):
    """One connection's bytes. A single reader and any number of writers may use it."""

    __slots__ = (
        "_chunks",
        "_drain_waiter",
        "_loop",
        "_read_limit",
        "_read_paused",
        "_size",
        "_waiter",
        "closed",
        "eof",
        "error",
        "on_lost",
        "transport",
        "write_paused",
    )

    def __init__(self, read_limit: int = 256 * 1024) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_limit = read_limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        # eof: the peer sent everything it will send; closed: the transport is gone.
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        # Called once when the peer closes (FIN) or the connection is lost.
        self.on_lost: Callable[[], None] | None = None

    # --- asyncio.Protocol callbacks ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._size > self._read_limit and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        # Like nginx and Envoy, a downstream FIN counts as the client going away (the
        # owner's on_lost cancels its request); the sending side stays open for whoever
        # still writes (an upstream half-close before the response is read).
        self._notify_lost()
        return True

    def _notify_lost(self) -> None:
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.eof = True
        self.error = exc
        self._wake_reader()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self._notify_lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- reading -------------------------------------------------------------------------
    @property
    def has_data(self) -> bool:
        return bool(self._chunks)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def receive(self, deadline: float | None = None) -> bytes:
        """Everything buffered, waiting if nothing is; b"" once the peer finished sending.

        `deadline` is in loop.time(); past it without data, raises ReadTimeout.
        """
        if self._chunks:
            return self._take()
        if self.eof:
            return b""
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, _expire, waiter) if deadline is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._chunks:
            return self._take()
        return b""

    def receive_nowait(self) -> bytes:
        """What is buffered right now, possibly b""."""
        return self._take() if self._chunks else b""

    def unread(self, data: bytes) -> None:
        """Put bytes back in front, for a protocol handler that peeked (h1 or h2 detection)."""
        if data:
            self._chunks.insert(0, data)
            self._size += len(data)

    # --- writing -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue bytes for sending now; raises StreamClosed once the connection is gone."""
        if self.closed:
            raise StreamClosed("connection closed by peer")
        transport = self.transport
        assert transport is not None
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self.write_paused and not self.closed:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise StreamClosed("connection closed by peer")

    # --- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """Flush what is queued, then close."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent bytes (a reset for the peer)."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.closed = True
        self.eof = True
        self._wake_reader()

    @property
    def peer_host(self) -> str:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return ""


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Wakeup:
    """Tasks waiting until something changes, woken together by ``notify``.

    The part of asyncio.Event a producer and its consumers need, for per-request paths: no
    running-loop lookup per wait (on Python 3.11 that is a getpid syscall), a future only while a
    task waits, a deadline as one timer (no cancel scope), and no set state to clear: ``wait``
    always waits for the next ``notify``, so callers check their condition first. Cancelling one
    waiter leaves the others waiting.
    """

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[bool]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the waits run on (the running one, looked up once if none was given)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def wait(self, deadline: float | None = None) -> bool:
        """Until the next ``notify`` (True) or, with ``deadline`` in loop time, until then (False)."""
        loop = self.loop
        waiter: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters
        waiters.append(waiter)
        timer = loop.call_at(deadline, _time_out, waiter) if deadline is not None else None
        try:
            woken = await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not woken and waiter in self._waiters:
            self._waiters.remove(waiter)
        return woken

    def notify(self) -> None:
        """Wake every task waiting now."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(True)
