"""CEL authorization: rule sets of allow, deny and require expressions, and the variables they see.

Semantics of a ``RuleSet`` (one policy, or several combined), evaluated in this order:

1. **deny**: if any deny rule holds, the request is denied.
2. **require**: if any require rule does not hold, the request is denied.
3. **allow**: if the allow list is empty, or any allow rule holds, the request is allowed; else denied.

Every failure is a deny, never an error response: a rule whose evaluation fails or whose value is not a bool
counts as holding for deny, as not holding for require and allow (fail closed), and is logged with its field.
A ``Decision`` names the rule that decided (policy, list and index) for audit logs.

Argument rules: a rule that can observe ``mcp.tool.arguments`` (found when it is compiled, ``argument_rules``)
cannot be decided before a ``tools/call`` brings its arguments. ``decide_without_arguments`` decides for a list,
with ``mcp.tool.arguments`` absent from the variables: CEL's ``&&`` and ``||`` absorb an error when the other
operand settles the result, so an argument rule that still evaluates (``mcp.tool.name == 'echo' && ...`` for
another tool) counts as usual, and one that fails could go either way with some arguments: it neither denies
(deny, require) nor is needed (an allow that fails counts as "may hold"). So an item is hidden only when the
rules deny it whatever the arguments, and the call path decides the rest with ``decide`` on the real arguments.

Variables (all always present, so ``has()`` and comparisons behave the same whatever the request is; an absent
part is an empty map or string):

- ``jwt``: the verified token's claims (``jwt.sub``, ``jwt.tenant``); ``{}`` without a token.
- ``request``: ``method``, ``path`` (no query), ``host``, ``headers`` (lower-case names; repeated fields joined
  with ``", "``, cookies with ``"; "``).
- ``source``: ``address`` (client IP), ``identity`` (the principal), ``namespace`` and ``serviceAccount``
  (Kubernetes service-account tokens).
- ``mcp``: ``method``; ``tool`` {name, target, arguments}; ``prompt`` {name, target}; ``resource`` {uri, target}.
  Names are the target's own (upstream) names; ``target`` is the federation's target name.
- ``a2a``: ``method`` as sent (``message/send`` in 0.3, ``SendMessage`` in 1.0; "" for an agent-card fetch),
  ``operation`` (always the 1.0 name, so one rule covers both eras), ``target`` {name, namespace} of the agent
  called, ``version`` (``A2A-Version``; "0.3" when absent), ``taskId``, ``contextId``, ``binding`` ("jsonrpc"
  or "rest") and ``streaming`` (bool). ``a2a_variables`` is the one builder (the A2A handler's ``A2aCall``
  uses it), so a rule sees the same keys on every route.
- ``llm``: ``model``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import cel as _cel

from dataplane.policy.cel import VARIABLES, CelEvaluationError, Expression, Usage, compile_expression
from shared.logging import get_logger

if TYPE_CHECKING:  # only read here, never constructed
    from dataplane.policy.identity import Identity

log = get_logger("dataplane.policy.authorize")

Activation = Mapping[str, Any]  # variable name -> plain Python value (maps, lists, strings, numbers, bools)
# The part of the variables only a tools/call carries: rules reading it are "argument rules".
MCP_TOOL_ARGUMENTS: Final = ("mcp", "tool", "arguments")


class RuleKind(enum.Enum):
    """Which list of a rule set a rule belongs to (the value is the config field name)."""

    DENY = "deny"
    REQUIRE = "require"
    ALLOW = "allow"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled expression of a policy's ``deny``, ``require`` or ``allow`` list."""

    policy: str
    kind: RuleKind
    index: int
    expression: Expression


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome and why: ``rule`` is the rule that decided, None when none did (no rules at all, or an
    allow list none of whose rules held). ``failed`` lists the fields of rules whose evaluation failed."""

    allowed: bool
    reason: str
    rule: Rule | None = None
    failed: tuple[str, ...] = ()

    def audit(self) -> dict[str, Any]:
        """Fields for an audit log line."""
        fields: dict[str, Any] = {"allowed": self.allowed, "reason": self.reason}
        if self.rule is not None:
            fields |= {"policy": self.rule.policy, "rule": f"{self.rule.kind.value}[{self.rule.index}]"}
        if self.failed:
            fields["failed"] = list(self.failed)
        return fields


_NO_RULES = Decision(True, "no rules")
_NO_ALLOW = "no allow rule held"


class RuleSet:
    """Compiled allow/deny/require rules, shared by every request; see the module docstring for semantics."""

    __slots__ = ("_allow", "_deny", "_require", "argument_rules", "rules", "usage")

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._deny = tuple(r for r in self.rules if r.kind is RuleKind.DENY)
        self._require = tuple(r for r in self.rules if r.kind is RuleKind.REQUIRE)
        self._allow = tuple(r for r in self.rules if r.kind is RuleKind.ALLOW)
        self.usage = Usage.of(r.expression for r in self.rules)
        # Rules a list cannot decide: they read a tools/call's arguments (see the module docstring).
        self.argument_rules: frozenset[Rule] = frozenset(
            r for r in self.rules if r.expression.observes(MCP_TOOL_ARGUMENTS)
        )

    @classmethod
    def compile(
        cls,
        policy: str,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        require: Sequence[str] = (),
        field: str = "authorization",
        variables: Collection[str] = VARIABLES,
    ) -> RuleSet:
        """Compile one policy's lists; raises ``CelCompileError`` naming ``policy`` and e.g. ``field.allow[1]``."""
        rules: list[Rule] = []
        for kind, sources in ((RuleKind.DENY, deny), (RuleKind.REQUIRE, require), (RuleKind.ALLOW, allow)):
            for index, source in enumerate(sources):
                expression = compile_expression(
                    source, f"{field}.{kind.value}[{index}]", policy=policy, variables=variables
                )
                rules.append(Rule(policy, kind, index, expression))
        return cls(rules)

    @classmethod
    def combine(cls, *sets: RuleSet) -> RuleSet:
        """Several policies applying to one request as one set: every deny and require of each, and the union
        of their allow lists (so attaching a second policy with an allow list widens, never narrows, access;
        narrow with require)."""
        return cls(rule for rule_set in sets for rule in rule_set.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self._deny)} deny, {len(self._require)} require, {len(self._allow)} allow)"

    @property
    def variables(self) -> frozenset[str]:
        """The variables some rule reads: the only ones a caller needs to build."""
        return self.usage.variables

    def context(self, activation: Activation) -> _cel.Context:
        """The engine's view of ``activation`` for these rules; raises ``CelEvaluationError``."""
        return self.usage.context(activation)

    def set_variable(self, context: _cel.Context, name: str, value: Any) -> None:
        """Replace one variable of a ``context`` (e.g. ``mcp`` per listed tool); raises ``CelEvaluationError``."""
        self.usage.bind(context, name, value)

    def decide(self, activation: Activation) -> Decision:
        """The decision for one request."""
        if not self.rules:
            return _NO_RULES
        try:
            context = self.usage.context(activation)
        except CelEvaluationError as exc:
            log.warning("authorization variables unusable", error=str(exc))
            return Decision(False, f"variables unusable: {exc}")
        return self.decide_with(context)

    def decide_with(self, context: _cel.Context) -> Decision:
        """The decision against an already built ``context`` (see ``context``)."""
        if not self.rules:
            return _NO_RULES
        failed: list[str] = []
        for rule in self._deny:
            holds = rule.expression.holds(context)
            if holds is None:
                failed.append(rule.expression.field)
                return Decision(False, "deny rule failed to evaluate", rule, tuple(failed))
            if holds:
                return Decision(False, "deny rule held", rule)
        for rule in self._require:
            holds = rule.expression.holds(context)
            if holds is None:
                failed.append(rule.expression.field)
                return Decision(False, "require rule failed to evaluate", rule, tuple(failed))
            if not holds:
                return Decision(False, "require rule did not hold", rule)
        if not self._allow:
            return Decision(True, "no allow rules")
        for rule in self._allow:
            holds = rule.expression.holds(context)
            if holds:
                return Decision(True, "allow rule held", rule, tuple(failed))
            if holds is None:
                failed.append(rule.expression.field)
        return Decision(False, _NO_ALLOW, None, tuple(failed))

    def decide_without_arguments(self, context: _cel.Context) -> Decision:
        """The decision while ``mcp.tool.arguments`` is unknown (absent from ``context``): an argument rule
        whose value depends on them does not decide (see the module docstring); the others as in
        ``decide_with``. Without argument rules this is ``decide_with``."""
        unknown = self.argument_rules
        if not unknown:
            return self.decide_with(context)
        for rule in self._deny:
            holds = _settled(rule, context) if rule in unknown else rule.expression.holds(context)
            if holds is None:
                return Decision(False, "deny rule failed to evaluate", rule, (rule.expression.field,))
            if holds is True:
                return Decision(False, "deny rule held", rule)
        for rule in self._require:
            holds = _settled(rule, context) if rule in unknown else rule.expression.holds(context)
            if holds is None:
                return Decision(False, "require rule failed to evaluate", rule, (rule.expression.field,))
            if holds is False:
                return Decision(False, "require rule did not hold", rule)
        if not self._allow:
            return Decision(True, "no allow rules")
        failed: list[str] = []
        maybe: Rule | None = None
        for rule in self._allow:
            holds = _settled(rule, context) if rule in unknown else rule.expression.holds(context)
            if holds is True:
                return Decision(True, "allow rule held", rule, tuple(failed))
            if holds is _UNSETTLED:
                maybe = maybe or rule
            elif holds is None:
                failed.append(rule.expression.field)
        if maybe is not None:
            return Decision(True, "allow rule may hold with the call's arguments", maybe, tuple(failed))
        return Decision(False, _NO_ALLOW, None, tuple(failed))


# What an argument rule evaluates to while the arguments are unknown and its value depends on them.
_UNSETTLED: Final = object()


def _settled(rule: Rule, context: _cel.Context) -> object:
    """True or False when the rule's value does not depend on the missing arguments; ``_UNSETTLED`` when
    evaluating it failed (some arguments could settle it); None for a non-bool value (a broken rule,
    logged). Failures are expected here, so they are not logged."""
    try:
        value = rule.expression.evaluate(context)
    except CelEvaluationError:
        return _UNSETTLED
    if value is True or value is False:
        return value
    rule.expression.failed(f"result is {type(value).__name__}, not bool")
    return None


# Variables ------------------------------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


_EMPTY: Mapping[str, Any] = MappingProxyType({})
EMPTY_REQUEST: Mapping[str, Any] = MappingProxyType({"method": "", "path": "", "host": "", "headers": _EMPTY})
EMPTY_SOURCE: Mapping[str, Any] = MappingProxyType(
    {"address": "", "identity": "", "namespace": "", "serviceAccount": ""}
)
_NO_TOOL = MappingProxyType({"name": "", "target": "", "arguments": _EMPTY})
_NO_PROMPT = MappingProxyType({"name": "", "target": ""})
_NO_RESOURCE = MappingProxyType({"uri": "", "target": ""})
EMPTY_MCP: Mapping[str, Any] = MappingProxyType(
    {"method": "", "tool": _NO_TOOL, "prompt": _NO_PROMPT, "resource": _NO_RESOURCE}
)
EMPTY_A2A: Mapping[str, Any] = MappingProxyType(
    {
        "method": "",
        "operation": "",
        "target": MappingProxyType({"name": "", "namespace": ""}),
        "version": "",
        "taskId": "",
        "contextId": "",
        "binding": "",
        "streaming": False,
    }
)
EMPTY_LLM: Mapping[str, Any] = MappingProxyType({"model": ""})

# A2A 0.3 JSON-RPC method names -> the 1.0 names (A2A 1.0 section 9 uses the gRPC names over JSON-RPC too).
A2A_OPERATIONS: Mapping[str, str] = MappingProxyType(
    {
        "message/send": "SendMessage",
        "message/stream": "SendStreamingMessage",
        "tasks/get": "GetTask",
        "tasks/list": "ListTasks",
        "tasks/cancel": "CancelTask",
        "tasks/resubscribe": "SubscribeToTask",
        "tasks/pushNotificationConfig/set": "CreateTaskPushNotificationConfig",
        "tasks/pushNotificationConfig/get": "GetTaskPushNotificationConfig",
        "tasks/pushNotificationConfig/list": "ListTaskPushNotificationConfigs",
        "tasks/pushNotificationConfig/delete": "DeleteTaskPushNotificationConfig",
        "agent/getAuthenticatedExtendedCard": "GetExtendedAgentCard",
    }
)
# 1.0 draft spellings some SDKs still send (dataplane.a2a.methods accepts them too).
_A2A_DRAFT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "SetTaskPushNotificationConfig": "CreateTaskPushNotificationConfig",
        "ListTaskPushNotificationConfig": "ListTaskPushNotificationConfigs",
    }
)
# What an absent A2A-Version header means (A2A 1.0 section 3.2.6).
A2A_DEFAULT_VERSION: Final = "0.3"
_A2A_STREAMING: Final = frozenset({"SendStreamingMessage", "SubscribeToTask"})


def jwt_variables(identity: Identity | None) -> Mapping[str, Any]:
    """``jwt``: the verified claims (empty for API keys, basic auth and anonymous callers).

    The claims are also under ``jwt.claims`` (unless a token has a claim of that name), so rules
    written for kgateway/agentgateway (``jwt.claims.tenant``) work unchanged next to ``jwt.tenant``.
    """
    if identity is None or not identity.claims:
        return _EMPTY
    claims = identity.claims
    if "claims" in claims:
        return claims
    return {**claims, "claims": claims}


def request_variables(
    method: str | bytes, target: str | bytes, host: str | bytes, headers: Iterable[tuple[str | bytes, str | bytes]]
) -> dict[str, Any]:
    """``request`` from the request line and header fields (``target`` may carry a query; ``path`` does not)."""
    by_name: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = _text(raw_name).lower()
        value = _text(raw_value)
        previous = by_name.get(name)
        if previous is None:
            by_name[name] = value
        else:  # one field per RFC 9110 5.3; HTTP/2 splits cookies, rejoined with "; " (RFC 9113 8.2.3)
            by_name[name] = f"{previous}{'; ' if name == 'cookie' else ', '}{value}"
    path = _text(target).partition("?")[0]
    return {"method": _text(method), "path": path, "host": _text(host), "headers": by_name}


def source_variables(address: str | bytes, identity: Identity | None) -> dict[str, Any]:
    """``source``: the client address and who it authenticated as."""
    if identity is None:
        return {"address": _text(address), "identity": "", "namespace": "", "serviceAccount": ""}
    return {
        "address": _text(address),
        "identity": identity.principal,
        "namespace": identity.namespace or "",
        "serviceAccount": identity.service_account or "",
    }


def mcp_variables(
    method: str,
    *,
    tool: str | None = None,
    prompt: str | None = None,
    resource: str | None = None,
    target: str = "",
    arguments: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``mcp`` for one MCP request: at most one of ``tool``, ``prompt`` or ``resource`` (a URI) names the item
    it concerns, on ``target``; the others stay empty."""
    return {
        "method": method,
        "tool": _NO_TOOL
        if tool is None
        else {"name": tool, "target": target, "arguments": arguments if arguments is not None else _EMPTY},
        "prompt": _NO_PROMPT if prompt is None else {"name": prompt, "target": target},
        "resource": _NO_RESOURCE if resource is None else {"uri": resource, "target": target},
    }


def a2a_variables(
    method: str,
    *,
    target: str = "",
    namespace: str = "",
    operation: str | None = None,
    version: str = A2A_DEFAULT_VERSION,
    task_id: str = "",
    context_id: str = "",
    binding: str = "jsonrpc",
    streaming: bool | None = None,
) -> dict[str, Any]:
    """``a2a``: the method as sent, its 1.0 ``operation`` (from the method when not given; unknown names pass
    through), the agent called and the request's facts. The defaults are what a JSON-RPC request with that
    method and no ``A2A-Version`` header says (``streaming`` follows the operation)."""
    if operation is None:
        operation = A2A_OPERATIONS.get(method) or _A2A_DRAFT_NAMES.get(method, method)
    return {
        "method": method,
        "operation": operation,
        "target": {"name": target, "namespace": namespace},
        "version": version,
        "taskId": task_id,
        "contextId": context_id,
        "binding": binding,
        "streaming": operation in _A2A_STREAMING if streaming is None else streaming,
    }


def llm_variables(model: str) -> dict[str, Any]:
    """``llm``: the model the request asks for."""
    return {"model": model}


def activation(
    *,
    jwt: Mapping[str, Any] | None = None,
    request: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    mcp: Mapping[str, Any] | None = None,
    a2a: Mapping[str, Any] | None = None,
    llm: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every variable, the parts not given empty (build only what ``RuleSet.variables`` names)."""
    return {
        "jwt": _EMPTY if jwt is None else jwt,
        "request": EMPTY_REQUEST if request is None else request,
        "source": EMPTY_SOURCE if source is None else source,
        "mcp": EMPTY_MCP if mcp is None else mcp,
        "a2a": EMPTY_A2A if a2a is None else a2a,
        "llm": EMPTY_LLM if llm is None else llm,
    }


__all__ = [
    "A2A_DEFAULT_VERSION",
    "A2A_OPERATIONS",
    "EMPTY_A2A",
    "EMPTY_LLM",
    "EMPTY_MCP",
    "EMPTY_REQUEST",
    "EMPTY_SOURCE",
    "MCP_TOOL_ARGUMENTS",
    "Activation",
    "Decision",
    "Rule",
    "RuleKind",
    "RuleSet",
    "a2a_variables",
    "activation",
    "jwt_variables",
    "llm_variables",
    "mcp_variables",
    "request_variables",
    "source_variables",
]
