"""A `TargetChannel` over MCP streamable HTTP (2025-03-26 .. 2025-11-25): one upstream session.

Each `send` is one POST of one JSON-RPC message to the target's path (basic/transports, "Sending
Messages to the Server"). `send` returns once the upstream answered the POST's head: 202 for a
notification or response; for a request, either a JSON body (read here, bounded) or an SSE
stream, which a background task reads while `send` returns, so a long tool call does not hold
the caller. Everything the target sends (responses, notifications, server-to-client requests),
from POST streams and from the standalone GET stream, goes to one inbox that `receive` drains.

Session: the Mcp-Session-Id of the initialize response is sent on every later request, with
MCP-Protocol-Version (the version the initialize result named). A channel built with a
`session_id` resumes an existing upstream session (another worker opened it). 404 on a session
ends the channel with TargetClosed("session expired upstream"). `aclose` DELETEs the session.

Streams: after `notifications/initialized` (or on the first send of a resumed session) a GET
opens the standalone stream for server-initiated messages; 405 means the server has none. A
stream that breaks after the server gave event ids is resumed with GET + Last-Event-ID (after
the server's `retry` delay); a POST stream that ends without its response and cannot be resumed
yields a synthesized JSON-RPC error for that request, so the caller never waits for an answer
that cannot come.

Bounds: connecting uses the backend's connect timeout; the response head and every wait between
body bytes of a POST use `response_timeout`; a message larger than `max_message_bytes` is a
protocol error. The GET stream has no idle bound (a quiet server is normal there).

A 2026-07-28 message (its version in `params._meta`) is sent without session headers but with
MCP-Protocol-Version, Mcp-Method and Mcp-Name mirroring the body.

Connections come from a private HTTP/1.1 pool per channel (keep-alive reuse within the session,
closed by `aclose`); see `McpHttpUpstream`. A POST that meets a reused connection closed before
any response byte is sent once more on a fresh one (the server never read it). The inbox is
bounded (`DEFAULT_MAX_QUEUED`): a caller must `receive` concurrently with `send`, as a JSON-mode
`send` waits to queue its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

import anyio

from dataplane.config.model import (
    DEFAULT_MCP_MAX_BODY_BYTES,
    McpHttpTarget,
    UpstreamCluster,
    UpstreamTarget,
)
from dataplane.http.errors import ProxyError, RetryableUpstreamError
from dataplane.http.h1codec import ResponseHead
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.http.stream import ReadTimeout, Wakeup
from dataplane.mcp.channel import JSON, SendFailure, TargetClosed, TargetUnavailable
from dataplane.mcp.headers import (
    MCP_NAME_SOURCE,
    META_PROTOCOL_VERSION,
    MODERN_PROTOCOL_VERSIONS,
    encode_header_value,
)
from dataplane.mcp.jsonrpc import ErrorCode, error_response
from dataplane.mcp.sse import SseError, SseEvent, SseParser
from dataplane.policy.resilience import failure_kind
from dataplane.upstream.exchange import Exchange, Headers, UpstreamRequest
from dataplane.upstream.pool import Http1Pool
from shared.logging import get_logger

log = get_logger("dataplane.mcp.http")

DEFAULT_RESPONSE_TIMEOUT: Final = 120.0
# Reconnection delay when the server named none (ms, as SSE `retry`), and how often in a row a
# broken stream is resumed before giving up.
DEFAULT_RETRY_MS: Final = 1000
MAX_RESUME_ATTEMPTS: Final = 3
SESSION_EXPIRED: Final = "session expired upstream"
# Messages received but not yet taken by `receive` before the stream readers pause.
DEFAULT_MAX_QUEUED: Final = 256

_ACCEPT_BOTH: Final = (b"accept", b"application/json, text/event-stream")
_ACCEPT_SSE: Final = (b"accept", b"text/event-stream")
_CONTENT_JSON: Final = (b"content-type", b"application/json")


def header(head: ResponseHead, name: bytes) -> str | None:
    """A response header's value (first occurrence; names are compared lowercase)."""
    for key, value in head.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def media_type(head: ResponseHead) -> str:
    value = header(head, b"content-type") or ""
    return value.split(";", 1)[0].strip().lower()


def _is_request(message: JSON) -> bool:
    return "method" in message and "id" in message


class McpHttpUpstream:
    """The HTTP plumbing an MCP HTTP channel shares with its sibling: a private pool, requests
    with the target's headers, errors mapped to TargetUnavailable naming the target, and an inbox."""

    def __init__(
        self,
        target: McpHttpTarget,
        backend: UpstreamCluster,
        *,
        response_timeout: float,
        max_message_bytes: int,
        limits: ProxyLimits,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.target = target
        self.response_timeout = response_timeout
        self.connect_timeout = backend.connect_timeout
        self.max_message_bytes = max_message_bytes
        cluster = UpstreamCluster(
            name=f"{backend.name}/{target.name}",
            ssl_context=target.ssl_context,
            server_name=target.server_name,
            connect_timeout=backend.connect_timeout,
            idle_timeout=backend.idle_timeout,
            max_connections=backend.max_connections,
        )
        upstream = UpstreamTarget(target.name, target.host, target.port, 1, target.authority)
        self.pool = Http1Pool(cluster, upstream, limits)
        self.authority = target.authority.encode("latin-1")
        self.extra_headers: Headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in target.headers]
        self.inbox: deque[JSON] = deque()
        self.inbox_changed = Wakeup(self.pool.loop)  # once per message: no running-loop lookup
        self.inbox_drained = asyncio.Event()
        self.max_queued = max_queued
        self.closed_reason: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # --- errors and inbox ---------------------------------------------------------------------
    def unavailable(self, cause: str, failure: SendFailure | None = None) -> TargetUnavailable:
        """``failure``: the retry condition when the target gave no response at all (see TargetUnavailable)."""
        return TargetUnavailable(f"MCP target {self.target.name} ({self.target.authority}): {cause}", failure=failure)

    async def deliver(self, message: JSON) -> None:
        """Queue a message for `receive`; a full inbox holds the stream readers back (and so the
        upstream, through TCP), instead of buffering whatever a chatty target sends."""
        while len(self.inbox) >= self.max_queued and self.closed_reason is None:
            self.inbox_drained.clear()
            await self.inbox_drained.wait()
        self.inbox.append(message)
        self.inbox_changed.notify()

    async def fail_request(self, request_id: Any, cause: str) -> None:
        """Answer a request the target will not answer, so its caller does not wait forever."""
        message = f"MCP target {self.target.name}: {cause}"
        await self.deliver(error_response(request_id, int(ErrorCode.INTERNAL_ERROR), message))

    def end(self, reason: str) -> None:
        """No more messages will come: `receive` raises TargetClosed(reason) once the inbox is empty."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self.inbox_changed.notify()
        self.inbox_drained.set()

    async def receive(self) -> JSON:
        while True:
            if self.inbox:
                self.inbox_drained.set()
                return self.inbox.popleft()
            if self.closed_reason is not None:
                raise TargetClosed(self.closed_reason)
            await self.inbox_changed.wait()

    def spawn(self, work: Callable[[], Any]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop_tasks(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            # Cancelled, or already failed and reported through the inbox: nothing to add.
            with contextlib.suppress(BaseException):
                await task

    # --- HTTP ---------------------------------------------------------------------------------
    async def request(self, method: bytes, path: str, headers: Headers, body: bytes | None = None) -> Exchange:
        """Send a request and wait for its response head: the pool bounds the connect (and the wait for
        a free connection) by the connect timeout, the head is bounded by the response timeout."""
        all_headers = [*headers, *self.extra_headers]
        if body is not None:
            all_headers.append((b"content-length", b"%d" % len(body)))
        return await self.send_request(method, path.encode("latin-1"), all_headers, body)

    async def send_request(
        self, method: bytes, target: bytes, all_headers: Headers, body: bytes | None = None
    ) -> Exchange:
        """`request` for a caller that built the whole header list (the target's extra headers and,
        with a body, its content-length included), e.g. once per upstream session."""
        upstream = UpstreamRequest(method, target, self.authority, all_headers, body is not None, len(body or b""))
        exchange: Exchange | None = None
        try:
            if body is None:
                # The pool retries a stale keep-alive connection once for bodiless requests.
                with anyio.fail_after(self.connect_timeout + self.response_timeout):
                    exchange = await self.pool.exchange(upstream)
            else:
                try:
                    exchange = await self._post(upstream, body)
                except RetryableUpstreamError:
                    # A reused keep-alive connection closed before any response byte: the server
                    # dropped an idle connection and never read the message, so it is sent once more.
                    exchange = None
                    exchange = await self._post(upstream, body)
        except TimeoutError:
            if exchange is not None:
                exchange.abort()
            cause = f"no response to {method.decode()} within {self.response_timeout:g}s"
            raise self.unavailable(cause, "reset") from None
        except ProxyError as exc:
            if exchange is not None:
                exchange.abort()
            raise self.unavailable(exc.message, failure_kind(exc)) from None
        except BaseException:
            if exchange is not None:
                exchange.abort()
            raise
        return exchange

    async def _post(self, upstream: UpstreamRequest, body: bytes) -> Exchange:
        """Head and body in one write, then the response head within the response timeout.

        The wait is a read deadline (one timer), not a cancel scope: this runs once per message.
        """
        exchange = await self.pool.open(upstream, body)
        try:
            if exchange.write_paused:  # a large message: let it leave before waiting for the answer
                with anyio.fail_after(self.response_timeout):
                    await exchange.drain()
            await exchange.response(self.pool.loop.time() + self.response_timeout)
        except ReadTimeout:
            exchange.abort()
            raise TimeoutError from None
        except BaseException:
            exchange.abort()
            raise
        return exchange

    async def read_body(self, exchange: Exchange) -> bytes:
        """The whole (bounded) body, each wait bounded by the response timeout."""
        body, complete = exchange.take_body()
        parts = [body]
        size = len(body)
        try:
            while not complete:
                with anyio.fail_after(self.response_timeout):
                    data = await exchange.read()
                if not data:
                    break
                size += len(data)
                if size > self.max_message_bytes:
                    raise self.unavailable(f"response body larger than {self.max_message_bytes} bytes")
                parts.append(data)
        except TimeoutError:
            raise self.unavailable(f"response body stalled for {self.response_timeout:g}s") from None
        except ProxyError as exc:
            raise self.unavailable(exc.message) from None
        finally:
            if not exchange.complete:
                exchange.abort()
        return b"".join(parts)

    async def drain(self, exchange: Exchange) -> None:
        """Discard a body we do not need (keeps the connection reusable); errors do not matter."""
        with contextlib.suppress(TargetUnavailable):
            await self.read_body(exchange)

    def parse_message(self, data: bytes | str) -> JSON:
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.unavailable(f"invalid JSON from upstream ({exc})") from None
        if not isinstance(message, dict):
            raise self.unavailable("upstream sent a JSON value that is not one JSON-RPC message")
        return message

    async def events(
        self, exchange: Exchange, parser: SseParser, idle_timeout: float | None
    ) -> AsyncGenerator[SseEvent, None]:
        """Yield the SSE events of a response body as they complete; raises TargetUnavailable
        when the stream breaks, stalls past `idle_timeout`, or is not valid SSE. Ends at EOF."""
        data, complete = exchange.take_body()
        try:
            while True:
                if data:
                    for event in parser.feed(data):
                        yield event
                if complete:
                    return
                if idle_timeout is None:
                    data = await exchange.read()
                else:
                    with anyio.fail_after(idle_timeout):
                        data = await exchange.read()
                if not data:
                    return
        except TimeoutError:
            raise self.unavailable(f"event stream stalled for {idle_timeout:g}s") from None
        except SseError as exc:
            raise self.unavailable(f"invalid event stream: {exc}") from None
        except ProxyError as exc:
            raise self.unavailable(exc.message) from None
        finally:
            if not exchange.complete:
                exchange.abort()

    def close_pool(self) -> None:
        self.pool.close()


class StreamableHttpChannel:
    """One upstream MCP session over streamable HTTP. See the module docstring for the rules."""

    def __init__(
        self,
        target: McpHttpTarget,
        backend: UpstreamCluster,
        *,
        session_id: str | None = None,
        protocol_version: str | None = None,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        max_message_bytes: int = DEFAULT_MCP_MAX_BODY_BYTES,
        listen: bool = True,
        limits: ProxyLimits = DEFAULT_LIMITS,
    ) -> None:
        self._up = McpHttpUpstream(
            target, backend, response_timeout=response_timeout, max_message_bytes=max_message_bytes, limits=limits
        )
        self._path = target.path or "/"
        self._target = self._path.encode("latin-1")
        self._post_headers_for: tuple[str | None, str | None] | None = None
        self._post_headers_cache: Headers = []
        self._session_id = session_id
        self._protocol_version = protocol_version
        # Open the standalone GET stream once the session is usable (after initialized, or at
        # once for a resumed session).
        self._listen = listen
        self._listening = False
        self._resumed = session_id is not None
        self._closing = False

    @property
    def target(self) -> str:
        return self._up.target.name

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def protocol_version(self) -> str | None:
        """The version the initialize result named (sent as MCP-Protocol-Version)."""
        return self._protocol_version

    # --- sending --------------------------------------------------------------------------------
    def _session_headers(self) -> Headers:
        headers: Headers = []
        if self._session_id is not None:
            headers.append((b"mcp-session-id", self._session_id.encode("latin-1")))
        if self._protocol_version is not None:
            headers.append((b"mcp-protocol-version", self._protocol_version.encode("latin-1")))
        return headers

    def _post_headers(self) -> Headers:
        """Every header of a session-era POST but its content-length, built once per session state
        (the session id and protocol version change only at initialize)."""
        state = (self._session_id, self._protocol_version)
        if self._post_headers_for != state:
            self._post_headers_for = state
            self._post_headers_cache = [_ACCEPT_BOTH, _CONTENT_JSON, *self._session_headers(), *self._up.extra_headers]
        return self._post_headers_cache

    @staticmethod
    def _modern_headers(message: JSON) -> Headers | None:
        """For 2026-07-28 messages (which carry their version in `_meta` and have no session)
        MCP-Protocol-Version, Mcp-Method and Mcp-Name mirroring the body; None for others."""
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(META_PROTOCOL_VERSION) if isinstance(meta, dict) else None
        if not isinstance(version, str) or version not in MODERN_PROTOCOL_VERSIONS:
            return None
        headers: Headers = [(b"mcp-protocol-version", version.encode("latin-1"))]
        method = message.get("method")
        if isinstance(method, str):
            headers.append((b"mcp-method", encode_header_value(method).encode("latin-1")))
            source = MCP_NAME_SOURCE.get(method)
            name = params.get(source) if source is not None and isinstance(params, dict) else None
            if isinstance(name, str):
                headers.append((b"mcp-name", encode_header_value(name).encode("latin-1")))
        return headers

    def _check_open(self) -> None:
        reason = self._up.closed_reason
        if reason is not None or self._closing:
            raise TargetClosed(reason or "channel closed")

    async def send(self, message: JSON) -> None:
        self._check_open()
        up = self._up
        body = _encode(message)
        if len(body) > up.max_message_bytes:
            raise up.unavailable(f"message larger than {up.max_message_bytes} bytes")
        if self._resumed and self._listen and not self._listening:
            self._start_listening()
        modern = self._modern_headers(message)
        if modern is None:
            headers = [*self._post_headers(), (b"content-length", b"%d" % len(body))]
            exchange = await up.send_request(b"POST", self._target, headers, body)
        else:
            exchange = await up.request(b"POST", self._path, [_ACCEPT_BOTH, _CONTENT_JSON, *modern], body)
        head = await exchange.response()
        status = head.status
        if status == 404 and self._session_id is not None:
            await up.drain(exchange)
            up.end(SESSION_EXPIRED)
            raise TargetClosed(SESSION_EXPIRED)
        if status >= 500:
            await up.drain(exchange)
            raise up.unavailable(f"upstream answered {status}", status)
        if not _is_request(message):
            await up.drain(exchange)
            if not 200 <= status < 300:
                raise up.unavailable(f"upstream answered {status} to a {_kind(message)}")
            if message.get("method") == "notifications/initialized" and self._listen and not self._listening:
                self._start_listening()
            return
        await self._answer(message, exchange, head)

    async def _answer(self, request: JSON, exchange: Exchange, head: ResponseHead) -> None:
        up = self._up
        status = head.status
        kind = media_type(head)
        initialize = request.get("method") == "initialize"
        if initialize and 200 <= status < 300:
            session_id = header(head, b"mcp-session-id")
            if session_id is not None:
                if not session_id or not all(0x21 <= ord(c) <= 0x7E for c in session_id):
                    exchange.abort()
                    raise up.unavailable("upstream session id has characters other than visible ASCII")
                self._session_id = session_id
        if kind == "text/event-stream" and 200 <= status < 300:
            up.spawn(lambda: self._read_post_stream(request["id"], initialize, exchange))
            return
        if kind != "application/json":
            await up.drain(exchange)
            raise up.unavailable(f"upstream answered {status} with content type {kind or 'none'!r} to a request")
        answer = up.parse_message(await up.read_body(exchange))
        if not 200 <= status < 300 and "error" not in answer:
            raise up.unavailable(f"upstream answered {status}")
        if "error" in answer and "result" not in answer and answer.get("id") is None:
            # A transport-level error (400 and the like) without the request's id: give it one.
            answer = {**answer, "id": request["id"]}
        self._note_answer(answer, request["id"], initialize)
        await up.deliver(answer)

    def _note_answer(self, message: JSON, request_id: Any, initialize: bool) -> None:
        if initialize and message.get("id") == request_id:
            result = message.get("result")
            if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                self._protocol_version = result["protocolVersion"]

    # --- streams --------------------------------------------------------------------------------
    async def _read_post_stream(self, request_id: Any, initialize: bool, exchange: Exchange) -> None:
        """Deliver a POST's SSE events until its response; resume with GET when it breaks early."""
        up = self._up
        parser = SseParser(up.max_message_bytes)
        answered = False

        resuming = False

        def on_message(message: JSON) -> bool:
            nonlocal answered
            if ("result" in message or "error" in message) and message.get("id") == request_id:
                answered = True
                self._note_answer(message, request_id, initialize)
            return answered and resuming

        cause = "the event stream ended before the response"
        try:
            await self._pump(exchange, parser, up.response_timeout, on_message)
        except TargetUnavailable as exc:
            cause = str(exc)
        attempts = 0
        while not answered and parser.last_event_id and attempts < MAX_RESUME_ATTEMPTS and not self._closing:
            attempts += 1
            resuming = True
            await anyio.sleep((parser.retry if parser.retry is not None else DEFAULT_RETRY_MS) / 1000)
            try:
                resumed = await self._get_stream(parser.last_event_id)
                if resumed is None:
                    break
                await self._pump(resumed, parser, up.response_timeout, on_message)
            except TargetUnavailable as exc:
                cause = str(exc)
        if not answered and up.closed_reason is None:
            await up.fail_request(request_id, cause)

    async def _pump(
        self,
        exchange: Exchange,
        parser: SseParser,
        idle_timeout: float | None,
        on_message: Callable[[JSON], bool],
    ) -> None:
        """Deliver a stream's messages until it ends or `on_message` says nothing more is wanted
        (a resumed stream may stay open after the response it was opened for)."""
        up = self._up
        async with contextlib.aclosing(up.events(exchange, parser, idle_timeout)) as events:
            async for event in events:
                if event.event != "message" or not event.data:
                    continue  # priming events (an id, no data) and unknown event types
                message = up.parse_message(event.data)
                stop = on_message(message)
                await up.deliver(message)
                if stop:
                    return

    async def _get_stream(self, last_event_id: str | None) -> Exchange | None:
        """GET the session's stream (resuming after `last_event_id`); None when the server has none."""
        up = self._up
        headers = [_ACCEPT_SSE, *self._session_headers()]
        if last_event_id is not None:
            headers.append((b"last-event-id", last_event_id.encode("utf-8")))
        exchange = await up.request(b"GET", self._path, headers)
        head = await exchange.response()
        status = head.status
        if status == 404 and self._session_id is not None:
            await up.drain(exchange)
            up.end(SESSION_EXPIRED)
            return None
        if status == 405:
            await up.drain(exchange)
            return None
        if not 200 <= status < 300 or media_type(head) != "text/event-stream":
            await up.drain(exchange)
            raise up.unavailable(f"GET stream answered {status}")
        return exchange

    def _start_listening(self) -> None:
        self._listening = True
        self._up.spawn(self._listen_loop)

    async def _listen_loop(self) -> None:
        """The standalone stream: reconnect while the server keeps offering it."""
        up = self._up
        parser = SseParser(up.max_message_bytes)
        failures = 0
        while not self._closing and up.closed_reason is None:
            try:
                exchange = await self._get_stream(parser.last_event_id)
                if exchange is None:
                    return
                failures = 0
                await self._pump(exchange, parser, None, _ignore)
            except TargetUnavailable as exc:
                failures += 1
                log.info("MCP GET stream failed", target=self.target, reason=str(exc), failures=failures)
                if failures >= MAX_RESUME_ATTEMPTS:
                    return
            await anyio.sleep((parser.retry if parser.retry is not None else DEFAULT_RETRY_MS) / 1000)

    # --- receiving and closing ------------------------------------------------------------------
    async def receive(self) -> JSON:
        return await self._up.receive()

    async def aclose(self, *, end_session: bool = True) -> None:
        """Close the channel; ``end_session=False`` keeps the upstream session (no DELETE), for a worker
        that lets an idle session go while another worker or replica may still resume it."""
        if self._closing:
            return
        self._closing = True
        up = self._up
        await up.stop_tasks()
        if end_session and self._session_id is not None and up.closed_reason is None:
            try:
                exchange = await up.request(b"DELETE", self._path, self._session_headers())
                await up.drain(exchange)
            except TargetUnavailable as exc:
                log.info("MCP session DELETE failed", target=self.target, reason=str(exc))
        up.end("channel closed")
        up.close_pool()


# What json.dumps(separators=(",", ":"), ensure_ascii=False) produces, without building an encoder per call.
_ENCODER_UTF8: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ENCODER_ASCII: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _encode(message: JSON) -> bytes:
    """Compact UTF-8 JSON; lone surrogates (legal in JSON escapes, not in UTF-8) become \\u escapes."""
    try:
        return _ENCODER_UTF8.encode(message).encode("utf-8")
    except UnicodeEncodeError:
        return _ENCODER_ASCII.encode(message).encode("ascii")


def _ignore(message: JSON) -> bool:
    return False


def _kind(message: JSON) -> str:
    return "notification" if "method" in message else "response"
