"""MCP authorization through the federation's single visibility rule.

``McpFederation`` asks one question for list items, calls, reads, completions and resource notifications alike:
may this caller see ``(kind, target, name)``? ``McpVisibility`` answers it with a ``RuleSet``: an item is visible
iff the rules allow *using* it, so a denied tool is missing from ``tools/list`` and a ``tools/call`` to it gets
the same -32602 as a tool that does not exist (the federation decides that; nothing here can leak the
difference).

What the rules see for an item: the conversation's ``jwt``, ``request``, ``source`` (fixed when the visibility
is made, or by ``update``), and ``mcp`` with the item filled in and ``mcp.method`` set to the method that *uses*
it (``tools/call``, ``prompts/get``, ``resources/read``), whichever message is being handled, so a list never
shows what a call would refuse, nor hides what it would allow.

Argument rules (those that can observe ``mcp.tool.arguments``; ``RuleSet.argument_rules``, found when the policy
is compiled): a list has no arguments, so ``mcp.tool`` has no ``arguments`` key while visibility is decided, and
an argument rule whose value depends on them decides nothing (``RuleSet.decide_without_arguments``): a tool is
hidden only when the rules deny it whatever the arguments, and a rule that fails for want of arguments never
hides it. The call path decides the rest: ``call_decision`` (from ``McpCaller.admit``, before the message
reaches the federation) evaluates every rule with the call's real arguments. A hidden tool is left to the
federation (it answers as for an unknown tool); a visible tool whose arguments the rules deny is refused with
``POLICY_DENIED`` (``dataplane.mcp.endpoint``). Both kinds of decision go to ``audit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import cel as _cel

from dataplane.mcp.federation import Kind
from dataplane.policy.authorize import Activation, Decision, RuleSet, mcp_variables
from dataplane.policy.cel import CelEvaluationError
from shared.logging import get_logger

log = get_logger("dataplane.policy.mcp")

# The method that uses an item of each kind: what ``mcp.method`` says while deciding its visibility.
USE_METHOD: Mapping[Kind, str] = {
    Kind.TOOL: "tools/call",
    Kind.PROMPT: "prompts/get",
    Kind.RESOURCE: "resources/read",
    Kind.RESOURCE_TEMPLATE: "resources/read",
}
# Decisions remembered per conversation; a client can ask for any number of made-up names.
MAX_CACHED = 4096


class Audit(Protocol):
    """Receives each decision: an item's visibility (``call`` False), or a ``tools/call``'s arguments (True)."""

    def __call__(self, kind: Kind, target: str, name: str, decision: Decision, /, *, call: bool = False) -> None: ...


def item_variables(kind: Kind, target: str, name: str) -> dict[str, Any]:
    """``mcp`` for deciding whether ``name`` (upstream tool/prompt name, resource URI or template) is visible;
    a tool's ``arguments`` are unknown there, so the key is absent (see the module docstring)."""
    method = USE_METHOD[kind]
    if kind is Kind.TOOL:
        variables = mcp_variables(method, tool=name, target=target)
        variables["tool"] = {"name": name, "target": target}
        return variables
    if kind is Kind.PROMPT:
        return mcp_variables(method, prompt=name, target=target)
    return mcp_variables(method, resource=name, target=target)


class McpVisibility:
    """``federation.Visibility`` for one conversation, backed by a ``RuleSet`` and the caller's variables.

    Decisions are cached per item (the caller's variables are fixed until ``update``). ``audit``, if given,
    receives each decision when it is first made.
    """

    __slots__ = ("_audit", "_cache", "_context", "_rules")

    def __init__(self, rules: RuleSet, activation: Activation, *, audit: Audit | None = None) -> None:
        self._rules = rules
        self._audit = audit
        self._cache: dict[tuple[Kind, str, str], Decision] = {}
        self._context: _cel.Context | None = None
        self.update(activation)

    def update(self, activation: Activation) -> None:
        """New variables for the caller (e.g. each HTTP request of a session carries its own headers)."""
        self._cache.clear()
        self._context = None
        if not self._rules:
            return
        try:
            self._context = self._rules.context(activation)
        except CelEvaluationError as exc:
            log.warning("mcp authorization variables unusable; everything hidden", error=str(exc))

    def __call__(self, kind: Kind, target: str, name: str) -> bool:
        return self.decision(kind, target, name).allowed

    def decision(self, kind: Kind, target: str, name: str) -> Decision:
        """The decision (with the rule that made it) behind the visibility of one item."""
        key = (kind, target, name)
        decision = self._cache.get(key)
        if decision is not None:
            return decision
        decision = self._decide(kind, target, name)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key] = decision
        if self._audit is not None:
            self._audit(kind, target, name, decision)
        return decision

    def call_decision(self, target: str, name: str, arguments: Any) -> Decision | None:
        """The decision on one ``tools/call`` of ``name`` on ``target`` with ``arguments``, when its arguments
        matter: None when no rule reads them, or when the tool is hidden (the federation answers that call as
        for an unknown tool, so nothing here may tell the two apart). Not cached: arguments differ per call."""
        rules = self._rules
        if not rules.argument_rules or not self.decision(Kind.TOOL, target, name).allowed:
            return None
        context = self._context
        if context is None:  # cannot happen: visibility denies everything then
            return Decision(False, "variables unusable")
        variables = mcp_variables(
            USE_METHOD[Kind.TOOL], tool=name, target=target, arguments={} if arguments is None else arguments
        )
        try:
            rules.set_variable(context, "mcp", variables)
        except CelEvaluationError as exc:
            log.info("mcp call arguments unusable in authorization", target=target, tool=name, error=str(exc))
            decision = Decision(False, f"arguments unusable: {exc}")
        else:
            decision = rules.decide_with(context)
        if self._audit is not None:
            self._audit(Kind.TOOL, target, name, decision, call=True)
        return decision

    def _decide(self, kind: Kind, target: str, name: str) -> Decision:
        rules = self._rules
        if not rules:
            return rules.decide({})  # "no rules": allowed
        context = self._context
        if context is None:
            return Decision(False, "variables unusable")
        try:
            rules.set_variable(context, "mcp", item_variables(kind, target, name))
        except CelEvaluationError as exc:
            log.warning("mcp item unusable in authorization", kind=kind.value, target=target, error=str(exc))
            return Decision(False, f"variables unusable: {exc}")
        return rules.decide_without_arguments(context)


__all__ = ["MAX_CACHED", "USE_METHOD", "Audit", "McpVisibility", "item_variables"]
