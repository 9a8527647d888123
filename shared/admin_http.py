"""A small HTTP/1.1 server for operator endpoints (readiness, config dump, metrics).

Not on the data path: one request per connection, bounded head size and read time,
so a stuck or hostile client cannot pin a worker. h11 does the protocol work.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import h11
from anyio.abc import SocketStream, TaskStatus

from shared.logging import get_logger

log = get_logger("admin")

MAX_HEAD_BYTES = 16 * 1024
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def text(cls, status: int, text: str) -> AdminResponse:
        return cls(status, text.encode() + (b"" if text.endswith("\n") else b"\n"))


AdminHandler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminServer:
    """Serves one handler on one port; `port` is known once `start` has run."""

    def __init__(self, handler: AdminHandler, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False):
        self._handler = handler
        self.host = host
        self.port = port
        self._reuse_port = reuse_port

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"admin server cannot bind {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        async with await anyio.abc.SocketListener.from_socket(sock) as listener:
            task_status.started(self.port)
            await listener.serve(self._handle_connection)

    async def _handle_connection(self, stream: SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    request = await self._read_request(conn, stream)
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            except h11.RemoteProtocolError as exc:
                await self._send(conn, stream, AdminResponse.text(exc.error_status_hint, f"bad request: {exc}"))
                return
            if request is None:
                return
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("admin handler failed", path=request.path)
                response = AdminResponse.text(500, "internal error")
            await self._send(conn, stream, response)

    @staticmethod
    async def _read_request(conn: h11.Connection, stream: SocketStream) -> AdminRequest | None:
        head: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = urlsplit(head.target.decode("latin-1"))
                return AdminRequest(head.method.decode(), target.path, parse_qs(target.query))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    @staticmethod
    async def _send(conn: h11.Connection, stream: SocketStream, response: AdminResponse) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("connection", "close"),
            *response.headers,
        ]
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers))
            data += conn.send(h11.Data(data=response.body)) + conn.send(h11.EndOfMessage())
            await stream.send(data)
        except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return
