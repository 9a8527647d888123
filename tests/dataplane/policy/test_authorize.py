"""Rule-set semantics (deny, then require, then allow; every failure a deny), decisions that name their rule,
the variable builders, and the policies the seeds ask for: tenant-scoped tools, per-principal tool lists and
namespace-aware agent-to-agent rules."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from dataplane.policy.authorize import (
    A2A_OPERATIONS,
    Decision,
    RuleKind,
    RuleSet,
    a2a_variables,
    activation,
    jwt_variables,
    llm_variables,
    mcp_variables,
    request_variables,
    source_variables,
)
from dataplane.policy.cel import CelCompileError


def caller(principal: str, claims: dict[str, Any] | None = None, namespace: str | None = None) -> Any:
    """An authenticated caller with the attributes of ``dataplane.policy.identity.Identity``."""
    service_account = principal.rsplit(":", 1)[-1] if namespace else None
    return SimpleNamespace(
        principal=principal, claims=claims or {}, namespace=namespace, service_account=service_account
    )


def decide(rules: RuleSet, **variables: Any) -> Decision:
    return rules.decide(activation(**variables))


# Semantics --------------------------------------------------------------------------------------------------------

FLAGS = {"jwt": {"a": True, "b": False}}


@pytest.mark.parametrize(
    ("lists", "allowed", "reason", "decider"),
    [
        ({}, True, "no rules", None),
        ({"deny": ["jwt.b"]}, True, "no allow rules", None),
        ({"deny": ["jwt.b", "jwt.a"], "allow": ["jwt.a"]}, False, "deny rule held", ("deny", 1)),
        ({"require": ["jwt.a", "jwt.b"], "allow": ["jwt.a"]}, False, "require rule did not hold", ("require", 1)),
        ({"require": ["jwt.a"]}, True, "no allow rules", None),
        ({"allow": ["jwt.b", "jwt.a"]}, True, "allow rule held", ("allow", 1)),
        ({"allow": ["jwt.b"]}, False, "no allow rule held", None),
    ],
)
def test_deny_then_require_then_allow(
    lists: dict[str, list[str]], allowed: bool, reason: str, decider: tuple[str, int] | None
) -> None:
    decision = decide(RuleSet.compile("p", **lists), **FLAGS)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    rule = decision.rule
    assert (None if rule is None else (rule.kind.value, rule.index)) == decider
    if rule is not None:
        assert rule.policy == "p"


@pytest.mark.parametrize(
    ("lists", "allowed", "reason", "failed"),
    [
        # A deny rule that cannot be evaluated denies; so does a require rule; an allow rule simply does not hold.
        ({"deny": ["jwt.missing"]}, False, "deny rule failed to evaluate", ["authorization.deny[0]"]),
        ({"require": ["jwt.missing == 1"]}, False, "require rule failed to evaluate", ["authorization.require[0]"]),
        ({"allow": ["jwt.missing"]}, False, "no allow rule held", ["authorization.allow[0]"]),
        ({"allow": ["'not a bool'"]}, False, "no allow rule held", ["authorization.allow[0]"]),
        ({"allow": ["jwt.missing", "jwt.a"]}, True, "allow rule held", ["authorization.allow[0]"]),
    ],
)
def test_failures_are_denies_never_errors(
    lists: dict[str, list[str]], allowed: bool, reason: str, failed: list[str]
) -> None:
    with capture_logs() as logs:
        decision = decide(RuleSet.compile("p", **lists), **FLAGS)
    assert (decision.allowed, decision.reason, list(decision.failed)) == (allowed, reason, failed)
    assert [entry["field"] for entry in logs if entry["event"] == "cel evaluation failed"] == failed


def test_a_decision_carries_the_rule_for_audit_logs() -> None:
    rules = RuleSet.compile("tenant-rbac", deny=["source.address.startsWith('10.66.')"], allow=["true"])
    decision = decide(rules, source=source_variables("10.66.0.9", None))
    assert decision.audit() == {
        "allowed": False,
        "reason": "deny rule held",
        "policy": "tenant-rbac",
        "rule": "deny[0]",
    }
    assert decision.rule is not None and decision.rule.expression.source == "source.address.startsWith('10.66.')"


def test_combined_policies_keep_every_deny_and_require_and_union_the_allows() -> None:
    route = RuleSet.compile("route", allow=["jwt.sub == 'alice'"], require=["has(jwt.sub)"])
    gateway = RuleSet.compile("gateway", allow=["jwt.sub == 'bob'"], deny=["jwt.sub == 'mallory'"])
    both = RuleSet.combine(route, gateway)
    assert [decide(both, jwt={"sub": s}).allowed for s in ("alice", "bob", "carol", "mallory")] == [
        True,
        True,
        False,
        False,
    ]
    with capture_logs():
        no_subject = decide(both, jwt={})  # the gateway's deny rule cannot be evaluated: fail closed
    assert no_subject.audit() == {
        "allowed": False,
        "reason": "deny rule failed to evaluate",
        "policy": "gateway",
        "rule": "deny[0]",
        "failed": ["authorization.deny[0]"],
    }
    assert decide(both, jwt={"sub": "bob"}).audit()["policy"] == "gateway"
    assert decide(both, jwt={"sub": "alice"}).audit()["policy"] == "route"


def test_a_bad_expression_is_a_compile_error_naming_policy_list_and_index() -> None:
    with pytest.raises(CelCompileError) as caught:
        RuleSet.compile("tenant-rbac", allow=["true"], require=["jwt.sub == 'a'", "jwt.sub =="], field="spec.authz")
    assert (caught.value.policy, caught.value.field) == ("tenant-rbac", "spec.authz.require[1]")


def test_a_rule_set_reports_the_variables_a_caller_must_build() -> None:
    rules = RuleSet.compile("p", allow=["jwt.sub == 'a'", "mcp.tool.name == 'x'"])
    assert rules.variables == {"jwt", "mcp"}
    assert not RuleSet() and rules
    assert [r.kind for r in rules.rules] == [RuleKind.ALLOW, RuleKind.ALLOW]


def test_unusable_variables_deny() -> None:
    rules = RuleSet.compile("p", allow=["jwt.sub == 'a'"])
    with capture_logs():
        decision = decide(rules, jwt={"sub": {1, 2}})
    assert not decision.allowed and decision.reason.startswith("variables unusable")


# The seeds' policies ------------------------------------------------------------------------------------------------

SEED = (
    "jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['allowed-tool-1', 'allowed-tool-2', 'safe-search']"
)
# The same rule as the seed document writes it (kgateway's `jwt.claims.<name>`).
SEED_AS_WRITTEN = SEED.replace("jwt.tenant", "jwt.claims.tenant")


@pytest.mark.parametrize(
    ("tenant_claim", "tenant_header", "tool", "allowed"),
    [
        ("acme", "acme", "safe-search", True),
        ("acme", "acme", "delete-everything", False),
        ("acme", "globex", "safe-search", False),
    ],
)
@pytest.mark.parametrize("rule", [SEED, SEED_AS_WRITTEN])
def test_the_seed_tenant_and_tool_rule(
    tenant_claim: str, tenant_header: str, tool: str, allowed: bool, rule: str
) -> None:
    rules = RuleSet.compile("multi-tenant-rbac", allow=[rule])
    identity = caller("alice", {"sub": "alice", "tenant": tenant_claim})
    decision = decide(
        rules,
        jwt=jwt_variables(identity),
        request=request_variables("POST", "/mcp", "gw", [("X-Tenant", tenant_header)]),
        mcp=mcp_variables("tools/call", tool=tool, target="tools"),
    )
    assert decision.allowed is allowed


def test_the_seed_rule_denies_an_anonymous_caller_without_an_error() -> None:
    rules = RuleSet.compile("multi-tenant-rbac", allow=[SEED])
    with capture_logs():
        decision = decide(
            rules,
            jwt=jwt_variables(None),
            request=request_variables("POST", "/mcp", "gw", [("x-tenant", "acme")]),
            mcp=mcp_variables("tools/call", tool="safe-search"),
        )
    assert not decision.allowed and decision.failed == ("authorization.allow[0]",)


WEATHER_SA = "system:serviceaccount:agent-core-infra:ekspoc-v6-kagent-agent-sa"
PLANNER_SA = "system:serviceaccount:agent-core-infra:planning-agent-sa"
# Per-principal tool lists as one CEL map; `in` first so an unlisted principal is a clean False, not an error.
PER_PRINCIPAL = "source.identity in {p} && mcp.tool.name in {p}[source.identity]".replace(
    "{p}", f"{{'{WEATHER_SA}': ['get_weather_data', 'execute_code'], '{PLANNER_SA}': ['store_activity_plan']}}"
)


@pytest.mark.parametrize(
    ("principal", "tool", "allowed"),
    [
        (WEATHER_SA, "get_weather_data", True),
        (WEATHER_SA, "execute_code", True),
        (WEATHER_SA, "store_activity_plan", False),
        (PLANNER_SA, "store_activity_plan", True),
        ("system:serviceaccount:other:sa", "get_weather_data", False),
    ],
)
def test_a_per_principal_allow_list_of_tools(principal: str, tool: str, allowed: bool) -> None:
    rules = RuleSet.compile("mcp-authz", allow=[PER_PRINCIPAL])
    identity = caller(principal, namespace=principal.split(":")[2])
    with capture_logs() as logs:
        decision = decide(
            rules, source=source_variables("10.0.0.7", identity), mcp=mcp_variables("tools/call", tool=tool)
        )
    assert decision.allowed is allowed and decision.failed == () and logs == []


# Same namespace always; across namespaces only the listed (source namespace -> target namespaces) pairs, and
# the orchestrator anywhere. Production is never reachable from dev-team, whatever is allowed.
A2A_RULES = {
    "allow": [
        "source.namespace == a2a.target.namespace",
        "source.namespace in {'dev-team': ['shared-tools']} && "
        "a2a.target.namespace in {'dev-team': ['shared-tools']}[source.namespace]",
        "source.identity == 'system:serviceaccount:agent-core-infra:orchestrator-agent-sa'",
    ],
    "deny": ["source.namespace == 'dev-team' && a2a.target.namespace == 'production'"],
    "require": ["source.namespace != '' && a2a.operation in ['SendMessage', 'SendStreamingMessage', 'GetTask']"],
}


@pytest.mark.parametrize(
    ("source_ns", "sa", "target_ns", "method", "allowed"),
    [
        ("dev-team", "a", "dev-team", "message/send", True),
        ("dev-team", "a", "dev-team", "SendMessage", True),
        ("dev-team", "a", "shared-tools", "message/stream", True),
        ("dev-team", "a", "billing", "SendMessage", False),
        ("dev-team", "a", "production", "SendMessage", False),
        ("agent-core-infra", "orchestrator-agent-sa", "billing", "tasks/get", True),
        ("agent-core-infra", "orchestrator-agent-sa", "billing", "tasks/cancel", False),
    ],
)
def test_namespace_aware_agent_to_agent_rules(
    source_ns: str, sa: str, target_ns: str, method: str, allowed: bool
) -> None:
    rules = RuleSet.compile("a2a-authz", **A2A_RULES)
    identity = caller(f"system:serviceaccount:{source_ns}:{sa}", namespace=source_ns)
    decision = decide(
        rules,
        source=source_variables("10.0.0.8", identity),
        a2a=a2a_variables(method, target="weather-agent", namespace=target_ns),
    )
    assert decision.allowed is allowed


def test_an_anonymous_caller_has_no_namespace_so_the_a2a_rules_deny_it() -> None:
    rules = RuleSet.compile("a2a-authz", **A2A_RULES)
    decision = decide(rules, a2a=a2a_variables("SendMessage", target="w", namespace=""))
    assert (decision.allowed, decision.reason) == (False, "require rule did not hold")


# Variables ---------------------------------------------------------------------------------------------------------


def test_request_variables_lower_case_names_join_repeats_and_drop_the_query() -> None:
    request = request_variables(
        b"GET",
        b"/a/b?x=1&y=2",
        b"gw.example",
        [(b"X-A", b"1"), (b"x-a", b"2"), (b"b", b"\xe9"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
    )
    assert request == {
        "method": "GET",
        "path": "/a/b",
        "host": "gw.example",
        "headers": {"x-a": "1, 2", "b": "é", "cookie": "a=1; b=2"},
    }


def test_source_variables_for_a_service_account_and_for_nobody() -> None:
    identity = caller("system:serviceaccount:team-a:agent", {"sub": "system:serviceaccount:team-a:agent"}, "team-a")
    assert source_variables("10.1.2.3", identity) == {
        "address": "10.1.2.3",
        "identity": "system:serviceaccount:team-a:agent",
        "namespace": "team-a",
        "serviceAccount": "agent",
    }
    assert source_variables(b"::1", None) == {"address": "::1", "identity": "", "namespace": "", "serviceAccount": ""}
    claims = {"sub": "system:serviceaccount:team-a:agent"}
    assert jwt_variables(identity) == {**claims, "claims": claims}


def test_a2a_operation_is_the_one_name_for_both_eras() -> None:
    assert a2a_variables("message/send")["operation"] == a2a_variables("SendMessage")["operation"] == "SendMessage"
    assert a2a_variables("tasks/resubscribe")["operation"] == "SubscribeToTask"
    assert a2a_variables("Custom/thing")["operation"] == "Custom/thing"
    assert len(set(A2A_OPERATIONS.values())) == len(A2A_OPERATIONS)


def test_absent_parts_are_empty_so_has_and_comparisons_are_predictable() -> None:
    rules = RuleSet.compile(
        "p",
        require=[
            "!has(jwt.sub) && size(jwt) == 0",
            "request.method == '' && size(request.headers) == 0",
            "source.identity == '' && source.namespace == ''",
            "mcp.method == '' && mcp.tool.name == '' && mcp.tool.arguments == {} && mcp.resource.uri == ''",
            "mcp.prompt.target == '' && a2a.operation == '' && a2a.target.namespace == '' && llm.model == ''",
        ],
    )
    assert decide(rules).allowed


def test_mcp_variables_fill_only_the_item_concerned_and_llm_is_the_model() -> None:
    rules = RuleSet.compile(
        "p",
        allow=[
            "mcp.method == 'prompts/get' && mcp.prompt.name == 'summarise' && mcp.prompt.target == 'docs'"
            " && mcp.tool.name == '' && llm.model.startsWith('gpt-4')"
        ],
    )
    model = llm_variables("gpt-4o")
    assert decide(rules, mcp=mcp_variables("prompts/get", prompt="summarise", target="docs"), llm=model).allowed
    assert not decide(rules, mcp=mcp_variables("tools/call", tool="summarise", target="docs"), llm=model).allowed


def test_tool_arguments_are_visible_to_call_path_rules() -> None:
    rules = RuleSet.compile("p", deny=["mcp.tool.name == 'execute_code' && mcp.tool.arguments.language != 'python'"])
    call = mcp_variables("tools/call", tool="execute_code", target="t", arguments={"language": "bash"})
    assert not decide(rules, mcp=call).allowed
    call = mcp_variables("tools/call", tool="execute_code", target="t", arguments={"language": "python"})
    assert decide(rules, mcp=call).allowed
