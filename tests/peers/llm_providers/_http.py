"""A lean HTTP/1.1 server (h11 on anyio) for the provider stand-ins: the thin I/O shell.

Why not uvicorn: the stand-ins must be able to misbehave on the wire (close a chunked stream without
its terminating chunk, send half a body, hold a response until a test says go), and uvicorn only
does that by logging an application error. h11 is the parser uvicorn itself uses; this loop only
reads requests, hands each to a handler and writes what it returns. The listener binds before the
context yields, so clients can connect at once and nothing waits for readiness.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import anyio.abc
import h11

Outcome = Literal["pending", "complete", "cut", "client-gone"]
_READ_SIZE = 65536
_MAX_BODY = 64 * 1024 * 1024


@dataclass
class RecordedRequest:
    """One request as the stand-in received it, and how its response ended (``outcome``, ``done``)."""

    method: str
    path: str  # without the query
    query: dict[str, str]  # the last value of each name
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    json: Any = None  # the parsed body when it was JSON, else None
    status: int | None = None  # the status the stand-in answered with
    outcome: Outcome = "pending"
    done: anyio.Event = field(default_factory=anyio.Event, repr=False)

    @property
    def target(self) -> str:
        return self.path + (f"?{urlencode(self.query)}" if self.query else "")


@dataclass
class HttpReply:
    """What to answer. ``body`` bytes go out with a Content-Length; an async iterator goes out chunked,
    one chunk per item. ``cut_after`` closes the connection abruptly after that many body bytes (bytes
    body) or items (iterator), without completing the message."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]
    cut_after: int | None = None


Handler = Callable[[RecordedRequest], Awaitable[HttpReply]]


def parse_request(method: bytes, target: bytes, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> RecordedRequest:
    """The record of one request (pure: no I/O)."""
    url = urlsplit(target.decode("latin-1"))
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    parsed: Any = None
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
    return RecordedRequest(
        method=method.decode("ascii"),
        path=url.path,
        query=dict(parse_qsl(url.query, keep_blank_values=True)),
        headers=headers,
        body=body,
        json=parsed,
    )


@dataclass(frozen=True)
class RunningServer:
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def serve_http(handler: Handler, on_request: Callable[[RecordedRequest], None]) -> AsyncIterator[RunningServer]:
    """Serve ``handler`` on a fresh 127.0.0.1 port until the block ends (open connections are cancelled).
    ``on_request`` sees every parsed request before the handler does."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def serve_connection(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await _connection_loop(stream, handler, on_request)

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve_connection)
        try:
            yield RunningServer(port)
        finally:
            tasks.cancel_scope.cancel()


async def _next_event(conn: h11.Connection, stream: anyio.abc.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(_READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            data = b""
        conn.receive_data(data)


async def _connection_loop(stream: anyio.abc.SocketStream, handler: Handler, on_request: Callable[..., None]) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        try:
            event = await _next_event(conn, stream)
        except h11.RemoteProtocolError:
            await _send_quietly(stream, _refusal(conn, 400, "malformed HTTP request"))
            return
        if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
            return
        if conn.they_are_waiting_for_100_continue:
            await _send_quietly(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            try:
                part = await _next_event(conn, stream)
            except h11.RemoteProtocolError:
                await _send_quietly(stream, _refusal(conn, 400, "malformed HTTP request"))
                return
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > _MAX_BODY:
                    await _send_quietly(stream, _refusal(conn, 413, "request body too large"))
                    return
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # the client went away mid-request
                return
        record = parse_request(event.method, event.target, list(event.headers), bytes(body))
        on_request(record)
        reply = await handler(record)
        record.status = reply.status
        try:
            record.outcome = await _write_reply(conn, stream, reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            record.outcome = "client-gone"
        record.done.set()
        if record.outcome != "complete" or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _write_reply(conn: h11.Connection, stream: anyio.abc.SocketStream, reply: HttpReply) -> Outcome:
    headers = list(reply.headers)
    if isinstance(reply.body, bytes):
        headers.append(("content-length", str(len(reply.body))))
        await stream.send(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if reply.cut_after is not None:
            if reply.body[: reply.cut_after]:
                await stream.send(conn.send(h11.Data(data=reply.body[: reply.cut_after])))
            await stream.aclose()
            return "cut"
        if reply.body:
            await stream.send(conn.send(h11.Data(data=reply.body)))
        await stream.send(conn.send(h11.EndOfMessage()))
        return "complete"
    # No length: h11 frames the body chunked (HTTP/1.1) or by closing (HTTP/1.0).
    await stream.send(conn.send(h11.Response(status_code=reply.status, headers=headers)))
    if reply.cut_after == 0:
        await stream.aclose()
        return "cut"
    sent = 0
    async with _closing(reply.body) as chunks:
        async for chunk in chunks:
            if chunk:
                await stream.send(conn.send(h11.Data(data=chunk)))
            sent += 1
            if reply.cut_after is not None and sent >= reply.cut_after:
                await stream.aclose()  # FIN without the terminating chunk: the client sees a truncated body
                return "cut"
    await stream.send(conn.send(h11.EndOfMessage()))
    return "complete"


@asynccontextmanager
async def _closing(chunks: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close an async generator body even when the write stops early (its ``finally`` blocks run)."""
    try:
        yield chunks
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _refusal(conn: h11.Connection, status: int, message: str) -> bytes:
    """A closing JSON error answer for a request the HTTP layer itself refuses."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    try:
        head = conn.send(
            h11.Response(
                status_code=status,
                headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ],
            )
        )
        return (head or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        return b""


async def _send_quietly(stream: anyio.abc.SocketStream, data: bytes | None) -> None:
    if not data:
        return
    with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
        await stream.send(data)
