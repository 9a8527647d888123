"""dataplane.a2a.errors: each error's codes, and that a2a-sdk's own client parsers read our bodies as the
errors we mean (its REST error parser and its JSON-RPC code table)."""

from __future__ import annotations

import json

import pytest
from a2a.client.transports import jsonrpc as sdk_jsonrpc
from a2a.client.transports.rest import _parse_rest_error
from a2a.utils import errors as sdk_errors

from dataplane.a2a.errors import (
    A2aAgentTimeout,
    A2aError,
    A2aInvalidAgentCard,
    A2aInvalidParams,
    A2aInvalidRequest,
    A2aMethodNotAllowed,
    A2aMethodNotFound,
    A2aParseError,
    A2aVersionNotSupported,
    agent_timeout,
    agent_unavailable,
    payload_too_large,
    policy_denied,
)

CASES: list[tuple[A2aError, int, int, int]] = [  # error, JSON-RPC code, HTTP status, HTTP status on JSON-RPC
    (A2aParseError("Parse error"), -32700, 400, 200),
    (A2aInvalidRequest("Invalid Request"), -32600, 400, 200),
    (A2aMethodNotFound("Method not found: x"), -32601, 404, 200),
    (A2aMethodNotAllowed("Method not allowed", allow=("GET",)), -32601, 405, 200),
    (A2aInvalidParams("Invalid params"), -32602, 400, 200),
    (A2aVersionNotSupported("bad version"), -32009, 400, 200),
    (payload_too_large(1024, 5), -32600, 413, 413),
    (policy_denied(5), -32011, 403, 403),
    (agent_unavailable("planner", 5), -32603, 502, 502),
    (agent_timeout("planner", 5), -32603, 504, 504),
    (A2aInvalidAgentCard("card is not JSON"), -32006, 502, 502),
]


@pytest.mark.parametrize(("error", "code", "status", "jsonrpc_status"), CASES)
def test_codes_and_bodies(error: A2aError, code: int, status: int, jsonrpc_status: int) -> None:
    assert (error.jsonrpc_code, error.http_status, error.jsonrpc_http_status) == (code, status, jsonrpc_status)
    assert error.http_status_for("rest") == status and error.http_status_for("jsonrpc") == jsonrpc_status
    response = json.loads(error.body("jsonrpc"))
    assert response["jsonrpc"] == "2.0" and response["id"] == error.request_id
    assert response["error"]["code"] == code and response["error"]["message"] == error.message
    problem = json.loads(error.body("rest"))["error"]
    assert problem["code"] == status and problem["message"] == error.message
    assert problem["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    event = error.sse_event("jsonrpc")
    assert event.startswith(b"event: error\ndata: {") and event.endswith(b"}\n\n") and event.count(b"\n") == 3


@pytest.mark.parametrize(
    ("error", "sdk_type"),
    [
        (A2aMethodNotFound("Method not found: x"), sdk_errors.MethodNotFoundError),
        (A2aInvalidParams("Invalid params"), sdk_errors.InvalidParamsError),
        (A2aVersionNotSupported("bad version"), sdk_errors.VersionNotSupportedError),
        (A2aInvalidAgentCard("bad card"), sdk_errors.InvalidAgentResponseError),
    ],
)
def test_the_sdk_client_reads_a2a_errors_as_the_matching_a2a_error(error: A2aError, sdk_type: type) -> None:
    parsed = _parse_rest_error(error.rest_object(), "fallback")
    assert type(parsed) is sdk_type and str(parsed) == error.message
    assert sdk_jsonrpc._JSON_RPC_ERROR_CODE_TO_A2A_ERROR[error.jsonrpc_code] is sdk_type


@pytest.mark.parametrize("error", [policy_denied(), agent_unavailable("x"), payload_too_large(10)])
def test_gateway_conditions_are_not_mistaken_for_agent_errors(error: A2aError) -> None:
    """Reasons in the gateway's own domain map to no A2A error, so the SDK reports them as transport errors."""
    assert json.loads(error.rest_body())["error"]["details"][0]["domain"] == "agentgate.dev"
    assert _parse_rest_error(error.rest_object(), "fallback") is None


def test_policy_denial_code_is_no_a2a_error_code() -> None:
    """-32003 would read as PushNotificationNotSupported; -32011 is no A2A error (and the MCP endpoint's)."""
    assert policy_denied().jsonrpc_code not in sdk_jsonrpc._JSON_RPC_ERROR_CODE_TO_A2A_ERROR


def test_messages_and_metadata() -> None:
    assert policy_denied().message == "Forbidden: denied by the gateway's authorization policy"
    down = agent_unavailable("planner", "r1", detail="connection refused")
    assert down.message == "Agent 'planner' is unavailable: connection refused" and down.request_id == "r1"
    assert json.loads(down.rest_body())["error"]["details"][0]["metadata"] == {"agent": "planner"}
    assert A2aAgentTimeout("slow").status == "DEADLINE_EXCEEDED"
    assert payload_too_large(1024).metadata == {"limit": "1024"}
