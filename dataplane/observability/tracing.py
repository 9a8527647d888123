"""Request tracing: a server span per request, a client span per upstream call, W3C/B3 propagation.

The request path talks to small handles, never to the OpenTelemetry SDK directly:

    span = tracing.server_span(request, gateway="default/gw", listener="http")  # at arrival
    span.set_route("default/mcp", backend="default/tools")                   # once routed
    call = span.client_span(method=b"POST", backend="default/echo", address="10.0.0.7", port=80, attempt=0)
    headers = call.inject_headers(headers)             # traceparent (+ B3 if the client used it)
    call.end(502, reason="upstream_error")              # each retry attempt is its own client span
    span.end(200, reason="ok")

MCP fan-outs take `span.mcp_span(target, method, tool=...)` per target (stdio targets get the context
through `call.inject_into_mcp_meta(params)`), A2A calls `span.a2a_span(...)`, model calls
`span.llm_span(provider, model)` then `call.set_usage(...)`.

Three costs, chosen per request:
- off (no endpoint, or before `start()`): `server_span` returns one shared no-op handle whose
  children are another shared no-op; nothing is allocated and headers pass through untouched.
- on, not sampled: no SDK object; a small handle with the ids to propagate (the caller's own ids
  when it sent some, new ones otherwise, flag 00).
- sampled: SDK spans, ended into a BatchSpanProcessor whose thread exports (the loop only appends to
  its queue; a full queue drops spans, counted and logged at most every 30 s).

Span and attribute names follow the OpenTelemetry semantic conventions (HTTP server/client, MCP,
GenAI); gateway-specific ones are `agentgate.*`. The query string is never recorded (it may carry
credentials).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from dataplane.http.messages import Headers, ProxyRequest
from dataplane.observability import propagation
from dataplane.observability.propagation import B3Style, IncomingContext
from dataplane.observability.sampling import Sampling
from dataplane.observability.settings import Protocol, TracingSettings
from shared.logging import get_logger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span as SdkSpan
    from opentelemetry.sdk.trace import Tracer, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from dataplane.observability.export import GuardedExporter, OtelLogBridge, Throttle

AttributeValue = str | bool | int | float

log = get_logger("dataplane.tracing")

INSTRUMENTATION_SCOPE: Final = "agentgate.dataplane"
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
_ROOT: Final = Context()  # an explicit empty parent: never whatever span a contextvar holds
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_getrandbits = random.getrandbits


def _new_trace_id() -> int:
    return _getrandbits(128) or 1


def _new_span_id() -> int:
    return _getrandbits(64) or 1


# --- the handles ----------------------------------------------------------------------------------


class _SpanHandle:
    """A span as the request path sees it. This base does nothing: it is the tracing-off handle."""

    __slots__ = ()

    # False when nothing is recorded (attributes are dropped): callers may skip building them.
    recording: bool = False
    # 0 when tracing is off; else the ids this hop propagates (for log correlation).
    trace_id: int = 0
    span_id: int = 0

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        pass

    def set_mcp(
        self,
        method: str,
        *,
        tool: str | None = None,
        target: str | None = None,
        session_id: str | None = None,
        request_id: str | int | None = None,
    ) -> None:
        """MCP attributes: mcp.method.name, gen_ai.tool.name (tools/call), agentgate.mcp.target..."""

    def set_a2a(self, method: str | None = None, *, task_id: str | None = None, agent: str | None = None) -> None:
        """A2A attributes: a2a.method.name, a2a.task.id, gen_ai.agent.name (the task id may only be
        known from the agent's answer)."""

    def set_llm(self, provider: str, model: str, *, operation: str = "chat") -> None:
        """GenAI request attributes (gen_ai.provider.name and gen_ai.system, gen_ai.request.model...)."""

    def set_usage(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        response_model: str | None = None,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> None:
        """GenAI usage (gen_ai.usage.input_tokens, output_tokens, cache...; gen_ai.response.model)."""

    def inject_headers(self, headers: Headers) -> Headers:
        """The upstream request headers carrying this span's context (client copies replaced)."""
        return headers

    def inject_into_mcp_meta(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """JSON-RPC params whose `_meta` carries this span's W3C context (SEP-414), for targets
        without headers; a copy, `params` itself is left as it was."""
        return params

    def end(self, status: int | None = None, *, reason: str | None = None, error: BaseException | None = None) -> None:
        """End the span: `status` the HTTP status answered (None: no answer), `reason` why the
        gateway ended it so (`RequestReason`), `error` an exception that ended it. Idempotent."""


class ClientSpan(_SpanHandle):
    """One upstream call (one attempt). This class itself is the no-op handle."""

    __slots__ = ()


class ServerSpan(_SpanHandle):
    """One downstream request. This class itself is the no-op handle."""

    __slots__ = ()

    def set_route(self, route: str, *, backend: str | None = None) -> None:
        """The route (and backend) chosen: the span becomes "<METHOD> <route>"."""

    def set_backend(self, backend: str) -> None:
        pass

    def client_span(
        self,
        *,
        method: bytes | str = b"",
        backend: str = "",
        address: str = "",
        port: int = 0,
        path: bytes | str = b"",
        attempt: int = 0,
    ) -> ClientSpan:
        """An HTTP call to an upstream; `attempt` counts retries (0 first, http.request.resend_count)."""
        return NOOP_CLIENT_SPAN

    def mcp_span(
        self,
        target: str,
        method: str,
        *,
        tool: str | None = None,
        attempt: int = 0,
        address: str = "",
        port: int = 0,
        stdio: bool = False,
        request_id: str | int | None = None,
    ) -> ClientSpan:
        """A call to one MCP target (one per target of a fan-out, one per retry attempt)."""
        return NOOP_CLIENT_SPAN

    def a2a_span(
        self,
        method: str,
        *,
        task_id: str | None = None,
        agent: str | None = None,
        backend: str = "",
        address: str = "",
        port: int = 0,
        attempt: int = 0,
    ) -> ClientSpan:
        """A call to an A2A agent."""
        return NOOP_CLIENT_SPAN

    def llm_span(
        self,
        provider: str,
        model: str,
        *,
        operation: str = "chat",
        backend: str = "",
        address: str = "",
        port: int = 0,
        attempt: int = 0,
    ) -> ClientSpan:
        """A call to a model provider, named "<operation> <model>" as GenAI spans are."""
        return NOOP_CLIENT_SPAN


NOOP_CLIENT_SPAN: Final = ClientSpan()
NOOP_SERVER_SPAN: Final = ServerSpan()


# --- not sampled: ids to propagate, nothing recorded -------------------------------------------


class _UnsampledClientSpan(ClientSpan):
    __slots__ = ("_b3", "_tracestate", "span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int, tracestate: bytes, b3: B3Style) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self._tracestate = tracestate
        self._b3 = b3

    def inject_headers(self, headers: Headers) -> Headers:
        return propagation.inject(headers, self.trace_id, self.span_id, False, self._tracestate, self._b3)

    def inject_into_mcp_meta(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return propagation.inject_mcp_meta(
            params,
            propagation.format_traceparent(self.trace_id, self.span_id, False).decode(),
            self._tracestate.decode(),
        )


class _UnsampledServerSpan(ServerSpan):
    """Every child of an unsampled request propagates the same context, so they share one handle."""

    __slots__ = ("_child", "span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int, tracestate: bytes, b3: B3Style) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self._child = _UnsampledClientSpan(trace_id, span_id, tracestate, b3)

    def inject_headers(self, headers: Headers) -> Headers:
        return self._child.inject_headers(headers)

    def inject_into_mcp_meta(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return self._child.inject_into_mcp_meta(params)

    def client_span(self, **_: Any) -> ClientSpan:
        return self._child

    def mcp_span(self, target: str, method: str, **_: Any) -> ClientSpan:
        return self._child

    def a2a_span(self, method: str, **_: Any) -> ClientSpan:
        return self._child

    def llm_span(self, provider: str, model: str, **_: Any) -> ClientSpan:
        return self._child


# --- sampled: SDK spans ----------------------------------------------------------------------------


def _mcp_attributes(
    attributes: dict[str, AttributeValue],
    method: str,
    tool: str | None,
    target: str | None,
    session_id: str | None,
    request_id: str | int | None,
) -> None:
    attributes["mcp.method.name"] = method
    if tool is not None:
        attributes["gen_ai.tool.name" if method == "tools/call" else "gen_ai.prompt.name"] = tool
        if method == "tools/call":
            attributes["gen_ai.operation.name"] = "execute_tool"
    if target is not None:
        attributes["agentgate.mcp.target"] = target
    if session_id is not None:
        attributes["mcp.session.id"] = session_id
    if request_id is not None:
        attributes["jsonrpc.request.id"] = str(request_id)


def _a2a_attributes(
    attributes: dict[str, AttributeValue], method: str | None, task_id: str | None, agent: str | None
) -> None:
    if method is not None:
        attributes["a2a.method.name"] = method
        attributes["gen_ai.operation.name"] = "invoke_agent"
    if task_id is not None:
        attributes["a2a.task.id"] = task_id
    if agent is not None:
        attributes["gen_ai.agent.name"] = agent


def _llm_attributes(attributes: dict[str, AttributeValue], provider: str, model: str, operation: str) -> None:
    attributes["gen_ai.operation.name"] = operation
    attributes["gen_ai.provider.name"] = provider
    # The older name, still what many backends (and Jaeger's GenAI views) read.
    attributes["gen_ai.system"] = provider
    attributes["gen_ai.request.model"] = model


def _usage_attributes(
    attributes: dict[str, AttributeValue],
    input_tokens: int,
    output_tokens: int,
    response_model: str | None,
    cache_read: int,
    cache_creation: int,
) -> None:
    attributes["gen_ai.usage.input_tokens"] = input_tokens
    attributes["gen_ai.usage.output_tokens"] = output_tokens
    if cache_read:
        attributes["gen_ai.usage.cache_read.input_tokens"] = cache_read
    if cache_creation:
        attributes["gen_ai.usage.cache_creation.input_tokens"] = cache_creation
    if response_model is not None:
        attributes["gen_ai.response.model"] = response_model


def _peer(attributes: dict[str, AttributeValue], address: str, port: int) -> None:
    if address:
        attributes["server.address"] = address
    if port:
        attributes["server.port"] = port


class _Recorded:
    """What sampled server and client handles share: an SDK span and the context they propagate."""

    __slots__ = ()

    _span: SdkSpan
    _server: bool
    _ended: bool
    _tracestate: bytes
    _b3: B3Style
    trace_id: int
    span_id: int

    def _set(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self._ended:
            self._span.set_attributes(attributes)

    def _inject_headers(self, headers: Headers) -> Headers:
        return propagation.inject(headers, self.trace_id, self.span_id, True, self._tracestate, self._b3)

    def _inject_meta(self, params: dict[str, Any] | None) -> dict[str, Any]:
        traceparent = propagation.format_traceparent(self.trace_id, self.span_id, True).decode()
        return propagation.inject_mcp_meta(params, traceparent, self._tracestate.decode())

    def _end(self, status: int | None, reason: str | None, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        attributes: dict[str, AttributeValue] = {}
        failed = error is not None
        if status is not None:
            attributes["http.response.status_code"] = status
            failed = failed or status >= (500 if self._server else 400)
        if reason is not None:
            reason = str(reason)
            attributes["agentgate.reason"] = reason
            # No answer at all, for a reason other than success: the call failed.
            failed = failed or (status is None and reason != "ok")
        span = self._span
        if failed:
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
            elif reason is not None and reason != "ok":
                attributes["error.type"] = reason
            elif status is not None:
                attributes["error.type"] = str(status)
            span.set_status(Status(StatusCode.ERROR, None if error is None else str(error) or None))
        if attributes:
            span.set_attributes(attributes)
        span.end()


class _SampledClientSpan(_Recorded, ClientSpan):
    __slots__ = ("_b3", "_ended", "_server", "_span", "_tracestate", "span_id", "trace_id")

    recording = True

    def __init__(self, span: SdkSpan, tracestate: bytes, b3: B3Style) -> None:
        self._span = span
        self._server = False
        self._ended = False
        self._tracestate = tracestate
        self._b3 = b3
        context = span.get_span_context()
        self.trace_id = context.trace_id
        self.span_id = context.span_id

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._set({key: value})

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self._set(attributes)

    def set_mcp(
        self,
        method: str,
        *,
        tool: str | None = None,
        target: str | None = None,
        session_id: str | None = None,
        request_id: str | int | None = None,
    ) -> None:
        attributes: dict[str, AttributeValue] = {}
        _mcp_attributes(attributes, method, tool, target, session_id, request_id)
        self._set(attributes)

    def set_a2a(self, method: str | None = None, *, task_id: str | None = None, agent: str | None = None) -> None:
        attributes: dict[str, AttributeValue] = {}
        _a2a_attributes(attributes, method, task_id, agent)
        self._set(attributes)

    def set_llm(self, provider: str, model: str, *, operation: str = "chat") -> None:
        attributes: dict[str, AttributeValue] = {}
        _llm_attributes(attributes, provider, model, operation)
        self._set(attributes)

    def set_usage(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        response_model: str | None = None,
        cache_read_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> None:
        attributes: dict[str, AttributeValue] = {}
        _usage_attributes(
            attributes, input_tokens, output_tokens, response_model, cache_read_input_tokens,
            cache_creation_input_tokens,
        )
        self._set(attributes)

    def inject_headers(self, headers: Headers) -> Headers:
        return self._inject_headers(headers)

    def inject_into_mcp_meta(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return self._inject_meta(params)

    def end(self, status: int | None = None, *, reason: str | None = None, error: BaseException | None = None) -> None:
        self._end(status, reason, error)


class _SampledServerSpan(_Recorded, ServerSpan):
    __slots__ = (
        "_b3",
        "_children",
        "_ended",
        "_method",
        "_server",
        "_span",
        "_tracer",
        "_tracestate",
        "span_id",
        "trace_id",
    )

    recording = True

    def __init__(self, tracer: Tracer, span: SdkSpan, method: str, tracestate: bytes, b3: B3Style) -> None:
        self._tracer = tracer
        self._span = span
        self._server = True
        self._ended = False
        self._method = method
        self._tracestate = tracestate
        self._b3 = b3
        self._children: Context | None = None
        context = span.get_span_context()
        self.trace_id = context.trace_id
        self.span_id = context.span_id

    # Same setters as the client handle.
    set_attribute = _SampledClientSpan.set_attribute
    set_attributes = _SampledClientSpan.set_attributes
    set_mcp = _SampledClientSpan.set_mcp
    set_a2a = _SampledClientSpan.set_a2a
    set_llm = _SampledClientSpan.set_llm
    set_usage = _SampledClientSpan.set_usage

    def set_route(self, route: str, *, backend: str | None = None) -> None:
        if self._ended:
            return
        self._span.update_name(f"{self._method} {route}")
        attributes: dict[str, AttributeValue] = {"agentgate.route": route}
        if backend is not None:
            attributes["agentgate.backend"] = backend
        self._span.set_attributes(attributes)

    def set_backend(self, backend: str) -> None:
        self._set({"agentgate.backend": backend})

    def inject_headers(self, headers: Headers) -> Headers:
        return self._inject_headers(headers)

    def inject_into_mcp_meta(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        return self._inject_meta(params)

    def end(self, status: int | None = None, *, reason: str | None = None, error: BaseException | None = None) -> None:
        self._end(status, reason, error)

    def _child(self, name: str, attributes: dict[str, AttributeValue], attempt: int) -> ClientSpan:
        if attempt:
            attributes["http.request.resend_count"] = attempt
        context = self._children
        if context is None:
            context = self._children = set_span_in_context(self._span)
        span = self._tracer.start_span(name, context, SpanKind.CLIENT, attributes)
        return _SampledClientSpan(span, self._tracestate, self._b3)  # type: ignore[arg-type]

    def client_span(
        self,
        *,
        method: bytes | str = b"",
        backend: str = "",
        address: str = "",
        port: int = 0,
        path: bytes | str = b"",
        attempt: int = 0,
    ) -> ClientSpan:
        name = method.decode("latin-1") if isinstance(method, bytes) else method
        attributes: dict[str, AttributeValue]
        if name in _KNOWN_METHODS:
            attributes = {"http.request.method": name}
        else:
            attributes = {"http.request.method": "_OTHER"}
            if name:
                attributes["http.request.method_original"] = name
            name = "HTTP"
        if backend:
            attributes["agentgate.backend"] = backend
        if path:
            attributes["url.path"] = path.decode("latin-1") if isinstance(path, bytes) else path
        _peer(attributes, address, port)
        return self._child(name, attributes, attempt)

    def mcp_span(
        self,
        target: str,
        method: str,
        *,
        tool: str | None = None,
        attempt: int = 0,
        address: str = "",
        port: int = 0,
        stdio: bool = False,
        request_id: str | int | None = None,
    ) -> ClientSpan:
        attributes: dict[str, AttributeValue] = {}
        _mcp_attributes(attributes, method, tool, target, None, request_id)
        attributes["network.transport"] = "pipe" if stdio else "tcp"
        _peer(attributes, address, port)
        return self._child(f"{method} {tool}" if tool else method, attributes, attempt)

    def a2a_span(
        self,
        method: str,
        *,
        task_id: str | None = None,
        agent: str | None = None,
        backend: str = "",
        address: str = "",
        port: int = 0,
        attempt: int = 0,
    ) -> ClientSpan:
        attributes: dict[str, AttributeValue] = {}
        _a2a_attributes(attributes, method, task_id, agent)
        if backend:
            attributes["agentgate.backend"] = backend
        _peer(attributes, address, port)
        return self._child(f"invoke_agent {agent}" if agent else method, attributes, attempt)

    def llm_span(
        self,
        provider: str,
        model: str,
        *,
        operation: str = "chat",
        backend: str = "",
        address: str = "",
        port: int = 0,
        attempt: int = 0,
    ) -> ClientSpan:
        attributes: dict[str, AttributeValue] = {}
        _llm_attributes(attributes, provider, model, operation)
        if backend:
            attributes["agentgate.backend"] = backend
        _peer(attributes, address, port)
        return self._child(f"{operation} {model}" if model else operation, attributes, attempt)


def _host(authority: bytes) -> str:
    """The host of an authority (`host`, `host:port`, `[v6]:port`)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[1:end].decode("latin-1") if end > 0 else authority.decode("latin-1")
    host, sep, port = authority.rpartition(b":")
    return (host if sep and port.isdigit() else authority).decode("latin-1")


def _trace_state(tracestate: bytes) -> TraceState:
    if not tracestate:
        return TraceState()
    pairs = []
    for member in tracestate.decode("ascii").split(","):
        key, _, value = member.partition("=")
        pairs.append((key, value))
    return TraceState(pairs)


# --- the tracer ------------------------------------------------------------------------------------


class Tracing:
    """One per worker process: `start()` once serving, `await shutdown()` on drain (flushes)."""

    def __init__(self, settings: TracingSettings | None = None) -> None:
        self.settings = settings or TracingSettings()
        self._sampling = Sampling(self.settings.sampler, self.settings.ratio)
        self._active = False
        self._tracer: Tracer | None = None
        self._provider: TracerProvider | None = None
        self._processor: BatchSpanProcessor | None = None
        self._bridge: OtelLogBridge | None = None
        self.exporter: GuardedExporter | None = None
        self.throttle: Throttle | None = None

    @property
    def enabled(self) -> bool:
        """Started with an endpoint: spans may be recorded and contexts are propagated."""
        return self._active

    def start(self) -> None:
        """Build the SDK pipeline (no-op when tracing is off, or already started). Raises
        RuntimeError when the exporter cannot be loaded."""
        settings = self.settings
        if settings.endpoint is None or self._provider is not None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
            from opentelemetry.sdk.version import __version__ as sdk_version

            from dataplane.observability.export import GuardedExporter, Throttle, install_log_bridge

            if settings.protocol is Protocol.GRPC:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

                inner: Any = GrpcExporter(
                    endpoint=settings.endpoint,
                    insecure=settings.endpoint.startswith("http://"),
                    headers=tuple(settings.headers.items()),
                    timeout=settings.export_timeout_ms / 1000,
                )
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                inner = HttpExporter(
                    endpoint=settings.endpoint,
                    headers=dict(settings.headers),
                    timeout=settings.export_timeout_ms / 1000,
                )
        except ImportError as error:
            raise RuntimeError(
                f"tracing: the OTLP {settings.protocol} exporter cannot be loaded ({error}); if the message names "
                "opentelemetry.proto, another package (xds-protos) overwrote opentelemetry-proto's modules: "
                "reinstall it with `pip install --force-reinstall --no-deps opentelemetry-proto`"
            ) from error

        resource = Resource(
            {
                "telemetry.sdk.language": "python",
                "telemetry.sdk.name": "opentelemetry",
                "telemetry.sdk.version": sdk_version,
                **settings.resource_attributes,
                "service.name": settings.service_name,
            }
        )
        # The gateway samples before the SDK sees a span (sampling.py): what reaches it is kept.
        provider = TracerProvider(sampler=ALWAYS_ON, resource=resource, shutdown_on_exit=False)
        self.throttle = Throttle()
        self.exporter = GuardedExporter(inner, settings.endpoint, settings.protocol.value, self.throttle)
        batch = settings.batch
        self._processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=batch.max_queue_size,
            schedule_delay_millis=batch.schedule_delay_ms,
            max_export_batch_size=batch.max_export_batch_size,
            export_timeout_millis=batch.export_timeout_ms,
        )
        provider.add_span_processor(self._processor)
        self._bridge = install_log_bridge(self.throttle)
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION_SCOPE)
        self._active = True

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Export what has ended (blocks this thread: from the loop, use `flush`)."""
        provider = self._provider
        return True if provider is None else provider.force_flush(int(timeout * 1000))

    async def flush(self, within: float = 10.0) -> bool:
        """`force_flush` on a worker thread, so the loop keeps serving (and receivers keep receiving)."""
        return await anyio.to_thread.run_sync(self.force_flush, within)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop tracing (new requests get the no-op handle), export what is queued within `grace`
        seconds, release the exporter. For the worker's drain."""
        self._active = False
        if self._provider is not None:
            await anyio.to_thread.run_sync(self._close, grace)

    def _close(self, grace: float) -> None:
        provider, bridge = self._provider, self._bridge
        self._provider = self._processor = self._bridge = None
        self._tracer = None
        if provider is not None:
            # The SDK's shutdown exports everything queued but has no deadline of its own (a dead
            # collector holds it for the exporter's retries, batch after batch): run it on a daemon
            # thread and stop waiting after `grace`.
            closer = threading.Thread(target=provider.shutdown, name="agentgate-tracing-shutdown", daemon=True)
            closer.start()
            closer.join(grace)
            if closer.is_alive():
                log.warning("tracing shutdown: spans still exporting after the grace period were abandoned",
                            grace_s=grace, endpoint=self.settings.endpoint)
        if bridge is not None:
            from dataplane.observability.export import remove_log_bridge

            remove_log_bridge(bridge)

    def server_span(
        self,
        request: ProxyRequest,
        *,
        gateway: str = "",
        listener: str = "",
        parent: IncomingContext | None = None,
        start_time_ns: int | None = None,
    ) -> ServerSpan:
        """The span of one downstream request. Its parent is `parent` when given (say, read from an
        MCP `_meta`), else what the request headers carry; `start_time_ns` (time.time_ns()) lets a
        handler that reads the body first still start the span at arrival."""
        if not self._active:
            return NOOP_SERVER_SPAN
        incoming = parent if parent is not None else propagation.extract(request.headers)
        if incoming is None:
            trace_id = _new_trace_id()
            if not self._sampling.decide(trace_id, None):
                return _UnsampledServerSpan(trace_id, _new_span_id(), b"", B3Style.NONE)
        elif incoming.trace_id:
            trace_id = incoming.trace_id
            if not self._sampling.decide(trace_id, incoming.sampled):
                # Not ours to record: pass the caller's context on as it came.
                return _UnsampledServerSpan(trace_id, incoming.span_id, incoming.tracestate, incoming.b3)
        else:  # a bare B3 sampling decision
            trace_id = _new_trace_id()
            if not self._sampling.decide(trace_id, incoming.sampled):
                return _UnsampledServerSpan(trace_id, _new_span_id(), b"", incoming.b3)
        return self._start_sampled(request, incoming, gateway, listener, start_time_ns)

    def _start_sampled(
        self,
        request: ProxyRequest,
        incoming: IncomingContext | None,
        gateway: str,
        listener: str,
        start_time_ns: int | None,
    ) -> ServerSpan:
        tracer = self._tracer
        assert tracer is not None
        tracestate = b""
        b3 = B3Style.NONE
        context = _ROOT
        if incoming is not None:
            b3 = incoming.b3
            if incoming.trace_id:
                tracestate = incoming.tracestate
                context = set_span_in_context(
                    NonRecordingSpan(
                        SpanContext(
                            incoming.trace_id,
                            incoming.span_id,
                            True,
                            _SAMPLED if incoming.sampled else _NOT_SAMPLED,
                            _trace_state(tracestate),
                        )
                    )
                )
        method = request.method.decode("latin-1")
        known = method in _KNOWN_METHODS
        target = request.target
        query = target.find(b"?")
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method if known else "_OTHER",
            "url.path": (target if query < 0 else target[:query]).decode("latin-1"),
            "url.scheme": request.scheme.decode("latin-1"),
            "server.address": _host(request.authority),
            "server.port": request.server_port,
            "client.address": request.client_host.decode("latin-1"),
            "network.protocol.name": "http",
            "network.protocol.version": "2" if request.version == b"2" else request.version.decode("latin-1"),
        }
        if not known:
            attributes["http.request.method_original"] = method
            method = "HTTP"
        if gateway:
            attributes["agentgate.gateway"] = gateway
        if listener:
            attributes["agentgate.listener"] = listener
        for name, value in request.headers:
            if name == b"user-agent":
                attributes["user_agent.original"] = value.decode("latin-1")
                break
        span = tracer.start_span(method, context, SpanKind.SERVER, attributes, start_time=start_time_ns)
        return _SampledServerSpan(tracer, span, method, tracestate, b3)  # type: ignore[arg-type]


def inject_into_mcp_meta(params: dict[str, Any] | None, span: _SpanHandle) -> dict[str, Any] | None:
    """`span.inject_into_mcp_meta(params)`, for callers holding the span apart from the params."""
    return span.inject_into_mcp_meta(params)
