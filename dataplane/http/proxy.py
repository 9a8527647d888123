"""Forwarding one request: route, filters, backend and target choice, upstream exchange, relay.

Protocol-neutral: the HTTP/1.1 and HTTP/2 connection handlers call `ProxyHandler.handle`
with a `ProxyRequest` and a `ResponseSink`. The config is read once per request (one
attribute load), so a request sees the old config or the new one, never a mix. Every
failure becomes a plain-text answer naming its cause, or, once the response head went
out, an aborted stream.
"""

from __future__ import annotations

import anyio

from dataplane.config.model import RuntimeConfig, UpstreamCluster, UpstreamTarget
from dataplane.http.errors import (
    BackendUnavailable,
    GatewayTimeout,
    NoBackend,
    NoRoute,
    ProxyError,
    RequestRejected,
    UnsupportedRequest,
)
from dataplane.http.headers import HeaderView, downstream_response_headers, upstream_request_headers
from dataplane.http.messages import BodySource, Headers, ProxyRequest, ResponseSink
from dataplane.mcp.endpoint import McpEndpoint
from dataplane.mcp.modern import ModernEndpoint
from dataplane.routing.match import BackendChoice, CompiledRoute, RouteMatch
from dataplane.upstream.exchange import Exchange, UpstreamRequest
from dataplane.upstream.pool import UpstreamPools
from shared.logging import get_logger

log = get_logger("dataplane.proxy")

_METHOD_NAMES: dict[bytes, str] = {
    name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
}
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")


def _primary(group: BaseExceptionGroup) -> BaseException:
    """The exception that explains a task group's failure (not the cancellations it caused)."""
    fallback: BaseException = group
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _primary(exc)
        if not isinstance(exc, anyio.get_cancelled_exc_class()):
            return exc
        fallback = exc
    return fallback


def error_body(message: str) -> tuple[Headers, bytes]:
    body = (message + "\n").encode("utf-8", "replace")
    return [_TEXT_PLAIN, (b"content-length", b"%d" % len(body))], body


async def send_error(sink: ResponseSink, status: int, message: str) -> None:
    headers, body = error_body(message)
    await sink.start(status, headers, len(body), body, True)


class _Progress:
    """What the forwarding of one request has finished, so cleanup knows what to abort."""

    __slots__ = ("request_done", "response_done")

    def __init__(self, request_done: bool) -> None:
        self.request_done = request_done
        self.response_done = False


class ProxyHandler:
    """The forwarding logic of a worker; `config` is swapped by ProxyServer.apply."""

    def __init__(self, pools: UpstreamPools, config: RuntimeConfig | None = None) -> None:
        self.pools = pools
        self.config = config if config is not None else RuntimeConfig.empty()
        # Requests between their head and their last byte, over all connections.
        self.in_flight = 0
        # The worker's MCP sessions outlive requests; `aclose` ends them.
        self.mcp = McpEndpoint(modern=ModernEndpoint())

    def begin_drain(self) -> None:
        """End the streams that last until the client goes (MCP GET and listen streams), so a drain
        waits only for real requests."""
        self.mcp.end_streams()

    async def aclose(self) -> None:
        """End what outlives requests (MCP sessions and their upstream sessions)."""
        await self.mcp.aclose()

    async def handle(self, request: ProxyRequest, sink: ResponseSink) -> None:
        """Serve one request. Raises only ClientGone (and cancellation): everything else is
        answered here."""
        config = self.config
        try:
            await self._serve(config, request, sink)
        except ProxyError as exc:
            await self._fail(request, sink, exc.status, exc.message, exc.kind)
        except RequestRejected as exc:
            await self._fail(request, sink, exc.status, exc.reason, "bad_request")

    async def _fail(self, request: ProxyRequest, sink: ResponseSink, status: int, message: str, kind: str) -> None:
        if status >= 500:
            log.warning(
                "request failed",
                status=status,
                kind=kind,
                reason=message,
                method=request.method.decode("latin-1"),
                authority=request.authority.decode("latin-1"),
            )
        else:
            log.debug("request refused", status=status, kind=kind, reason=message)
        if sink.started:
            sink.abort()
            return
        await send_error(sink, status, message)

    async def _serve(self, config: RuntimeConfig, request: ProxyRequest, sink: ResponseSink) -> None:
        method_bytes = request.method
        if method_bytes == b"CONNECT":
            raise UnsupportedRequest("CONNECT is not supported by this proxy")
        group = config.listeners.get(request.listener_key)
        authority = request.authority.decode("latin-1")
        target = request.target
        mark = target.find(b"?")
        if mark < 0:
            path = target.decode("latin-1")
            query = ""
        else:
            path = target[:mark].decode("latin-1")
            query = target[mark + 1 :].decode("latin-1")
        method = _METHOD_NAMES.get(method_bytes) or method_bytes.decode("latin-1")
        if group is None:
            raise BackendUnavailable(
                f"listener {request.listener_key[0]}:{request.listener_key[1]} is no longer configured"
            )
        match = group.route_table.match(authority, path, query, method, HeaderView(request.headers))
        if match is None:
            raise NoRoute(f"no route for {method} {authority}{path}")
        await self._dispatch(request, sink, match, authority, path, query)

    async def _dispatch(
        self, request: ProxyRequest, sink: ResponseSink, match: RouteMatch, authority: str, path: str, query: str
    ) -> None:
        route = match.route
        status = route.direct_response_status
        if status:
            if status >= 500:
                raise NoBackend(f"route {route.name}: no usable backend (configured to answer {status})")
            await send_error(sink, status, f"route {route.name}: direct response {status}")
            return
        redirect = route.redirect
        if redirect is not None:
            location = redirect.location(
                request.scheme.decode("latin-1"), authority, request.server_port, path, query, match.matched_prefix
            )
            headers: Headers = [(b"location", location.encode("utf-8")), (b"content-length", b"0")]
            await sink.start(redirect.status, headers, 0, b"", True)
            return
        choice = route.pick_backend()
        if choice is None:
            raise NoBackend(f"route {route.name}: every backend has weight 0")
        if choice.direct_response_status:
            raise NoBackend(f"route {route.name}: a backendRef of this rule could not be resolved by the control plane")
        cluster = choice.cluster
        if cluster is None:
            raise BackendUnavailable(f"route {route.name}: backend {choice.name} is not in the configuration")
        timeout = route.request_timeout
        if cluster.kind == "mcp" and cluster.mcp is not None:
            # The endpoint bounds each MCP request by the route's timeout itself: its GET streams outlive it.
            await self.mcp.handle(request, sink, cluster, timeout)
            return
        if cluster.kind != "http":
            # Protocol-aware backends (MCP now; A2A and LLM later) need their own handler.
            raise UnsupportedRequest(f"backend {cluster.name} is a {cluster.kind} backend, not served here yet")
        target = cluster.pick_target()
        if target is None:
            raise BackendUnavailable(f"backend {cluster.name} has no targets")
        if timeout is None:
            await self._forward(request, sink, match, choice, cluster, target, path, query)
            return
        with anyio.move_on_after(timeout) as scope:
            await self._forward(request, sink, match, choice, cluster, target, path, query)
        if scope.cancelled_caught:
            raise GatewayTimeout(f"route {route.name}: request timeout of {timeout:g}s exceeded")

    async def _forward(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        match: RouteMatch,
        choice: BackendChoice,
        cluster: UpstreamCluster,
        target: UpstreamTarget,
        path: str,
        query: str,
    ) -> None:
        route = match.route
        authority = request.authority or target.authority.encode("latin-1")
        headers = upstream_request_headers(
            request.headers,
            to_h2=cluster.protocol == "http2",
            client_host=request.client_host,
            scheme=request.scheme,
            host=request.authority,
        )
        if route.request_headers is not None:
            headers = route.request_headers.apply(headers)
        if choice.request_headers is not None:
            headers = choice.request_headers.apply(headers)
        upstream_target = request.target
        rewrite = route.url_rewrite
        if rewrite is not None:
            if rewrite.hostname:
                authority = rewrite.hostname.encode("latin-1")
            new_path = rewrite.rewrite_path(path, match.matched_prefix)
            if new_path != path:
                upstream_target = (new_path + "?" + query if query else new_path).encode("latin-1")
        upstream = UpstreamRequest(
            request.method, upstream_target, authority, headers, request.body is not None, request.content_length
        )
        pool = self.pools.get(cluster, target)
        progress = _Progress(request_done=request.body is None)
        timeout = route.backend_timeout
        exchange: Exchange | None = None
        try:
            if request.body is None:
                if timeout is None:
                    exchange = await pool.exchange(upstream)
                else:
                    with anyio.fail_after(timeout):
                        exchange = await pool.exchange(upstream)
                await self._relay(exchange, sink, route, choice, progress)
            else:
                try:
                    async with anyio.create_task_group() as tasks:
                        if timeout is None:
                            exchange = await pool.open(upstream)
                            tasks.start_soon(self._pump_body, request.body, exchange, progress)
                            await exchange.response()
                        else:
                            with anyio.fail_after(timeout):
                                exchange = await pool.open(upstream)
                                tasks.start_soon(self._pump_body, request.body, exchange, progress)
                                await exchange.response()
                        await self._relay(exchange, sink, route, choice, progress)
                        # An early response (before the whole body was sent) ends the exchange.
                        tasks.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise _primary(group) from None
        except TimeoutError:
            raise GatewayTimeout(
                f"backend {cluster.name} ({target.authority}) sent no response within {timeout:g}s "
                f"(route {route.name} backend timeout)"
            ) from None
        finally:
            if exchange is not None and not (progress.request_done and progress.response_done):
                exchange.abort()

    @staticmethod
    async def _pump_body(body: BodySource, exchange: Exchange, progress: _Progress) -> None:
        """Copy the request body upstream piece by piece (each read waits for the previous send)."""
        while True:
            data = await body.read()
            if not data:
                break
            try:
                await exchange.send_data(data)
            except ProxyError:
                return  # the upstream side failed; the response side reports how
        try:
            await exchange.end_request(body.trailers)
        except ProxyError:
            return
        progress.request_done = True

    @staticmethod
    async def _relay(
        exchange: Exchange, sink: ResponseSink, route: CompiledRoute, choice: BackendChoice, progress: _Progress
    ) -> None:
        """Send the upstream response downstream, each piece as it arrives."""
        head = await exchange.response()
        headers = downstream_response_headers(head.headers)
        if choice.response_headers is not None:
            headers = choice.response_headers.apply(headers)
        if route.response_headers is not None:
            headers = route.response_headers.apply(headers)
        body, complete = exchange.take_body()
        if complete:
            progress.response_done = True
            trailers = exchange.trailers
            if not trailers:
                await sink.start(head.status, headers, head.content_length, body, True)
                return
            await sink.start(head.status, headers, head.content_length, body, False)
            await sink.end(trailers)
            return
        await sink.start(head.status, headers, head.content_length, body, False)
        while True:
            data = await exchange.read()
            if not data:
                break
            await sink.write(data)
        progress.response_done = True
        await sink.end(exchange.trailers)
