"""Forwarding one request: route, filters, backend and target choice, upstream exchange, relay.

Protocol-neutral: the HTTP/1.1 and HTTP/2 connection handlers call `ProxyHandler.handle`
with a `ProxyRequest` and a `ResponseSink`. The config is read once per request (one
attribute load), so a request sees the old config or the new one, never a mix. Every
failure becomes a plain-text answer naming its cause, or, once the response head went
out, an aborted stream.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Final

import anyio

from dataplane.a2a.card import public_prefix
from dataplane.a2a.handler import A2aHandler, A2aRequest
from dataplane.config.model import RuntimeConfig, UpstreamCluster, UpstreamTarget
from dataplane.config.policy import EMPTY_POLICY, EffectivePolicy, ResilienceSettings
from dataplane.http.errors import (
    BackendUnavailable,
    ClientGone,
    GatewayTimeout,
    NoBackend,
    NoRoute,
    ProxyError,
    RequestRejected,
    UnsupportedRequest,
)
from dataplane.http.headers import HeaderView, downstream_response_headers, upstream_request_headers
from dataplane.http.messages import BodySource, Headers, ProxyRequest, ResponseSink
from dataplane.llm.handler import NO_RESILIENCE as NO_LLM_RESILIENCE
from dataplane.llm.handler import LlmHandler, LlmRequest, LlmResilience, policy_refusal
from dataplane.llm.metering import Charge, MeteredSink
from dataplane.llm.usage import TokenUsage
from dataplane.mcp.endpoint import CallerPolicy, McpEndpoint
from dataplane.mcp.modern import ModernEndpoint
from dataplane.observability.metrics import RequestReason, refusal_reason
from dataplane.observability.request import Observability, RequestTelemetry
from dataplane.observability.tracing import NOOP_CLIENT_SPAN, NOOP_SERVER_SPAN, ClientSpan
from dataplane.policy.chain import Admitted, PolicyTable, Refused, RequestPolicy, WorkerPolicies
from dataplane.policy.cors import CorsPolicy, is_preflight
from dataplane.policy.forwarding import ForwardPolicy, forward_policy
from dataplane.policy.ratelimit import DecisionReason
from dataplane.policy.resilience import REPLAY_BODY_CAP, ReplayableBody, RetryState, failure_kind, next_target
from dataplane.routing.match import BackendChoice, CompiledRoute, RouteMatch
from dataplane.upstream.exchange import Exchange, UpstreamRequest
from dataplane.upstream.pool import Http1Pool, Pool, UpstreamPools
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.logging import get_logger
from shared.resources import ROUTE

log = get_logger("dataplane.proxy")

_METHOD_NAMES: dict[bytes, str] = {
    name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
}
_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")

# ProxyError.kind -> the metric reason (anything else is an upstream error).
_ERROR_REASONS: Final[Mapping[str, RequestReason]] = {
    "no_route": RequestReason.NOT_FOUND,
    "no_backend": RequestReason.NO_BACKEND,
    "backend_unavailable": RequestReason.NO_BACKEND,
    "pool_exhausted": RequestReason.NO_BACKEND,
    "unsupported": RequestReason.BAD_REQUEST,
    "upstream_connect_failed": RequestReason.UPSTREAM_CONNECT,
    "timeout": RequestReason.TIMEOUT,
    "upstream_connect_timeout": RequestReason.TIMEOUT,
}


def error_reason(exc: ProxyError) -> RequestReason:
    """The metric reason of a proxy failure."""
    return _ERROR_REASONS.get(exc.kind, RequestReason.UPSTREAM_ERROR)


def _provider_name(backend: str) -> str:
    """A GenAI provider label from a backend name ("default/openai" -> "openai") until the LLM gateway
    knows the provider itself."""
    return backend.rpartition("/")[2].lower()


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

    __slots__ = ("request_done", "response_done", "status")

    def __init__(self, request_done: bool) -> None:
        self.request_done = request_done
        self.response_done = False
        self.status: int | None = None  # the upstream's response status, once its head arrived


async def _within_request_timeout(route: CompiledRoute, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` under the route's whole-request timeout (504 once it passes)."""
    limit = route.request_timeout
    if limit is None:
        await work
        return
    with anyio.move_on_after(limit) as scope:
        await work
    if scope.cancelled_caught:
        raise GatewayTimeout(f"route {route.name}: request timeout of {limit:g}s exceeded")


def llm_resilience(route: CompiledRoute, resilience: ResilienceSettings | None) -> LlmResilience:
    """An LLM request's bounds: the route's timeouts win over the policy's, as on the HTTP path."""
    per_try = route.backend_timeout
    request_timeout = route.request_timeout
    if resilience is None:
        if per_try is None and request_timeout is None:
            return NO_LLM_RESILIENCE
        idle = retry = None
    else:
        per_try = per_try if per_try is not None else resilience.per_try_timeout
        request_timeout = request_timeout if request_timeout is not None else resilience.request_timeout
        idle, retry = resilience.stream_idle_timeout, resilience.retry
    deadline = anyio.current_time() + request_timeout if request_timeout is not None else None
    return LlmResilience(deadline, per_try, idle, retry)


class _HeadEditingSink:
    """Passes a response through to ``_sink``; subclasses change only its head (``start``)."""

    __slots__ = ("_sink",)

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink

    @property
    def started(self) -> bool:
        return self._sink.started

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        await self._sink.start(status, headers, content_length, body, end)

    async def write(self, data: bytes) -> None:
        await self._sink.write(data)

    async def end(self, trailers: Headers) -> None:
        await self._sink.end(trailers)

    def abort(self) -> None:
        self._sink.abort()


class _ObservedSink(_HeadEditingSink):
    """Notes the status answered downstream (for the request's metrics, span and log line)."""

    __slots__ = ("status",)

    def __init__(self, sink: ResponseSink) -> None:
        super().__init__(sink)
        self.status = 0

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        self.status = status
        await self._sink.start(status, headers, content_length, body, end)


class _ExtraHeadersSink(_HeadEditingSink):
    """A sink that adds the policy chain's response headers (``x-ratelimit-*``) to the head. With
    ``inner_wins`` (MCP: the endpoint sets an item limit's headers itself) a name the response already
    has is not added again."""

    __slots__ = ("_extra", "_inner_wins")

    def __init__(self, sink: ResponseSink, extra: Headers, *, inner_wins: bool = False) -> None:
        super().__init__(sink)
        self._extra = extra
        self._inner_wins = inner_wins

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        extra = self._extra
        if self._inner_wins:
            present = {name for name, _ in headers}
            extra = [header for header in extra if header[0] not in present]
        await self._sink.start(status, [*headers, *extra], content_length, body, end)


class _CorsSink(_HeadEditingSink):
    """A sink that sets a CORS policy's response headers (MCP routes: the endpoint answers itself, and
    refusals of the policy chain must be readable by a browser client too, e.g. a 401's challenge)."""

    __slots__ = ("_cors", "_request_headers")

    def __init__(self, sink: ResponseSink, cors: CorsPolicy, request_headers: Headers) -> None:
        super().__init__(sink)
        self._cors = cors
        self._request_headers = request_headers

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        headers = self._cors.response_headers(self._request_headers, list(headers))
        await self._sink.start(status, headers, content_length, body, end)


class ProxyHandler:
    """The forwarding logic of a worker; `config` is swapped by ProxyServer.apply."""

    def __init__(self, pools: UpstreamPools, config: RuntimeConfig | None = None) -> None:
        self.pools = pools
        # The worker's policy state (compile caches, Redis clients, the JWKS refresh seam
        # `policies.on_jwks_refresh`) outlives configs; each config's policies compile when it is set.
        self.policies = WorkerPolicies()
        # A2A agents (card rewriters, header values) are built with each config, like its policies.
        self.a2a = A2aHandler()
        # Metrics, traces and the access log (the worker sets its recorders; all off by default).
        self.observability = Observability()
        # LLM backends: provider upstreams built with each config; provider health outlives configs.
        self.llm = LlmHandler(pools, lambda: self.observability)
        # (bind, route) -> the listener name the route lists for that bind (metrics and log label).
        self._listener_names: dict[tuple[tuple[str, int], str], str] = {}
        self._config = RuntimeConfig.empty()
        self._policy_table = self.policies.compile(self._config)
        if config is not None:
            self.config = config
        # Requests between their head and their last byte, over all connections.
        self.in_flight = 0
        # The worker's MCP sessions outlive requests; `aclose` ends them.
        self.mcp = McpEndpoint(modern=ModernEndpoint())

    def begin_drain(self) -> None:
        """End the streams that last until the client goes (MCP GET and listen streams), so a drain
        waits only for real requests."""
        self.mcp.end_streams()

    @property
    def config(self) -> RuntimeConfig:
        return self._config

    @config.setter
    def config(self, config: RuntimeConfig) -> None:
        """Swap in ``config`` with its policies compiled (unchanged sections reused): no request pays
        for compiling, and table and config change together (no await in between)."""
        table = self.policies.compile(config)
        self.a2a.apply(config)
        self.llm.apply(config)
        self.policies.activate(table)
        self._listener_names = _listener_names(config)
        self._policy_table = table
        self._config = config

    def prepare(self, config: RuntimeConfig) -> None:
        """Compile ``config``'s policies before it is applied; ConfigRejected (a NACK) when a policy core
        refuses a section the config compiler accepted. The swap then reuses the result. Without this
        call such a section fails closed (500) where it applies."""
        self.policies.compile(config).raise_if_problems()

    async def aclose(self) -> None:
        """End what outlives requests (MCP sessions and their upstream sessions, Redis connections)."""
        await self.mcp.aclose()
        await self.policies.aclose()

    async def handle(self, request: ProxyRequest, sink: ResponseSink) -> None:
        """Serve one request. Raises only ClientGone (and cancellation): everything else is
        answered here. Records it once (metric, span, access-log line) however it ends."""
        config = self.config
        observability = self.observability
        telemetry = observability.begin(request)
        observed = _ObservedSink(sink)
        try:
            await self._serve(config, request, observed, telemetry)
        except ProxyError as exc:
            telemetry.fail(error_reason(exc), exc.kind)
            await self._fail(request, observed, exc.status, exc.message, exc.kind)
        except RequestRejected as exc:
            telemetry.fail(RequestReason.BAD_REQUEST, "bad_request")
            await self._fail(request, observed, exc.status, exc.reason, "bad_request")
        except ClientGone:
            telemetry.fail(RequestReason.CLIENT_CLOSED)
            raise
        except BaseException as exc:
            # Cancellation: the connection is closing (the client went or the worker stops).
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            telemetry.fail(RequestReason.CLIENT_CLOSED if cancelled else RequestReason.INTERNAL_ERROR)
            raise
        finally:
            observability.finish(telemetry, observed.status)

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

    async def _serve(
        self, config: RuntimeConfig, request: ProxyRequest, sink: ResponseSink, telemetry: RequestTelemetry
    ) -> None:
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
        if group.listener_names:
            telemetry.record.listener = group.listener_names[0]  # until a route names its own
        table = self._policy_table
        if table.config is not config:  # cannot happen (no await since `handle` read the config): never mix
            table = self.policies.compile(config)
        if table.documents and (method_bytes == b"GET" or method_bytes == b"HEAD"):
            # RFC 9728 metadata of the protected (MCP) resources on this listener, answered here.
            document = table.document(request.listener_key, path)
            if document is not None:
                await sink.start(200, list(document.headers), len(document.body), document.body, True)
                return
        match = group.route_table.match(authority, path, query, method, HeaderView(request.headers))
        if match is None:
            raise NoRoute(f"no route for {method} {authority}{path}")
        listener = self._listener_names.get((request.listener_key, match.route.name), telemetry.record.listener)
        telemetry.routed(listener, match.route.name, "")
        await self._dispatch(request, sink, match, authority, path, query, table, telemetry)

    def _observe_policy(
        self, telemetry: RequestTelemetry, policy: RequestPolicy, outcome: Admitted | Refused
    ) -> None:
        """The chain's authorization, limit and budget decisions into the metrics and the access record."""
        metrics = self.observability.metrics
        decision = outcome.decision
        if decision is not None:
            telemetry.authorized(decision, policy.policies[0] if policy.policies else "")
        if metrics is None:
            return
        for limit in outcome.limits:
            metrics.record_rate_limit(
                limit.policy, allowed=limit.allowed, store_down=limit.reason is DecisionReason.STORE_DOWN
            )
        budgets = outcome.budgets if type(outcome) is Admitted else (outcome.budget,) if outcome.budget else ()
        for budget in budgets:
            metrics.record_budget(budget.policy, remaining=budget.remaining, limit=budget.limit, reset=budget.reset)

    async def _refuse(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        refused: Refused,
        telemetry: RequestTelemetry,
        llm_path: str | None = None,
    ) -> None:
        """Answer a request the policy chain refused (401, 403, 429, 503, or 500 failing closed); on
        an LLM backend (`llm_path`) in the error format of the API the client speaks."""
        telemetry.fail(refusal_reason(refused.reason, refused.status), refused.reason)
        if refused.status >= 500:
            log.warning(
                "request refused by policy",
                status=refused.status,
                kind=refused.reason,
                reason=refused.message,
                authority=request.authority.decode("latin-1"),
            )
        else:
            log.debug("request refused by policy", status=refused.status, kind=refused.reason)
        if llm_path is not None:
            answer = policy_refusal(llm_path, refused.status, refused.message, refused.reason)
            body = answer.body
            headers = [*answer.headers, (b"content-length", b"%d" % len(body))]
        else:
            headers, body = error_body(refused.message)
        headers.extend(refused.headers)
        await sink.start(refused.status, headers, len(body), body, True)

    async def _dispatch(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        match: RouteMatch,
        authority: str,
        path: str,
        query: str,
        table: PolicyTable,
        telemetry: RequestTelemetry,
    ) -> None:
        route = match.route
        status = route.direct_response_status
        if status or route.redirect is not None:
            # The rule answers itself, after its policy (authentication, authorization, limits).
            policy = table.lookup(request, route.name, "")
            if policy is not None and not policy.idle:
                outcome = await policy.evaluate(request)
                self._observe_policy(telemetry, policy, outcome)
                if isinstance(outcome, Refused):
                    await self._refuse(request, sink, outcome, telemetry)
                    return
                telemetry.identified(outcome.identity)
                if outcome.response_headers:
                    sink = _ExtraHeadersSink(sink, outcome.response_headers)
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
        telemetry.record.backend = choice.name
        telemetry.span.set_backend(choice.name)
        # The policy chain: CORS preflight (answered before authentication: browsers send it without
        # credentials), then authentication, identity headers, authorization, limits, budgets.
        policy = table.lookup(request, route.name, choice.name)
        effective = EMPTY_POLICY
        caller: CallerPolicy | None = None
        admitted: Admitted | None = None
        charge: Charge | None = None  # budgets and token limits: charged with the usage the response reports
        if policy is not None:
            effective = policy.effective
            if cluster.kind == "mcp":
                # Preflights are answered here, before any MCP parsing; every MCP answer (refusals too) gets CORS.
                plan = forward_policy(effective)
                if plan is not None and plan.mcp_cors is not None:
                    if is_preflight(request.method, request.headers):
                        await self._send_preflight_answer(sink, plan.mcp_cors, request.headers)
                        return
                    sink = _CorsSink(sink, plan.mcp_cors, request.headers)
            elif await self._answer_cors_preflight(request, sink, effective):
                return
            if not policy.idle:
                outcome = await policy.evaluate(request)
                self._observe_policy(telemetry, policy, outcome)
                if isinstance(outcome, Refused):
                    await self._refuse(request, sink, outcome, telemetry, path if cluster.kind == "llm" else None)
                    return
                telemetry.identified(outcome.identity)
                request.headers = outcome.headers
                admitted = outcome
                caller = outcome.mcp
                if outcome.wants_usage:
                    charge = outcome.charge
                if outcome.response_headers:
                    sink = _ExtraHeadersSink(sink, outcome.response_headers, inner_wins=cluster.kind == "mcp")
        if cluster.kind == "mcp" and cluster.mcp is not None:
            # The endpoint bounds each MCP request by the route's timeout itself: its GET streams outlive it.
            await self.mcp.handle(request, sink, cluster, route.request_timeout, caller, telemetry=telemetry)
            return
        if cluster.kind == "a2a" and cluster.a2a is not None:
            await self._serve_a2a(request, sink, match, choice, cluster, path, query, effective, admitted, telemetry)
            return
        if cluster.kind == "llm" and cluster.llm is not None:
            plan = forward_policy(effective)
            resilience = plan.resilience if plan is not None else None
            llm = LlmRequest(request, cluster, path, admitted, telemetry, llm_resilience(route, resilience))
            await self.llm.handle(llm, sink)  # bounded by the request timeout it was given
            return
        if cluster.kind != "http":
            # Protocol-aware backends (MCP, A2A, LLM) need their own handler.
            raise UnsupportedRequest(f"backend {cluster.name} is a {cluster.kind} backend, not served here yet")
        target = cluster.pick_target()
        if target is None:
            raise BackendUnavailable(f"backend {cluster.name} has no targets")
        metered: MeteredSink | None = None
        if charge is not None:
            sink = metered = MeteredSink(sink, charge, route=route.name)
            began = time.perf_counter()
        try:
            forwarding = self._forward(request, sink, match, choice, cluster, target, path, query, effective, telemetry)
            await _within_request_timeout(route, forwarding)
        finally:
            if metered is not None:  # however the response ended: charge what it reported, once
                usage = await metered.settle()
                if usage is not None:
                    self._observe_usage(telemetry, choice.name, usage, time.perf_counter() - began)

    def _observe_usage(self, telemetry: RequestTelemetry, backend: str, usage: TokenUsage, duration: float) -> None:
        """Metered token usage into the GenAI metrics and the access record. Only the backend is known
        here: it names the provider; the model is left to the LLM gateway."""
        provider = _provider_name(backend)
        record = telemetry.record
        record.llm_provider = provider
        record.llm_input_tokens = usage.input_tokens
        record.llm_output_tokens = usage.output_tokens
        metrics = self.observability.metrics
        if metrics is not None:
            metrics.record_llm(
                provider, "chat", "", input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                duration=duration,
            )  # fmt: skip

    async def _serve_a2a(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        match: RouteMatch,
        choice: BackendChoice,
        cluster: UpstreamCluster,
        path: str,
        query: str,
        policy: EffectivePolicy,
        admitted: Admitted | None,
        telemetry: RequestTelemetry,
    ) -> None:
        """Hand the request to the A2A handler with this forwarding path (the route's rewrite, filters and
        timeouts, the policy's credential, CORS and resilience) as its way to the agent."""
        route = match.route
        rewrite = route.url_rewrite
        upstream_path = path if rewrite is None else rewrite.rewrite_path(path, match.matched_prefix)
        agent = self.a2a.agent(cluster)
        replacement = rewrite.replace_prefix_match if rewrite is not None else None
        prefix = public_prefix(agent.base_path, match.matched_prefix, replacement)

        async def forward(forwarded: ProxyRequest, answer: ResponseSink) -> None:
            target = cluster.pick_target()
            if target is None:
                raise BackendUnavailable(f"backend {cluster.name} has no targets")
            forwarding = self._forward(
                forwarded, answer, match, choice, cluster, target, path, query, policy, telemetry
            )
            await _within_request_timeout(route, forwarding)

        a2a = A2aRequest(request, agent, upstream_path, query, prefix, admitted, telemetry)
        await self.a2a.handle(a2a, sink, forward)

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
        policy: EffectivePolicy,
        telemetry: RequestTelemetry,
    ) -> None:
        """Send the request upstream and relay the answer, under the effective policy's CORS, header
        modifiers, upstream credential, timeouts and retries (`policy`: EMPTY_POLICY when none applies)."""
        route = match.route
        plan = forward_policy(policy)
        if plan is not None and plan.cors is not None and is_preflight(request.method, request.headers):
            await self._send_preflight_answer(sink, plan.cors, request.headers)
            return
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
        if plan is not None:
            if plan.request_headers is not None:
                headers = plan.request_headers.apply(headers)
            credential = plan.credential
            if credential is not None:
                name = credential[0]
                headers = [header for header in headers if header[0] != name]
                headers.append(credential)
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
        reply = _Reply(route, choice, plan, request.headers, telemetry)
        if plan is not None and plan.resilience is not None:
            await self._forward_resilient(request, sink, cluster, target, upstream, reply, plan.resilience)
            return
        timeout = route.backend_timeout
        try:
            await self._try(
                self.pools.get(cluster, target), target, upstream, request.body, sink, reply, timeout, None, 0
            )
        except TimeoutError:
            raise GatewayTimeout(
                f"backend {cluster.name} ({target.authority}) sent no response within {timeout:g}s "
                f"(route {route.name} backend timeout)"
            ) from None

    async def _answer_cors_preflight(self, request: ProxyRequest, sink: ResponseSink, policy: EffectivePolicy) -> bool:
        """Answer a CORS preflight the policy governs (True), before authentication: browsers send
        preflights without credentials. False: not a preflight, or no CORS in the policy."""
        plan = forward_policy(policy)
        if plan is None or plan.cors is None or not is_preflight(request.method, request.headers):
            return False
        await self._send_preflight_answer(sink, plan.cors, request.headers)
        return True

    @staticmethod
    async def _send_preflight_answer(sink: ResponseSink, cors: CorsPolicy, request_headers: Headers) -> None:
        answer = cors.preflight(request_headers)
        if answer.status == 204:
            await sink.start(204, answer.headers, 0, b"", True)
            return
        log.debug("cors preflight refused", reason=answer.reason)
        await send_error(sink, answer.status, answer.reason)

    async def _forward_resilient(
        self,
        request: ProxyRequest,
        sink: ResponseSink,
        cluster: UpstreamCluster,
        target: UpstreamTarget,
        upstream: UpstreamRequest,
        reply: _Reply,
        resilience: ResilienceSettings,
    ) -> None:
        """Tries under a policy's timeouts and retries. The route's own timeouts win: its request
        timeout is enforced by the caller, its backend timeout bounds each try."""
        route = reply.route
        loop = asyncio.get_running_loop()
        retry = resilience.retry
        per_try = route.backend_timeout if route.backend_timeout is not None else resilience.per_try_timeout
        request_timeout = resilience.request_timeout if route.request_timeout is None else None
        deadline = loop.time() + request_timeout if request_timeout is not None else None
        body = request.body
        replay: ReplayableBody | None = None
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            if body is not None and retry is not None and retry.attempts:
                replay = ReplayableBody(body)
                if request.content_length is None or request.content_length <= REPLAY_BODY_CAP:
                    await replay.prime()
            state = RetryState(retry, deadline=deadline, body=replay)
            retries = state if retry is not None and retry.attempts else None
            tried: list[UpstreamTarget] = []
            while True:
                tried.append(target)
                timeout = state.try_timeout(per_try, loop.time())
                try_body = replay.reader() if replay is not None else body
                try:
                    delay = await self._try(
                        self.pools.get(cluster, target), target, upstream, try_body, sink, reply, timeout, retries,
                        len(tried) - 1,
                    )
                    if delay is None:
                        return
                    cause = "5xx response"
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise GatewayTimeout(
                            f"route {route.name}: request timeout of {request_timeout:g}s exceeded"
                        ) from None
                    delay = None if sink.started else state.decide("reset", loop.time())
                    if delay is None:
                        raise GatewayTimeout(
                            f"backend {cluster.name} ({target.authority}) sent no response within {timeout:g}s "
                            f"(route {route.name} per-try timeout)"
                        ) from None
                    cause = "per-try timeout"
                except ProxyError as exc:
                    kind = failure_kind(exc)
                    delay = None if sink.started or kind is None else state.decide(kind, loop.time())
                    if delay is None:
                        raise
                    cause = exc.kind
                log.info(
                    "retrying upstream request",
                    backend=cluster.name,
                    target=target.authority,
                    cause=cause,
                    retry=state.retries,
                    backoff=round(delay, 4),
                )
                if delay > 0:
                    await anyio.sleep(delay)
                target = next_target(cluster, tried) or target
        if scope.cancelled_caught:
            raise GatewayTimeout(f"route {route.name}: request timeout of {request_timeout:g}s exceeded")

    async def _try(
        self,
        pool: Pool,
        target: UpstreamTarget,
        upstream: UpstreamRequest,
        body: BodySource | None,
        sink: ResponseSink,
        reply: _Reply,
        try_timeout: float | None,
        retries: RetryState | None,
        attempt: int,
    ) -> float | None:
        """One try: send the request, await the response head within `try_timeout` (TimeoutError past
        it), relay the response. With `retries`, a 5xx the policy retries is dropped instead and the
        backoff before the next try returned; None means the response was relayed. Each try is a client
        span of its own (its trace context in the upstream headers)."""
        progress = _Progress(request_done=body is None)
        exchange: Exchange | None = None
        telemetry = reply.telemetry
        telemetry.record.upstream_address = target.authority
        call: ClientSpan = NOOP_CLIENT_SPAN
        span = telemetry.span
        if span is not NOOP_SERVER_SPAN:
            preset = telemetry.upstream_call if attempt == 0 else None
            call = preset if preset is not None else span.client_span(
                method=upstream.method, backend=reply.choice.name, address=target.host, port=target.port,
                path=upstream.target, attempt=attempt,
            )  # fmt: skip
            upstream = UpstreamRequest(
                upstream.method, upstream.target, upstream.authority, call.inject_headers(upstream.headers),
                upstream.has_body, upstream.content_length,
            )  # fmt: skip
        try:
            if body is None:
                if try_timeout is None:
                    exchange = await pool.exchange(upstream)
                else:
                    with anyio.fail_after(try_timeout):
                        exchange = await pool.exchange(upstream)
                if retries is not None:
                    delay = self._retry_status(exchange, (await exchange.response()).status, retries, progress)
                    if delay is not None:
                        return delay
                await self._relay(exchange, sink, reply, progress)
                return None
            whole = body.take_complete() if type(pool) is Http1Pool else None
            if whole is not None:
                # The whole body arrived with the head: head and body go upstream in one write,
                # without a pump task (the common case for JSON-RPC and API calls).
                progress.request_done = True
                if try_timeout is None:
                    exchange = await pool.open(upstream, whole)
                    head = await exchange.response()
                else:
                    with anyio.fail_after(try_timeout):
                        exchange = await pool.open(upstream, whole)
                        head = await exchange.response()
                if retries is not None:
                    delay = self._retry_status(exchange, head.status, retries, progress)
                    if delay is not None:
                        return delay
                await self._relay(exchange, sink, reply, progress)
                return None
            try:
                async with anyio.create_task_group() as tasks:
                    if try_timeout is None:
                        exchange = await pool.open(upstream)
                        tasks.start_soon(self._pump_body, body, exchange, progress)
                        head = await exchange.response()
                    else:
                        with anyio.fail_after(try_timeout):
                            exchange = await pool.open(upstream)
                            tasks.start_soon(self._pump_body, body, exchange, progress)
                            head = await exchange.response()
                    if retries is not None:
                        delay = self._retry_status(exchange, head.status, retries, progress)
                        if delay is not None:
                            tasks.cancel_scope.cancel()
                            return delay
                    await self._relay(exchange, sink, reply, progress)
                    # An early response (before the whole body was sent) ends the exchange.
                    tasks.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise _primary(group) from None
            return None
        except BaseException as exc:
            if call is not NOOP_CLIENT_SPAN:
                reason = error_reason(exc) if isinstance(exc, ProxyError) else (
                    RequestReason.TIMEOUT if isinstance(exc, TimeoutError) else RequestReason.CLIENT_CLOSED
                )
                call.end(progress.status, reason=reason.value, error=exc)
            raise
        finally:
            if exchange is not None and not (progress.request_done and progress.response_done):
                exchange.abort()
            if call is not NOOP_CLIENT_SPAN:
                call.end(progress.status, reason=RequestReason.OK.value)  # no-op when ended above

    @staticmethod
    def _retry_status(exchange: Exchange, status: int, retries: RetryState, progress: _Progress) -> float | None:
        """The backoff when a response of `status` is to be retried (the response is then dropped:
        a complete one leaves its connection reusable), else None."""
        progress.status = status
        if status < 500:
            return None
        delay = retries.decide(status, asyncio.get_running_loop().time())
        if delay is not None:
            _, progress.response_done = exchange.take_body()
        return delay

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
    async def _relay(exchange: Exchange, sink: ResponseSink, reply: _Reply, progress: _Progress) -> None:
        """Send the upstream response downstream, each piece as it arrives."""
        head = await exchange.response()
        progress.status = head.status
        headers = downstream_response_headers(head.headers)
        choice = reply.choice
        if choice.response_headers is not None:
            headers = choice.response_headers.apply(headers)
        route = reply.route
        if route.response_headers is not None:
            headers = route.response_headers.apply(headers)
        idle: float | None = None
        plan = reply.plan
        if plan is not None:
            if plan.response_headers is not None:
                headers = plan.response_headers.apply(headers)
            if plan.cors is not None:
                headers = plan.cors.response_headers(reply.request_headers, headers)
            if plan.resilience is not None:
                idle = plan.resilience.stream_idle_timeout
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
        if idle is not None:
            await _relay_until_idle(exchange, sink, progress, idle, head.content_length is None, route.name)
            return
        while True:
            data = await exchange.read()
            if not data:
                break
            await sink.write(data)
        progress.response_done = True
        await sink.end(exchange.trailers)


class _Reply:
    """What shapes the response of one request: the route's, backend's and policy's header edits,
    CORS (which reads the request's Origin) and the idle-stream bound."""

    __slots__ = ("choice", "plan", "request_headers", "route", "telemetry")

    def __init__(
        self,
        route: CompiledRoute,
        choice: BackendChoice,
        plan: ForwardPolicy | None,
        headers: Headers,
        telemetry: RequestTelemetry,
    ) -> None:
        self.route = route
        self.choice = choice
        self.plan = plan
        self.request_headers = headers
        self.telemetry = telemetry


def _listener_names(config: RuntimeConfig) -> dict[tuple[tuple[str, int], str], str]:
    """For each (bind, route) the first listener the Route resource lists on that bind: several listeners
    may share a socket, and the request metrics are labelled by the name the route was attached through."""
    bind_of = {name: bind for bind, group in config.listeners.items() for name in group.listener_names}
    names: dict[tuple[tuple[str, int], str], str] = {}
    for route_name, route in config.resources.get(ROUTE, {}).items():
        if not isinstance(route, pb.Route):
            continue
        for listener in route.listeners:
            bind = bind_of.get(listener)
            if bind is not None:
                names.setdefault((bind, route_name), listener)
    return names


class _IdleWatch:
    """Cancels `scope` once `idle` seconds pass without `touch`: one timer per stream, re-armed
    lazily, so a chunk costs a clock read rather than a timer or a cancel scope."""

    __slots__ = ("_idle", "_last", "_loop", "_scope", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float, scope: anyio.CancelScope) -> None:
        self._loop = loop
        self._idle = idle
        self._scope = scope
        self._last = loop.time()
        self._timer = loop.call_at(self._last + idle, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        due = self._last + self._idle
        if self._loop.time() >= due:
            self._scope.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._timer.cancel()


async def _relay_until_idle(
    exchange: Exchange, sink: ResponseSink, progress: _Progress, idle: float, can_end: bool, route: str
) -> None:
    """Relay the response body, ending it once no byte moved for `idle` seconds: cleanly (the last
    chunk, or END_STREAM) when its length was not announced, else by aborting the stream."""
    with anyio.CancelScope() as scope:
        watch = _IdleWatch(asyncio.get_running_loop(), idle, scope)
        try:
            while True:
                data = await exchange.read()
                if not data:
                    break
                watch.touch()
                await sink.write(data)
                watch.touch()
        finally:
            watch.stop()
    if scope.cancelled_caught:
        if not can_end:
            raise GatewayTimeout(f"route {route}: response stream idle for {idle:g}s (content-length not reached)")
        log.info("response stream idle, ended", route=route, idle_timeout=idle)
        await sink.end([])
        return
    progress.response_done = True
    await sink.end(exchange.trailers)
