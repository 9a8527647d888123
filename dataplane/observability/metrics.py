"""The worker's Prometheus metrics: one registry per worker process, every family created up front.

Families (label values are bounded: config names, fixed enums, or capped sets with an overflow value):

- ``agentgate_requests_total`` / ``agentgate_request_duration_seconds``: every request, by gateway,
  listener, route and backend (config names; ``none`` when routing chose none), status class (``2xx``...)
  and `RequestReason` (why the gateway ended the request the way it did; ``ok`` when it relayed the
  upstream's answer, whatever its status).
- ``agentgate_mcp_requests_total`` / ``agentgate_mcp_request_duration_seconds``: MCP messages by backend,
  method (the spec's method names, else ``unknown``), target (configured targets only) and tool. A client
  can send any tool name, so a tool is counted under its name only when the caller says it exists (the
  federation resolved it) and the per-target set still has room; anything else is ``unknown``.
- ``agentgate_a2a_requests_total`` / ``agentgate_a2a_request_duration_seconds``: A2A calls by backend, agent
  and operation (the 1.0 operation names).
- ``gen_ai_client_token_usage``, ``gen_ai_client_operation_duration_seconds``,
  ``gen_ai_client_operation_time_to_first_chunk_seconds``: the OpenTelemetry GenAI client metrics (the
  gateway is the provider's client) as an OTLP-to-Prometheus translation names them, with the buckets the
  semantic conventions advise, labelled ``gen_ai_operation_name``, ``gen_ai_provider_name``,
  ``gen_ai_request_model`` (+ ``gen_ai_token_type``, ``error_type``). A model name is the client's to
  choose, so a new one is admitted only from a successful response (the provider accepted it) and up to a
  cap per provider; others are ``_OTHER``.
- ``agentgate_llm_tokens_total``: tokens per backend, caller, provider, model and type, for cost
  allocation: the caller is a service-account token's namespace, else an API key's name (name keys after
  the namespace they are issued to), else ``none`` (at most 1024 callers, then ``_OTHER``).
- ``agentgate_ratelimit_decisions_total`` (limit, decision allowed|refused|store_down),
  ``agentgate_authorization_decisions_total`` (policy, decision allow|deny),
  ``agentgate_token_budget_remaining_ratio`` / ``..._remaining_tokens`` / ``..._limit_tokens``: the lowest
  remaining share of any key of a budget in its current period (what "near exhaustion" alerts need).
- ``agentgate_dataplane_xds_*``, ``agentgate_dataplane_config_ready``, ``agentgate_dataplane_config_info``:
  the worker's own xDS state (the control plane's are in ``controlplane.metrics``).

Cost: the request path records through children bound ahead: `prepare` (at config apply) binds the
(listener, route, backend) series of every configured route, with an ``ok`` series exported at zero so
``rate()`` works from the first scrape; other label sets go to bounded dicts. One request costs a dict
lookup, a counter increment and a histogram observation (about 1.5 µs; bench/observability_metrics.py).

Several workers (``agentgate run --workers N``): each process has its own registry and serves it on its own
metrics port (base + k). Prometheus scrapes every port as its own target and queries aggregate with
``sum without (instance)``. Every worker builds the same families in `WorkerMetrics.__init__` and the same
zero series from the same config, so all targets expose the same names. No multiprocess directory: it
would need a shared scrape endpoint, mmapped files cleaned on restart and loses custom collectors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import ROUTE

if TYPE_CHECKING:
    from prometheus_client.metrics import Counter as CounterChild
    from prometheus_client.metrics import Histogram as HistogramChild

    from dataplane.config.model import RuntimeConfig

# --- label vocabularies ---------------------------------------------------------------------------

NONE: Final = "none"  # no route / backend / target / tool applies
UNKNOWN: Final = "unknown"  # a value the gateway does not know (an invented method, tool, target)
OTHER: Final = "_OTHER"  # a real value past a cardinality cap (OpenTelemetry's fallback spelling)


class RequestReason(StrEnum):
    """Why the gateway ended a request as it did: the ``reason`` label of the request metrics."""

    OK = "ok"  # the upstream's answer was relayed (whatever its status), or a configured redirect/direct answer
    AUTH_DENIED = "auth_denied"  # no or bad credential (401)
    AUTH_UNAVAILABLE = "auth_unavailable"  # credentials cannot be checked right now (503)
    AUTHZ_DENIED = "authz_denied"  # authorization rules refused (403)
    RATE_LIMITED = "rate_limited"  # 429, or 503 when a fail-closed global limit's store is down
    BUDGET_EXHAUSTED = "budget_exhausted"  # a token budget is spent
    POLICY_ERROR = "policy_error"  # a policy is invalid or did not compile: fail closed (500)
    CORS_DENIED = "cors_denied"  # a preflight from an origin not allowed
    BAD_REQUEST = "bad_request"  # malformed HTTP, JSON-RPC or protocol input, too large a body
    NOT_FOUND = "not_found"  # no route, unknown session
    NO_BACKEND = "no_backend"  # the route's backend is missing, unresolved or has no endpoint
    TIMEOUT = "timeout"  # request, per-try or idle timeout
    UPSTREAM_CONNECT = "upstream_connect"  # the upstream could not be reached (refused, TLS, DNS)
    UPSTREAM_ERROR = "upstream_error"  # the upstream broke the exchange (reset, malformed response)
    CLIENT_CLOSED = "client_closed"  # the client went away before the answer was complete
    INTERNAL_ERROR = "internal_error"  # a bug: the gateway failed on its own


# `Refused.reason` of the policy chain -> metric reason. Authentication's detailed labels (token_expired,
# kid_unknown, apikey_unknown...) are many and may grow, so any other 401 is AUTH_DENIED (see `refusal_reason`).
_REFUSAL_REASONS: Final[Mapping[str, RequestReason]] = MappingProxyType({
    "credential_missing": RequestReason.AUTH_DENIED,
    "authorization_denied": RequestReason.AUTHZ_DENIED,
    "rate_limited": RequestReason.RATE_LIMITED,
    "budget_exhausted": RequestReason.BUDGET_EXHAUSTED,
    "policy_invalid": RequestReason.POLICY_ERROR,
    "policy_uncompilable": RequestReason.POLICY_ERROR,
    "token_review_unavailable": RequestReason.AUTH_UNAVAILABLE,
    "cors_denied": RequestReason.CORS_DENIED,
})


def refusal_reason(label: str, status: int) -> RequestReason:
    """The metric reason of a policy refusal: its stable ``reason`` label, else what its status means."""
    known = _REFUSAL_REASONS.get(label)
    if known is not None:
        return known
    if status == 401:
        return RequestReason.AUTH_DENIED
    if status == 403:
        return RequestReason.AUTHZ_DENIED
    if status == 429:
        return RequestReason.RATE_LIMITED
    if status == 503:
        return RequestReason.AUTH_UNAVAILABLE
    return RequestReason.POLICY_ERROR if status >= 500 else RequestReason.BAD_REQUEST


# Index = status // 100 for 100..599; 0 = no response was sent; 6 = anything else.
_STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx", "other")


def status_class(status: int) -> str:
    """'2xx' for 204: the ``status`` label (bounded; the reason label says more about errors)."""
    if 100 <= status < 600:
        return _STATUS_CLASSES[status // 100]
    return _STATUS_CLASSES[0] if status == 0 else _STATUS_CLASSES[6]


class CallOutcome(StrEnum):
    """How one MCP message or A2A call ended, as the protocol handler saw it."""

    OK = "ok"
    ERROR = "error"  # a JSON-RPC/A2A error answer, or the upstream failed
    DENIED = "denied"  # policy refused it (hidden tool, argument rules, A2A rules)


# Client-to-server requests and notifications of MCP 2024-11-05 .. 2025-11-25 and the sessionless era.
MCP_METHODS: Final = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
    "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "server/discover", "subscriptions/listen",
    "tasks/get", "tasks/list", "tasks/result", "tasks/cancel",
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed",
})
# Methods that use one named tool: only these carry a ``tool`` label.
_MCP_TOOL_METHODS: Final = frozenset({"tools/call"})

# The A2A 1.0 operation names (`dataplane.a2a.methods.A2aOperation` values; a test keeps them equal).
A2A_OPERATIONS: Final = frozenset({
    "SendMessage", "SendStreamingMessage", "GetTask", "ListTasks", "CancelTask", "SubscribeToTask",
    "CreateTaskPushNotificationConfig", "GetTaskPushNotificationConfig", "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig", "GetExtendedAgentCard",
})

# gen_ai.operation.name well-known values (semantic conventions, GenAI metrics).
GEN_AI_OPERATIONS: Final = frozenset({
    "chat", "create_agent", "embeddings", "execute_tool", "generate_content", "invoke_agent", "text_completion",
})
# A provider name as the conventions spell them ("openai", "aws.bedrock", "gcp.vertex_ai") or a config name.
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
_STATUS_CODE = re.compile(r"[1-5][0-9][0-9]\Z")

# Buckets. Requests: sub-millisecond direct answers to multi-minute LLM/MCP streams.
REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
# The GenAI conventions' advised boundaries (gen_ai.client.token.usage, operation.duration, time to first token).
GEN_AI_TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
GEN_AI_DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
GEN_AI_FIRST_CHUNK_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)

# Caps. Config-bounded names are capped too: a config can be large, a bug can leak ids into names.
MAX_ROUTE_SERIES: Final = 4096  # (listener, route, backend) triples outside the prepared config
MAX_TOOLS_PER_TARGET: Final = 256
MAX_MODELS_PER_PROVIDER: Final = 100
MAX_NAMES: Final = 256  # providers, limits, policies, budgets
MAX_CALLERS: Final = 1024  # namespaces and API keys LLM tokens are allocated to


class BoundedNames:
    """A set of label values that stops growing at ``limit``: past it, new values read as ``overflow``."""

    __slots__ = ("_names", "limit", "overflow")

    def __init__(self, limit: int, overflow: str = OTHER, initial: Iterable[str] = ()) -> None:
        self.limit = limit
        self.overflow = overflow
        self._names: set[str] = set(initial)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def admit(self, name: str, *, may_add: bool = True) -> str:
        """``name`` if known (or, with ``may_add``, room is left to learn it), else the overflow value."""
        names = self._names
        if name in names:
            return name
        if may_add and len(names) < self.limit:
            names.add(name)
            return name
        return self.overflow


# --- requests -------------------------------------------------------------------------------------

_Pair = tuple["CounterChild", "HistogramChild"]


class _RouteSeries:
    """The children of one (gateway, listener, route, backend), per status class and reason, bound lazily:
    a list indexed like `_STATUS_CLASSES` of dicts by reason, so a lookup allocates nothing."""

    __slots__ = ("_by_status", "_labels", "_metrics")

    def __init__(self, metrics: WorkerMetrics, labels: tuple[str, str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._by_status: list[dict[str, _Pair]] = [{} for _ in _STATUS_CLASSES]

    def pair(self, status_index: int, reason: str) -> _Pair:
        slot = self._by_status[status_index]
        found = slot.get(reason)
        if found is None:
            labels = (*self._labels, _STATUS_CLASSES[status_index], reason)
            found = (self._metrics.requests.labels(*labels), self._metrics.request_duration.labels(*labels))
            slot[reason] = found
        return found

    def remove(self) -> None:
        """Drop every series this bound (its route left the config)."""
        for index, slot in enumerate(self._by_status):
            for reason in slot:
                labels = (*self._labels, _STATUS_CLASSES[index], reason)
                self._metrics.requests.remove(*labels)
                self._metrics.request_duration.remove(*labels)
            slot.clear()


def _status_index(status: int) -> int:
    if 100 <= status < 600:
        return status // 100
    return 0 if status == 0 else 6


_REASONS: Final = frozenset(RequestReason)


class _Plan:
    """What `prepare` derived from one config: bound route series and the names MCP/A2A labels accept."""

    __slots__ = ("a2a_agents", "mcp_targets", "routes")

    def __init__(
        self,
        routes: dict[tuple[str, str, str], _RouteSeries],
        mcp_targets: Mapping[str, frozenset[str]],
        a2a_agents: Mapping[str, str],
    ) -> None:
        self.routes = routes
        self.mcp_targets = mcp_targets
        self.a2a_agents = a2a_agents


class _BudgetLow:
    """The lowest remaining share seen for one budget in the current period, and when that period ends."""

    __slots__ = ("expires", "limit", "ratio", "remaining")

    def __init__(self, ratio: float, remaining: int, limit: int, expires: float) -> None:
        self.ratio = ratio
        self.remaining = remaining
        self.limit = limit
        self.expires = expires


class _BudgetCollector(Collector):
    """Exports each budget's lowest remaining share at scrape time, so a period that ended reads full again."""

    def __init__(self, gateway: Callable[[], str], clock: Callable[[], float]) -> None:
        self._gateway = gateway
        self._clock = clock
        self.lows: dict[str, _BudgetLow] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ratio = GaugeMetricFamily(
            "agentgate_token_budget_remaining_ratio",
            "Lowest remaining share (0..1) of any key of a token budget in its current period.",
            labels=["gateway", "budget"],
        )
        remaining = GaugeMetricFamily(
            "agentgate_token_budget_remaining_tokens",
            "Tokens left to the key of a token budget with the lowest remaining share in its current period.",
            labels=["gateway", "budget"],
        )
        limit = GaugeMetricFamily(
            "agentgate_token_budget_limit_tokens", "Tokens per key and period of a token budget.",
            labels=["gateway", "budget"],
        )
        now = self._clock()
        gateway = self._gateway()
        for budget, low in sorted(self.lows.items()):
            expired = low.expires <= now
            ratio.add_metric([gateway, budget], 1.0 if expired else low.ratio)
            remaining.add_metric([gateway, budget], low.limit if expired else low.remaining)
            limit.add_metric([gateway, budget], low.limit)
        yield ratio
        yield remaining
        yield limit

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing without collecting keeps registration from reading the clock or the gateway.
        for suffix in ("remaining_ratio", "remaining_tokens", "limit_tokens"):
            yield GaugeMetricFamily(f"agentgate_token_budget_{suffix}", "", labels=["gateway", "budget"])


class WorkerMetrics:
    """Every metric a worker exports, registered into its own registry; see the module docstring.

    ``gateway`` is the Gateway the worker serves ("namespace/name"); `prepare` is called with each
    applied config. The record methods are for the request path: cheap, never raising on odd input.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        gateway: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.gateway = gateway
        self._clock = clock

        # xDS client state (these four were dataplane.metrics.WorkerMetrics; same names and labels).
        self.xds_connected = Gauge(
            "agentgate_dataplane_xds_connected", "1 while the ADS stream to the control plane is up.",
            registry=registry,
        )
        self.xds_updates = Counter(
            "agentgate_dataplane_xds_updates_total", "Discovery responses handled, by type and result (ack|nack).",
            ["type", "result"], registry=registry,
        )
        self.xds_reconnects = Counter(
            "agentgate_dataplane_xds_reconnects_total", "ADS stream (re)connect attempts.", registry=registry,
        )
        self.config_ready = Gauge(
            "agentgate_dataplane_config_ready", "1 once a first config has been applied.", registry=registry,
        )
        self.config_info = Gauge(
            "agentgate_dataplane_config_info", "The config version applied (always 1; one series).",
            ["gateway", "version"], registry=registry,
        )

        request_labels = ["gateway", "listener", "route", "backend", "status", "reason"]
        self.requests = Counter(
            "agentgate_requests_total",
            "Requests answered, by listener, route and backend (config names), status class and reason.",
            request_labels, registry=registry,
        )
        self.request_duration = Histogram(
            "agentgate_request_duration_seconds",
            "Time from the request's first byte to the end of its response, by route, backend, status and reason.",
            request_labels, buckets=REQUEST_BUCKETS, registry=registry,
        )

        self.mcp_requests = Counter(
            "agentgate_mcp_requests_total", "MCP messages from clients, by backend, method, target, tool and outcome.",
            ["gateway", "backend", "method", "target", "tool", "outcome"], registry=registry,
        )
        self.mcp_duration = Histogram(
            "agentgate_mcp_request_duration_seconds", "MCP request handling time, by backend, method, target and tool.",
            ["gateway", "backend", "method", "target", "tool"], buckets=REQUEST_BUCKETS, registry=registry,
        )
        self.a2a_requests = Counter(
            "agentgate_a2a_requests_total", "A2A calls, by backend, agent, operation (1.0 name) and outcome.",
            ["gateway", "backend", "agent", "operation", "outcome"], registry=registry,
        )
        self.a2a_duration = Histogram(
            "agentgate_a2a_request_duration_seconds", "A2A call time (streams: until the stream ends).",
            ["gateway", "backend", "agent", "operation"], buckets=REQUEST_BUCKETS, registry=registry,
        )

        gen_ai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.gen_ai_token_usage = Histogram(
            "gen_ai_client_token_usage", "Number of input and output tokens used (gen_ai.client.token.usage).",
            [*gen_ai, "gen_ai_token_type"], buckets=GEN_AI_TOKEN_BUCKETS, registry=registry,
        )
        self.gen_ai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration (gen_ai.client.operation.duration).",
            [*gen_ai, "error_type"], buckets=GEN_AI_DURATION_BUCKETS, registry=registry,
        )
        self.gen_ai_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the first chunk of a streamed GenAI response (gen_ai.client.operation.time_to_first_chunk).",
            gen_ai, buckets=GEN_AI_FIRST_CHUNK_BUCKETS, registry=registry,
        )

        self.llm_tokens = Counter(
            "agentgate_llm_tokens_total",
            "Tokens used through LLM backends (estimated where the provider reported none), by the caller they "
            "are allocated to (a service-account token's namespace, else an API key's name, else none), "
            "provider, model and type (input|output).",
            ["gateway", "backend", "caller", "provider", "model", "token_type"], registry=registry,
        )

        self.ratelimit_decisions = Counter(
            "agentgate_ratelimit_decisions_total",
            "Rate limit checks, by limit and decision (allowed|refused|store_down).",
            ["gateway", "limit", "decision"], registry=registry,
        )
        self.authorization_decisions = Counter(
            "agentgate_authorization_decisions_total",
            "Authorization rule decisions, by policy and decision (allow|deny).",
            ["gateway", "policy", "decision"], registry=registry,
        )
        self.access_log_dropped = Counter(
            "agentgate_access_log_dropped_total", "Access log lines dropped because the writer fell behind.",
            registry=registry,
        )
        self._budgets = _BudgetCollector(lambda: self.gateway, clock)
        registry.register(self._budgets)

        self._plan = _Plan({}, MappingProxyType({}), MappingProxyType({}))
        self._dynamic_routes: dict[tuple[str, str, str], _RouteSeries] = {}
        self._overflow_route: _RouteSeries | None = None
        self._config_version: str | None = None
        self._mcp: dict[tuple[str, str, str, str, str], tuple[CounterChild, HistogramChild]] = {}
        self._mcp_tools: dict[tuple[str, str], BoundedNames] = {}
        self._a2a: dict[tuple[str, str, str], tuple[CounterChild, HistogramChild]] = {}
        self._providers = BoundedNames(MAX_NAMES)
        self._models: dict[str, BoundedNames] = {}
        self._gen_ai_tokens: dict[tuple[str, str, str], tuple[HistogramChild, HistogramChild]] = {}
        self._gen_ai_duration: dict[tuple[str, str, str, str], HistogramChild] = {}
        self._gen_ai_first: dict[tuple[str, str, str], HistogramChild] = {}
        self._limits = BoundedNames(MAX_NAMES)
        self._callers = BoundedNames(MAX_CALLERS)
        self._llm_tokens: dict[tuple[str, str, str, str], tuple[CounterChild, CounterChild]] = {}
        self._limit_children: dict[tuple[str, str], CounterChild] = {}
        self._policies = BoundedNames(MAX_NAMES)
        self._policy_children: dict[tuple[str, bool], CounterChild] = {}
        self._budget_names = BoundedNames(MAX_NAMES)

    # --- config apply -----------------------------------------------------------------------------
    def prepare(self, config: RuntimeConfig) -> None:
        """Bind the series of every configured (listener, route, backend) and export them at zero (2xx, ok);
        drop the series of routes the config no longer has; learn MCP targets and A2A agents per backend.
        Call after the config is applied (a refused config must not change what is exported)."""
        old = self._plan.routes
        routes: dict[tuple[str, str, str], _RouteSeries] = {}
        ok = RequestReason.OK.value
        for name, route in config.resources.get(ROUTE, {}).items():
            if not isinstance(route, pb.Route):
                continue
            backends = [ref.backend for ref in route.backends if ref.backend] or [NONE]
            for listener in route.listeners:
                for backend in backends:
                    key = (listener, name, backend)
                    series = old.get(key) or self._dynamic_routes.pop(key, None)
                    if series is None:
                        series = _RouteSeries(self, (self.gateway, listener, name, backend))
                    series.pair(2, ok)
                    routes[key] = series
        for key, series in old.items():
            if key not in routes:
                series.remove()
        # Series outside the previous plan were transient (requests finishing on an older config).
        for series in self._dynamic_routes.values():
            series.remove()
        self._dynamic_routes.clear()
        mcp_targets: dict[str, frozenset[str]] = {}
        a2a_agents: dict[str, str] = {}
        for name, cluster in config.backends.items():
            if cluster.mcp is not None:
                mcp_targets[name] = frozenset(target.name for target in cluster.mcp.targets)
            if cluster.a2a is not None:
                a2a_agents[name] = cluster.a2a.agent_name
        self._plan = _Plan(routes, MappingProxyType(mcp_targets), MappingProxyType(a2a_agents))
        if self._config_version is not None and self._config_version != config.version:
            self.config_info.remove(self.gateway, self._config_version)
        self._config_version = config.version
        self.config_info.labels(self.gateway, config.version).set(1)

    # --- request path -----------------------------------------------------------------------------
    def record_request(
        self, listener: str, route: str, backend: str, status: int, reason: RequestReason | str, duration: float
    ) -> None:
        """One finished request. ``route``/``backend`` empty when routing chose none; ``status`` 0 when no
        response was sent; ``reason`` a `RequestReason` (anything else counts as internal_error)."""
        key = (listener, route or NONE, backend or NONE)
        series = self._plan.routes.get(key)
        if series is None:
            series = self._dynamic_route(key)
        if reason not in _REASONS:
            reason = RequestReason.INTERNAL_ERROR
        counter, histogram = series.pair(_status_index(status), reason)
        counter.inc()
        histogram.observe(duration)

    def _dynamic_route(self, key: tuple[str, str, str]) -> _RouteSeries:
        """A triple outside the prepared config (a request still on the previous config, a listener name the
        plan does not list): bound on first use, up to a cap, then all such requests share one series."""
        series = self._dynamic_routes.get(key)
        if series is not None:
            return series
        if len(self._dynamic_routes) < MAX_ROUTE_SERIES:
            series = _RouteSeries(self, (self.gateway, *key))
            self._dynamic_routes[key] = series
            return series
        if self._overflow_route is None:
            self._overflow_route = _RouteSeries(self, (self.gateway, OTHER, OTHER, OTHER))
        return self._overflow_route

    def record_mcp(
        self,
        backend: str,
        method: str,
        target: str,
        tool: str,
        *,
        tool_exists: bool,
        outcome: CallOutcome | str,
        duration: float | None = None,
    ) -> None:
        """One MCP message. ``target``/``tool`` empty when the message names none (lists fan out to all
        targets); ``tool_exists`` False when the federation found no such tool (a hostile client can invent
        any number of names: those all count as ``unknown``)."""
        targets = self._plan.mcp_targets.get(backend)
        if targets is None:
            backend = UNKNOWN
            target = UNKNOWN if target else NONE
        elif not target:
            target = NONE
        elif target not in targets:
            target = UNKNOWN
        if method not in MCP_METHODS:
            method = UNKNOWN
        if method not in _MCP_TOOL_METHODS or not tool:
            tool = NONE
        elif not tool_exists or target in (UNKNOWN, NONE):
            tool = UNKNOWN
        else:
            names = self._mcp_tools.get((backend, target))
            if names is None:
                names = self._mcp_tools[(backend, target)] = BoundedNames(MAX_TOOLS_PER_TARGET)
            tool = names.admit(tool)
        if outcome not in _OUTCOMES:
            outcome = CallOutcome.ERROR
        key = (backend, method, target, tool, outcome)
        pair = self._mcp.get(key)
        if pair is None:
            gateway = self.gateway
            pair = (
                self.mcp_requests.labels(gateway, backend, method, target, tool, outcome),
                self.mcp_duration.labels(gateway, backend, method, target, tool),
            )
            self._mcp[key] = pair
        pair[0].inc()
        if duration is not None:
            pair[1].observe(duration)

    def record_a2a(
        self, backend: str, operation: str, *, outcome: CallOutcome | str, duration: float | None = None
    ) -> None:
        """One A2A call; ``operation`` is the `A2aOperation` value (its 1.0 name)."""
        agent = self._plan.a2a_agents.get(backend)
        if agent is None:
            backend = agent = UNKNOWN
        if operation not in A2A_OPERATIONS:
            operation = UNKNOWN
        if outcome not in _OUTCOMES:
            outcome = CallOutcome.ERROR
        key = (backend, operation, outcome)
        pair = self._a2a.get(key)
        if pair is None:
            gateway = self.gateway
            pair = (
                self.a2a_requests.labels(gateway, backend, agent, operation, outcome),
                self.a2a_duration.labels(gateway, backend, agent, operation),
            )
            self._a2a[key] = pair
        pair[0].inc()
        if duration is not None:
            pair[1].observe(duration)

    def record_llm(
        self,
        provider: str,
        operation: str,
        model: str,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        duration: float,
        time_to_first_chunk: float | None = None,
        error_type: str | None = None,
    ) -> None:
        """One LLM call as the GenAI conventions see it. ``error_type`` None when it succeeded, else a
        `RequestReason` value or the provider's status code ("429"). Token counts None when the response
        reported none (the conventions: do not report usage then). ``time_to_first_chunk`` for streams only."""
        provider = self._providers.admit(provider) if _PROVIDER_NAME.match(provider) else OTHER
        if operation not in GEN_AI_OPERATIONS:
            operation = OTHER
        models = self._models.get(provider)
        if models is None:
            models = self._models[provider] = BoundedNames(MAX_MODELS_PER_PROVIDER)
        model = models.admit(model, may_add=error_type is None and 0 < len(model) <= 128) if model else NONE
        if error_type is None:
            error = ""
        elif error_type in _REASONS or _STATUS_CODE.match(error_type):
            error = error_type
        else:
            error = OTHER
        if input_tokens is not None or output_tokens is not None:
            key = (operation, provider, model)
            tokens = self._gen_ai_tokens.get(key)
            if tokens is None:
                tokens = self._gen_ai_tokens[key] = (
                    self.gen_ai_token_usage.labels(operation, provider, model, "input"),
                    self.gen_ai_token_usage.labels(operation, provider, model, "output"),
                )
            if input_tokens is not None:
                tokens[0].observe(input_tokens)
            if output_tokens is not None:
                tokens[1].observe(output_tokens)
        duration_key = (operation, provider, model, error)
        child = self._gen_ai_duration.get(duration_key)
        if child is None:
            child = self._gen_ai_duration[duration_key] = self.gen_ai_duration.labels(*duration_key)
        child.observe(duration)
        if time_to_first_chunk is not None:
            first_key = (operation, provider, model)
            first = self._gen_ai_first.get(first_key)
            if first is None:
                first = self._gen_ai_first[first_key] = self.gen_ai_first_chunk.labels(*first_key)
            first.observe(time_to_first_chunk)

    def record_llm_tokens(
        self, backend: str, caller: str, provider: str, model: str, *, input_tokens: int, output_tokens: int
    ) -> None:
        """Tokens one LLM call used, allocated to ``caller`` ("" when unknown): per-namespace cost
        tracking. Names past their caps read as ``_OTHER``, so the series stay bounded."""
        caller = self._callers.admit(caller) if caller else NONE
        provider = self._providers.admit(provider) if _PROVIDER_NAME.match(provider) else OTHER
        models = self._models.get(provider)
        if models is None:
            models = self._models[provider] = BoundedNames(MAX_MODELS_PER_PROVIDER)
        model = models.admit(model, may_add=0 < len(model) <= 128) if model else NONE
        key = (backend, caller, provider, model)
        children = self._llm_tokens.get(key)
        if children is None:
            children = self._llm_tokens[key] = (
                self.llm_tokens.labels(self.gateway, backend, caller, provider, model, "input"),
                self.llm_tokens.labels(self.gateway, backend, caller, provider, model, "output"),
            )
        if input_tokens > 0:
            children[0].inc(input_tokens)
        if output_tokens > 0:
            children[1].inc(output_tokens)

    def record_rate_limit(self, limit: str, *, allowed: bool, store_down: bool = False) -> None:
        """One rate limit check; ``store_down`` when a global limit decided without its store (either way)."""
        decision = "store_down" if store_down else "allowed" if allowed else "refused"
        key = (limit, decision)
        child = self._limit_children.get(key)
        if child is None:
            name = self._limits.admit(limit)
            child = self.ratelimit_decisions.labels(self.gateway, name, decision)
            if name == limit:
                self._limit_children[key] = child
        child.inc()

    def record_authorization(self, policy: str, *, allowed: bool) -> None:
        """One authorization decision of ``policy`` (namespace/name of the Policy whose rules decided)."""
        key = (policy, allowed)
        child = self._policy_children.get(key)
        if child is None:
            name = self._policies.admit(policy)
            child = self.authorization_decisions.labels(self.gateway, name, "allow" if allowed else "deny")
            if name == policy:
                self._policy_children[key] = child
        child.inc()

    def record_budget(self, budget: str, *, remaining: int, limit: int, reset: float) -> None:
        """A token budget decision for one key: ``remaining`` of ``limit`` tokens, the period ending in
        ``reset`` seconds. Kept when it is the lowest share seen this period (or the previous low expired)."""
        name = self._budget_names.admit(budget)
        ratio = max(0.0, min(1.0, remaining / limit)) if limit > 0 else 0.0
        now = self._clock()
        low = self._budgets.lows.get(name)
        if low is None or low.expires <= now or ratio <= low.ratio:
            self._budgets.lows[name] = _BudgetLow(ratio, max(remaining, 0), limit, now + max(reset, 0.0))


_OUTCOMES: Final = frozenset(CallOutcome)


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export (``_total`` of counters, ``_bucket``/``_sum``/``_count``
    of histograms...), whether or not a series exists yet: what dashboards and alerts may refer to."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {family.name, family.name + "_sum", family.name + "_count", family.name + "_created"}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names
