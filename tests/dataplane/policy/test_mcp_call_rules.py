"""Authorization rules on a tools/call's arguments, without sockets: which rules read ``mcp.tool.arguments``
(found at compile time), what they mean for lists (arguments unknown), how a call is decided on its real
arguments, and the caller policy (``McpCaller.admit``) that refuses a denied call and counts the rest."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from dataplane.mcp.endpoint import POLICY_DENIED, RATE_LIMITED
from dataplane.mcp.federation import Kind
from dataplane.policy.authorize import Decision, RuleSet, activation, request_variables
from dataplane.policy.chain import WorkerPolicies
from dataplane.policy.mcp_visibility import McpVisibility
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.dataplane.policy.test_chain import (
    MCP,
    PORT,
    admitted,
    bearer,
    build,
    chain,
    header,
    jwt_authentication,
    policy,
    rate_limit,
    request,
    token,
)

pytestmark = pytest.mark.anyio

SEED = "jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['add', 'echo']"
NO_SECRETS = "!(mcp.tool.name == 'echo' && mcp.tool.arguments.message.startsWith('secret'))"
SECRET_ECHO = "mcp.tool.name == 'echo' && mcp.tool.arguments.message.startsWith('secret')"


def tenant(claimed: str, header_value: str) -> dict[str, Any]:
    headers = [(b"x-tenant", header_value.encode())]
    return activation(jwt={"tenant": claimed}, request=request_variables("POST", "/mcp", "gw", headers))


def visible(visibility: McpVisibility, *tools: str) -> set[str]:
    return {tool for tool in tools if visibility(Kind.TOOL, "web", tool)}


# --- compile time -----------------------------------------------------------------------------------


def test_rules_that_can_observe_the_arguments_are_found_when_compiled() -> None:
    rules = RuleSet.compile(
        "p",
        allow=[SEED, "mcp.tool.arguments.x == 1", "size(mcp) > 0", "mcp.tool == {'name': 'a'}"],
        require=[NO_SECRETS, "mcp.method == 'tools/call'"],
        deny=["has(mcp.tool.arguments.force)", "mcp.tool.target == 'ops'"],
    )
    fields = sorted(rule.expression.field for rule in rules.argument_rules)
    # The seed rule, the method and the target cannot see arguments; a map read whole (mcp, mcp.tool) can.
    assert fields == [
        "authorization.allow[1]",
        "authorization.allow[2]",
        "authorization.allow[3]",
        "authorization.deny[0]",
        "authorization.require[0]",
    ]
    assert not RuleSet.compile("p", allow=[SEED]).argument_rules


# --- lists: arguments unknown -------------------------------------------------------------------------


def test_an_argument_rule_never_hides_a_tool_and_the_seed_rule_still_does() -> None:
    rules = RuleSet.compile("tenants", allow=[SEED], require=[NO_SECRETS])
    with capture_logs() as logs:
        acme = McpVisibility(rules, tenant("acme", "acme"))
        assert visible(acme, "add", "echo", "count") == {"add", "echo"}
        other = McpVisibility(rules, tenant("acme", "globex"))
        assert visible(other, "add", "echo") == set()
    # Failing for want of arguments is expected at list time: nothing is logged as a broken rule.
    assert [entry for entry in logs if entry["log_level"] == "warning"] == []


@pytest.mark.parametrize(
    ("rules", "shown"),
    [
        # A deny that needs the arguments hides nothing; one that holds whatever they are hides.
        (RuleSet.compile("p", deny=[SECRET_ECHO]), {"add", "echo", "drop"}),
        (RuleSet.compile("p", deny=["mcp.tool.name == 'drop' || mcp.tool.arguments.x == 1"]), {"add", "echo"}),
        # A require that fails whatever the arguments hides; one that could pass does not.
        (RuleSet.compile("p", require=["mcp.tool.name != 'drop' && mcp.tool.arguments.x > 0"]), {"add", "echo"}),
        # An allow that may hold with some arguments shows the tool; one that cannot, does not.
        (RuleSet.compile("p", allow=["mcp.tool.name == 'echo' && mcp.tool.arguments.message == 'hi'"]), {"echo"}),
        (RuleSet.compile("p", allow=["mcp.tool.name == 'add'", SECRET_ECHO]), {"add", "echo"}),
    ],
)
def test_lists_show_a_tool_unless_the_rules_deny_it_whatever_the_arguments(rules: RuleSet, shown: set[str]) -> None:
    assert visible(McpVisibility(rules, activation()), "add", "echo", "drop") == shown


def test_a_deny_rule_that_is_broken_whatever_the_arguments_still_fails_closed() -> None:
    rules = RuleSet.compile("p", deny=["has(mcp.tool.arguments) ? true : mcp.tool.name"])  # a string, not a bool
    assert visible(McpVisibility(rules, activation()), "add") == set()


# --- calls: the real arguments ------------------------------------------------------------------------


def test_a_call_is_decided_on_its_arguments_and_audited() -> None:
    audited: list[tuple[str, Decision, bool]] = []

    def audit(kind: Kind, target: str, name: str, decision: Decision, /, *, call: bool = False) -> None:
        audited.append((name, decision, call))

    rules = RuleSet.compile("tenants", allow=[SEED], require=[NO_SECRETS])
    visibility = McpVisibility(rules, tenant("acme", "acme"), audit=audit)
    allowed = visibility.call_decision("web", "echo", {"message": "hello"})
    denied = visibility.call_decision("web", "echo", {"message": "secret plans"})
    assert allowed is not None and allowed.allowed
    assert denied is not None and not denied.allowed
    assert denied.audit() == {
        "allowed": False,
        "reason": "require rule did not hold",
        "policy": "tenants",
        "rule": "require[0]",
    }
    # Arguments the rule cannot read (no message at all) fail closed, like every rule failure.
    missing = visibility.call_decision("web", "echo", None)
    assert missing is not None and not missing.allowed
    # Another tool: the argument rule holds whatever its arguments.
    added = visibility.call_decision("web", "add", {"a": 1})
    assert added is not None and added.allowed
    # A hidden tool is left to the federation (it answers as for an unknown tool): no decision here.
    assert visibility.call_decision("web", "count", {"message": "secret"}) is None
    calls = [(name, decision.allowed) for name, decision, call in audited if call]
    assert calls == [("echo", True), ("echo", False), ("echo", False), ("add", True)]
    # The visibility of echo, add and count was audited once each, as list decisions.
    assert sorted(name for name, _, call in audited if not call) == ["add", "count", "echo"]


def test_without_argument_rules_calls_are_left_to_visibility() -> None:
    visibility = McpVisibility(RuleSet.compile("p", allow=[SEED]), tenant("acme", "acme"))
    assert visibility.call_decision("web", "echo", {"message": "secret"}) is None


def test_arguments_the_engine_cannot_take_are_a_deny() -> None:
    visibility = McpVisibility(RuleSet.compile("p", deny=[SECRET_ECHO]), activation())
    decision = visibility.call_decision("web", "echo", {"message": {"not", "convertible"}})
    assert decision is not None and not decision.allowed


# --- the caller policy ----------------------------------------------------------------------------------


def mcp_policy(**sections: Any) -> Any:
    return chain(WorkerPolicies().compile(build(PORT, policy(**sections), mcp_port=9)), MCP)


def acme_request(*extra: tuple[bytes, bytes]) -> Any:
    return request(PORT, bearer(token(tenant="acme")), (b"x-tenant", b"acme"), *extra, method=b"POST")


async def test_admit_refuses_a_call_whose_arguments_policy_denies_before_limits_count_it() -> None:
    policy_ = mcp_policy(
        authentication=jwt_authentication(),
        authorization=pb.Authorization(allow=[SEED], require=[NO_SECRETS]),
        rate_limits=pb.RateLimits(limits=[rate_limit("per-tool", 1, key="mcp.tool.name")]),
    )
    caller = (await admitted(policy_, acme_request())).mcp
    assert caller is not None
    refusal = await caller.admit("tools/call", "web", "echo", {"message": "secret plans"})
    assert refusal is not None and refusal.code == POLICY_DENIED and refusal.status == 200
    assert refusal.headers == [] and "policy denied" in refusal.message
    assert "startsWith" not in refusal.message and "require" not in refusal.message  # no rule text
    # The denied call took no token: the same tool with allowed arguments passes its limit of one.
    assert await caller.admit("tools/call", "web", "echo", {"message": "hello"}) is None
    assert header(caller.response_headers, b"x-ratelimit-limit") == [b"1"]
    assert header(caller.response_headers, b"x-ratelimit-remaining") == [b"0"]
    limited = await caller.admit("tools/call", "web", "echo", {"message": "again"})
    assert limited is not None and limited.code == RATE_LIMITED and limited.status == 429
    # A hidden tool is not refused here: the federation answers it as unknown (-32602).
    assert await caller.admit("tools/call", "web", "count", {"message": "secret"}) is None


async def test_the_2026_visibility_and_the_call_decision_share_one_view() -> None:
    policy_ = mcp_policy(
        authentication=jwt_authentication(), authorization=pb.Authorization(allow=[SEED], deny=[SECRET_ECHO])
    )
    caller = (await admitted(policy_, acme_request())).mcp
    assert caller is not None
    assert await caller.admit("tools/call", "web", "echo", {"message": "hi"}) is None
    visibility = caller.visibility()
    assert visibility is caller.visibility() and visibility(Kind.TOOL, "web", "echo")
    assert caller.response_headers == []  # no limit applied


async def test_admitted_item_uses_report_the_tightest_of_the_http_and_item_limits() -> None:
    limits = [rate_limit("per-user", 10, key="jwt.sub"), rate_limit("per-tool", 3, key="mcp.tool.name")]
    policy_ = mcp_policy(authentication=jwt_authentication(), rate_limits=pb.RateLimits(limits=limits))
    outcome = await admitted(policy_, acme_request())
    assert header(outcome.response_headers, b"x-ratelimit-remaining") == [b"9"]
    caller = outcome.mcp
    assert caller is not None
    assert await caller.admit("tools/call", "web", "add", {}) is None
    assert header(caller.response_headers, b"x-ratelimit-limit") == [b"3"]
    assert header(caller.response_headers, b"x-ratelimit-remaining") == [b"2"]
    # A message no item limit counts leaves the headers to the HTTP-level limit.
    fresh = (await admitted(policy_, acme_request())).mcp
    assert fresh is not None and await fresh.admit("tools/list", "", "", None) is None
    assert fresh.response_headers == []
