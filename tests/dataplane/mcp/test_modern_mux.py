"""The sessionless multiplexer and the input-required bridge, without sockets (shared_upstream.UpstreamMux)."""

from __future__ import annotations

from typing import Any

import pytest

from dataplane.mcp.federation import Kind
from dataplane.mcp.jsonrpc import Request, classify
from dataplane.mcp.modern import ExpiringCatalogs, _check_request, _Refusal, complete_result
from dataplane.mcp.session import SessionKeyring
from dataplane.mcp.shared_upstream import (
    NOT_HELD,
    Broadcast,
    MuxAction,
    RequestStateCodec,
    ToLease,
    ToUpstream,
    UpstreamMux,
    strip_envelope,
)

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def codec(backend: str = "default/mcp", key: bytes = b"k" * 32) -> RequestStateCodec:
    return RequestStateCodec(SessionKeyring([("k1", key)]), backend)


def make_mux(clock: Clock | None = None, worker: str = "w1") -> UpstreamMux:
    mux = UpstreamMux("local", codec(), worker=worker, clock=clock or Clock(), input_ttl=30.0)
    mux.initialize_result = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "stdio", "version": "1"},
        "instructions": "Be nice.",
    }
    return mux


def call(local_id: int, name: str = "ask", arguments: Any = None, token: Any = None, **extra: Any) -> dict[str, Any]:
    meta = dict(META)
    if token is not None:
        meta["progressToken"] = token
    params = {"name": name, "arguments": arguments or {"q": "x"}, "_meta": meta, **extra}
    return {"jsonrpc": "2.0", "id": local_id, "method": "tools/call", "params": params}


def only(actions: list[MuxAction], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def test_ids_and_progress_tokens_are_rewritten_so_answers_reach_their_lease() -> None:
    mux = make_mux()
    a, b = mux.open_lease({}), mux.open_lease({})
    # Both leases use the same local ids (each federation counts from 1).
    [to_a] = mux.from_lease(a, call(1, "echo", token=1))
    [to_b] = mux.from_lease(b, call(1, "echo", token=1))
    assert isinstance(to_a, ToUpstream) and isinstance(to_b, ToUpstream)
    up_a, up_b = to_a.message, to_b.message
    assert up_a["id"] != up_b["id"]
    token_a = up_a["params"]["_meta"]["progressToken"]
    assert token_a != up_b["params"]["_meta"]["progressToken"]
    # The 2026-07-28 envelope never reaches a session-era target.
    assert set(up_a["params"]["_meta"]) == {"progressToken"}
    progress = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": token_a, "progress": 1},
    }
    assert mux.from_upstream(progress) == [
        ToLease(
            a, {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
        )
    ]
    answer = {"jsonrpc": "2.0", "id": up_b["id"], "result": {"content": []}}
    assert mux.from_upstream(answer) == [ToLease(b, {"jsonrpc": "2.0", "id": 1, "result": {"content": []}})]
    assert mux.from_upstream(answer) == []  # answered once
    assert mux.in_flight == 1


def test_discover_ping_and_unattributable_messages() -> None:
    mux = make_mux()
    lease = mux.open_lease({})
    discover = {"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {"_meta": META}}
    [answer] = mux.from_lease(lease, discover)
    assert isinstance(answer, ToLease)
    result = answer.message["result"]
    assert result["supportedVersions"] == ["2026-07-28"] and result["capabilities"] == {"tools": {"listChanged": True}}
    assert result["instructions"] == "Be nice." and result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"]
    # The target's ping is answered by the gateway.
    assert mux.from_upstream({"jsonrpc": "2.0", "id": "p", "method": "ping"}) == [
        ToUpstream({"jsonrpc": "2.0", "id": "p", "result": {}})
    ]
    # An elicitation when no client waits: refused upstream.
    [refused] = mux.from_upstream({"jsonrpc": "2.0", "id": 3, "method": "elicitation/create", "params": {}})
    assert isinstance(refused, ToUpstream) and refused.message["error"]["code"] == -32603
    changed = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    assert mux.from_upstream(changed) == [Broadcast({**changed, "params": {}})]
    assert mux.from_upstream({"jsonrpc": "2.0", "id": 99, "result": {}}) == []  # nobody asked


def test_cancel_and_closing_a_lease_cancel_upstream() -> None:
    mux = make_mux()
    lease = mux.open_lease({})
    [sent] = mux.from_lease(lease, call(1, "slow"))
    up_id = sent.message["id"]  # type: ignore[union-attr]
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1, "reason": "bye"}}
    [forwarded] = mux.from_lease(lease, cancel)
    assert forwarded == ToUpstream(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": up_id, "reason": "bye"}}
    )
    mux.from_lease(lease, call(2, "slow"))
    [closing] = mux.close_lease(lease)
    assert isinstance(closing, ToUpstream) and closing.message["method"] == "notifications/cancelled"
    assert mux.in_flight == 0


def test_an_elicitation_becomes_input_required_and_the_retry_continues_the_call() -> None:
    mux = make_mux()
    first = mux.open_lease({"elicitation": {}})
    [sent] = mux.from_lease(first, call(1, token="t1"))
    up = sent.message  # type: ignore[union-attr]
    ask = {"jsonrpc": "2.0", "id": 5, "method": "elicitation/create", "params": {"message": "colour?"}}
    [answer] = mux.from_upstream(ask)
    assert isinstance(answer, ToLease) and answer.lease == first
    result = answer.message["result"]
    assert answer.message["id"] == 1 and result["resultType"] == "input_required"
    [(key, request)] = result["inputRequests"].items()
    assert request == {"method": "elicitation/create", "params": {"message": "colour?"}}
    state = result["requestState"]
    assert mux.parked == 1
    # The first request is over; closing its lease must not cancel the parked call.
    assert mux.close_lease(first) == []
    # Progress while parked has nowhere to go.
    token = up["params"]["_meta"]["progressToken"]
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": token, "progress": 1}}
    assert mux.from_upstream(progress) == []
    # The retry: a new request (new id, new token) carrying the state and the answers.
    second = mux.open_lease({"elicitation": {}})
    retry = call(9, token="t2", requestState=state, inputResponses={key: {"action": "accept", "content": {"c": 1}}})
    [reply] = mux.from_lease(second, retry)
    assert reply == ToUpstream({"jsonrpc": "2.0", "id": 5, "result": {"action": "accept", "content": {"c": 1}}})
    assert mux.parked == 0
    assert mux.from_upstream(progress) == [
        ToLease(
            second,
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t2", "progress": 1}},
        )
    ]
    final = {"jsonrpc": "2.0", "id": up["id"], "result": {"content": [{"type": "text", "text": "ok"}]}}
    assert mux.from_upstream(final) == [ToLease(second, {**final, "id": 9})]
    # A replayed state finds nothing.
    [replayed] = mux.from_lease(second, {**retry, "id": 10})
    assert replayed.message["error"] == {"code": -32602, "message": NOT_HELD}  # type: ignore[union-attr]


def test_questions_asked_while_parked_and_answers_that_came_early() -> None:
    mux = make_mux()
    lease = mux.open_lease({"elicitation": {}, "sampling": {}})
    [sent] = mux.from_lease(lease, call(1))
    up_id = sent.message["id"]  # type: ignore[union-attr]
    [first] = mux.from_upstream({"jsonrpc": "2.0", "id": "a", "method": "elicitation/create", "params": {}})
    state = first.message["result"]["requestState"]  # type: ignore[union-attr]
    # A second question arrives while the client is away: it rides the next round.
    sample = {"jsonrpc": "2.0", "id": "b", "method": "sampling/createMessage", "params": {"maxTokens": 5}}
    assert mux.from_upstream(sample) == []
    retry_lease = mux.open_lease({"elicitation": {}, "sampling": {}})
    keys = list(first.message["result"]["inputRequests"])  # type: ignore[union-attr]
    actions = mux.from_lease(retry_lease, call(2, requestState=state, inputResponses={keys[0]: {"action": "decline"}}))
    assert only(actions, ToUpstream)[0].message == {"jsonrpc": "2.0", "id": "a", "result": {"action": "decline"}}
    [again] = only(actions, ToLease)
    assert list(again.message["result"]["inputRequests"].values()) == [
        {"method": "sampling/createMessage", "params": {"maxTokens": 5}}
    ]
    # The target finishes while parked: the next retry gets the answer at once.
    mux.from_upstream({"jsonrpc": "2.0", "id": up_id, "result": {"content": []}})
    state = again.message["result"]["requestState"]
    last = mux.open_lease({})
    [done] = mux.from_lease(last, call(3, requestState=state, inputResponses={}))
    assert done == ToLease(last, {"jsonrpc": "2.0", "id": 3, "result": {"content": []}})


def test_a_roots_request_is_refused_to_the_target_and_never_touches_a_call() -> None:
    mux = make_mux()
    lease = mux.open_lease({})
    mux.from_lease(lease, call(1))
    [refusal] = mux.from_upstream({"jsonrpc": "2.0", "id": "r", "method": "roots/list"})
    assert refusal == ToUpstream(
        {"jsonrpc": "2.0", "id": "r", "error": {"code": -32601, "message": "Method not found: roots/list"}}
    )


def test_a_missing_client_capability_fails_the_call_with_minus_32021() -> None:
    mux = make_mux()
    lease = mux.open_lease({})
    [sent] = mux.from_lease(lease, call(1))
    actions = mux.from_upstream({"jsonrpc": "2.0", "id": 4, "method": "sampling/createMessage", "params": {}})
    [refusal] = only(actions, ToLease)
    assert refusal.message["error"]["code"] == -32021
    assert refusal.message["error"]["data"] == {"requiredCapabilities": {"sampling": {}}}
    upstream = [a.message for a in only(actions, ToUpstream)]
    assert upstream[0]["id"] == 4 and "error" in upstream[0]
    assert upstream[1]["method"] == "notifications/cancelled"
    assert upstream[1]["params"]["requestId"] == sent.message["id"]  # type: ignore[union-attr]
    assert mux.in_flight == 0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s, p: {**p, "requestState": "s1.k1.garbage"}, "Invalid or expired requestState"),
        (lambda s, p: {**p, "requestState": s[:-2] + ("AA" if s[-2:] != "AA" else "BB")}, "Invalid or expired"),
        (lambda s, p: {**p, "arguments": {"q": "other"}}, "belongs to another request"),
        (lambda s, p: {**p, "name": "other"}, "belongs to another request"),
        (lambda s, p: {**p, "inputResponses": []}, "inputResponses must be an object"),
    ],
)
def test_states_that_do_not_match_are_refused(mutate: Any, expected: str) -> None:
    mux = make_mux()
    lease = mux.open_lease({"elicitation": {}})
    mux.from_lease(lease, call(1))
    [asked] = mux.from_upstream({"jsonrpc": "2.0", "id": 1, "method": "elicitation/create", "params": {}})
    state = asked.message["result"]["requestState"]  # type: ignore[union-attr]
    params = {**call(2)["params"], "requestState": state, "inputResponses": {}}
    [refused] = mux.from_lease(
        lease, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": mutate(state, params)}
    )
    error = refused.message["error"]  # type: ignore[union-attr]
    assert error["code"] == -32602 and expected in error["message"]
    assert mux.parked == 1  # a refused retry leaves the parked call for the right one


def test_another_worker_or_backend_or_target_does_not_hold_the_state() -> None:
    mux = make_mux(worker="w1")
    lease = mux.open_lease({"elicitation": {}})
    mux.from_lease(lease, call(1))
    [asked] = mux.from_upstream({"jsonrpc": "2.0", "id": 1, "method": "elicitation/create", "params": {}})
    state = asked.message["result"]["requestState"]  # type: ignore[union-attr]
    retry = call(2, requestState=state, inputResponses={})
    other_worker = make_mux(worker="w2")
    [refused] = other_worker.from_lease(other_worker.open_lease({}), retry)
    assert refused.message["error"]["message"] == NOT_HELD  # type: ignore[union-attr]
    other_backend = UpstreamMux("local", codec(backend="default/other"), worker="w1")
    [refused] = other_backend.from_lease(other_backend.open_lease({}), retry)
    assert refused.message["error"]["message"] == "Invalid or expired requestState"  # type: ignore[union-attr]


def test_expiry_cancels_the_parked_call_upstream() -> None:
    clock = Clock()
    mux = make_mux(clock)
    lease = mux.open_lease({"elicitation": {}})
    [sent] = mux.from_lease(lease, call(1))
    mux.from_upstream({"jsonrpc": "2.0", "id": 8, "method": "elicitation/create", "params": {}})
    assert mux.next_expiry() == 130.0
    clock.now = 129.0
    assert mux.expire() == []
    clock.now = 130.0
    actions = mux.expire()
    assert [a.message.get("id") for a in only(actions, ToUpstream)] == [8, None]
    assert actions[-1].message["params"]["requestId"] == sent.message["id"]  # type: ignore[union-attr]
    assert mux.parked == 0 and mux.in_flight == 0 and mux.next_expiry() is None


def test_a_lost_session_fails_what_waits_but_spares_a_resend() -> None:
    mux = make_mux()
    lease = mux.open_lease({"elicitation": {}})
    mux.from_lease(lease, call(3))
    mux.from_upstream({"jsonrpc": "2.0", "id": 8, "method": "elicitation/create", "params": {}})  # call 3 parks
    [a] = mux.from_lease(lease, call(1, "echo"))
    [b] = mux.from_lease(lease, call(2, "echo"))
    spared = b.message["id"]  # type: ignore[union-attr]
    actions = mux.upstream_lost("MCP target 'local' failed: gone", spare=[spared])
    failure = {"code": -32603, "message": "MCP target 'local' failed: gone"}
    assert actions == [ToLease(lease, {"jsonrpc": "2.0", "id": 1, "error": failure})]
    assert mux.has_call(spared) and not mux.has_call(a.message["id"])  # type: ignore[union-attr]
    assert mux.parked == 0


def test_strip_envelope_keeps_only_what_a_session_era_target_knows() -> None:
    params = {"name": "x", "requestState": "s", "inputResponses": {}, "_meta": {**META, "progressToken": 3}}
    assert strip_envelope(params) == {"name": "x", "_meta": {"progressToken": 3}}
    assert strip_envelope({"_meta": META}) == {}


def test_codec_round_trip_and_rejections() -> None:
    sealer = codec()
    state = sealer.seal({"p": "x"})
    assert state.startswith("s1.k1.") and all(0x21 <= ord(c) <= 0x7E for c in state)
    assert sealer.open(state) == {"p": "x"}
    assert codec(key=b"z" * 32).open(state) is None
    for bad in (None, 5, "", "s1.", "s1.k2.AAAA", "s2.k1.AAAA", state + "x", "s1.k1.@@@@", "s1.k1." + "A" * 5000):
        assert sealer.open(bad) is None


def parse(body: dict[str, Any]) -> Request:
    message = classify(body)
    assert isinstance(message, Request)
    return message


def headers(method: str, name: str | None = None, version: str = "2026-07-28") -> list[tuple[bytes, bytes]]:
    out = [(b"mcp-protocol-version", version.encode()), (b"mcp-method", method.encode())]
    if name is not None:
        out.append((b"mcp-name", name.encode()))
    return out


def test_request_validation_order_and_codes() -> None:
    listing = parse({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}})
    assert _check_request(headers("tools/list"), listing) == META
    future = {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    unknown = parse({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": future}})
    with pytest.raises(_Refusal) as refused:
        _check_request(headers("tools/list", version="2099-01-01"), unknown)
    error = refused.value.response["error"]
    assert error["code"] == -32022 and error["data"]["requested"] == "2099-01-01"
    assert error["data"]["supported"][0] == "2026-07-28" and "2025-11-25" in error["data"]["supported"]
    removed = parse({"jsonrpc": "2.0", "id": 3, "method": "initialize", "params": {"_meta": META}})
    with pytest.raises(_Refusal) as refused:
        _check_request(headers("initialize"), removed)
    assert refused.value.response["error"]["code"] == -32601
    # The envelope is checked before the headers, the headers before the method.
    with pytest.raises(_Refusal) as refused:
        _check_request([], parse({"jsonrpc": "2.0", "id": 4, "method": "nope", "params": []}))
    assert refused.value.response["error"]["code"] == -32602
    with pytest.raises(_Refusal) as refused:
        _check_request(
            headers("tools/list"), parse({"jsonrpc": "2.0", "id": 5, "method": "nope", "params": {"_meta": META}})
        )
    assert refused.value.response["error"]["code"] == -32020


def test_results_get_the_2026_fields() -> None:
    listed = complete_result("tools/list", {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}})
    assert listed["result"] == {"tools": [], "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
    called = complete_result("tools/call", {"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
    assert called["result"] == {"content": [], "resultType": "complete"}
    asking = {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": "s"}}
    assert complete_result("tools/call", asking) is asking
    kept = complete_result("resources/read", {"jsonrpc": "2.0", "id": 1, "result": {"contents": [], "ttlMs": 5}})
    assert kept["result"]["ttlMs"] == 5 and kept["result"]["cacheScope"] == "private"
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}
    assert complete_result("tools/list", error) is error


def test_catalogs_expire() -> None:
    clock = Clock()
    catalogs = ExpiringCatalogs(ttl=10, clock=clock)
    catalogs[(Kind.TOOL, "web")] = frozenset({"add"})
    assert (Kind.TOOL, "web") in catalogs and catalogs.get((Kind.TOOL, "web")) == frozenset({"add"})
    clock.now += 11
    assert (Kind.TOOL, "web") not in catalogs and catalogs.get((Kind.TOOL, "web")) is None and len(catalogs) == 0
    catalogs[(Kind.TOOL, "web")] = frozenset()
    assert catalogs.pop((Kind.TOOL, "web")) == frozenset() and catalogs.pop((Kind.TOOL, "web"), None) is None
