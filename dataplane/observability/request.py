"""One request's telemetry on the request path: its server span, its access record and why it ended.

The proxy opens a `RequestTelemetry` when a request arrives (`Observability.begin`), the routing and the
protocol handlers fill it as they learn things (route, backend, identity, MCP tool, A2A task...), and
`Observability.finish` records it once: one request metric, the span ended, one access-log line. Any of the
three recorders may be off: with tracing off the span is the shared no-op handle, with the access log off the
record is still the request's state (route, backend, timing) but never rendered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from dataplane.observability.access_log import AccessLog, AccessRecord
from dataplane.observability.metrics import RequestReason, WorkerMetrics
from dataplane.observability.tracing import NOOP_SERVER_SPAN, ClientSpan, ServerSpan, Tracing

if TYPE_CHECKING:
    from dataplane.http.messages import ProxyRequest
    from dataplane.policy.authorize import Decision
    from dataplane.policy.identity import Identity

_OK: Final = RequestReason.OK


class RequestTelemetry:
    """What one request has recorded so far. ``reason`` is the metric reason (`RequestReason`);
    ``record.reason`` the detailed one for the log line (a policy refusal's label, an error kind).
    ``upstream_call`` lets a protocol handler open the span of its upstream call itself (A2A): the
    forwarding path then uses it for its first attempt instead of a plain HTTP client span.
    ``metrics`` are the worker's (None: off), for protocol handlers' own metrics."""

    __slots__ = ("metrics", "reason", "record", "span", "upstream_call")

    def __init__(self, span: ServerSpan, record: AccessRecord, metrics: WorkerMetrics | None = None) -> None:
        self.span = span
        self.record = record
        self.metrics = metrics
        self.reason: RequestReason = _OK
        self.upstream_call: ClientSpan | None = None

    def routed(self, listener: str, route: str, backend: str) -> None:
        """Routing chose ``route`` (and ``backend``, "" when the rule answers itself)."""
        record = self.record
        record.listener = listener
        record.route = route
        record.backend = backend
        span = self.span
        if span is not NOOP_SERVER_SPAN:
            span.set_attribute("agentgate.listener", listener)
            span.set_route(route, backend=backend or None)

    def authorized(self, decision: Decision, fallback_policy: str = "") -> None:
        """An authorization decision (the policy chain's, or the deferred rules an A2A or LLM handler
        applies once it knows the method or model) into the access record and the authorization
        metric; a denial ends the request as an authorization refusal."""
        rule = decision.rule
        policy = rule.policy if rule is not None else fallback_policy
        self.record.note_decision(decision.allowed, policy, f"{rule.kind.value}[{rule.index}]" if rule else "")
        if self.metrics is not None:
            self.metrics.record_authorization(policy, allowed=decision.allowed)
        if not decision.allowed:
            self.fail(RequestReason.AUTHZ_DENIED, "authorization_denied")

    def identified(self, identity: Identity | None) -> None:
        """The caller the policy chain authenticated (None: anonymous)."""
        if identity is not None:
            self.record.principal = identity.principal
            if identity.namespace:
                self.record.source_namespace = identity.namespace

    def fail(self, reason: RequestReason, detail: str = "") -> None:
        """The gateway ended the request for ``reason`` (the last call wins)."""
        self.reason = reason
        if detail:
            self.record.reason = detail


class Observability:
    """A worker's recorders for the request path; each is optional (None: off). One per ProxyHandler."""

    __slots__ = ("access_log", "gateway", "metrics", "tracing")

    def __init__(
        self,
        *,
        gateway: str = "",
        tracing: Tracing | None = None,
        metrics: WorkerMetrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.gateway = gateway
        self.tracing = tracing
        self.metrics = metrics
        self.access_log = access_log

    def begin(self, request: ProxyRequest) -> RequestTelemetry:
        """Open the telemetry of a request that just arrived (its clock starts now)."""
        tracing = self.tracing
        span = NOOP_SERVER_SPAN if tracing is None else tracing.server_span(request, gateway=self.gateway)
        record = AccessRecord(gateway=self.gateway)
        if self.access_log is not None:  # the rest only shows in the line
            target = request.target
            query = target.find(b"?")
            record.method = request.method.decode("latin-1")
            record.authority = request.authority.decode("latin-1")
            record.path = (target if query < 0 else target[:query]).decode("latin-1")
            record.source_address = request.client_host.decode("latin-1")
        return RequestTelemetry(span, record, self.metrics)

    def finish(self, telemetry: RequestTelemetry, status: int) -> None:
        """Record a finished request once: metric, span end, access-log line. ``status`` 0: no response."""
        record = telemetry.record
        if not record.finish(status):
            return
        reason = telemetry.reason
        metrics = self.metrics
        if metrics is not None:
            metrics.record_request(record.listener, record.route, record.backend, status, reason, record.duration)
        span = telemetry.span
        if span is not NOOP_SERVER_SPAN:
            span.end(status or None, reason=reason.value)
        access_log = self.access_log
        if access_log is not None:
            if reason is not _OK and not record.reason:
                record.reason = reason.value
            if span.trace_id:
                record.trace_id = f"{span.trace_id:032x}"
            access_log.emit(record)
