"""ModernTargetChannel: a session-era conversation with a 2026-07-28-only target.

The pure core (era detection, InitializeResult, input_required <-> server-to-client requests, the
listen filter, x-mcp-header) is tested without sockets; the channel itself against the official
SDK serving 2026-07-28 only (tests/peers/mcp_servers/modern_only.py).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from dataplane.config.model import McpStreamableHttpTarget, UpstreamCluster
from dataplane.mcp.channel import JSON, TargetClosed, TargetUnavailable
from dataplane.mcp.http_channel import StreamableHttpChannel
from dataplane.mcp.modern_channel import (
    InputRound,
    InvalidInputRequired,
    ModernTargetChannel,
    initialize_result,
    is_modern_only,
    listen_filter,
    param_headers,
    request_headers,
    x_mcp_headers,
)
from tests.conftest import free_port
from tests.peers.mcp_servers.http_faulty import FaultyPeer
from tests.peers.mcp_servers.modern_only import ModernPeer, build_modern_app, serve

BACKEND = UpstreamCluster(name="mcp-backend", kind="mcp", connect_timeout=2.0)
CLIENT_INFO = {"name": "gateway-test", "version": "0"}
ELICIT = {"message": "colour?", "requestedSchema": {"type": "object", "properties": {"text": {"type": "string"}}}}


# ------------------------------------------------------------------------------------------- pure core


def test_an_initialize_refused_with_only_modern_versions_means_a_modern_only_target() -> None:
    def refused(code: int, data: Any = None) -> JSON:
        return {"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": "no", "data": data}}

    assert is_modern_only(refused(-32022, {"supported": ["2026-07-28"], "requested": "2025-06-18"}))
    assert is_modern_only(refused(-32020))  # HeaderMismatch: only 2026-07-28 servers define it
    assert not is_modern_only(refused(-32022, {"supported": ["2026-07-28", "2025-11-25"]}))  # dual-era
    assert not is_modern_only(refused(-32022, {"supported": ["2099-01-01"]}))  # nothing we speak
    assert not is_modern_only(refused(-32022, {"supported": "2026-07-28"}))
    assert not is_modern_only(refused(-32601))
    assert not is_modern_only({"jsonrpc": "2.0", "id": 1, "result": {"protocolVersion": "2025-06-18"}})


def test_the_initialize_result_is_built_from_discover_in_the_version_the_client_asked_for() -> None:
    discover = {
        "supportedVersions": ["2026-07-28"],
        "capabilities": {"tools": {"listChanged": True}},
        "instructions": "Be kind.",
        "resultType": "complete",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "peer", "version": "2"}},
    }
    result = initialize_result(discover, "2025-06-18", "t")
    assert result == {
        "protocolVersion": "2025-06-18",
        "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "peer", "version": "2"},
        "instructions": "Be kind.",
    }
    bare = initialize_result({"supportedVersions": ["2026-07-28"], "capabilities": {}}, "2026-07-28", "t")
    assert isinstance(bare, dict)
    assert bare["protocolVersion"] == "2025-11-25"  # not a session-era version: the newest one
    assert bare["serverInfo"] == {"name": "t", "version": ""}
    assert "2026-07-28" in str(initialize_result({"supportedVersions": ["2030-01-01"]}, "2025-06-18", "t"))
    assert isinstance(initialize_result([], "2025-06-18", "t"), str)


def test_an_input_required_round_becomes_client_requests_and_its_answers_a_retry() -> None:
    ids = itertools.count(1)
    result = {
        "resultType": "input_required",
        "inputRequests": {
            "colour": {"method": "elicitation/create", "params": ELICIT},
            "login": {"method": "elicitation/create", "params": {"mode": "url", "message": "m", "url": "https://x"}},
            "roots": {"method": "roots/list"},
        },
        "requestState": "opaque",
    }
    round_ = InputRound.parse(result, lambda: f"mrtr-{next(ids)}")
    assert [(r["id"], r["method"]) for r in round_.requests] == [
        ("mrtr-1", "elicitation/create"),
        ("mrtr-2", "elicitation/create"),
        ("mrtr-3", "roots/list"),
    ]
    assert round_.requests[0]["params"] == ELICIT
    assert round_.requests[1]["params"]["elicitationId"] == "mrtr-2"  # 2025-11-25 URL mode needs one
    assert round_.requests[2]["params"] == {}

    assert not round_.answer({"jsonrpc": "2.0", "id": "mrtr-1", "result": {"action": "accept", "content": {}}})
    assert not round_.answer({"jsonrpc": "2.0", "id": "unknown", "result": {}})
    assert round_.outstanding == ["mrtr-2", "mrtr-3"]
    assert not round_.answer({"jsonrpc": "2.0", "id": "mrtr-2", "result": {"action": "accept"}})
    assert round_.answer({"jsonrpc": "2.0", "id": "mrtr-3", "result": {"roots": []}})
    assert round_.refusal is None

    original = {"name": "t", "arguments": {"a": 1}, "_meta": {"progressToken": 5}, "requestState": "stale"}
    assert round_.retry_params(original) == {
        "name": "t",
        "arguments": {"a": 1},
        "_meta": {"progressToken": 5},
        "inputResponses": {
            "colour": {"action": "accept", "content": {}},
            "login": {"action": "accept"},
            "roots": {"roots": []},
        },
        "requestState": "opaque",
    }


def test_a_refused_input_ends_the_round_and_a_state_only_round_retries_without_responses() -> None:
    request = {"resultType": "input_required", "inputRequests": {"k": {"method": "sampling/createMessage"}}}
    round_ = InputRound.parse(request, lambda: 7)
    assert round_.answer({"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "user declined"}})
    assert round_.refusal == {"code": -1, "message": "user declined"}

    state_only = InputRound.parse({"resultType": "input_required", "requestState": "s"}, lambda: 0)
    assert state_only.complete and not state_only.requests
    assert state_only.retry_params({"name": "t"}) == {"name": "t", "requestState": "s"}
    no_state = InputRound.parse(request, lambda: 8)
    no_state.answer({"jsonrpc": "2.0", "id": 8, "result": {"role": "assistant"}})
    assert "requestState" not in no_state.retry_params({"name": "t", "requestState": "old"})


@pytest.mark.parametrize(
    "result",
    [
        {"resultType": "input_required"},
        {"resultType": "input_required", "inputRequests": []},
        {"resultType": "input_required", "requestState": 5},
        {"resultType": "input_required", "inputRequests": {"k": {"method": "tools/call"}}},
        {"resultType": "input_required", "inputRequests": {"k": {"method": "roots/list", "params": []}}},
    ],
)
def test_an_input_required_result_the_gateway_cannot_act_on_is_refused(result: JSON) -> None:
    with pytest.raises(InvalidInputRequired):
        InputRound.parse(result, lambda: 1)


def test_the_listen_filter_follows_the_capabilities_and_the_subscribed_uris() -> None:
    caps = {"tools": {"listChanged": True}, "prompts": {}, "resources": {"subscribe": True, "listChanged": True}}
    assert listen_filter(caps, set()) == {"toolsListChanged": True, "resourcesListChanged": True}
    assert listen_filter(caps, {"b://", "a://"})["resourceSubscriptions"] == ["a://", "b://"]  # type: ignore[index]
    assert listen_filter({"resources": {"subscribe": True}}, set()) is None
    assert listen_filter({"resources": {"subscribe": True}}, {"a://"}) == {"resourceSubscriptions": ["a://"]}
    assert listen_filter(None, {"a://"}) is None


def test_x_mcp_header_annotations_are_found_and_invalid_ones_refused() -> None:
    schema = {
        "type": "object",
        "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "deep": {"type": "object", "properties": {"n": {"type": "integer", "x-mcp-header": "N"}}},
            "plain": {"type": "string", "default": {"x-mcp-header": "data, not a schema"}},
        },
    }
    assert x_mcp_headers(schema) == {("region",): "Region", ("deep", "n"): "N"}
    assert x_mcp_headers({"type": "object"}) == {}
    invalid = [
        {"x-mcp-header": "Root", "type": "string"},
        {"properties": {"a": {"type": "number", "x-mcp-header": "A"}}},
        {"properties": {"a": {"type": "string", "x-mcp-header": "Not a token"}}},
        {"properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "I"}}}},
        {"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]},
        {"properties": {"a": {"type": "string", "x-mcp-header": "A"}, "b": {"type": "string", "x-mcp-header": "a"}}},
    ]
    for bad in invalid:
        assert x_mcp_headers(bad) is None, bad

    headers = dict(
        param_headers(
            {("region",): "Region", ("deep", "n"): "N", ("gone",): "G"},
            {
                "region": "Zürich",
                "deep": {"n": 42},
                "gone": None,
            },
        )
    )
    assert headers[b"mcp-param-n"] == b"42"
    encoded = headers[b"mcp-param-region"].decode()
    assert encoded.startswith("=?base64?") and base64.b64decode(encoded[9:-2]).decode() == "Zürich"
    assert b"mcp-param-g" not in headers
    assert dict(param_headers({("on",): "On"}, {"on": True})) == {b"mcp-param-on": b"true"}


def test_request_headers_mirror_the_body() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "note://é"}}
    headers = dict(request_headers(message))
    assert headers[b"mcp-protocol-version"] == b"2026-07-28"
    assert headers[b"mcp-method"] == b"resources/read"
    assert headers[b"mcp-name"] == b"=?base64?" + base64.b64encode("note://é".encode()) + b"?="
    assert b"mcp-name" not in dict(request_headers({"method": "tools/list", "params": {}}))


# ------------------------------------------------------------------------------ against the SDK server


def target(port: int, path: str = "/mcp") -> McpStreamableHttpTarget:
    return McpStreamableHttpTarget(name="modern", host="127.0.0.1", port=port, path=path)


def request(request_id: Any, method: str, params: JSON | None = None) -> JSON:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def call(request_id: Any, tool: str, arguments: JSON, **meta: Any) -> JSON:
    params: JSON = {"name": tool, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    return request(request_id, "tools/call", params)


async def receive_until(channel: ModernTargetChannel, request_id: Any, seen: list[JSON] | None = None) -> JSON:
    """Collect messages until the response to ``request_id``; returns it."""
    with anyio.fail_after(10):
        while True:
            message = await channel.receive()
            if seen is not None:
                seen.append(message)
            if message.get("id") == request_id and "method" not in message:
                return message


async def open_conversation(channel: ModernTargetChannel, version: str = "2025-06-18") -> JSON:
    params = {"protocolVersion": version, "capabilities": {"elicitation": {}}, "clientInfo": CLIENT_INFO}
    await channel.send(request("init", "initialize", params))
    answer = await receive_until(channel, "init")
    await channel.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return answer


@pytest.fixture
async def peer() -> AsyncIterator[tuple[ModernPeer, int]]:
    modern = ModernPeer()
    async with serve(build_modern_app(modern)) as port:
        yield modern, port


@pytest.fixture
async def channel(peer: tuple[ModernPeer, int]) -> AsyncIterator[ModernTargetChannel]:
    opened = ModernTargetChannel(target(peer[1]), BACKEND, response_timeout=10)
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.mark.anyio
async def test_the_peer_refuses_a_session_era_initialize_as_modern_only(peer: tuple[ModernPeer, int]) -> None:
    session_era = StreamableHttpChannel(target(peer[1]), BACKEND, response_timeout=10, listen=False)
    try:
        params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": CLIENT_INFO}
        await session_era.send(request(1, "initialize", params))
        with anyio.fail_after(10):
            answer = await session_era.receive()
        assert answer["error"]["code"] == -32022
        assert is_modern_only(answer)
    finally:
        await session_era.aclose()


@pytest.mark.anyio
async def test_initialize_is_answered_from_discover_then_lists_and_calls_relay_progress(
    channel: ModernTargetChannel,
) -> None:
    init = await open_conversation(channel)
    assert init["result"]["protocolVersion"] == "2025-06-18"
    assert init["result"]["serverInfo"] == {"name": "modern-peer", "version": "1.0"}
    assert init["result"]["instructions"] == "A 2026-07-28-only peer."
    assert init["result"]["capabilities"]["tools"] == {"listChanged": True}
    assert channel.session_id is None
    assert channel.capabilities == init["result"]["capabilities"]

    await channel.send(request(2, "tools/list"))
    tools = await receive_until(channel, 2)
    assert {"add", "count", "ask", "wait", "where", "touch"} <= {t["name"] for t in tools["result"]["tools"]}

    seen: list[JSON] = []
    await channel.send(call(3, "count", {"n": 3}, progressToken=7))
    result = await receive_until(channel, 3, seen)
    assert result["result"]["content"][0]["text"] == "counted 3"
    progress = [m["params"] for m in seen if m.get("method") == "notifications/progress"]
    assert [(p["progressToken"], p["progress"]) for p in progress] == [(7, 1), (7, 2), (7, 3)]

    await channel.send(request(4, "ping"))
    assert (await receive_until(channel, 4))["result"] == {}


@pytest.mark.anyio
async def test_an_input_required_tool_becomes_elicitations_and_a_retry_with_the_answers(
    channel: ModernTargetChannel,
) -> None:
    await open_conversation(channel)
    await channel.send(call("ask-1", "ask", {"question": "colour?"}))
    asked: set[Any] = set()
    for text in ("", "blue"):  # an empty answer makes the server ask again (a second round)
        with anyio.fail_after(10):
            elicit = await channel.receive()
        assert elicit["method"] == "elicitation/create"
        assert elicit["params"]["message"] == "colour?"
        assert str(elicit["id"]).startswith("mrtr-") and elicit["id"] not in asked
        asked.add(elicit["id"])
        answer = {"action": "accept", "content": {"text": text}}
        await channel.send({"jsonrpc": "2.0", "id": elicit["id"], "result": answer})
    result = await receive_until(channel, "ask-1")
    # The handler saw the answer and the requestState the server sealed in round 2 (echoed verbatim).
    assert result["result"]["content"][0]["text"] == "answer: blue (state round-2)"


@pytest.mark.anyio
async def test_rounds_are_bounded_and_a_refused_input_fails_the_request(peer: tuple[ModernPeer, int]) -> None:
    channel = ModernTargetChannel(target(peer[1]), BACKEND, response_timeout=10, max_input_rounds=1)
    try:
        await open_conversation(channel)
        await channel.send(call(1, "ask", {"question": "q"}))
        with anyio.fail_after(10):
            elicit = await channel.receive()
        await channel.send({"jsonrpc": "2.0", "id": elicit["id"], "result": {"action": "accept", "content": {}}})
        failed = await receive_until(channel, 1)
        assert failed["error"]["code"] == -32603
        assert "1 rounds" in failed["error"]["message"]

        await channel.send(call(2, "ask", {"question": "q"}))
        with anyio.fail_after(10):
            elicit = await channel.receive()
        refusal = {"code": -32600, "message": "the user closed the dialog"}
        await channel.send({"jsonrpc": "2.0", "id": elicit["id"], "error": refusal})
        assert (await receive_until(channel, 2))["error"] == refusal
    finally:
        await channel.aclose()


@pytest.mark.anyio
async def test_cancelled_closes_the_response_stream_and_the_target_stops_the_handler(
    peer: tuple[ModernPeer, int], channel: ModernTargetChannel
) -> None:
    modern, _ = peer
    await open_conversation(channel)
    await channel.send(call(1, "wait", {}))
    with anyio.fail_after(10):
        await modern.wait_started.wait()
    params = {"requestId": 1, "reason": "changed my mind"}
    await channel.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
    with anyio.fail_after(10):
        await modern.cancelled.wait()
    # Nothing is delivered for the cancelled request: the next message answers the next request.
    await channel.send(call(2, "add", {"a": 1, "b": 2}))
    with anyio.fail_after(10):
        answer = await channel.receive()
    assert answer["id"] == 2
    assert answer["result"]["structuredContent"] == {"result": 3}


@pytest.mark.anyio
async def test_cancelling_while_the_client_answers_withdraws_the_elicitation(channel: ModernTargetChannel) -> None:
    await open_conversation(channel)
    await channel.send(call(1, "ask", {"question": "q"}))
    with anyio.fail_after(10):
        elicit = await channel.receive()
    await channel.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    with anyio.fail_after(10):
        withdrawn = await channel.receive()
    assert withdrawn["method"] == "notifications/cancelled"
    assert withdrawn["params"]["requestId"] == elicit["id"]
    # A late answer is ignored.
    await channel.send({"jsonrpc": "2.0", "id": elicit["id"], "result": {"action": "decline"}})
    await channel.send(request(2, "ping"))
    assert (await channel.receive())["id"] == 2


@pytest.mark.anyio
async def test_subscriptions_listen_carries_list_changed_and_subscribed_resource_updates(
    channel: ModernTargetChannel,
) -> None:
    await open_conversation(channel)
    # Answered once the target acknowledged the listen stream whose filter holds the URI.
    await channel.send(request(1, "resources/subscribe", {"uri": "note://a"}))
    assert (await receive_until(channel, 1))["result"] == {}
    seen: list[JSON] = []
    await channel.send(call(2, "touch", {}))
    await receive_until(channel, 2, seen)
    with anyio.fail_after(10):
        while len([m for m in seen if m.get("method", "").startswith("notifications/")]) < 2:
            seen.append(await channel.receive())
    notifications = {m["method"]: m.get("params", {}) for m in seen if "method" in m}
    assert "notifications/tools/list_changed" in notifications
    assert notifications["notifications/resources/updated"] == {"uri": "note://a"}  # no subscription id

    await channel.send(request(3, "resources/unsubscribe", {"uri": "note://a"}))
    assert (await receive_until(channel, 3))["result"] == {}
    await channel.send(request(4, "resources/subscribe", {"uri": 5}))
    assert (await receive_until(channel, 4))["error"]["code"] == -32602


@pytest.mark.anyio
async def test_x_mcp_header_arguments_travel_as_headers_learnt_on_a_header_mismatch(
    channel: ModernTargetChannel,
) -> None:
    await open_conversation(channel)
    # No tools/list yet: the target answers HeaderMismatch, the channel reads tools/list and retries.
    await channel.send(call(1, "where", {"region": "eu-west"}))
    assert (await receive_until(channel, 1))["result"]["content"][0]["text"] == "region eu-west"
    await channel.send(call(2, "where", {"region": "Zürich"}))
    assert (await receive_until(channel, 2))["result"]["content"][0]["text"] == "region Zürich"


@pytest.mark.anyio
async def test_local_answers_http_errors_and_closing(channel: ModernTargetChannel) -> None:
    await open_conversation(channel)
    await channel.send(request(1, "logging/setLevel", {"level": "debug"}))
    assert (await receive_until(channel, 1))["result"] == {}
    await channel.send(request(2, "no/such/method"))
    missing = await receive_until(channel, 2)
    assert missing["error"]["code"] == -32601  # the target's 404 body, under the federation's id
    await channel.aclose()
    with pytest.raises(TargetClosed):
        await channel.receive()
    with pytest.raises(TargetClosed):
        await channel.send(request(3, "ping"))


@pytest.mark.anyio
async def test_an_unreachable_target_fails_the_send() -> None:
    channel = ModernTargetChannel(target(free_port()), BACKEND, response_timeout=2)
    try:
        with pytest.raises(TargetUnavailable, match="modern"):
            await channel.send(request(1, "tools/list"))
    finally:
        await channel.aclose()


@pytest.mark.anyio
async def test_an_http_error_status_is_a_json_rpc_error_for_that_request() -> None:
    async with serve(FaultyPeer()) as port:
        channel = ModernTargetChannel(target(port, "/error"), BACKEND, response_timeout=5)
        try:
            await channel.send(call(9, "add", {}))
            answer = await receive_until(channel, 9)
            assert answer["error"]["code"] == -32603
            assert "503" in answer["error"]["message"]
        finally:
            await channel.aclose()
