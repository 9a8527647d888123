"""The A2A handler: the I/O shell around the sans-I/O core (methods, card, stream, errors).

The proxy routes a request to an A2A backend, runs the policy chain (authentication, limits; on A2A
backends every authorization rule is deferred to here), then calls ``A2aHandler.handle`` with a
``forward`` function: the proxy's own forwarding path (header modifiers, upstream credential, CORS,
timeouts, retries). The handler decides what to send and what the client gets back:

- **Paths** are read after the route's rewrite, relative to the agent's base path. A GET (or HEAD) of
  ``/.well-known/agent-card.json`` or ``/.well-known/agent.json`` is a card fetch; a POST to the base path
  itself is a JSON-RPC call; anything else is the 1.0 HTTP+JSON binding (a POST that is no REST operation
  is read as JSON-RPC, for agents whose JSON-RPC endpoint sits below their base path).
- **Cards** (and GetExtendedAgentCard / agent/getAuthenticatedExtendedCard results) are read whole, up to
  the rewriter's bound, and their URLs rewritten to the address the client used (X-Forwarded-Proto/Host,
  Host, the listener's scheme, and the route's public prefix when a ReplacePrefixMatch maps
  ``/agents/<name>`` onto the agent's base path). A card that is not a JSON object is a 502.
  ``If-None-Match`` and ``Accept-Encoding`` are not forwarded: the client's validators describe a card
  rewritten for its Host, and a compressed body could not be rewritten.
- **Calls**: the body is read up to the backend's ``max_request_bytes`` (413 beyond), classified (bad
  JSON, unknown methods, wrong types get the codes ``errors`` chooses and are never forwarded), then
  authorized and forwarded with the same bytes. Streams are relayed event by event by
  ``A2aStreamRelay`` (never buffered), so an agent that dies, stalls past a timeout or sends garbage
  mid-stream leaves the client one final error event and a clean end. Unary 2xx answers are read (up to
  4 MiB, beyond which they pass through unread) to check they are what the binding carries (else 502)
  and to log the task state. The agent down is a 502, a timeout a 504, with the request's id.
- **Identity**: client-sent ``x-source-agent`` and ``x-target-agent`` are removed; the agent gets
  ``x-target-agent: <agent name>`` and, when the policy authenticated the caller, ``x-source-agent:
  <principal>`` (``system:serviceaccount:NS:SA`` for Kubernetes service accounts; omitted if the
  principal holds control characters).
- **Authorization**: the deferred rules see ``a2a`` (``A2aCall.variables``; for a card fetch ``method``
  and ``operation`` are "") with ``target`` {name, namespace} taken from the agent name
  (``namespace/name``; a name without a namespace is in its Backend's namespace). A denial is 403 with
  JSON-RPC error -32011 (or the REST error body). **Cross-namespace calls**: when the caller's identity
  has a namespace (a service account) and it differs from the agent's, the call is denied the same way
  unless an ``allow`` rule held for it. Only an allow rule that held counts as explicit: no rules, an
  empty allow list or a policy with only ``deny`` / ``require`` rules never admits a call across
  namespaces.
- **Logs**: one ``a2a request`` line per request: agent, ``A2aCall.log_fields()``, binding, the task
  id, context id and last task state seen (request, JSON result or stream), events relayed, status and
  duration. The request's access record (``a2a`` section) carries method, task, context and state too;
  this line stays in the application log (stderr), which is another stream than the access log, so each
  log still has one line per request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from dataplane.a2a.card import CardRewriter, ExternalBase, external_base, is_card_path
from dataplane.a2a.errors import (
    CONTENT_TYPE,
    A2aError,
    A2aInvalidAgentResponse,
    A2aMethodNotAllowed,
    A2aMethodNotFound,
    A2aPolicyDenied,
    Binding,
    RequestId,
    agent_timeout,
    agent_unavailable,
    echo,
    payload_too_large,
    policy_denied,
)
from dataplane.a2a.methods import (
    VERSION_HEADER,
    A2aCall,
    A2aOperation,
    classify_jsonrpc,
    classify_rest,
    protocol_version,
)
from dataplane.a2a.stream import (
    DEFAULT_MAX_EVENT_BYTES,
    A2aStreamRelay,
    StreamEventInfo,
    describe_result,
    is_event_stream,
    normal_state,
)
from dataplane.config.model import RuntimeConfig, UpstreamCluster
from dataplane.http.errors import GatewayTimeout, ProxyError
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink, read_whole_body
from dataplane.mcp.jsonrpc import decode_json
from dataplane.observability.metrics import CallOutcome
from dataplane.policy.authorize import Decision, RuleKind, a2a_variables
from shared.logging import get_logger

if TYPE_CHECKING:
    from dataplane.observability.request import RequestTelemetry
    from dataplane.policy.chain import Admitted

log = get_logger("dataplane.a2a")

Forward = Callable[[ProxyRequest, ResponseSink], Awaitable[None]]

SOURCE_AGENT: Final = b"x-source-agent"
TARGET_AGENT: Final = b"x-target-agent"
# Request headers never forwarded to an agent (see the module docstring); content-length is re-set.
_DROPPED: Final = frozenset({SOURCE_AGENT, TARGET_AGENT, b"accept-encoding", b"content-length"})
_CARD_DROPPED: Final = _DROPPED | {b"if-none-match", b"if-modified-since"}
_REWRITTEN_DROPPED: Final = frozenset({b"content-length", b"etag", b"last-modified", b"content-encoding"})
_STREAM_DROPPED: Final = frozenset({b"content-length"})
# Unary answers larger than this pass through without being checked (A2A results are small).
MAX_INSPECTED_BYTES: Final = DEFAULT_MAX_EVENT_BYTES
_CARD_OPERATIONS: Final = frozenset({A2aOperation.GET_EXTENDED_CARD})
# What the client is told for each way of failing to reach the agent (addresses stay in the log).
_FAILURE_DETAILS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "upstream_connect_failed": "connection failed",
        "upstream_reset": "connection lost",
        "upstream_stale": "connection lost",
        "upstream_protocol_error": "invalid HTTP response",
        "backend_unavailable": "no endpoint available",
        "pool_exhausted": "too many connections",
    }
)


# --- config time --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class A2aAgent:
    """One A2A backend as the handler reads it, built when config is applied."""

    cluster: UpstreamCluster
    name: str  # as configured: x-target-agent, logs
    target_name: str  # ``a2a.target.name``
    namespace: str  # ``a2a.target.namespace``
    base_path: str  # no trailing slash; "" for the root
    max_request_bytes: int
    rewriter: CardRewriter
    target_header: bytes


def compile_agent(cluster: UpstreamCluster) -> A2aAgent:
    """The agent of an A2A cluster (``cluster.a2a`` set)."""
    settings = cluster.a2a
    assert settings is not None, cluster.name
    namespace, slash, short = settings.agent_name.rpartition("/")
    if not slash:  # a bare name lives in its Backend's namespace (backend keys are "namespace/name")
        backend_namespace, has_namespace, _ = cluster.name.partition("/")
        namespace = backend_namespace if has_namespace else ""
    base = "" if settings.base_path == "/" else settings.base_path
    scheme = "https" if cluster.ssl_context is not None else "http"
    authority = cluster.targets[0].authority if cluster.targets else "agent.invalid"
    try:
        rewriter = CardRewriter(upstream_base=f"{scheme}://{authority}{base}/", signed_cards=settings.signed_cards)
    except ValueError:  # an address urlsplit cannot read: match the agent's URLs by path alone
        rewriter = CardRewriter(upstream_base=f"{scheme}://agent.invalid{base}/", signed_cards=settings.signed_cards)
    return A2aAgent(
        cluster=cluster,
        name=settings.agent_name,
        target_name=short,
        namespace=namespace,
        base_path=base,
        max_request_bytes=settings.max_request_bytes,
        rewriter=rewriter,
        target_header=settings.agent_name.encode(),
    )


def compile_agents(config: RuntimeConfig) -> Mapping[str, A2aAgent]:
    """Every A2A backend of ``config``, by backend name."""
    return MappingProxyType(
        {name: compile_agent(cluster) for name, cluster in config.backends.items() if cluster.a2a is not None}
    )


def relative_path(upstream_path: str, base_path: str) -> str | None:
    """``upstream_path`` below the agent's base path ("/" for the base itself); None when outside it."""
    if not base_path:
        return upstream_path or "/"
    if upstream_path == base_path:
        return "/"
    if upstream_path.startswith(base_path + "/"):
        return upstream_path[len(base_path) :]
    return None


# --- request time -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class A2aRequest:
    """What the proxy knows about one request to an agent: ``upstream_path`` is the path after the route's
    rewrite (no query), ``public_prefix`` the gateway path of the agent's base (``card.public_prefix``),
    ``admitted`` the policy chain's outcome (None when no policy applies)."""

    request: ProxyRequest
    agent: A2aAgent
    upstream_path: str
    query: str
    public_prefix: str
    admitted: Admitted | None
    # The request's span, access record and metrics (None: not observed, as in handler tests).
    telemetry: RequestTelemetry | None = None


class _BufferedBody:
    """A request body already read (a ``BodySource`` that replays it once)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def take_complete(self) -> bytes | None:
        data, self._data = self._data, b""
        return data

    async def read(self) -> bytes:
        data, self._data = self._data, b""
        return data

    @property
    def trailers(self) -> Headers:
        return []


class _RelayClosed(Exception):
    """The stream relay ended the client's stream itself (garbage from the agent): stop reading the agent."""


class _AgentAnswer:
    """The sink the forwarding path writes the agent's answer into. At the head it picks a mode: an SSE
    stream is relayed event by event (``relay``); a 2xx answer is held (up to ``limit``) for the handler to
    check or rewrite (``capture``); anything else goes straight to the client (``pass``). A capture over the
    limit fails with ``overflow`` (cards) or, without one, turns into ``pass``."""

    __slots__ = (
        "_overflow",
        "_relay",
        "body",
        "client",
        "complete",
        "content_length",
        "headers",
        "limit",
        "mode",
        "started",
        "status",
    )

    def __init__(
        self,
        sink: ResponseSink,
        *,
        relay: A2aStreamRelay | None,
        limit: int,
        overflow: Callable[[], A2aError] | None = None,
        capture: bool = True,
    ) -> None:
        self.client = sink  # the client's sink
        self._relay = relay
        self._overflow = overflow
        self.limit = limit
        self.mode = "" if capture else "pass"
        self.started = False
        self.status = 0
        self.headers: Headers = []
        self.content_length: int | None = None
        self.body = bytearray()
        self.complete = False

    @property
    def streamed(self) -> bool:
        """Bytes of this answer reached the client (a failure now can only end or abort the stream)."""
        return self.mode in ("pass", "relay") and self.client.started

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        self.started = True
        self.status = status
        content_type = next((value for name, value in headers if name == b"content-type"), None)
        if self.mode == "pass":
            await self.client.start(status, headers, content_length, body, end)
        elif self._relay is not None and is_event_stream(content_type):
            self.mode = "relay"
            out = self._relay.feed(body)
            await self.client.start(status, [h for h in headers if h[0] not in _STREAM_DROPPED], None, out.data, False)
            if out.closed:
                raise _RelayClosed
            if end:
                await self.end([])
        elif 200 <= status < 300:
            self.mode = "capture"
            self.headers = headers
            self.content_length = content_length
            await self._hold(body)
            self.complete = end
        else:
            self.mode = "pass"
            await self.client.start(status, headers, content_length, body, end)

    async def _hold(self, data: bytes) -> None:
        if self.mode == "pass":
            await self.client.write(data)
            return
        self.body += data
        if len(self.body) <= self.limit:
            return
        if self._overflow is not None:
            raise self._overflow()
        self.mode = "pass"  # too large to check: the client gets it as it is
        held, self.body = bytes(self.body), bytearray()
        await self.client.start(self.status, self.headers, self.content_length, held, False)

    async def write(self, data: bytes) -> None:
        if self.mode == "relay":
            assert self._relay is not None
            out = self._relay.feed(data)
            if out.data:
                await self.client.write(out.data)
            if out.closed:
                raise _RelayClosed
        elif self.mode == "capture":
            await self._hold(data)
        else:
            await self.client.write(data)

    async def end(self, trailers: Headers) -> None:
        if self.mode == "relay":
            assert self._relay is not None
            closing = self._relay.finish()
            if closing:
                await self.client.write(closing)
            await self.client.end([])
        elif self.mode == "capture":
            self.complete = True
        else:
            await self.client.end(trailers)

    def abort(self) -> None:
        if self.client.started:
            self.client.abort()

    async def close_stream(self, closing: bytes) -> None:
        """End the client's (started) stream cleanly after ``closing`` (an error event, or nothing)."""
        if closing:
            await self.client.write(closing)
        await self.client.end([])


@dataclass(slots=True)
class _Outcome:
    """What the access log line says about one request."""

    binding: Binding = "jsonrpc"
    call: A2aCall | None = None
    card_path: str = ""
    status: int = 0
    task_id: str = ""
    context_id: str = ""
    state: str = ""
    relay: A2aStreamRelay | None = None
    error: str = ""

    def note(self, info: StreamEventInfo) -> None:
        self.task_id = info.task_id or self.task_id
        self.context_id = info.context_id or self.context_id
        self.state = info.state or self.state


class A2aHandler:
    """Serves requests routed to A2A backends (see the module docstring). One per worker."""

    def __init__(self) -> None:
        self._agents: Mapping[str, A2aAgent] = MappingProxyType({})

    def apply(self, config: RuntimeConfig) -> None:
        """Build the agents of ``config`` (card rewriters, header values) before it serves requests."""
        self._agents = compile_agents(config)

    def agent(self, cluster: UpstreamCluster) -> A2aAgent:
        """The compiled agent of ``cluster`` (built now only if ``apply`` never saw this cluster)."""
        agent = self._agents.get(cluster.name)
        if agent is None or agent.cluster is not cluster:
            agent = compile_agent(cluster)
        return agent

    async def handle(self, a2a: A2aRequest, sink: ResponseSink, forward: Forward) -> None:
        """Serve one request. Raises only ClientGone (and cancellation); everything else is answered."""
        began = time.monotonic()
        outcome = _Outcome()
        try:
            await self._serve(a2a, sink, forward, outcome)
        finally:
            self._log(a2a, outcome, began)
            telemetry = a2a.telemetry
            if telemetry is not None:
                self._observe(a2a, outcome, telemetry, time.monotonic() - began)

    async def _serve(self, a2a: A2aRequest, sink: ResponseSink, forward: Forward, outcome: _Outcome) -> None:
        request, agent = a2a.request, a2a.agent
        relative = relative_path(a2a.upstream_path, agent.base_path)
        method = request.method
        if relative is None:
            outcome.binding = "rest"
            error = A2aMethodNotFound(f"Not found: {echo(a2a.upstream_path)} is outside the agent's base path")
            await _answer(sink, outcome, error)
            return
        if (method == b"GET" or method == b"HEAD") and is_card_path(relative):
            outcome.binding, outcome.card_path = "rest", relative
            await self._card(a2a, sink, forward, outcome)
            return
        outcome.binding = "jsonrpc" if method == b"POST" and relative == "/" else "rest"
        try:
            call = await self._classify(a2a, relative, outcome)
        except A2aError as error:
            await _answer(sink, outcome, error)
            return
        outcome.call, outcome.binding = call, call.binding
        outcome.task_id, outcome.context_id = call.task_id, call.context_id
        if not self._authorize(a2a, call.variables(agent.target_name, agent.namespace), call.method):
            await _answer(sink, outcome, policy_denied(call.request_id))
            return
        body_length = request.content_length if request.body is not None else None
        request.headers = _agent_headers(request.headers, agent, a2a.admitted, _DROPPED, body_length)
        external: ExternalBase | None = None
        if call.operation in _CARD_OPERATIONS:
            try:
                external = _external(a2a)
            except A2aError as error:
                await _answer(sink, outcome, error.with_request_id(call.request_id))
                return
        relay = None
        if external is None:
            relay = outcome.relay = A2aStreamRelay(binding=call.binding, agent=agent.name, request_id=call.request_id)
        answer = _AgentAnswer(
            sink, relay=relay, limit=agent.rewriter.max_card_bytes if external else MAX_INSPECTED_BYTES
        )
        if not await self._forward(a2a, answer, forward, outcome, call.request_id):
            return
        if answer.mode != "capture":
            outcome.status = answer.status
            return
        body = bytes(answer.body)
        try:
            if external is not None:
                rewriter = agent.rewriter
                new = (
                    rewriter.rewrite(body, external)
                    if call.binding == "rest"
                    else rewriter.rewrite_jsonrpc_result(body, external)
                )
            else:
                outcome.note(_unary_facts(body, call, agent.name))
                new = body
        except A2aError as error:
            await _answer(sink, outcome, error.with_request_id(call.request_id))
            return
        await _send_captured(sink, outcome, answer, body, new)

    async def _classify(self, a2a: A2aRequest, relative: str, outcome: _Outcome) -> A2aCall:
        request, agent = a2a.request, a2a.agent
        version = protocol_version(_header(request.headers, VERSION_HEADER.encode()))
        body = b""
        if request.body is not None:
            body = await read_whole_body(request, agent.max_request_bytes)
            if body is None:
                raise payload_too_large(agent.max_request_bytes)
            request.body = _BufferedBody(body)
            request.content_length = len(body)
        if outcome.binding == "jsonrpc":
            return classify_jsonrpc(body, version=version, max_bytes=agent.max_request_bytes)
        target = relative + "?" + a2a.query if a2a.query else relative
        try:
            return classify_rest(request.method, target, version=version, body=body, max_bytes=agent.max_request_bytes)
        except A2aMethodNotFound as exc:
            if request.method != b"POST" or isinstance(exc, A2aMethodNotAllowed):
                raise
        outcome.binding = "jsonrpc"  # a POST that is no REST operation: a JSON-RPC endpoint below the base
        return classify_jsonrpc(body, version=version, max_bytes=agent.max_request_bytes)

    def _authorize(self, a2a: A2aRequest, variable: dict[str, Any], method: str) -> bool:
        """The deferred rules, then the cross-namespace rule (see the module docstring)."""
        admitted = a2a.admitted
        if admitted is None:
            return True
        decision = admitted.authorize("a2a", variable)
        if not decision.allowed:
            if a2a.telemetry is not None:
                a2a.telemetry.authorized(decision, admitted.deferred_policy)
            return False
        identity = admitted.identity
        agent = a2a.agent
        if identity is None or not identity.namespace or identity.namespace == agent.namespace:
            return True
        rule = decision.rule
        if rule is not None and rule.kind is RuleKind.ALLOW:
            return True
        log.info(
            "a2a cross-namespace call denied",
            principal=identity.principal,
            source_namespace=identity.namespace,
            agent=agent.name,
            agent_namespace=agent.namespace,
            a2a_method=method,
            reason=decision.reason,
        )
        if a2a.telemetry is not None:
            a2a.telemetry.authorized(Decision(False, "cross-namespace call without an allow rule"))
        return False

    async def _card(self, a2a: A2aRequest, sink: ResponseSink, forward: Forward, outcome: _Outcome) -> None:
        """Fetch the agent's card and rewrite its URLs to the address the client used."""
        request, agent = a2a.request, a2a.agent
        variable = a2a_variables(
            "", target=agent.target_name, namespace=agent.namespace, operation="", version="", binding=""
        )
        if not self._authorize(a2a, variable, ""):
            await _answer(sink, outcome, policy_denied())
            return
        head = request.method == b"HEAD"
        try:
            external = None if head else _external(a2a)
        except A2aError as error:
            await _answer(sink, outcome, error)
            return
        request.headers = _agent_headers(request.headers, agent, a2a.admitted, _CARD_DROPPED, None)
        rewriter = agent.rewriter

        def too_large() -> A2aError:
            return A2aInvalidAgentResponse(
                f"Agent {agent.name!r} sent an agent card larger than {rewriter.max_card_bytes} bytes",
                metadata={"agent": agent.name},
            )

        answer = _AgentAnswer(sink, relay=None, limit=rewriter.max_card_bytes, overflow=too_large, capture=not head)
        if not await self._forward(a2a, answer, forward, outcome, None):
            return
        if answer.mode != "capture" or external is None:
            outcome.status = answer.status
            return
        body = bytes(answer.body)
        try:
            new = rewriter.rewrite(body, external)
        except A2aError as error:
            await _answer(sink, outcome, error)
            return
        await _send_captured(sink, outcome, answer, body, new)

    async def _forward(
        self, a2a: A2aRequest, answer: _AgentAnswer, forward: Forward, outcome: _Outcome, request_id: RequestId | None
    ) -> bool:
        """Forward through the proxy; True when the answer is in ``answer`` (captured or already relayed),
        False when this ended the exchange (an error answered, or a stream closed with its error event)."""
        agent = a2a.agent
        telemetry = a2a.telemetry
        if telemetry is not None and telemetry.span.recording:
            call = outcome.call
            telemetry.upstream_call = telemetry.span.a2a_span(
                call.method if call is not None else "GetAgentCard", task_id=outcome.task_id or None, agent=agent.name,
                backend=agent.cluster.name,
            )  # fmt: skip
        try:
            await forward(a2a.request, answer)
            return True
        except _RelayClosed:
            outcome.status = answer.status
            outcome.error = "agent sent an invalid stream event"
            await answer.close_stream(b"")
            return False
        except ProxyError as exc:
            error: A2aError
            if isinstance(exc, GatewayTimeout):
                error = agent_timeout(agent.name, request_id)
            else:
                error = agent_unavailable(agent.name, request_id, detail=_FAILURE_DETAILS.get(exc.kind, ""))
            outcome.error = exc.message
            log.warning("a2a agent failed", agent=agent.name, kind=exc.kind, reason=exc.message)
        except A2aError as exc:  # a card over the bound
            error = exc.with_request_id(request_id)
        relay = outcome.relay
        if relay is not None and answer.mode == "relay":
            outcome.status = answer.status
            await answer.close_stream(relay.fail(error))
            return False
        if answer.streamed:  # a plain answer cut short: only an abort tells the client
            outcome.status = answer.status
            answer.abort()
            return False
        await _answer(answer.client, outcome, error)
        return False

    @staticmethod
    def _observe(a2a: A2aRequest, outcome: _Outcome, telemetry: RequestTelemetry, duration: float) -> None:
        """The call into the request's access record, its server span and the A2A metrics."""
        relay = outcome.relay
        if relay is not None:
            outcome.task_id = relay.task_id or outcome.task_id
            outcome.context_id = relay.context_id or outcome.context_id
            outcome.state = relay.last_state or outcome.state
        call = outcome.call
        record = telemetry.record
        if call is not None:
            record.a2a_method = call.method
        elif outcome.card_path:
            record.a2a_method = "card"
        record.a2a_task = outcome.task_id
        record.a2a_context = outcome.context_id
        record.a2a_state = outcome.state
        agent = a2a.agent
        if call is not None:
            telemetry.span.set_a2a(call.method, task_id=outcome.task_id or None, agent=agent.name)
        upstream_call = telemetry.upstream_call
        if upstream_call is not None:  # ended by the forwarding path unless it never got that far
            upstream_call.end(outcome.status or None, reason="ok" if not outcome.error else "upstream_error")
        metrics = telemetry.metrics
        if metrics is not None and call is not None:
            denied = outcome.status == 403
            failed = bool(outcome.error) or outcome.status >= 400
            result = CallOutcome.DENIED if denied else CallOutcome.ERROR if failed else CallOutcome.OK
            metrics.record_a2a(agent.cluster.name, call.operation.value, outcome=result, duration=duration)

    @staticmethod
    def _log(a2a: A2aRequest, outcome: _Outcome, began: float) -> None:
        fields: dict[str, Any] = {"agent": a2a.agent.name, "a2a_binding": outcome.binding}
        call = outcome.call
        if call is not None:
            fields |= call.log_fields()
        elif outcome.card_path:
            fields["a2a_card"] = outcome.card_path
        relay = outcome.relay
        if relay is not None:  # what the stream said, over what the request named
            outcome.task_id = relay.task_id or outcome.task_id
            outcome.context_id = relay.context_id or outcome.context_id
            outcome.state = relay.last_state or outcome.state
        if outcome.task_id:
            fields["a2a_task_id"] = outcome.task_id
        if outcome.context_id:
            fields["a2a_context_id"] = outcome.context_id
        if outcome.state:
            fields["a2a_task_state"] = outcome.state
        if relay is not None and relay.event_count:
            fields["a2a_events"] = relay.event_count
        if outcome.error:
            fields["error"] = outcome.error
        fields["status"] = outcome.status
        fields["duration_ms"] = round((time.monotonic() - began) * 1000, 3)
        log.info("a2a request", **fields)


# --- helpers ------------------------------------------------------------------------------------------------


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _external(a2a: A2aRequest) -> ExternalBase:
    request = a2a.request
    headers = request.headers
    return external_base(
        listener_scheme=request.scheme.decode("latin-1"),
        host=request.authority,
        public_prefix=a2a.public_prefix,
        forwarded_proto=_header(headers, b"x-forwarded-proto"),
        forwarded_host=_header(headers, b"x-forwarded-host"),
    )


def _principal_header(admitted: Admitted | None) -> bytes | None:
    """``x-source-agent``: the caller's principal, or None (anonymous, or a value that could split a header)."""
    identity = admitted.identity if admitted is not None else None
    if identity is None or not identity.principal:
        return None
    principal = identity.principal
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in principal):
        return None
    return principal.encode()


def _agent_headers(
    headers: Headers, agent: A2aAgent, admitted: Admitted | None, dropped: frozenset[bytes], body_length: int | None
) -> Headers:
    """The request headers for the agent: the identity headers set (client copies gone), no validators or
    encodings the gateway cannot honour, and the length of the body it read."""
    out = [header for header in headers if header[0] not in dropped]
    out.append((TARGET_AGENT, agent.target_header))
    source = _principal_header(admitted)
    if source is not None:
        out.append((SOURCE_AGENT, source))
    if body_length is not None:
        out.append((b"content-length", b"%d" % body_length))
    return out


def _unary_facts(body: bytes, call: A2aCall, agent: str) -> StreamEventInfo:
    """The facts of a unary 2xx answer; ``A2aInvalidAgentResponse`` when it is not what the binding carries
    (JSON-RPC: a response object; REST: a JSON object, or nothing)."""
    if call.binding == "rest" and not body.strip():
        return StreamEventInfo("unknown")
    try:
        value = decode_json(body)
    except ValueError:
        value = None
    if type(value) is not dict:
        expected = "a JSON-RPC response" if call.binding == "jsonrpc" else "a JSON object"
        raise A2aInvalidAgentResponse(f"Agent {agent!r} answered with something that is not {expected}")
    if call.binding == "rest":
        return _result_facts(value)
    error = value.get("error")
    if type(error) is dict:
        code = error.get("code")
        return StreamEventInfo("error", error_code=code if type(code) is int else None)
    if "result" not in value and value.get("jsonrpc") != "2.0":
        raise A2aInvalidAgentResponse(f"Agent {agent!r} answered with something that is not a JSON-RPC response")
    # A null result may be left out (a2a-sdk's 0.3 server answers a push-config delete with only jsonrpc and id).
    return _result_facts(value.get("result"))


def _result_facts(result: Any) -> StreamEventInfo:
    """``describe_result``, plus a bare Task (the 1.0 answer to GetTask and CancelTask has no kind tag)."""
    info = describe_result(result)
    if info.kind != "unknown" or type(result) is not dict:
        return info
    status = result.get("status")
    task_id = result.get("id")
    if type(status) is not dict or type(task_id) is not str:
        return info
    context_id = result.get("contextId", result.get("context_id"))
    return StreamEventInfo(
        "task", task_id, context_id if type(context_id) is str else "", normal_state(status.get("state"))
    )


async def _send_captured(sink: ResponseSink, outcome: _Outcome, answer: _AgentAnswer, body: bytes, new: bytes) -> None:
    """Send a held answer; a changed body (rewritten card) drops the agent's length and validators."""
    headers = answer.headers
    if new is body:
        await sink.start(answer.status, headers, answer.content_length, body, True)
    else:
        headers = [h for h in headers if h[0] not in _REWRITTEN_DROPPED]
        headers.append((b"content-length", b"%d" % len(new)))
        await sink.start(answer.status, headers, len(new), new, True)
    outcome.status = answer.status


async def _answer(sink: ResponseSink, outcome: _Outcome, error: A2aError) -> None:
    """The gateway's own answer, in the binding's shape."""
    binding = outcome.binding
    body = error.body(binding)
    status = error.http_status_for(binding)
    headers: Headers = [(b"content-type", CONTENT_TYPE), (b"content-length", b"%d" % len(body))]
    if error.allow:
        headers.append((b"allow", ", ".join(error.allow).encode()))
    outcome.status = status
    outcome.error = outcome.error or error.message
    if isinstance(error, A2aPolicyDenied):
        outcome.error = "denied by policy"
    await sink.start(status, headers, len(body), body, True)


__all__ = [
    "SOURCE_AGENT",
    "TARGET_AGENT",
    "A2aAgent",
    "A2aHandler",
    "A2aRequest",
    "Forward",
    "compile_agent",
    "compile_agents",
    "relative_path",
]
