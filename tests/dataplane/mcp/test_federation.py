"""The sans-I/O federation core: fan-out and merge, routing, id mapping, failure modes, visibility. No sockets."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from dataplane.mcp.federation import (
    Action,
    FailureMode,
    FederationConfig,
    Kind,
    McpFederation,
    SendToClient,
    SendToTarget,
    Visibility,
    allow_all,
    decode_cursor,
    encode_cursor,
)
from dataplane.mcp.naming import Naming, PrefixMode

JSON = dict[str, Any]
ABC = ("a", "b", "c")


def make(
    targets: Sequence[str] = ABC,
    mode: PrefixMode = PrefixMode.CONDITIONAL,
    failure: FailureMode = FailureMode.FAIL_CLOSED,
    visibility: Visibility = allow_all,
) -> McpFederation:
    config = FederationConfig(Naming(targets, mode), failure_mode=failure, server_info={"name": "gw", "version": "1"})
    return McpFederation(config, visibility)


def req(request_id: Any, method: str, params: JSON | None = None) -> JSON:
    message: JSON = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def note(method: str, params: JSON) -> JSON:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def sent(actions: list[Action]) -> dict[str, JSON]:
    """The messages for targets, by target (one each in these tests)."""
    out = {a.target: a.message for a in actions if isinstance(a, SendToTarget)}
    assert len(out) == sum(isinstance(a, SendToTarget) for a in actions)
    return out


def client(actions: list[Action]) -> list[JSON]:
    return [a.message for a in actions if isinstance(a, SendToClient)]


def reply(fed: McpFederation, actions: list[Action], answers: dict[str, JSON]) -> list[Action]:
    """Answer each request sent to a target: a dict with "error" is an error response, else a result."""
    out: list[Action] = []
    for target, message in sent(actions).items():
        answer = answers[target]
        key = "error" if "error" in answer else "result"
        body = answer["error"] if key == "error" else answer
        out += fed.receive_from_target(target, {"jsonrpc": "2.0", "id": message["id"], key: body})
    return out


def only_client(actions: list[Action]) -> JSON:
    messages = client(actions)
    assert len(messages) == 1 and len(actions) == 1, actions
    return messages[0]


def initialized(fed: McpFederation, results: dict[str, JSON] | None = None) -> JSON:
    actions = fed.receive_from_client(req(0, "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}}))
    default = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}, "prompts": {}, "resources": {}}}
    return only_client(reply(fed, actions, results or {t: default for t in sent(actions)}))


def catalog(fed: McpFederation, method: str, names: dict[str, list[str]]) -> None:
    """Let the client list once, so the federation knows each target's catalog (targets not named have none)."""
    key = {"tools/list": "tools", "prompts/list": "prompts"}[method]
    actions = fed.receive_from_client(req("list", method))
    reply(fed, actions, {t: {key: [{"name": n} for n in names.get(t, [])]} for t in sent(actions)})


# Lifecycle ------------------------------------------------------------------------------------------------------


def test_initialize_fans_out_and_merges_capabilities_instructions_and_server_info() -> None:
    fed = make()
    actions = fed.receive_from_client(req(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}}))
    assert set(sent(actions)) == set(ABC)
    assert all(
        m["method"] == "initialize" and m["params"]["protocolVersion"] == "2025-06-18" for m in sent(actions).values()
    )
    answer = only_client(
        reply(
            fed,
            actions,
            {
                "a": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {"tools": {"listChanged": False}, "tasks": {"list": {}}, "experimental": {"x": {}}},
                    "serverInfo": {"name": "a", "version": "9"},
                    "instructions": "Use a for git.",
                },
                "b": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}},
                    "serverInfo": {"name": "b", "version": "9"},
                },
                "c": {
                    "protocolVersion": "2025-03-26",
                    "capabilities": {"logging": {}, "completions": {}, "resources": {"listChanged": True}},
                    "serverInfo": {"name": "c", "version": "9"},
                    "instructions": "  Use c for files.\n",
                },
            },
        )
    )
    assert answer["id"] == 1
    assert answer["result"] == {
        "protocolVersion": "2025-06-18",
        # Union of what the gateway can route; tasks and experimental are not advertised.
        "capabilities": {
            "tools": {"listChanged": True},
            "resources": {"subscribe": True, "listChanged": True},
            "logging": {},
            "completions": {},
        },
        "serverInfo": {"name": "gw", "version": "1"},
        "instructions": "[a]\nUse a for git.\n\n[c]\nUse c for files.",
    }
    assert fed.target_versions == {"a": "2025-06-18", "b": "2025-06-18", "c": "2025-03-26"}


@pytest.mark.parametrize(
    ("requested", "answered"),
    [("2025-11-25", "2025-11-25"), ("2025-06-18", "2025-06-18"), ("1999-01-01", "2025-11-25"), (None, "2025-11-25")],
)
def test_initialize_answers_the_clients_version_if_supported_else_the_newest(
    requested: str | None, answered: str
) -> None:
    fed = make(["a"])
    actions = fed.receive_from_client(req(1, "initialize", {"protocolVersion": requested, "capabilities": {}}))
    answer = only_client(reply(fed, actions, {"a": {"protocolVersion": "2025-06-18", "capabilities": {}}}))
    assert answer["result"]["protocolVersion"] == answered


def test_server_discover_merges_into_a_modern_discover_result() -> None:
    fed = make(["a", "b"])
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    actions = fed.receive_from_client(req("d", "server/discover", {"_meta": meta}))
    result = only_client(
        reply(
            fed,
            actions,
            {
                "a": {"resultType": "complete", "supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}},
                "b": {"resultType": "complete", "supportedVersions": ["2026-07-28"], "capabilities": {"prompts": {}}},
            },
        )
    )["result"]
    assert result["resultType"] == "complete"
    assert result["capabilities"] == {"tools": {}, "prompts": {}}
    assert result["supportedVersions"] == ["2025-11-25", "2025-06-18", "2025-03-26"]
    assert result["_meta"] == {"io.modelcontextprotocol/serverInfo": {"name": "gw", "version": "1"}}
    assert "instructions" not in result


def test_lists_fan_out_only_to_targets_with_the_capability() -> None:
    fed = make()
    initialized(
        fed,
        {
            "a": {"capabilities": {"tools": {}}},
            "b": {"capabilities": {"prompts": {}}},
            "c": {"capabilities": {"tools": {}, "prompts": {}}},
        },
    )
    assert set(sent(fed.receive_from_client(req(1, "tools/list")))) == {"a", "c"}
    assert set(sent(fed.receive_from_client(req(2, "prompts/list")))) == {"b", "c"}
    assert only_client(fed.receive_from_client(req(3, "resources/list"))) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"resources": []},
    }


# Lists, prefixes, pagination ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "targets", "expected"),
    [
        (PrefixMode.CONDITIONAL, ["a"], ["x_y", "r-s"]),
        (PrefixMode.CONDITIONAL, ["a", "b"], ["a__x_y", "a__r-s", "b__x_y", "b__r-s"]),
        (PrefixMode.ALWAYS, ["a"], ["a__x_y", "a__r-s"]),
        (PrefixMode.NEVER, ["a"], ["x_y", "r-s"]),
    ],
)
def test_tools_list_exposes_names_per_prefix_mode(mode: PrefixMode, targets: list[str], expected: list[str]) -> None:
    fed = make(targets, mode)
    actions = fed.receive_from_client(req(1, "tools/list"))
    page = {"tools": [{"name": "x_y", "inputSchema": {"type": "object"}}, {"name": "r-s", "inputSchema": {}}]}
    tools = only_client(reply(fed, actions, dict.fromkeys(targets, page)))["result"]["tools"]
    assert [t["name"] for t in tools] == expected
    assert all(t["inputSchema"] is not None for t in tools)


@pytest.mark.parametrize("arrival", [("a", "b", "c"), ("c", "b", "a")])
def test_never_mode_collisions_go_to_the_first_target_in_config_order(arrival: tuple[str, ...]) -> None:
    fed = make(ABC, PrefixMode.NEVER)
    actions = fed.receive_from_client(req(1, "tools/list"))
    pages = {
        "a": {"tools": [{"name": "search", "description": "from a"}]},
        "b": {"tools": [{"name": "search", "description": "from b"}, {"name": "only_b"}]},
        "c": {"tools": [{"name": "search", "description": "from c"}]},
    }
    out: list[Action] = []
    for target in arrival:  # the order answers arrive in must not matter
        message = sent(actions)[target]
        out += fed.receive_from_target(target, {"jsonrpc": "2.0", "id": message["id"], "result": pages[target]})
    tools = only_client(out)["result"]["tools"]
    assert tools == [{"name": "search", "description": "from a"}, {"name": "only_b"}]
    assert fed.take_collisions() == [(Kind.TOOL, "search", "b"), (Kind.TOOL, "search", "c")]
    assert fed.take_collisions() == []
    assert sent(fed.receive_from_client(req(2, "tools/call", {"name": "search"})))["a"]["params"]["name"] == "search"
    assert set(sent(fed.receive_from_client(req(3, "tools/call", {"name": "only_b"})))) == {"b"}


def test_pagination_walks_three_targets_with_their_own_cursors() -> None:
    fed = make()
    # Per target: upstream cursor -> (tool names, next upstream cursor).
    pages: dict[str, dict[str | None, tuple[list[str], str | None]]] = {
        "a": {None: (["a1", "a2"], "A-2"), "A-2": (["a3"], None)},
        "b": {None: (["b1"], None)},
        "c": {None: (["c1"], "c:p2"), "c:p2": (["c2"], "c:p3"), "c:p3": (["c3", "c4"], None)},
    }
    seen_cursors: list[tuple[str, str | None]] = []
    names: list[str] = []
    cursor: str | None = None
    for page_number in range(10):  # bounded: three pages are expected
        params = {} if cursor is None else {"cursor": cursor}
        actions = fed.receive_from_client(req(page_number, "tools/list", params))
        answers = {}
        for target, message in sent(actions).items():
            upstream_cursor = message["params"].get("cursor")
            seen_cursors.append((target, upstream_cursor))
            tools, next_cursor = pages[target][upstream_cursor]
            answers[target] = {"tools": [{"name": n} for n in tools]}
            if next_cursor:
                answers[target]["nextCursor"] = next_cursor
        result = only_client(reply(fed, actions, answers))["result"]
        names += [t["name"] for t in result["tools"]]
        cursor = result.get("nextCursor")
        if cursor is None:
            break
    assert page_number == 2
    assert names == ["a__a1", "a__a2", "b__b1", "c__c1", "a__a3", "c__c2", "c__c3", "c__c4"]
    assert seen_cursors == [("a", None), ("b", None), ("c", None), ("a", "A-2"), ("c", "c:p2"), ("c", "c:p3")]


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64 !",
        "",
        encode_cursor("prompts/list", {"a": "x"}),  # another method's cursor
        encode_cursor("tools/list", {"nope": "x"}),  # a target that does not exist
        encode_cursor("tools/list", {}),
        123,
    ],
)
def test_a_cursor_the_gateway_did_not_issue_is_invalid_params(cursor: Any) -> None:
    fed = make()
    answer = only_client(fed.receive_from_client(req(1, "tools/list", {"cursor": cursor})))
    assert answer["error"] == {"code": -32602, "message": "Invalid cursor"}


def test_cursor_round_trip() -> None:
    cursors = {"a": "x", "b-c_d": "=/+ü"}
    assert decode_cursor("tools/list", encode_cursor("tools/list", cursors)) == cursors


def test_a_target_without_the_method_contributes_an_empty_page() -> None:
    fed = make(["a", "b"])
    actions = fed.receive_from_client(req(1, "prompts/list"))
    answer = only_client(
        reply(
            fed,
            actions,
            {"a": {"error": {"code": -32601, "message": "Method not found"}}, "b": {"prompts": [{"name": "p"}]}},
        )
    )
    assert answer["result"] == {"prompts": [{"name": "b__p"}]}


def test_resources_and_templates_lists_rewrite_uris() -> None:
    fed = make(["a", "b"])
    actions = fed.receive_from_client(req(1, "resources/list"))
    answer = only_client(
        reply(fed, actions, {"a": {"resources": [{"uri": "file:///x", "name": "x"}]}, "b": {"resources": []}})
    )
    assert answer["result"]["resources"] == [{"uri": "mcp-target://a/file:///x", "name": "x"}]
    actions = fed.receive_from_client(req(2, "resources/templates/list"))
    answer = only_client(
        reply(fed, actions, {"a": {"resourceTemplates": []}, "b": {"resourceTemplates": [{"uriTemplate": "db://{t}"}]}})
    )
    assert answer["result"]["resourceTemplates"] == [{"uriTemplate": "mcp-target://b/db://{t}"}]


# Routing ----------------------------------------------------------------------------------------------------------


def test_tools_call_routes_by_prefix_strips_it_and_maps_uris_in_the_result_back() -> None:
    fed = make()
    catalog(fed, "tools/list", {"b": ["do_it"]})
    actions = fed.receive_from_client(req("call-1", "tools/call", {"name": "b__do_it", "arguments": {"k": 1}}))
    upstream = sent(actions)["b"]
    assert upstream["params"] == {"name": "do_it", "arguments": {"k": 1}}
    assert upstream["id"] != "call-1" and isinstance(upstream["id"], int)
    result = {
        "content": [
            {"type": "text", "text": "hi"},
            {"type": "resource_link", "uri": "file:///r", "name": "r"},
            {"type": "resource", "resource": {"uri": "file:///e", "text": "e"}},
        ],
        "isError": False,
    }
    answer = only_client(fed.receive_from_target("b", {"jsonrpc": "2.0", "id": upstream["id"], "result": result}))
    assert answer["id"] == "call-1"
    assert answer["result"]["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "resource_link", "uri": "mcp-target://b/file:///r", "name": "r"},
        {"type": "resource", "resource": {"uri": "mcp-target://b/file:///e", "text": "e"}},
    ]
    assert fed.in_flight == 0


def test_an_upstream_error_for_a_routed_call_reaches_the_client_under_its_id() -> None:
    fed = make()
    catalog(fed, "prompts/list", {"c": ["greet"]})
    upstream = sent(fed.receive_from_client(req(5, "prompts/get", {"name": "c__greet"})))["c"]
    assert upstream["params"] == {"name": "greet"}
    error = {"code": -32602, "message": "missing argument"}
    answer = only_client(fed.receive_from_target("c", {"jsonrpc": "2.0", "id": upstream["id"], "error": error}))
    assert answer == {"jsonrpc": "2.0", "id": 5, "error": error}


@pytest.mark.parametrize("method", ["resources/read", "resources/subscribe", "resources/unsubscribe"])
def test_resource_methods_route_by_uri(method: str) -> None:
    fed = make()
    upstream = sent(fed.receive_from_client(req(1, method, {"uri": "mcp-target://c/file:///a?b#c"})))["c"]
    assert upstream["method"] == method
    assert upstream["params"] == {"uri": "file:///a?b#c"}


def test_resources_read_maps_content_uris_back() -> None:
    fed = make()
    upstream = sent(fed.receive_from_client(req(1, "resources/read", {"uri": "mcp-target://a/file:///x"})))["a"]
    result = {"contents": [{"uri": "file:///x", "text": "hello"}]}
    answer = only_client(fed.receive_from_target("a", {"jsonrpc": "2.0", "id": upstream["id"], "result": result}))
    assert answer["result"] == {"contents": [{"uri": "mcp-target://a/file:///x", "text": "hello"}]}


def test_unprefixed_uris_route_by_listed_uri_or_a_unique_template_owner() -> None:
    fed = make(ABC, PrefixMode.NEVER)
    actions = fed.receive_from_client(req(1, "resources/list"))
    reply(fed, actions, {"a": {"resources": [{"uri": "file:///a"}]}, "b": {"resources": []}, "c": {"resources": []}})
    actions = fed.receive_from_client(req(2, "resources/templates/list"))
    templates = {
        "a": {"resourceTemplates": []},
        "b": {"resourceTemplates": [{"uriTemplate": "db://{table}"}, {"uriTemplate": "s3://{bucket}/{key}"}]},
        "c": {"resourceTemplates": [{"uriTemplate": "s3://{bucket}"}]},
    }
    reply(fed, actions, templates)
    assert set(sent(fed.receive_from_client(req(3, "resources/read", {"uri": "file:///a"})))) == {"a"}
    assert set(sent(fed.receive_from_client(req(4, "resources/read", {"uri": "db://users"})))) == {"b"}
    ambiguous = only_client(fed.receive_from_client(req(5, "resources/read", {"uri": "s3://bk/k"})))
    assert ambiguous["error"] == {"code": -32602, "message": "Unknown resource: s3://bk/k"}
    unknown = only_client(fed.receive_from_client(req(6, "resources/read", {"uri": "ftp://x"})))
    assert unknown["error"] == {"code": -32602, "message": "Unknown resource: ftp://x"}


@pytest.mark.parametrize(
    ("ref", "target", "upstream_ref"),
    [
        ({"type": "ref/prompt", "name": "b__greet"}, "b", {"type": "ref/prompt", "name": "greet"}),
        ({"type": "ref/resource", "uri": "mcp-target://c/db://{t}"}, "c", {"type": "ref/resource", "uri": "db://{t}"}),
    ],
)
def test_completion_routes_by_prompt_name_or_template_uri(ref: JSON, target: str, upstream_ref: JSON) -> None:
    fed = make()
    catalog(fed, "prompts/list", {"b": ["greet"]})
    params = {"ref": ref, "argument": {"name": "t", "value": "us"}}
    upstream = sent(fed.receive_from_client(req(1, "completion/complete", params)))
    assert upstream[target]["params"] == {"ref": upstream_ref, "argument": {"name": "t", "value": "us"}}


# Server-to-client requests, progress, cancellation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "answer"),
    [
        ("sampling/createMessage", {"messages": [], "maxTokens": 10}, {"role": "assistant", "content": {}}),
        ("elicitation/create", {"message": "name?", "requestedSchema": {}}, {"action": "accept", "content": {}}),
        ("roots/list", {}, {"roots": [{"uri": "file:///home"}]}),
        ("ping", {}, {}),
    ],
)
def test_server_to_client_requests_get_gateway_ids_and_answers_return_to_the_asker(
    method: str, params: JSON, answer: JSON
) -> None:
    fed = make()
    # Two targets use the same id: the client must see two distinct ids, and each answer must go home.
    to_client_b = only_client(fed.receive_from_target("b", req(7, method, params)))
    to_client_c = only_client(fed.receive_from_target("c", req(7, method, params)))
    assert to_client_b["method"] == method and to_client_b["params"] == params
    assert to_client_b["id"] != to_client_c["id"]
    assert 7 not in (to_client_b["id"], to_client_c["id"])
    back_c = fed.receive_from_client({"jsonrpc": "2.0", "id": to_client_c["id"], "result": answer})
    back_b = fed.receive_from_client(
        {"jsonrpc": "2.0", "id": to_client_b["id"], "error": {"code": -1, "message": "no"}}
    )
    assert back_c == [SendToTarget("c", {"jsonrpc": "2.0", "id": 7, "result": answer})]
    assert back_b == [SendToTarget("b", {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "no"}})]
    assert fed.receive_from_client({"jsonrpc": "2.0", "id": to_client_b["id"], "result": {}}) == []  # answered once
    assert fed.in_flight == 0


def test_progress_tokens_are_mapped_per_target_and_forgotten_with_the_request() -> None:
    fed = make()
    catalog(fed, "tools/list", {"a": ["slow"]})
    params = {"name": "a__slow", "_meta": {"progressToken": "tok"}}
    upstream = sent(fed.receive_from_client(req(1, "tools/call", params)))["a"]
    token = upstream["params"]["_meta"]["progressToken"]
    assert token != "tok"
    progress = note("notifications/progress", {"progressToken": token, "progress": 1, "total": 2})
    assert only_client(fed.receive_from_target("a", progress))["params"] == {
        "progressToken": "tok",
        "progress": 1,
        "total": 2,
    }
    assert fed.receive_from_target("b", progress) == []  # the token belongs to a, not b
    fed.receive_from_target("a", {"jsonrpc": "2.0", "id": upstream["id"], "result": {"content": []}})
    assert fed.receive_from_target("a", progress) == []  # finished: late progress is dropped


def test_fan_out_progress_gets_one_token_per_target_that_all_map_to_the_clients() -> None:
    fed = make()
    actions = fed.receive_from_client(req(1, "tools/list", {"_meta": {"progressToken": 99}}))
    tokens = {t: m["params"]["_meta"]["progressToken"] for t, m in sent(actions).items()}
    assert len(set(tokens.values())) == 3
    for target, token in tokens.items():
        message = only_client(
            fed.receive_from_target(target, note("notifications/progress", {"progressToken": token, "progress": 1}))
        )
        assert message["params"]["progressToken"] == 99


def test_progress_for_a_relayed_request_flows_from_client_to_the_target() -> None:
    fed = make()
    asked = only_client(
        fed.receive_from_target("c", req("s1", "sampling/createMessage", {"_meta": {"progressToken": "t"}}))
    )
    gw_token = asked["params"]["_meta"]["progressToken"]
    out = fed.receive_from_client(note("notifications/progress", {"progressToken": gw_token, "progress": 3}))
    assert out == [SendToTarget("c", note("notifications/progress", {"progressToken": "t", "progress": 3}))]


def test_client_cancellation_reaches_the_target_under_its_id_and_the_late_answer_is_dropped() -> None:
    fed = make()
    actions = fed.receive_from_client(req("r1", "tools/list"))
    ids = {t: m["id"] for t, m in sent(actions).items()}
    reply_a = {"jsonrpc": "2.0", "id": ids["a"], "result": {"tools": []}}
    assert fed.receive_from_target("a", reply_a) == []  # b and c still pending
    out = fed.receive_from_client(note("notifications/cancelled", {"requestId": "r1", "reason": "user"}))
    assert sent(out) == {
        t: note("notifications/cancelled", {"requestId": ids[t], "reason": "user"}) for t in ("b", "c")
    }
    assert fed.receive_from_target("b", {"jsonrpc": "2.0", "id": ids["b"], "result": {"tools": []}}) == []
    assert fed.in_flight == 0
    assert fed.receive_from_client(note("notifications/cancelled", {"requestId": "r1"})) == []


def test_target_cancellation_of_a_relayed_request_reaches_the_client_under_the_gateway_id() -> None:
    fed = make()
    asked = only_client(fed.receive_from_target("b", req(3, "elicitation/create", {"message": "?"})))
    out = only_client(fed.receive_from_target("b", note("notifications/cancelled", {"requestId": 3, "reason": "gone"})))
    assert out == note("notifications/cancelled", {"requestId": asked["id"], "reason": "gone"})
    assert fed.receive_from_client({"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "cancel"}}) == []


# Notifications from targets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "outgoing"),
    [
        (note("notifications/tools/list_changed", {}), note("notifications/tools/list_changed", {})),
        (note("notifications/prompts/list_changed", {}), note("notifications/prompts/list_changed", {})),
        (note("notifications/resources/list_changed", {}), note("notifications/resources/list_changed", {})),
        (
            note("notifications/resources/updated", {"uri": "file:///x"}),
            note("notifications/resources/updated", {"uri": "mcp-target://b/file:///x"}),
        ),
        (
            note("notifications/message", {"level": "info", "data": "hi"}),
            note("notifications/message", {"level": "info", "data": "hi", "logger": "b"}),
        ),
        (
            note("notifications/message", {"level": "info", "logger": "db", "data": 1}),
            note("notifications/message", {"level": "info", "logger": "b/db", "data": 1}),
        ),
    ],
)
def test_target_notifications_reach_the_client_mapped(incoming: JSON, outgoing: JSON) -> None:
    assert make().receive_from_target("b", incoming) == [SendToClient(outgoing)]


def test_client_notifications_without_ids_go_to_every_live_target() -> None:
    fed = make()
    out = fed.receive_from_client(note("notifications/initialized", {}))
    assert sent(out) == dict.fromkeys(ABC, note("notifications/initialized", {}))


# Failure modes -------------------------------------------------------------------------------------------------------

FAIL = {"error": {"code": -32000, "message": "boom"}}
OK = {"tools": [{"name": "t"}]}


@pytest.mark.parametrize(
    ("mode", "answers", "error_message", "tools"),
    [
        (FailureMode.FAIL_CLOSED, {"a": OK, "b": OK, "c": OK}, None, ["a__t", "b__t", "c__t"]),
        (FailureMode.FAIL_CLOSED, {"a": OK, "b": FAIL, "c": OK}, "MCP target failed: b", None),
        (FailureMode.FAIL_CLOSED, {"a": FAIL, "b": OK, "c": FAIL}, "MCP targets failed: a, c", None),
        (FailureMode.FAIL_OPEN, {"a": OK, "b": FAIL, "c": OK}, None, ["a__t", "c__t"]),
        (FailureMode.FAIL_OPEN, {"a": FAIL, "b": FAIL, "c": OK}, None, ["c__t"]),
        (FailureMode.FAIL_OPEN, {"a": FAIL, "b": FAIL, "c": FAIL}, "MCP targets failed: a, b, c", None),
    ],
)
def test_failure_mode_decides_a_fan_out_with_failed_targets(
    mode: FailureMode, answers: dict[str, JSON], error_message: str | None, tools: list[str] | None
) -> None:
    fed = make(failure=mode)
    answer = only_client(reply(fed, fed.receive_from_client(req(1, "tools/list")), answers))
    if error_message is None:
        assert [t["name"] for t in answer["result"]["tools"]] == tools
    else:
        assert answer["error"]["code"] == -32603
        assert answer["error"]["message"] == error_message
        failed = [t for t, a in answers.items() if a is FAIL]
        assert answer["error"]["data"] == {"targets": dict.fromkeys(failed, FAIL["error"])}


@pytest.mark.parametrize(("mode", "fails"), [(FailureMode.FAIL_CLOSED, True), (FailureMode.FAIL_OPEN, False)])
def test_a_transport_failure_counts_as_a_failed_target(mode: FailureMode, fails: bool) -> None:
    fed = make(failure=mode)
    actions = fed.receive_from_client(req(1, "tools/list"))
    ids = {t: m["id"] for t, m in sent(actions).items()}
    for target in ("a", "c"):
        assert fed.receive_from_target(target, {"jsonrpc": "2.0", "id": ids[target], "result": OK}) == []
    answer = only_client(fed.target_failed("b", "timed out"))
    if fails:
        assert answer["error"]["message"] == "MCP target failed: b"
        assert answer["error"]["data"] == {"targets": {"b": {"code": -32603, "message": "timed out"}}}
    else:
        assert [t["name"] for t in answer["result"]["tools"]] == ["a__t", "c__t"]
    assert fed.in_flight == 0


def test_a_transport_failure_fails_routed_calls_and_cancels_what_the_target_asked() -> None:
    fed = make()
    catalog(fed, "tools/list", {"a": ["t"]})
    fed.receive_from_client(req(1, "tools/call", {"name": "a__t"}))
    asked = only_client(fed.receive_from_target("a", req(9, "roots/list", {})))
    out = client(fed.target_failed("a", "connection reset"))
    assert out == [
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "connection reset"}},
        note("notifications/cancelled", {"requestId": asked["id"], "reason": "MCP target 'a' failed"}),
    ]
    assert fed.in_flight == 0


def test_fail_open_leaves_targets_that_failed_initialize_out_of_the_conversation() -> None:
    fed = make(failure=FailureMode.FAIL_OPEN)
    ok = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}}
    result = initialized(fed, {"a": ok, "b": FAIL, "c": ok})
    assert result["result"]["capabilities"] == {"tools": {}}
    assert fed.live_targets == ("a", "c")
    assert set(sent(fed.receive_from_client(req(1, "tools/list")))) == {"a", "c"}
    unavailable = only_client(fed.receive_from_client(req(2, "tools/call", {"name": "b__t"})))
    assert unavailable["error"] == {"code": -32603, "message": "MCP target 'b' is unavailable"}


def test_fail_closed_initialize_names_the_broken_target() -> None:
    fed = make()
    answer = initialized(fed, {"a": {"capabilities": {}}, "b": {"capabilities": {}}, "c": FAIL})
    assert answer["error"]["message"] == "MCP target failed: c"


# Visibility ----------------------------------------------------------------------------------------------------------


class RecordingRule:
    """Hides anything named "secret*"; records every question so list and call paths can be compared."""

    def __init__(self) -> None:
        self.asked: list[tuple[Kind, str, str]] = []

    def __call__(self, kind: Kind, target: str, name: str) -> bool:
        self.asked.append((kind, target, name))
        return not name.startswith("secret") and "secret" not in name.rsplit("/", 1)[-1]


def test_one_visibility_rule_filters_lists_and_guards_calls_alike() -> None:
    rule = RecordingRule()
    fed = make(visibility=rule)
    actions = fed.receive_from_client(req(1, "tools/list"))
    pages = {t: {"tools": [{"name": "open"}, {"name": "secret_tool"}]} for t in ABC}
    tools = only_client(reply(fed, actions, pages))["result"]["tools"]
    assert [t["name"] for t in tools] == ["a__open", "b__open", "c__open"]
    assert (Kind.TOOL, "b", "secret_tool") in rule.asked
    rule.asked.clear()
    hidden = only_client(fed.receive_from_client(req(2, "tools/call", {"name": "b__secret_tool"})))
    assert rule.asked == [(Kind.TOOL, "b", "secret_tool")]  # the same question the list path asked
    unknown = only_client(fed.receive_from_client(req(3, "tools/call", {"name": "b__no_such_tool"})))
    assert hidden["error"] == {"code": -32602, "message": "Unknown tool: b__secret_tool"}
    assert unknown["error"] == {"code": -32602, "message": "Unknown tool: b__no_such_tool"}
    assert hidden["error"].keys() == unknown["error"].keys()


def shape(error: JSON, name: str) -> JSON:
    return {**error, "message": error["message"].replace(name, "<name>")}


@pytest.mark.parametrize(
    ("method", "hidden_params", "unknown_params", "hidden_name", "unknown_name"),
    [
        ("tools/call", {"name": "a__secret"}, {"name": "a__nope"}, "a__secret", "a__nope"),
        ("tools/call", {"name": "a__secret"}, {"name": "zz__secret"}, "a__secret", "zz__secret"),
        ("prompts/get", {"name": "c__secret"}, {"name": "c__nope"}, "c__secret", "c__nope"),
        (
            "resources/read",
            {"uri": "mcp-target://b/file:///secret"},
            {"uri": "mcp-target://q/file:///x"},
            "mcp-target://b/file:///secret",
            "mcp-target://q/file:///x",
        ),
        (
            "completion/complete",
            {"ref": {"type": "ref/prompt", "name": "a__secret"}, "argument": {"name": "x", "value": ""}},
            {"ref": {"type": "ref/prompt", "name": "a__nope"}, "argument": {"name": "x", "value": ""}},
            "a__secret",
            "a__nope",
        ),
    ],
)
def test_hidden_and_unknown_items_get_the_same_error(
    method: str, hidden_params: JSON, unknown_params: JSON, hidden_name: str, unknown_name: str
) -> None:
    rule = RecordingRule()
    fed = make(visibility=rule)
    catalog(fed, "tools/list", {t: ["secret", "open"] for t in ABC})
    catalog(fed, "prompts/list", {t: ["secret", "open"] for t in ABC})
    hidden = only_client(fed.receive_from_client(req(1, method, hidden_params)))
    unknown = only_client(fed.receive_from_client(req(2, method, unknown_params)))
    assert hidden["error"]["code"] == unknown["error"]["code"] == -32602
    assert shape(hidden["error"], hidden_name) == shape(unknown["error"], unknown_name)


def test_hidden_resource_updates_are_not_forwarded() -> None:
    fed = make(visibility=RecordingRule())
    assert fed.receive_from_target("a", note("notifications/resources/updated", {"uri": "file:///secret"})) == []


# Bad input -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([1, 2], {"code": -32600, "message": "Invalid Request"}),
        ("text", {"code": -32600, "message": "Invalid Request"}),
        ({"jsonrpc": "2.0", "id": 1}, {"code": -32600, "message": "Invalid Request"}),
        ({"jsonrpc": "2.0", "id": True, "method": "ping"}, {"code": -32600, "message": "Invalid Request"}),
        ({"jsonrpc": "2.0", "id": [1], "method": "ping"}, {"code": -32600, "message": "Invalid Request"}),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, {"code": -32600, "message": "Invalid Request"}),
        (req(1, "tools/frobnicate"), {"code": -32601, "message": "Method not found: tools/frobnicate"}),
        ({**req(1, "tools/call"), "params": [1]}, {"code": -32602, "message": "params must be an object"}),
        (req(1, "tools/call", {}), {"code": -32602, "message": "name must be a string"}),
        (req(1, "tools/call", {"name": {"big": "object"}}), {"code": -32602, "message": "name must be a string"}),
        (req(1, "resources/read", {}), {"code": -32602, "message": "uri must be a string"}),
        (
            req(1, "completion/complete", {"ref": {"type": "ref/other"}}),
            {"code": -32602, "message": "ref must be a ref/prompt or ref/resource"},
        ),
    ],
)
def test_bad_client_input_gets_a_json_rpc_error(message: Any, error: JSON) -> None:
    answer = only_client(make().receive_from_client(message))
    assert answer["error"] == error
    assert answer["jsonrpc"] == "2.0"


def test_a_request_id_already_in_flight_is_refused() -> None:
    fed = make()
    fed.receive_from_client(req(1, "tools/call", {"name": "a__t"}))  # parked while a's catalog is walked
    answer = only_client(fed.receive_from_client(req(1, "tools/call", {"name": "b__t"})))
    assert answer["error"] == {"code": -32600, "message": "Request id already in use"}


@pytest.mark.parametrize(
    "message",
    [
        "garbage",
        {"jsonrpc": "2.0", "id": 424242, "result": {}},  # nothing pending under this id
        {"jsonrpc": "2.0", "id": "x", "result": {}},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}},
    ],
)
def test_stray_or_malformed_target_messages_are_dropped(message: Any) -> None:
    fed = make()
    assert fed.receive_from_target("a", message) == []
    assert fed.receive_from_target("not-a-target", note("notifications/tools/list_changed", {})) == []


def test_a_malformed_target_response_fails_only_that_request() -> None:
    fed = make()
    catalog(fed, "tools/list", {"a": ["t"]})
    upstream = sent(fed.receive_from_client(req(1, "tools/call", {"name": "a__t"})))["a"]
    answer = only_client(fed.receive_from_target("a", {"jsonrpc": "2.0", "id": upstream["id"], "result": "nope"}))
    assert answer["error"] == {"code": -32603, "message": "malformed response"}


@pytest.mark.parametrize(("modern", "result"), [(False, {}), (True, {"resultType": "complete"})])
def test_ping_is_answered_by_the_gateway(modern: bool, result: JSON) -> None:
    params = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}} if modern else None
    assert only_client(make().receive_from_client(req(1, "ping", params))) == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": result,
    }


def test_ids_sent_to_targets_never_repeat() -> None:
    fed = make()
    seen: list[int] = []
    call: Callable[[int], list[Action]] = lambda i: fed.receive_from_client(req(i, "tools/list"))  # noqa: E731
    for i in range(5):
        seen += [m["id"] for m in sent(call(i)).values()]
    assert len(seen) == len(set(seen)) == 15


# Catalog walks: unknown is decided by the gateway, even before the client listed --------------------------------------


def page(names: list[str], next_cursor: str | None = None) -> JSON:
    result: JSON = {"tools": [{"name": n} for n in names]}
    if next_cursor:
        result["nextCursor"] = next_cursor
    return result


def answer(fed: McpFederation, action: Action, result: JSON) -> list[Action]:
    assert isinstance(action, SendToTarget)
    key = "error" if "error" in result else "result"
    body = result["error"] if key == "error" else result
    return fed.receive_from_target(action.target, {"jsonrpc": "2.0", "id": action.message["id"], key: body})


def test_a_call_before_any_list_walks_the_targets_catalog_then_routes() -> None:
    fed = make()
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "progressToken": "p"}
    (walk,) = fed.receive_from_client(req(1, "tools/call", {"name": "b__x", "_meta": meta}))
    assert walk == SendToTarget(
        "b",
        {
            "jsonrpc": "2.0",
            "id": walk.message["id"],
            "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
        },
    )
    (second,) = answer(fed, walk, page(["w"], "n2"))
    assert second.message["params"]["cursor"] == "n2"
    (call,) = answer(fed, second, page(["x"]))
    assert call.target == "b" and call.message["method"] == "tools/call" and call.message["params"]["name"] == "x"
    # The catalog is kept: a second call routes at once, an unknown name is refused at once.
    assert set(sent(fed.receive_from_client(req(2, "tools/call", {"name": "b__w"})))) == {"b"}
    unknown = only_client(fed.receive_from_client(req(3, "tools/call", {"name": "b__y"})))
    assert unknown["error"] == {"code": -32602, "message": "Unknown tool: b__y"}


def test_calls_waiting_for_the_same_catalog_share_one_walk() -> None:
    fed = make()
    (walk,) = fed.receive_from_client(req(1, "tools/call", {"name": "a__x"}))
    assert fed.receive_from_client(req(2, "tools/call", {"name": "a__nope"})) == []
    out = answer(fed, walk, page(["x"]))
    assert len(out) == 2
    assert sent(out[:1])["a"]["params"] == {"name": "x"}
    assert only_client(out[1:])["error"] == {"code": -32602, "message": "Unknown tool: a__nope"}


def test_never_mode_call_before_any_list_walks_every_target_and_picks_the_first_owner() -> None:
    fed = make(ABC, PrefixMode.NEVER)
    walks = fed.receive_from_client(req(1, "tools/call", {"name": "search"}))
    assert [w.target for w in walks if isinstance(w, SendToTarget)] == list(ABC)
    out: list[Action] = []
    for w, names in zip(walks, (["other"], ["search"], ["search"]), strict=True):
        out += answer(fed, w, page(names))
    assert sent(out) == {"b": sent(out)["b"]}
    assert sent(out)["b"]["params"] == {"name": "search"}


def test_list_changed_forgets_the_catalog_so_the_next_call_walks_again() -> None:
    fed = make()
    catalog(fed, "tools/list", {"b": ["x"]})
    assert sent(fed.receive_from_client(req(1, "tools/call", {"name": "b__x"})))["b"]["method"] == "tools/call"
    fed.receive_from_target("b", note("notifications/tools/list_changed", {}))
    assert sent(fed.receive_from_client(req(2, "tools/call", {"name": "b__x"})))["b"]["method"] == "tools/list"


def test_a_failed_catalog_walk_fails_the_call_naming_the_target() -> None:
    fed = make()
    (walk,) = fed.receive_from_client(req(1, "tools/call", {"name": "c__x"}))
    out = only_client(answer(fed, walk, FAIL))
    assert out["error"] == {
        "code": -32603,
        "message": "MCP target failed: c",
        "data": {"targets": {"c": FAIL["error"]}},
    }
    assert fed.in_flight == 0


def test_fail_open_without_prefixes_skips_a_target_whose_walk_failed() -> None:
    fed = make(("a", "b"), PrefixMode.NEVER, FailureMode.FAIL_OPEN)
    walk_a, walk_b = fed.receive_from_client(req(1, "tools/call", {"name": "t"}))
    assert answer(fed, walk_a, FAIL) == []
    assert sent(answer(fed, walk_b, page(["t"])))["b"]["params"] == {"name": "t"}


def test_a_cancelled_waiting_call_is_dropped_and_its_walk_still_fills_the_catalog() -> None:
    fed = make()
    (walk,) = fed.receive_from_client(req(1, "tools/call", {"name": "a__x"}))
    assert fed.receive_from_client(note("notifications/cancelled", {"requestId": 1})) == []
    assert answer(fed, walk, page(["x"])) == []
    assert sent(fed.receive_from_client(req(2, "tools/call", {"name": "a__x"})))["a"]["method"] == "tools/call"


def test_a_catalog_walk_whose_cursors_never_end_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dataplane.mcp.federation.MAX_CATALOG_PAGES", 3)
    fed = make()
    (action,) = fed.receive_from_client(req(1, "tools/call", {"name": "a__x"}))
    for _ in range(2):
        (action,) = answer(fed, action, page(["w"], "again"))
    out = only_client(answer(fed, action, page(["w"], "again")))
    assert out["error"]["message"] == "MCP target failed: a"
    assert out["error"]["data"]["targets"]["a"]["message"] == "more than 3 list pages"


def test_a_transport_failure_during_a_catalog_walk_fails_the_waiting_call() -> None:
    fed = make()
    fed.receive_from_client(req(1, "prompts/get", {"name": "a__p"}))
    out = only_client(fed.target_failed("a", "connection refused"))
    assert out["error"]["message"] == "MCP target failed: a"
    assert fed.in_flight == 0


def test_with_prefixes_a_bare_uri_routes_only_when_one_target_listed_it() -> None:
    fed = make(("a", "b"))
    actions = fed.receive_from_client(req(1, "resources/list"))
    both = {"uri": "file:///shared"}
    reply(fed, actions, {"a": {"resources": [both, {"uri": "file:///only-a"}]}, "b": {"resources": [both]}})
    assert sent(fed.receive_from_client(req(2, "resources/read", {"uri": "file:///only-a"})))["a"]["params"] == {
        "uri": "file:///only-a"
    }
    ambiguous = only_client(fed.receive_from_client(req(3, "resources/read", {"uri": "file:///shared"})))
    assert ambiguous["error"] == {"code": -32602, "message": "Unknown resource: file:///shared"}
    routed = sent(fed.receive_from_client(req(4, "resources/read", {"uri": "mcp-target://b/file:///shared"})))
    assert routed["b"]["params"] == {"uri": "file:///shared"}


def test_conversations_sharing_a_catalog_route_without_walking_again() -> None:
    shared: dict[tuple[Kind, str], frozenset[str]] = {}
    config = FederationConfig(Naming(ABC))
    first = McpFederation(config, catalogs=shared)
    (walk,) = first.receive_from_client(req(1, "tools/call", {"name": "a__x"}))
    answer(first, walk, page(["x"]))
    second = McpFederation(config, catalogs=shared)
    assert sent(second.receive_from_client(req(1, "tools/call", {"name": "a__x"})))["a"]["method"] == "tools/call"


def test_set_level_goes_to_targets_with_logging_and_is_answered_once() -> None:
    fed = make()
    initialized(
        fed,
        {"a": {"capabilities": {"logging": {}}}, "b": {"capabilities": {}}, "c": {"capabilities": {"logging": {}}}},
    )
    actions = fed.receive_from_client(req(1, "logging/setLevel", {"level": "debug"}))
    assert {t: m["params"] for t, m in sent(actions).items()} == {"a": {"level": "debug"}, "c": {"level": "debug"}}
    assert only_client(reply(fed, actions, {"a": {}, "c": {}})) == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_modern_requests_get_result_type_on_merged_results() -> None:
    fed = make(("a", "b"))
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    actions = fed.receive_from_client(req(1, "tools/list", {"_meta": meta}))
    assert all(m["params"] == {"_meta": meta} for m in sent(actions).values())
    result = only_client(reply(fed, actions, {"a": {"tools": []}, "b": {"tools": [{"name": "t"}]}}))["result"]
    assert result == {"tools": [{"name": "b__t"}], "resultType": "complete"}


def test_visibility_filters_resources_and_templates_with_the_rule_reads_use() -> None:
    rule = RecordingRule()
    fed = make(("a", "b"), visibility=rule)
    actions = fed.receive_from_client(req(1, "resources/list"))
    resources = {"resources": [{"uri": "file:///open"}, {"uri": "file:///secret"}]}
    listed = only_client(reply(fed, actions, {"a": resources, "b": {"resources": []}}))["result"]["resources"]
    assert listed == [{"uri": "mcp-target://a/file:///open"}]
    actions = fed.receive_from_client(req(2, "resources/templates/list"))
    templates = {"resourceTemplates": [{"uriTemplate": "db://{t}"}, {"uriTemplate": "db://{t}/secret"}]}
    listed = only_client(reply(fed, actions, {"a": {"resourceTemplates": []}, "b": templates}))["result"]
    assert listed["resourceTemplates"] == [{"uriTemplate": "mcp-target://b/db://{t}"}]
    assert (Kind.RESOURCE, "a", "file:///secret") in rule.asked
    assert (Kind.RESOURCE_TEMPLATE, "b", "db://{t}/secret") in rule.asked
    rule.asked.clear()
    refused = only_client(fed.receive_from_client(req(3, "resources/read", {"uri": "mcp-target://a/file:///secret"})))
    assert refused["error"] == {"code": -32602, "message": "Unknown resource: mcp-target://a/file:///secret"}
    assert rule.asked == [(Kind.RESOURCE, "a", "file:///secret")]


def test_every_message_the_core_emits_is_plain_json() -> None:
    fed = make()
    emitted: list[Action] = []
    emitted += fed.receive_from_client(req(1, "initialize", {"protocolVersion": "2025-11-25"}))
    emitted += reply(fed, emitted[:], {t: FAIL for t in ABC})
    emitted += fed.receive_from_client(req(2, "tools/call", {"name": "nope"}))
    emitted += fed.receive_from_client(req(3, "tools/list", {"cursor": "bad"}))
    emitted += fed.target_failed("a", "down")
    emitted += fed.receive_from_target("b", req(4, "ping"))
    assert len(emitted) >= 7
    for action in emitted:
        assert json.loads(json.dumps(action.message)) == action.message
        assert all(type(v) in (str, int) for v in _codes(action.message))


def _codes(message: JSON) -> list[Any]:
    error = message.get("error")
    return [error["code"]] if isinstance(error, dict) else []
