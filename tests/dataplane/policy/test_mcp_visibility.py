"""MCP authorization through the federation's visibility rule, driven through ``McpFederation`` itself (pure, no
sockets): denied items vanish from lists, and calling one is indistinguishable from calling an unknown one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from structlog.testing import capture_logs

from dataplane.mcp.federation import Action, FederationConfig, Kind, McpFederation, SendToClient, SendToTarget
from dataplane.mcp.naming import Naming, PrefixMode
from dataplane.policy.authorize import Decision, RuleSet, activation, request_variables
from dataplane.policy.mcp_visibility import MAX_CACHED, McpVisibility, item_variables

JSON = dict[str, Any]

TENANT_TOOLS = RuleSet.compile(
    "multi-tenant-rbac",
    allow=["jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['search', 'fetch']"],
)


def caller(tenant: str, header: str) -> JSON:
    claims = {"sub": "alice", "tenant": tenant}
    return activation(jwt=claims, request=request_variables("POST", "/mcp", "gw", [(b"x-tenant", header.encode())]))


def federation(visibility: McpVisibility, targets: Sequence[str] = ("github", "web")) -> McpFederation:
    naming = Naming(targets, PrefixMode.CONDITIONAL)
    return McpFederation(FederationConfig(naming, server_info={"name": "gw", "version": "1"}), visibility)


def req(request_id: Any, method: str, params: JSON | None = None) -> JSON:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def to_targets(actions: list[Action]) -> dict[str, JSON]:
    return {a.target: a.message for a in actions if isinstance(a, SendToTarget)}


def to_client(actions: list[Action]) -> JSON:
    messages = [a.message for a in actions if isinstance(a, SendToClient)]
    assert len(messages) == 1 == len(actions), actions
    return messages[0]


def answer(fed: McpFederation, actions: list[Action], results: dict[str, JSON]) -> list[Action]:
    out: list[Action] = []
    for target, message in to_targets(actions).items():
        out += fed.receive_from_target(target, {"jsonrpc": "2.0", "id": message["id"], "result": results[target]})
    return out


CAPS = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}, "prompts": {}, "resources": {}}}
TOOLS = {
    "github": {"tools": [{"name": "search"}, {"name": "delete_repo"}]},
    "web": {"tools": [{"name": "fetch"}, {"name": "post"}]},
}


def listed_tools(fed: McpFederation) -> list[str]:
    answer(
        fed,
        fed.receive_from_client(req(0, "initialize", {"protocolVersion": "2025-11-25"})),
        {"github": CAPS, "web": CAPS},
    )
    result = to_client(answer(fed, fed.receive_from_client(req(1, "tools/list")), TOOLS))["result"]
    return [tool["name"] for tool in result["tools"]]


def test_tools_list_hides_denied_tools_and_calling_one_fails_like_an_unknown_tool() -> None:
    fed = federation(McpVisibility(TENANT_TOOLS, caller("acme", "acme")))
    assert listed_tools(fed) == ["github__search", "web__fetch"]

    hidden = to_client(fed.receive_from_client(req(2, "tools/call", {"name": "github__delete_repo"})))
    unknown = to_client(fed.receive_from_client(req(3, "tools/call", {"name": "github__no_such_tool"})))
    assert hidden["error"] == {"code": -32602, "message": "Unknown tool: github__delete_repo"}
    assert unknown["error"] == {"code": -32602, "message": "Unknown tool: github__no_such_tool"}

    allowed = to_targets(fed.receive_from_client(req(4, "tools/call", {"name": "web__fetch", "arguments": {}})))
    assert allowed["web"]["method"] == "tools/call" and allowed["web"]["params"]["name"] == "fetch"


def test_a_call_before_any_list_is_refused_the_same_way() -> None:
    """A fresh conversation (another worker, a 2026-07-28 request) walks the catalog first; still -32602."""
    fed = federation(McpVisibility(TENANT_TOOLS, caller("acme", "acme")))
    hidden = to_client(fed.receive_from_client(req(1, "tools/call", {"name": "github__delete_repo"})))
    assert hidden["error"] == {"code": -32602, "message": "Unknown tool: github__delete_repo"}
    walk = fed.receive_from_client(req(2, "tools/call", {"name": "github__search"}))
    assert to_targets(walk)["github"]["method"] == "tools/list"  # visible: learn the catalog, then forward
    forwarded = answer(fed, walk, {"github": TOOLS["github"]})
    assert to_targets(forwarded)["github"]["params"]["name"] == "search"


def test_a_caller_from_another_tenant_sees_no_tools_at_all() -> None:
    fed = federation(McpVisibility(TENANT_TOOLS, caller("acme", "globex")))
    assert listed_tools(fed) == []
    refused = to_client(fed.receive_from_client(req(2, "tools/call", {"name": "github__search"})))
    assert refused["error"]["code"] == -32602


def test_prompts_and_resources_follow_the_same_rules() -> None:
    rules = RuleSet.compile(
        "docs-only",
        allow=[
            "mcp.prompt.target == 'docs' && mcp.prompt.name != 'internal'",
            "mcp.resource.target == 'docs' && mcp.resource.uri.startsWith('file:///public/')",
        ],
    )
    fed = federation(McpVisibility(rules, activation()), targets=("docs", "ops"))
    answer(fed, fed.receive_from_client(req(0, "initialize", {})), {"docs": CAPS, "ops": CAPS})
    prompts = {"docs": {"prompts": [{"name": "summarise"}, {"name": "internal"}]}, "ops": {"prompts": [{"name": "x"}]}}
    listed = to_client(answer(fed, fed.receive_from_client(req(1, "prompts/list")), prompts))["result"]["prompts"]
    assert [p["name"] for p in listed] == ["docs__summarise"]
    refused = to_client(fed.receive_from_client(req(2, "prompts/get", {"name": "docs__internal"})))
    assert refused["error"] == {"code": -32602, "message": "Unknown prompt: docs__internal"}

    resources = {
        "docs": {"resources": [{"uri": "file:///public/a"}, {"uri": "file:///private/b"}]},
        "ops": {"resources": [{"uri": "file:///public/c"}]},
    }
    listed = to_client(answer(fed, fed.receive_from_client(req(3, "resources/list")), resources))["result"]
    assert [r["uri"] for r in listed["resources"]] == ["mcp-target://docs/file:///public/a"]
    refused = to_client(
        fed.receive_from_client(req(4, "resources/read", {"uri": "mcp-target://docs/file:///private/b"}))
    )
    assert refused["error"] == {"code": -32602, "message": "Unknown resource: mcp-target://docs/file:///private/b"}


def test_mcp_method_is_the_method_that_uses_the_item_on_list_and_call_alike() -> None:
    assert item_variables(Kind.TOOL, "t", "x")["method"] == "tools/call"
    assert item_variables(Kind.PROMPT, "t", "x")["prompt"] == {"name": "x", "target": "t"}
    assert item_variables(Kind.RESOURCE_TEMPLATE, "t", "db://{x}")["resource"] == {"uri": "db://{x}", "target": "t"}
    rules = RuleSet.compile("calls", allow=["mcp.method == 'tools/call' && mcp.tool.name == 'search'"])
    fed = federation(McpVisibility(rules, activation()))
    assert listed_tools(fed) == ["github__search"]


def test_each_item_is_decided_once_audited_and_update_starts_over() -> None:
    audited: list[tuple[Kind, str, str, Decision]] = []
    visibility = McpVisibility(TENANT_TOOLS, caller("acme", "acme"), audit=lambda *entry: audited.append(entry))
    assert visibility(Kind.TOOL, "github", "search") and visibility(Kind.TOOL, "github", "search")
    assert not visibility(Kind.TOOL, "github", "delete_repo")
    assert [(name, d.allowed) for _, _, name, d in audited] == [("search", True), ("delete_repo", False)]
    assert audited[0][3].audit() == {
        "allowed": True,
        "reason": "allow rule held",
        "policy": "multi-tenant-rbac",
        "rule": "allow[0]",
    }
    visibility.update(caller("acme", "globex"))  # the next request of the session names another tenant
    assert not visibility(Kind.TOOL, "github", "search")
    assert len(audited) == 3


def test_the_cache_is_bounded_against_made_up_names() -> None:
    visibility = McpVisibility(TENANT_TOOLS, caller("acme", "acme"))
    for i in range(MAX_CACHED + 10):
        assert not visibility(Kind.TOOL, "github", f"made-up-{i}")
    assert len(visibility._cache) <= MAX_CACHED


def test_no_rules_show_everything_and_unusable_variables_hide_everything() -> None:
    assert McpVisibility(RuleSet(), activation())(Kind.TOOL, "github", "anything")
    with capture_logs() as logs:
        broken = McpVisibility(TENANT_TOOLS, activation(jwt={"tenant": {"not", "convertible"}}))
    assert not broken(Kind.TOOL, "github", "search")
    assert logs[0]["event"].startswith("mcp authorization variables unusable")


def test_rules_on_the_caller_only_decide_every_item_alike() -> None:
    rules = RuleSet.compile("members", require=["'mcp-users' in jwt.groups"])
    member = McpVisibility(rules, activation(jwt={"groups": ["mcp-users"]}))
    stranger = McpVisibility(rules, activation(jwt={"groups": []}))
    assert member(Kind.TOOL, "github", "delete_repo") and member(Kind.RESOURCE, "web", "file:///x")
    assert not stranger(Kind.TOOL, "github", "search")
