"""The federation core's timeout and retry bookkeeping, sans-I/O: the test is the shell (its clock and
its failed sends are calls to ``expire``, ``attempt_timed_out`` and ``retry_attempt``)."""

from __future__ import annotations

from typing import Any

from dataplane.config.policy import ResilienceSettings, RetrySettings
from dataplane.mcp.federation import (
    REQUEST_TIMEOUT,
    Action,
    FailureMode,
    FederationConfig,
    McpFederation,
    SendToClient,
    SendToTarget,
)
from dataplane.mcp.naming import Naming, PrefixMode

JSON = dict[str, Any]
RETRY_5XX = RetrySettings(attempts=2, backoff_base=0.1, backoff_max=1.0, on=frozenset({"5xx"}))


def make(targets: tuple[str, ...] = ("a", "b"), failure: FailureMode = FailureMode.FAIL_CLOSED) -> McpFederation:
    config = FederationConfig(Naming(targets, PrefixMode.ALWAYS), failure_mode=failure)
    return McpFederation(config, catalogs={}, rand=lambda: 0.5)


def policy(retry: RetrySettings | None = RETRY_5XX, per_try: float | None = None) -> ResilienceSettings:
    return ResilienceSettings("default/p", request_timeout=10.0, per_try_timeout=per_try, retry=retry)


def to_targets(actions: list[Action]) -> list[SendToTarget]:
    return [a for a in actions if isinstance(a, SendToTarget)]


def to_client(actions: list[Action]) -> list[JSON]:
    return [a.message for a in actions if isinstance(a, SendToClient)]


def call(fed: McpFederation, request_id: int, name: str, resilience: ResilienceSettings | None) -> SendToTarget:
    """A tools/call routed to target a (its catalog known, so nothing is walked first)."""
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": f"a__{name}"}}
    (sent,) = to_targets(fed.receive_from_client(message, resilience))
    return sent


def known_tools(fed: McpFederation, tools: list[JSON]) -> None:
    """The client walked tools/list once: the core learnt target a's catalog and its annotations."""
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": "list", "method": "tools/list"})
    for sent in to_targets(actions):
        page = tools if sent.target == "a" else []
        fed.receive_from_target(sent.target, {"jsonrpc": "2.0", "id": sent.message["id"], "result": {"tools": page}})


def test_expire_answers_minus_32001_cancels_upstream_and_drops_the_late_answer() -> None:
    fed = make()
    known_tools(fed, [{"name": "slow"}])
    sent = call(fed, 7, "slow", None)
    actions = fed.expire(7)
    assert to_client(actions) == [
        {"jsonrpc": "2.0", "id": 7, "error": {"code": REQUEST_TIMEOUT, "message": "Request timed out"}}
    ]
    (cancel,) = to_targets(actions)
    assert cancel.target == "a" and cancel.message["method"] == "notifications/cancelled"
    assert cancel.message["params"]["requestId"] == sent.message["id"]
    assert fed.receive_from_target("a", {"jsonrpc": "2.0", "id": sent.message["id"], "result": {}}) == []
    assert fed.expire(7) == [] and fed.in_flight == 0


def test_expire_of_a_fan_out_cancels_every_pending_target_but_not_the_answered_one() -> None:
    fed = make()
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    by_target = {s.target: s.message["id"] for s in to_targets(actions)}
    assert fed.receive_from_target("a", {"jsonrpc": "2.0", "id": by_target["a"], "result": {"tools": []}}) == []
    expired = fed.expire(1)
    assert [m["error"]["code"] for m in to_client(expired)] == [REQUEST_TIMEOUT]
    assert [(s.target, s.message["params"]["requestId"]) for s in to_targets(expired)] == [("b", by_target["b"])]


def test_expire_of_a_call_parked_on_a_catalog_walk_answers_it() -> None:
    fed = make()
    message = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "a__x"}}
    (walk,) = to_targets(fed.receive_from_client(message))
    assert walk.message["method"] == "tools/list"
    assert [m["error"]["code"] for m in to_client(fed.expire(3))] == [REQUEST_TIMEOUT]
    # The walk still completes (its catalog is worth keeping) and releases nothing.
    assert fed.receive_from_target("a", {"jsonrpc": "2.0", "id": walk.message["id"], "result": {"tools": []}}) == []


def test_a_5xx_list_is_retried_under_a_fresh_id_with_jittered_backoff() -> None:
    fed = make()
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, policy())
    first = {s.target: s for s in to_targets(actions)}["a"]
    retry = fed.retry_attempt("a", first.message["id"], 503)
    assert retry is not None and retry.target == "a"
    assert retry.message["id"] != first.message["id"] and retry.message["method"] == "tools/list"
    assert retry.delay == 0.05  # rand 0.5 of the first ceiling, backoff_base 0.1
    assert not fed.is_pending("a", first.message["id"]) and fed.is_pending("a", retry.message["id"])
    # An answer to the abandoned attempt is dropped; the retry's answer counts.
    assert fed.receive_from_target("a", {"jsonrpc": "2.0", "id": first.message["id"], "result": {"tools": []}}) == []
    tool = {"name": "t"}
    fed.receive_from_target("a", {"jsonrpc": "2.0", "id": retry.message["id"], "result": {"tools": [tool]}})
    b_id = {s.target: s for s in to_targets(actions)}["b"].message["id"]
    (answer,) = to_client(fed.receive_from_target("b", {"jsonrpc": "2.0", "id": b_id, "result": {"tools": []}}))
    assert answer["result"]["tools"] == [{"name": "a__t"}]


def test_retries_stop_after_the_attempts_and_only_for_the_configured_conditions() -> None:
    fed = make()
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "prompts/list"}, policy())
    up_id = {s.target: s for s in to_targets(actions)}["a"].message["id"]
    assert fed.retry_attempt("a", up_id, "connect-failure") is not None  # as in Envoy, 5xx covers it too
    fed2 = make()
    actions = fed2.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "prompts/list"}, policy())
    up_id = {s.target: s for s in to_targets(actions)}["a"].message["id"]
    for _ in range(2):
        retry = fed2.retry_attempt("a", up_id, 502)
        assert retry is not None
        up_id = retry.message["id"]
    assert fed2.retry_attempt("a", up_id, 502) is None  # two retries were allowed
    only_reset = RetrySettings(attempts=3, on=frozenset({"reset"}))
    fed3 = make()
    actions = fed3.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "prompts/list"}, policy(only_reset))
    up_id = {s.target: s for s in to_targets(actions)}["a"].message["id"]
    assert fed3.retry_attempt("a", up_id, 503) is None
    assert fed3.retry_attempt("a", up_id, "connect-failure") is None
    assert fed3.retry_attempt("a", up_id, "reset") is not None


def test_no_policy_no_retry() -> None:
    fed = make()
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    up_id = to_targets(actions)[0].message["id"]
    assert to_targets(actions)[0].try_timeout is None
    assert fed.retry_attempt(to_targets(actions)[0].target, up_id, 503) is None


def test_tools_call_is_retried_only_when_allowed_or_hinted_idempotent() -> None:
    fed = make()
    known_tools(
        fed,
        [
            {"name": "write"},
            {"name": "look", "annotations": {"readOnlyHint": True}},
            {"name": "put", "annotations": {"idempotentHint": True, "readOnlyHint": False}},
        ],
    )
    write = call(fed, 1, "write", policy())
    assert fed.retry_attempt("a", write.message["id"], 503) is None
    look = call(fed, 2, "look", policy())
    assert fed.retry_attempt("a", look.message["id"], 503) is not None
    put = call(fed, 3, "put", policy())
    assert fed.retry_attempt("a", put.message["id"], "connect-failure") is not None
    allowed = RetrySettings(attempts=1, on=frozenset({"5xx"}), retry_non_idempotent_mcp=True)
    again = call(fed, 4, "write", policy(allowed))
    retry = fed.retry_attempt("a", again.message["id"], 500)
    assert retry is not None and retry.message["params"]["name"] == "write"
    # A list_changed forgets the hints with the catalog.
    fed.receive_from_target("a", {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    known_tools(fed, [{"name": "look"}])
    assert fed.retry_attempt("a", call(fed, 5, "look", policy()).message["id"], 503) is None


def test_a_per_try_timeout_cancels_the_attempt_then_retries_it() -> None:
    fed = make()
    retry = RetrySettings(attempts=1, on=frozenset({"reset"}))
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, policy(retry, per_try=2.0))
    first = {s.target: s for s in to_targets(actions)}["a"]
    assert first.try_timeout == 2.0
    cancel, again = fed.attempt_timed_out("a", first.message["id"])
    assert cancel.message == {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": first.message["id"], "reason": "the attempt timed out at the gateway"},
    }
    assert isinstance(again, SendToTarget) and again.try_timeout == 2.0 and again.message["id"] != first.message["id"]
    # The retry's own timeout: no retries left, so target a's part fails with -32001 (FAIL_CLOSED: the request).
    out = fed.attempt_timed_out("a", again.message["id"])
    assert [s.message["params"]["requestId"] for s in to_targets(out)] == [again.message["id"]]
    assert to_client(out) == []  # b is still pending
    b_id = {s.target: s for s in to_targets(actions)}["b"].message["id"]
    (failure,) = to_client(fed.receive_from_target("b", {"jsonrpc": "2.0", "id": b_id, "result": {"tools": []}}))
    assert failure["error"]["data"]["targets"]["a"]["code"] == REQUEST_TIMEOUT
    # A timer that fires after the answer does nothing.
    assert fed.attempt_timed_out("b", b_id) == []


def test_a_per_try_timeout_under_fail_open_skips_only_that_target() -> None:
    fed = make(failure=FailureMode.FAIL_OPEN)
    actions = fed.receive_from_client({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, policy(None, per_try=1.0))
    ids = {s.target: s.message["id"] for s in to_targets(actions)}
    assert to_client(fed.attempt_timed_out("a", ids["a"])) == []
    (answer,) = to_client(fed.receive_from_target("b", {"jsonrpc": "2.0", "id": ids["b"], "result": {"tools": []}}))
    assert answer["result"] == {"tools": []}
