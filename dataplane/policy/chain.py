"""The policy chain on the request path: who is calling, may they, and how much.

Config time (`WorkerPolicies.compile`, once per applied config): every section of every effective
policy (`dataplane.config.policy.PolicyIndex`) becomes its core object: an `Authenticator`, a
`RuleSet`, rate limiters, token budgets. Compiled objects are cached by the
section's *content* (CEL by its source text), so a gateway-wide section is compiled once for every
rule it reaches, and an update that leaves a section unchanged keeps its object: verified-token
caches, token buckets and Redis connections survive unrelated updates. One `RedisClient` per Redis
address serves every global limit and budget of the worker. A section the cores refuse (a JWKS key
too short, a budget window under a second...) fails closed like an invalid policy (500 where it
applies) and is listed in `PolicyTable.problems` so the update can be refused before it is served.

Request time (`RequestPolicy.evaluate`, after routing chose the rule and backend):

1. fail closed: a policy the control plane refused, or one the cores could not compile -> 500;
2. authentication -> 401 with ``WWW-Authenticate`` (never 500 for a bad token);
3. identity headers: client copies stripped, verified claims set, the caller's credential removed
   unless forwarded (a backend's own credential, CORS, header modifiers and resilience are the
   forwarding path's: `dataplane.policy.forwarding`, which gets `RequestPolicy.effective`);
4. authorization (CEL) -> 403; rule sets reading a protocol variable (``mcp``, ``a2a``, ``llm``) on
   a backend of that protocol are deferred to its handler: for MCP the rules decide the
   visibility of each tool, prompt and resource (`McpCaller`), so a denied tool is missing from
   lists and fails like an unknown one; for A2A/LLM handlers `Admitted.authorize`. On an A2A
   backend every rule set is deferred, whatever it reads: the handler answers denials in the A2A
   error shape and needs the `Decision` (which rule allowed) for its cross-namespace check;
5. rate limits, keyed by CEL, requests counted -> 429 with ``Retry-After`` and ``x-ratelimit-*``
   (503 when a fail-closed global limit cannot reach Redis); limits whose key reads ``mcp`` are
   counted per MCP item use instead (tools/call, prompts/get, resources/read; `McpCaller.admit`);
6. token budgets checked (-> 429); tokens are charged after the response (`Admitted.charge`).

The outcome is `Refused` (status, message, headers) or `Admitted` (identity, CEL activation,
upstream request headers, response headers to add, the MCP caller policy).

The CEL variables are built once per request, only those some expression reads; ``request.headers``
are the headers the upstream will see (identity headers already verified, the credential removed).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import cel as _cel

from dataplane.config.errors import ConfigRejected, ResourceError
from dataplane.config.model import RuntimeConfig
from dataplane.config.policy import (
    AuthenticationSettings,
    AuthorizationSettings,
    EffectivePolicy,
    RateLimitSettings,
    RateLimitsSection,
    RedisStoreSettings,
    ResilienceSettings,
    TokenBudgetSettings,
    TokenBudgetsSection,
)
from dataplane.http.messages import Headers, ProxyRequest
from dataplane.mcp.endpoint import POLICY_DENIED, CallRefusal
from dataplane.mcp.federation import Kind, McpFederation, Visibility, allow_all
from dataplane.policy.authn import (
    Authenticator,
    AuthnSpec,
    IdentityHeaderSpec,
    Refusal,
    compile_authn,
)
from dataplane.policy.authorize import (
    EMPTY_A2A,
    EMPTY_LLM,
    EMPTY_MCP,
    Decision,
    Rule,
    RuleKind,
    RuleSet,
    jwt_variables,
    mcp_variables,
    request_variables,
    source_variables,
)
from dataplane.policy.budget import BudgetSpec, TokenBudget, compile_budget
from dataplane.policy.cel import CelEvaluationError, Expression, Usage
from dataplane.policy.credentials import ApiKeyEntry, ApiKeySpec, AuthnConfigError, BasicAuthSpec, BasicUser
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import ALLOWED_ALGORITHMS, JwksRefreshGate, JwtProviderSpec, TokenReviewer
from dataplane.policy.mcp_visibility import McpVisibility
from dataplane.policy.protected_resource import well_known_path
from dataplane.policy.ratelimit import (
    Decision as LimitDecision,
)
from dataplane.policy.ratelimit import (
    LimitConfigError,
    LimitSpec,
    RateLimiter,
    compile_limit,
    refusal_status,
    response_headers,
    tightest,
)
from dataplane.policy.redis_limit import RedisClient, RedisSettings
from dataplane.policy.token_review import TokenReviewSpec
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.logging import get_logger
from shared.resources import LISTENER, POLICY, ROUTE

log = get_logger("dataplane.policy.chain")

# The variable a backend kind's own handler fills; rule sets reading it are deferred to that handler.
PROTOCOL_VARIABLES: Final[Mapping[str, str]] = MappingProxyType({"mcp": "mcp", "a2a": "a2a", "llm": "llm"})
# MCP methods that use one item; limits keyed on ``mcp`` count these (see the module docstring).
MCP_ITEM_METHODS: Final = frozenset({"tools/call", "prompts/get", "resources/read"})
_EMPTY_PROTOCOL: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {"mcp": EMPTY_MCP, "a2a": EMPTY_A2A, "llm": EMPTY_LLM}
)
_NO_HEADERS: Headers = []
RedisKey = tuple[str, str | None, str | None]  # url, username, password
_ALLOWED = Decision(True, "no deferred rules")
# What a tools/call refused for its arguments is told (the rule that decided is in the log, never sent).
_POLICY_DENIED_MESSAGE: Final = "Forbidden: policy denied this tool call with these arguments"
_JSON = (b"content-type", b"application/json")
_DOCUMENT_CACHE = (b"cache-control", b"public, max-age=300")
# Public metadata that browser-based MCP clients fetch cross-origin.
_DOCUMENT_CORS = (b"access-control-allow-origin", b"*")


# --- outcomes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """Answer the request with ``status``, ``headers`` and a plain-text ``message``; ``reason`` is the
    stable log and metric label (``credential_missing``, ``authorization_denied``, ``rate_limited``...).
    ``decision`` is the authorization decision and ``limits`` the limit and budget decisions made before
    the refusal, for the request's metrics and access record."""

    status: int
    message: str
    headers: Headers
    reason: str
    decision: Decision | None = None
    limits: tuple[LimitDecision, ...] | list[LimitDecision] = ()
    budget: LimitDecision | None = None  # the budget found spent


class Admitted:
    """A request the chain let through, and what the rest of the request path needs from it.

    ``headers``: the request headers for the upstream; ``response_headers``: to add to the response
    (``x-ratelimit-*``); ``activation``: the CEL variables built for this request (``jwt``,
    ``request``, ``source`` as read by some rule or key); ``mcp``: the caller's policy for the MCP
    endpoint (None when the backend is not MCP or no MCP rule or limit applies). ``decision`` and
    ``limits``/``budgets``: the authorization decision (None when no request-level rules) and the limit and
    budget decisions that admitted it, for the request's metrics and access record.
    """

    __slots__ = (
        "_charges", "_deferred", "activation", "budgets", "decision", "headers", "identity", "limits", "mcp",
        "response_headers",
    )

    def __init__(
        self,
        identity: Identity | None,
        activation: Mapping[str, Any],
        headers: Headers,
        response_headers: Headers,
        mcp: McpCaller | None,
        deferred: RuleSet | None,
        charges: list[tuple[RateLimiter | TokenBudget, str]] | None,
        decision: Decision | None = None,
        limits: tuple[LimitDecision, ...] | list[LimitDecision] = (),
        budgets: list[LimitDecision] | tuple[()] = (),
    ) -> None:
        self.decision = decision
        self.limits = limits
        self.budgets = budgets
        self.identity = identity
        self.activation = activation
        self.headers = headers
        self.response_headers = response_headers
        self.mcp = mcp
        self._deferred = deferred
        self._charges = charges

    @property
    def deferred_policy(self) -> str:
        """The policy a deferred decision is told of when no rule decided it (an allow list none of
        whose rules held): the first one with deferred rules."""
        rules = self._deferred
        return rules.rules[0].policy if rules is not None and rules.rules else ""

    def authorize(self, variable: str, value: Mapping[str, Any]) -> Decision:
        """The deferred rules (A2A, LLM backends) with the protocol's variable filled in, e.g.
        ``authorize("a2a", a2a_variables("message/send", target="billing"))``."""
        rules = self._deferred
        if rules is None:
            return _ALLOWED
        decision = rules.decide({**self.activation, variable: value})
        if not decision.allowed:
            log.info("request denied", **decision.audit(), principal=_principal(self.identity))
        return decision

    @property
    def wants_usage(self) -> bool:
        """Some ``tokens`` limit or token budget admitted this request: its response's usage is to be
        read and charged (`charge`). False costs the response path nothing."""
        return self._charges is not None

    async def charge(self, tokens: int) -> None:
        """Charge the real token usage (after the response) to every ``tokens`` limit and token budget
        that admitted this request, under the keys computed when it was admitted. One that fails is
        logged and the others are still charged (store outages are the limits' own fallback)."""
        for limit, key in self._charges or ():
            try:
                await limit.charge(key, tokens)
            except Exception as exc:
                log.warning("token usage not charged", limit=limit.spec.name, tokens=tokens, error=repr(exc))


@dataclass(frozen=True, slots=True)
class ProtectedResourceDocument:
    """An RFC 9728 document the proxy answers itself (GET or HEAD on its well-known path)."""

    body: bytes
    headers: Headers


# --- compiled pieces ------------------------------------------------------------------------------


class _KeyedLimit:
    """A limiter or budget and the CEL expression giving its key (None: one bucket)."""

    __slots__ = ("expression", "limiter", "tokens")

    def __init__(self, limiter: RateLimiter | TokenBudget, expression: Expression | None, tokens: bool) -> None:
        self.limiter = limiter
        self.expression = expression
        self.tokens = tokens  # charged after the response (token limits, budgets)

    def key(self, context: Any) -> str:
        expression = self.expression
        if expression is None or context is None:
            return ""
        try:
            value = expression.evaluate(context)
        except CelEvaluationError as exc:
            # One shared bucket for callers the key cannot name (e.g. no token): logged, throttled.
            expression.failed(str(exc))
            return ""
        if type(value) is str:
            return value
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return str(value)


class McpPolicy:
    """What an MCP backend's handler enforces per message: the rules deciding item visibility, the
    limits keyed on ``mcp``, and the resilience section (timeouts and retries of each JSON-RPC request,
    which the MCP session applies itself). Shared by every request of one effective policy."""

    __slots__ = ("limits", "resilience", "rules", "usage", "visibilities")

    def __init__(
        self, rules: RuleSet | None, limits: tuple[_KeyedLimit, ...], resilience: ResilienceSettings | None = None
    ) -> None:
        self.rules = rules
        self.limits = limits
        self.resilience = resilience
        self.usage = Usage.of(limit.expression for limit in limits if limit.expression is not None)
        # A session's visibility, kept while its federation lives, so each request only updates it.
        self.visibilities: weakref.WeakKeyDictionary[McpFederation, McpVisibility] = weakref.WeakKeyDictionary()


def _audit(kind: Kind, target: str, name: str, decision: Decision, /, *, call: bool = False) -> None:
    if call:  # a tools/call decided on its arguments: refusals are worth an info line, like an HTTP 403
        if not decision.allowed:
            log.info("mcp call denied", target=target, tool=name, **decision.audit())
        else:
            log.debug("mcp call allowed", target=target, tool=name, **decision.audit())
    elif not decision.allowed:
        log.debug("mcp item hidden", kind=kind.value, target=target, name=name, **decision.audit())


class McpCaller:
    """The caller's MCP policy for one HTTP request (implements ``dataplane.mcp.endpoint.CallerPolicy``).

    ``http_limit``: the tightest HTTP-level limit decision that admitted the request, if any; the
    ``response_headers`` of an admitted item use report the tightest of it and the item limits.
    """

    __slots__ = ("_activation", "_http_limit", "_policy", "_visibility", "response_headers")

    def __init__(
        self, policy: McpPolicy, activation: Mapping[str, Any], http_limit: LimitDecision | None = None
    ) -> None:
        self._policy = policy
        self._activation = activation
        self._http_limit = http_limit
        # The rules' view for this request: the session's (attach) or this request's own (visibility).
        self._visibility: McpVisibility | None = None
        self.response_headers: Headers = _NO_HEADERS

    @property
    def resilience(self) -> ResilienceSettings | None:
        """The policy's timeouts and retries for this caller's MCP requests (None: the defaults)."""
        return self._policy.resilience

    def attach(self, federation: McpFederation) -> None:
        """Decide a session's visibility with this request's variables (each request may differ)."""
        rules = self._policy.rules
        if rules is None:
            if federation.visibility is not allow_all:
                federation.visibility = allow_all
            return
        visibilities = self._policy.visibilities
        visibility = visibilities.get(federation)
        if visibility is None or federation.visibility is not visibility:
            visibility = McpVisibility(rules, self._activation, audit=_audit)
            visibilities[federation] = visibility
            federation.visibility = visibility
        else:
            visibility.update(self._activation)
        self._visibility = visibility

    def visibility(self) -> Visibility:
        """A visibility for a federation that lives as long as this request (2026-07-28)."""
        rules = self._policy.rules
        return allow_all if rules is None else self._view(rules)

    def _view(self, rules: RuleSet) -> McpVisibility:
        visibility = self._visibility
        if visibility is None:
            visibility = self._visibility = McpVisibility(rules, self._activation, audit=_audit)
        return visibility

    async def admit(self, method: str, target: str, name: str, arguments: Any) -> CallRefusal | None:
        """Decide a ``tools/call`` on its arguments (rules reading ``mcp.tool.arguments``; a hidden tool is
        left to the federation), then count one MCP request against the limits keyed on ``mcp``; a refusal
        to answer with, or None (then ``response_headers`` are the limit headers for its answer)."""
        rules = self._policy.rules
        if method == "tools/call" and rules is not None and rules.argument_rules:
            decision = self._view(rules).call_decision(target, name, arguments)
            if decision is not None and not decision.allowed:
                return CallRefusal(200, _POLICY_DENIED_MESSAGE, [], 0.0, POLICY_DENIED)
        limits = self._policy.limits
        if not limits or method not in MCP_ITEM_METHODS:
            return None
        args = arguments if isinstance(arguments, Mapping) else None
        if method == "tools/call":
            mcp = mcp_variables(method, tool=name, target=target, arguments=args)
        elif method == "prompts/get":
            mcp = mcp_variables(method, prompt=name, target=target)
        else:
            mcp = mcp_variables(method, resource=name, target=target)
        try:
            context = self._policy.usage.context({**self._activation, "mcp": mcp})
        except CelEvaluationError as exc:
            log.warning("mcp limit variables unusable", error=str(exc))
            context = None
        decisions = [await limit.limiter.check(limit.key(context)) for limit in limits]
        worst = tightest(decisions)
        if worst is None or worst.allowed:
            counted = tightest([*decisions, self._http_limit] if self._http_limit is not None else decisions)
            self.response_headers = response_headers(counted) if counted is not None else _NO_HEADERS
            return None
        return CallRefusal(refusal_status(worst), _limit_message(worst), response_headers(worst), worst.retry_after)


class RequestPolicy:
    """One effective policy compiled: what `evaluate` runs for every request it governs.

    ``effective`` is the policy itself, for the forwarding path (CORS, header modifiers, upstream
    credential, resilience); ``idle`` means the chain has nothing to check (only such sections).
    """

    __slots__ = (
        "_address",
        "_context",
        "_identity",
        "authenticator",
        "budgets",
        "deferred",
        "effective",
        "failure",
        "idle",
        "limits",
        "mcp",
        "policies",
        "rules",
        "usage",
        "variables",
    )

    def __init__(
        self,
        effective: EffectivePolicy,
        *,
        failure: Refused | None = None,
        authenticator: Authenticator | None = None,
        rules: RuleSet | None = None,
        deferred: RuleSet | None = None,
        limits: tuple[_KeyedLimit, ...] = (),
        budgets: tuple[_KeyedLimit, ...] = (),
        mcp: McpPolicy | None = None,
    ) -> None:
        self.effective = effective
        self.policies = effective.policies
        self.failure = failure
        self.authenticator = authenticator
        self.rules = rules
        self.deferred = deferred
        self.limits = limits
        self.budgets = budgets
        self.mcp = mcp
        http_expressions = [rule.expression for rule in rules.rules] if rules is not None else []
        http_expressions += [k.expression for k in (*limits, *budgets) if k.expression is not None]
        self.usage = Usage.of(http_expressions) if http_expressions else None
        # Every variable some expression of this policy reads, built once per request.
        names: set[str] = set(self.usage.variables) if self.usage is not None else set()
        if deferred is not None:
            names |= deferred.variables
        if mcp is not None:
            if mcp.rules is not None:
                names |= mcp.rules.variables
            names |= mcp.usage.variables
        self.variables = frozenset(names)
        # One engine context, rebound per request (see `_bind`).
        self._context: _cel.Context | None = None
        self._identity: object = _UNBOUND
        self._address: object = _UNBOUND
        self.idle = (
            failure is None
            and authenticator is None
            and rules is None
            and deferred is None
            and (mcp is None and not limits and not budgets)
        )

    async def evaluate(self, request: ProxyRequest) -> Admitted | Refused:
        """Run the chain for one request; never raises for anything the client sent."""
        if self.failure is not None:
            return self.failure
        headers = request.headers
        identity: Identity | None = None
        authenticator = self.authenticator
        if authenticator is not None:
            outcome = await authenticator.authenticate(headers)
            if type(outcome) is Refusal:
                return _unauthorized(outcome)
            if type(outcome) is Identity:
                identity = outcome
            headers = authenticator.strip_and_set_headers(headers, outcome)
        activation = self._activation(request, headers, identity) if self.variables else _NO_VARIABLES
        # From binding the context to the last key nothing awaits: the shared context cannot change under us.
        context = self._bind(activation, identity, request.client_host) if self.usage is not None else None
        rules = self.rules
        decision: Decision | None = None
        if rules is not None:
            decision = rules.decide_with(context) if context is not None else Decision(False, "variables unusable")
            if not decision.allowed:
                log.info("request denied", **decision.audit(), principal=_principal(identity))
                return self._forbidden(decision)
        limit_keys = [limit.key(context) for limit in self.limits] if self.limits else ()
        budget_keys = [budget.key(context) for budget in self.budgets] if self.budgets else ()
        extra = _NO_HEADERS
        charges: list[tuple[RateLimiter | TokenBudget, str]] | None = None
        http_limit: LimitDecision | None = None
        decisions: list[LimitDecision] | tuple[()] = ()
        if self.limits:
            decisions = []
            for limit, key in zip(self.limits, limit_keys, strict=True):
                decisions.append(await limit.limiter.check(key))
                if limit.tokens:
                    charges = charges or []
                    charges.append((limit.limiter, key))
            worst = http_limit = tightest(decisions)
            if worst is not None:
                extra = response_headers(worst)
                if not worst.allowed:
                    log.debug("request limited", limit=worst.policy, reason=worst.reason.value)
                    return Refused(
                        refusal_status(worst), _limit_message(worst), extra, "rate_limited", decision, decisions
                    )
        budgets: list[LimitDecision] = []
        for budget, key in zip(self.budgets, budget_keys, strict=True):
            spent = await budget.limiter.check(key)
            if not spent.allowed:
                log.debug("request over budget", budget=spent.policy, reason=spent.reason.value)
                retry = [header for header in response_headers(spent) if header[0] == b"retry-after"]
                message = f"Too Many Requests: token budget {spent.policy!r} is spent for this period"
                return Refused(refusal_status(spent), message, retry, "budget_exhausted", decision, decisions, spent)
            charges = charges or []
            charges.append((budget.limiter, key))
            budgets.append(spent)
        caller = McpCaller(self.mcp, activation, http_limit) if self.mcp is not None else None
        return Admitted(
            identity, activation, headers, extra, caller, self.deferred, charges, decision, decisions, budgets
        )

    def _bind(self, activation: Mapping[str, Any], identity: Identity | None, address: bytes) -> _cel.Context | None:
        """The engine context for this request's rules and keys. Converting values for the engine costs
        more than evaluating (``cel.py``), so one context is kept and ``jwt`` and ``source`` are rebound
        only when the identity or address changed: an agent reusing its token gets the same `Identity`
        object from the verified-token cache. ``request`` is rebound every time."""
        usage = self.usage
        assert usage is not None
        context = self._context
        try:
            if context is None:
                context = self._context = _cel.Context()
                self._identity = self._address = _UNBOUND
            same_identity = identity is self._identity
            for name in usage.variables:
                if name == "jwt":
                    if same_identity:
                        continue
                elif name == "source":
                    if same_identity and address == self._address:
                        continue
                elif name != "request" and self._identity is not _UNBOUND:
                    continue  # mcp, a2a, llm: constants here, bound with the first request
                usage.bind(context, name, activation[name])
        except CelEvaluationError as exc:
            self._context = None  # partly rebound: start afresh next time
            log.warning("policy variables unusable", policies=list(self.policies), error=str(exc))
            return None
        self._identity = identity
        self._address = address
        return context

    def _activation(self, request: ProxyRequest, headers: Headers, identity: Identity | None) -> dict[str, Any]:
        names = self.variables
        activation: dict[str, Any] = {}
        if "jwt" in names:
            activation["jwt"] = jwt_variables(identity)
        if "request" in names:
            activation["request"] = request_variables(request.method, request.target, request.authority, headers)
        if "source" in names:
            activation["source"] = source_variables(request.client_host, identity)
        for name, empty in _EMPTY_PROTOCOL.items():
            if name in names:
                activation[name] = empty
        return activation

    def _forbidden(self, decision: Decision) -> Refused:
        message = "Forbidden: access denied by policy"
        if self.authenticator is None:
            return Refused(403, message, [], "authorization_denied", decision)
        refusal = self.authenticator.forbidden("authorization_denied", "Access denied by policy")
        return Refused(403, message, refusal.headers(), "authorization_denied", decision)


_NO_VARIABLES: Mapping[str, Any] = MappingProxyType({})
_UNBOUND: Final = object()


def _principal(identity: Identity | None) -> str:
    return identity.principal if identity is not None else ""


def _unauthorized(refusal: Refusal) -> Refused:
    reason = refusal.description or "a valid credential is required"
    title = "Service Unavailable" if refusal.status == 503 else "Unauthorized"  # 503: TokenReview unreachable
    return Refused(refusal.status, f"{title}: {reason}", refusal.headers(), refusal.reason)


def _limit_message(decision: LimitDecision) -> str:
    if decision.allowed:
        return ""
    if refusal_status(decision) == 503:
        return f"Service Unavailable: the store of limit {decision.policy!r} is unreachable"
    return f"Too Many Requests: limit {decision.policy!r} reached, retry after {max(1, round(decision.retry_after))}s"


# --- one config's table ---------------------------------------------------------------------------


class _ByHost:
    """The policies of one (bind, rule, backend) reached through several listeners of one bind: the
    listener is the one whose hostname matches the request's host (exact, then wildcard, then none)."""

    __slots__ = ("_any", "_exact", "_wildcards")

    def __init__(self) -> None:
        self._exact: dict[str, RequestPolicy | None] = {}
        self._wildcards: list[tuple[str, RequestPolicy | None]] = []
        self._any: RequestPolicy | None = None

    def add(self, hostname: str, policy: RequestPolicy | None) -> None:
        if not hostname:
            self._any = policy
        elif hostname.startswith("*."):
            suffix = hostname[1:]
            wildcards = [item for item in self._wildcards if item[0] != suffix]
            wildcards.append((suffix, policy))
            self._wildcards = sorted(wildcards, key=lambda item: -len(item[0]))  # longest suffix first
        else:
            self._exact[hostname] = policy

    def pick(self, authority: bytes) -> RequestPolicy | None:
        host = _host_of(authority)
        if host in self._exact:
            return self._exact[host]
        for suffix, policy in self._wildcards:
            if host.endswith(suffix):
                return policy
        return self._any


def _host_of(authority: bytes) -> str:
    """The host of an authority, lower case, without port or trailing dot (IPv6 keeps its brackets)."""
    host = authority.decode("latin-1").lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = name
    return host.rstrip(".")


class PolicyTable:
    """The compiled policies of one config: a dict probe per request.

    ``problems`` lists sections the cores refused (each also fails closed where it applies);
    `raise_if_problems` turns them into the ConfigRejected a NACK carries.
    """

    __slots__ = ("_by_listener", "_entries", "config", "documents", "problems", "redis")

    def __init__(
        self,
        config: RuntimeConfig,
        entries: Mapping[tuple[tuple[str, int], str, str], RequestPolicy | _ByHost],
        by_listener: Mapping[tuple[str, str, str], RequestPolicy],
        documents: Mapping[tuple[str, int], Mapping[str, ProtectedResourceDocument]],
        problems: tuple[ResourceError, ...],
        redis: frozenset[RedisKey] = frozenset(),
    ) -> None:
        self.config = config
        self.redis = redis  # the Redis clients its limits use
        self._entries = entries
        self._by_listener = by_listener
        self.documents = documents
        self.problems = problems

    def lookup(self, request: ProxyRequest, route: str, backend: str) -> RequestPolicy | None:
        """The policy of a request routed to rule ``route`` and backend ``backend`` ("" when the rule
        answers itself: redirect, direct response); None when no policy applies."""
        entries = self._entries
        if not entries:
            return None
        entry = entries.get((request.listener_key, route, backend))
        if entry is None or type(entry) is RequestPolicy:
            return entry
        return entry.pick(request.authority)  # type: ignore[union-attr]

    def for_request(self, listener: str, route: str, backend: str) -> RequestPolicy | None:
        """The policy by listener name (as `PolicyIndex.for_request`), for tests and tools."""
        return self._by_listener.get((listener, route, backend))

    def document(self, listener_key: tuple[str, int], path: str) -> ProtectedResourceDocument | None:
        """The RFC 9728 document served at ``path`` on this listener bind, if any."""
        documents = self.documents.get(listener_key)
        return documents.get(path) if documents is not None else None

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConfigRejected(self.problems)


# --- the worker's compiler and caches -------------------------------------------------------------


class _Problem(Exception):
    """A section the cores refuse: ``field`` is relative to the Policy resource."""

    def __init__(self, policy: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.policy = policy
        self.field = field
        self.message = message


@dataclass(slots=True)
class _Cache:
    """Compiled objects by content key; `keep_used` drops what the newest config did not use."""

    entries: dict[Hashable, Any] = field(default_factory=dict)
    used: dict[Hashable, Any] = field(default_factory=dict)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self.used:
            return self.used[key]
        value = self.entries[key] if key in self.entries else build()
        self.used[key] = value
        return value

    def keep_used(self) -> None:
        self.entries, self.used = self.used, {}


def _source(expression: Expression | None) -> str | None:
    return None if expression is None else expression.source


class WorkerPolicies:
    """The policy state of one worker that outlives configs: the compile caches, the Redis clients
    (one per address) and the JWKS refresh gate.

    ``on_jwks_refresh(url)`` is the seam to the control plane: a token with an unknown ``kid`` (or a
    provider whose keys were never fetched) calls it, at most once per URL per 30 s per worker; the
    control plane then refetches that JWKS and ships the keys in the next snapshot.
    ``redis_options`` override `RedisSettings` fields (timeouts) for every client.
    ``token_reviewer`` reviews service-account tokens of ``tokenReview`` providers (through the
    control plane); without one such a policy cannot be compiled.
    """

    def __init__(
        self,
        *,
        on_jwks_refresh: Callable[[str], None] | None = None,
        redis_options: Mapping[str, Any] | None = None,
        token_reviewer: TokenReviewer | None = None,
    ) -> None:
        self.on_jwks_refresh = on_jwks_refresh
        self.token_reviewer = token_reviewer
        self.refresh_gate = JwksRefreshGate(self._jwks_refresh)
        self._redis_options = dict(redis_options or {})
        self._authn = _Cache()
        self._rules = _Cache()
        self._limits = _Cache()
        self._budgets = _Cache()
        self.redis: dict[RedisKey, RedisClient] = {}
        self._redis_used: set[RedisKey] = set()
        self._closing: set[asyncio.Task[None]] = set()
        # The newest table compiled, and the tables in service (the active one and its predecessor,
        # whose requests may still be in flight).
        self.table: PolicyTable | None = None
        self._active: tuple[PolicyTable, ...] = ()

    def _jwks_refresh(self, url: str) -> None:
        log.info("jwks refresh requested", url=url)
        callback = self.on_jwks_refresh
        if callback is not None:
            try:
                callback(url)
            except Exception as exc:  # the seam must never fail a request
                log.warning("jwks refresh callback failed", url=url, error=str(exc))

    async def aclose(self) -> None:
        """Close every Redis connection (worker shutdown)."""
        clients, self.redis = list(self.redis.values()), {}
        for client in clients:
            await client.aclose()

    # ------------------------------------------------------------------------------------ compile

    def compile(self, config: RuntimeConfig) -> PolicyTable:
        """The table of ``config``, reusing what earlier configs compiled; never raises (problems fail
        closed where they apply and are listed in the table). `activate` puts it in service."""
        table = self.table
        if table is not None and table.config is config:
            return table
        index = config.policies
        problems: dict[tuple[str, str], ResourceError] = {}
        compiled: dict[tuple[int, str], RequestPolicy] = {}

        def request_policy(effective: EffectivePolicy, backend: str) -> RequestPolicy:
            cluster = config.backends.get(backend)
            kind = cluster.kind if cluster is not None else "http"
            key = (id(effective), kind)  # the config holds every effective policy: ids are stable here
            found = compiled.get(key)
            if found is None:
                found = compiled[key] = self._build(effective, kind, problems)
            return found

        group_of = {name: key for key, group in config.listeners.items() for name in group.listener_names}
        hostnames = {
            name: (message.hostname.lower().rstrip(".") if isinstance(message, pb.Listener) else "")
            for name, message in config.resources.get(LISTENER, {}).items()
        }
        members: dict[tuple[tuple[str, int], str], list[str]] = {}
        for route_name, route in config.resources.get(ROUTE, {}).items():
            if isinstance(route, pb.Route):
                for listener in dict.fromkeys(route.listeners):
                    if listener in group_of:
                        members.setdefault((group_of[listener], route_name), []).append(listener)
        entries: dict[tuple[tuple[str, int], str, str], RequestPolicy | _ByHost] = {}
        by_listener: dict[tuple[str, str, str], RequestPolicy] = {}
        documents: dict[tuple[str, int], dict[str, ProtectedResourceDocument]] = {}
        reachable = [((listener, route, ""), effective) for (listener, route), effective in index.rules.items()]
        reachable += list(index.requests.items())
        for (listener, route, backend), effective in reachable:
            policy = request_policy(effective, backend)
            by_listener[(listener, route, backend)] = policy
            bind = group_of.get(listener)
            if bind is None:
                continue
            self._document(documents, bind, effective)
            names = members.get((bind, route), [listener])
            if len(names) == 1:
                entries[(bind, route, backend)] = policy
                continue
            resolver = entries.get((bind, route, backend))
            if not isinstance(resolver, _ByHost):
                resolver = entries[(bind, route, backend)] = _ByHost()
                for name in names:  # listeners without a policy here: none applies through them
                    resolver.add(hostnames.get(name, ""), None)
            resolver.add(hostnames.get(listener, ""), policy)
        for cache in (self._authn, self._rules, self._limits, self._budgets):
            cache.keep_used()
        used, self._redis_used = frozenset(self._redis_used), set()
        table = PolicyTable(
            config,
            MappingProxyType(entries),
            MappingProxyType(by_listener),
            MappingProxyType({bind: MappingProxyType(paths) for bind, paths in documents.items()}),
            tuple(problems.values()),
            used,
        )
        for problem in table.problems:
            log.error("policy cannot be applied; failing closed where it applies", problem=str(problem))
        self.table = table
        return table

    def _document(
        self,
        documents: dict[tuple[str, int], dict[str, ProtectedResourceDocument]],
        bind: tuple[str, int],
        effective: EffectivePolicy,
    ) -> None:
        authn = effective.sections.authentication
        metadata = authn.protected_resource if authn is not None else None
        if metadata is None:
            return
        path = well_known_path(metadata.resource)
        served = documents.setdefault(bind, {})
        if path in served:
            if served[path].body != metadata.document:
                log.warning("two protected-resource documents for one path; the first is served", path=path)
            return
        headers = [_JSON, (b"content-length", b"%d" % len(metadata.document)), _DOCUMENT_CACHE, _DOCUMENT_CORS]
        served[path] = ProtectedResourceDocument(metadata.document, headers)

    def _build(
        self, effective: EffectivePolicy, kind: str, problems: dict[tuple[str, str], ResourceError]
    ) -> RequestPolicy:
        if effective.invalid:
            names = ", ".join(effective.invalid)
            message = (
                f"Internal Server Error: policy {names} was refused by the control plane; "
                "this route fails closed until it is fixed"
            )
            return RequestPolicy(effective, failure=Refused(500, message, [], "policy_invalid"))
        sections = effective.sections
        protocol = PROTOCOL_VARIABLES.get(kind)
        try:
            authenticator = self._authenticator(sections.authentication)
            rule_set = self._rule_set(sections.authorization)
            limits = self._rate_limits(sections.rate_limits)
            budgets = self._token_budgets(sections.token_budgets)
        except _Problem as problem:
            error = ResourceError(POLICY, problem.policy, problem.field, problem.message)
            problems.setdefault((problem.policy, problem.field), error)
            message = (
                f"Internal Server Error: policy {problem.policy} cannot be applied by this proxy; "
                "this route fails closed until it is fixed"
            )
            return RequestPolicy(effective, failure=Refused(500, message, [], "policy_uncompilable"))
        rules = deferred = None
        if rule_set is not None:
            if protocol is not None and (protocol in rule_set.variables or kind == "a2a"):
                deferred = rule_set
            else:
                rules = rule_set
        mcp = None
        if kind == "mcp":
            item_limits = tuple(limit for limit in limits if _reads(limit, "mcp"))
            limits = tuple(limit for limit in limits if not _reads(limit, "mcp"))
            if deferred is not None or item_limits or sections.resilience is not None:
                mcp = McpPolicy(deferred, item_limits, sections.resilience)
                deferred = None
        return RequestPolicy(
            effective,
            authenticator=authenticator,
            rules=rules,
            deferred=deferred,
            limits=limits,
            budgets=budgets,
            mcp=mcp,
        )

    # -------------------------------------------------------------------------------- sections

    def _authenticator(self, section: AuthenticationSettings | None) -> Authenticator | None:
        if section is None:
            return None
        compiled = self._authn.get(section, lambda: self._compile_authn(section))
        if isinstance(compiled, _Problem):
            raise compiled
        return compiled  # type: ignore[no-any-return]

    def _compile_authn(self, section: AuthenticationSettings) -> Authenticator | _Problem:
        try:
            return compile_authn(
                authn_spec(section), refresh_gate=self.refresh_gate, token_reviewer=self.token_reviewer
            )
        except AuthnConfigError as exc:
            return _Problem(section.policy, f"authentication.{exc.field}", exc.message)

    def _rule_set(self, section: AuthorizationSettings | None) -> RuleSet | None:
        if section is None:
            return None
        key = tuple((kind.value, tuple(e.source for e in getattr(section, kind.value))) for kind in RuleKind)

        def build() -> RuleSet:
            rules = [
                Rule(section.policy, kind, index, expression)
                for kind in RuleKind
                for index, expression in enumerate(getattr(section, kind.value))
            ]
            return RuleSet(rules)

        rule_set: RuleSet = self._rules.get((section.policy, key), build)
        return rule_set if rule_set else None

    def _rate_limits(self, section: RateLimitsSection | None) -> tuple[_KeyedLimit, ...]:
        if section is None:
            return ()
        compiled = []
        for index, limit in enumerate(section.limits):
            key = (section.policy, limit.name, limit.capacity, limit.refill, limit.per, _source(limit.key),
                   limit.unit, limit.scope, limit.store, limit.on_store_down)  # fmt: skip
            where = f"rate_limits.limits[{index}]"
            built = self._limits.get(key, partial(self._limit, limit, section.policy, where))
            self._note_store(limit.store)
            if isinstance(built, _Problem):
                raise built
            compiled.append(_KeyedLimit(built, limit.key, limit.unit == "tokens"))
        return tuple(compiled)

    def _limit(self, limit: RateLimitSettings, policy: str, where: str) -> RateLimiter | _Problem:
        # Named by policy too: two policies' limits of one name must not share buckets in Redis.
        spec = LimitSpec(
            f"{policy}/{limit.name}", limit.capacity, limit.refill, limit.per, limit.unit, limit.scope,
            limit.on_store_down,
        )  # fmt: skip
        try:
            redis = self._redis_client(limit.store) if limit.scope == "global" else None
            return compile_limit(spec, redis=redis)
        except LimitConfigError as exc:
            return _Problem(policy, f"{where}.{exc.field}", exc.message)

    def _token_budgets(self, section: TokenBudgetsSection | None) -> tuple[_KeyedLimit, ...]:
        if section is None:
            return ()
        compiled = []
        for index, budget in enumerate(section.budgets):
            key = (section.policy, budget.name, budget.tokens, budget.period, _source(budget.key), budget.scope,
                   budget.store, budget.on_store_down)  # fmt: skip
            where = f"token_budgets.budgets[{index}]"
            built = self._budgets.get(key, partial(self._budget, budget, section.policy, where))
            self._note_store(budget.store)
            if isinstance(built, _Problem):
                raise built
            compiled.append(_KeyedLimit(built, budget.key, True))
        return tuple(compiled)

    def _budget(self, budget: TokenBudgetSettings, policy: str, where: str) -> TokenBudget | _Problem:
        spec = BudgetSpec(f"{policy}/{budget.name}", budget.tokens, budget.period, budget.scope, budget.on_store_down)
        try:
            redis = self._redis_client(budget.store) if budget.scope == "global" else None
            return compile_budget(spec, redis=redis)
        except LimitConfigError as exc:
            return _Problem(policy, f"{where}.{exc.field}", exc.message)

    def _redis_client(self, store: RedisStoreSettings | None) -> RedisClient:
        if store is None:
            raise LimitConfigError("redis", "store", "a global limit needs a Redis store")
        key = (store.url, store.username, store.password)
        client = self.redis.get(key)
        if client is None:
            settings = RedisSettings.from_url(
                store.url, username=store.username, password=store.password, **self._redis_options
            )
            client = self.redis[key] = RedisClient(settings)
        return client

    def _note_store(self, store: RedisStoreSettings | None) -> None:
        """The config being compiled uses this store (whether its limiter was built now or reused)."""
        if store is not None:
            self._redis_used.add((store.url, store.username, store.password))

    def activate(self, table: PolicyTable) -> None:
        """``table`` now serves requests: close the Redis clients neither it nor its predecessor (whose
        requests may still be in flight) uses."""
        if self._active and self._active[0] is table:
            return
        self._active = (table, *self._active[:1])
        keep = set().union(*(active.redis for active in self._active))
        retired = [key for key in self.redis if key not in keep]
        if not retired:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for key in retired:
            client = self.redis.pop(key)
            if loop is not None:
                task = loop.create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)


def _reads(limit: _KeyedLimit, variable: str) -> bool:
    return limit.expression is not None and variable in limit.expression.variables


def authn_spec(section: AuthenticationSettings) -> AuthnSpec:
    """The authenticator spec of an authentication section (raises AuthnConfigError)."""
    providers = []
    token_review: TokenReviewSpec | None = None
    claims: dict[str, str] = {}
    for index, provider in enumerate(section.providers):
        if provider.token_review:
            if token_review is not None:
                raise AuthnConfigError(f"providers[{index}].token_review", "only one provider may use TokenReview")
            token_review = TokenReviewSpec(provider.name, provider.issuer, provider.audiences, provider.leeway_seconds)
        else:
            inline = provider.jwks_inline
            if inline is None and provider.jwks_file is None:
                inline = '{"keys":[]}'  # not fetched yet: every token asks for a refresh (jwks_url is set)
            providers.append(
                JwtProviderSpec(
                    name=provider.name,
                    issuer=provider.issuer,
                    audiences=provider.audiences,
                    jwks_inline=inline,
                    jwks_file=provider.jwks_file,
                    jwks_url=provider.jwks_url,
                    algorithms=provider.algorithms or ALLOWED_ALGORITHMS,
                    leeway_seconds=provider.leeway_seconds,  # type: ignore[arg-type]
                    required_claims=provider.required_claims,
                    require_expiry=provider.require_expiry,
                    principal_claim=provider.principal_claim,
                    kind=provider.kind,
                )
            )
        for mapping in provider.claims_to_headers:
            seen = claims.setdefault(mapping.header, mapping.claim)
            if seen != mapping.claim:
                raise AuthnConfigError(
                    f"providers[{index}].claims_to_headers",
                    f"header {mapping.header!r} is filled from claim {seen!r} by another provider; "
                    "providers must agree on what an identity header carries",
                )
    api_keys = None
    if section.api_keys is not None:
        entries = tuple(ApiKeyEntry(key.name, key.sha256) for key in section.api_keys.keys)
        api_keys = ApiKeySpec(entries, section.api_keys.header)
    basic = None
    realm = "agentgate"
    if section.basic is not None:
        basic = BasicAuthSpec(tuple(BasicUser(user.name, user.password_hash) for user in section.basic.users))
        realm = section.basic.realm
    metadata_url = None
    if section.protected_resource is not None:
        parts = urlsplit(section.protected_resource.resource)
        metadata_url = f"{parts.scheme}://{parts.netloc}{well_known_path(section.protected_resource.resource)}"
    return AuthnSpec(
        mode=section.mode,
        jwt_providers=tuple(providers),
        token_review=token_review,
        api_keys=api_keys,
        basic=basic,
        realm=realm,
        resource_metadata_url=metadata_url,
        identity_headers=tuple(IdentityHeaderSpec(header, f"claim:{claim}") for header, claim in claims.items()),
        pass_through_credentials=section.forward_credentials,
    )


__all__ = [
    "MCP_ITEM_METHODS",
    "PROTOCOL_VARIABLES",
    "Admitted",
    "McpCaller",
    "McpPolicy",
    "PolicyTable",
    "ProtectedResourceDocument",
    "Refused",
    "RequestPolicy",
    "WorkerPolicies",
    "authn_spec",
]
