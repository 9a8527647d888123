"""JSON-RPC 2.0 framing as MCP uses it: every error class, hostile input, and the error builders."""

from __future__ import annotations

import json

import pytest

from dataplane.mcp import jsonrpc
from dataplane.mcp.jsonrpc import (
    ErrorCode,
    ErrorResponse,
    InvalidMessage,
    Notification,
    Request,
    Response,
    parse_message,
)

VALID = [
    ('{"jsonrpc":"2.0","id":1,"method":"tools/list"}', Request, 1),
    ('{"jsonrpc":"2.0","id":"a-1","method":"tools/call","params":{"name":"x"}}', Request, "a-1"),
    ('{"jsonrpc":"2.0","id":0,"method":"m","params":[1,2]}', Request, 0),
    ('{"jsonrpc":"2.0","id":-9223372036854775808,"method":"m"}', Request, -(2**63)),
    ('{"jsonrpc":"2.0","method":"notifications/initialized"}', Notification, None),
    ('{"jsonrpc":"2.0","method":"n","params":{}}', Notification, None),
    ('{"jsonrpc":"2.0","id":7,"result":{}}', Response, 7),
    ('{"jsonrpc":"2.0","id":7,"result":null}', Response, 7),
    ('{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"nope"}}', ErrorResponse, 7),
    ('{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}', ErrorResponse, None),
    # Extra members are tolerated (JSON-RPC does not forbid them).
    ('{"jsonrpc":"2.0","id":1,"method":"m","x-extra":true}', Request, 1),
    # Whitespace around the object is fine.
    (' \n{"jsonrpc":"2.0","id":1,"method":"m"}\r\n ', Request, 1),
]


@pytest.mark.parametrize(("body", "kind", "expected_id"), VALID)
def test_valid_messages_are_typed(body: str, kind: type, expected_id: object) -> None:
    for form in (body, body.encode()):
        message = parse_message(form)
        assert type(message) is kind
        assert getattr(message, "id", None) == expected_id


def test_request_fields_and_raw_object() -> None:
    message = parse_message(b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo"}}')
    assert isinstance(message, Request)
    assert message.method == "tools/call"
    assert message.params == {"name": "echo"}
    assert message.raw["params"]["name"] == "echo"


def test_error_response_keeps_data_presence() -> None:
    with_data = parse_message(b'{"jsonrpc":"2.0","id":1,"error":{"code":5,"message":"m","data":null}}')
    without = parse_message(b'{"jsonrpc":"2.0","id":1,"error":{"code":5,"message":"m"}}')
    assert isinstance(with_data, ErrorResponse) and isinstance(without, ErrorResponse)
    assert with_data.error.to_json() == {"code": 5, "message": "m", "data": None}
    assert without.error.to_json() == {"code": 5, "message": "m"}


PARSE_ERRORS = [
    (b"", "empty body"),
    (b"{", "truncated"),
    (b"{'jsonrpc':'2.0'}", "single quotes"),
    (b'{"jsonrpc":"2.0","id":1,"method":"m"} {}', "two values"),
    (b'{"jsonrpc":"2.0","id":1,"method":"m",}', "trailing comma"),
    (b"\xff\xfe{}", "invalid UTF-8"),
    (b'{"method":"\xc3\x28"}', "invalid UTF-8 inside a string"),
    (b'{"a":"\xed\xa0\x80"}', "UTF-8 encoded surrogate"),
    ("\ufeff{}".encode(), "byte-order mark"),
    ('{"a":1}'.encode("utf-16"), "UTF-16 body"),
    (b'{"a":"line\nbreak"}', "raw control character in a string"),
    (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"m"}', "duplicate key at top level"),
    (b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"name":"a","name":"b"}}', "duplicate key nested"),
    (b'{"x":NaN}', "NaN literal"),
    (b'{"x":-Infinity}', "Infinity literal"),
    (b'{"x":1e400}', "float overflow"),
    (b'{"x":' + b"9" * 5000 + b"}", "integer longer than the digit limit"),
    (b"[" * 100_000 + b"]" * 100_000, "nesting past the interpreter limit"),
    (b"[" * 129 + b"]" * 129, "nesting past max_depth"),
    (b'{"a":' * 200 + b"1" + b"}" * 200, "deep objects"),
]


@pytest.mark.parametrize(("body", "why"), PARSE_ERRORS, ids=[why for _, why in PARSE_ERRORS])
def test_parse_errors_are_32700_with_null_id(body: bytes, why: str) -> None:
    message = parse_message(body)
    assert isinstance(message, InvalidMessage), why
    assert message.code == ErrorCode.PARSE_ERROR
    assert message.id is None
    response = message.to_response()
    assert response == {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": message.message}}


def test_depth_limit_is_exact_and_configurable() -> None:
    at_limit = parse_message(b"[" * 128 + b"]" * 128)
    # Parsed (128 levels are allowed), then refused only because an array is not a message.
    assert isinstance(at_limit, InvalidMessage) and at_limit.code == ErrorCode.INVALID_REQUEST
    nested = b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"a":' + b"[" * 8 + b"]" * 8 + b"}}"
    assert isinstance(parse_message(nested, max_depth=10), Request)
    rejected = parse_message(nested, max_depth=9)
    assert isinstance(rejected, InvalidMessage) and rejected.code == ErrorCode.PARSE_ERROR


def test_many_shallow_brackets_are_not_mistaken_for_depth() -> None:
    items = ",".join(["{}"] * 1000)
    body = '{"jsonrpc":"2.0","id":1,"method":"m","params":{"items":[' + items + "]}}"
    assert isinstance(parse_message(body), Request)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"s": "[" * 1000}})
    assert isinstance(parse_message(body), Request)


def test_big_but_in_range_numbers_parse() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"big":' + b"9" * 4000 + b',"f":1.5e308}}'
    message = parse_message(body)
    assert isinstance(message, Request)
    assert message.params["f"] == 1.5e308  # type: ignore[index]


INVALID_REQUESTS = [
    ("[]", None, "empty batch"),
    ('[{"jsonrpc":"2.0","id":1,"method":"m"}]', None, "batch of one"),
    ("1", None, "number"),
    ('"str"', None, "string"),
    ("null", None, "null"),
    ('{"id":1,"method":"m"}', 1, "missing jsonrpc"),
    ('{"jsonrpc":"1.0","id":1,"method":"m"}', 1, "wrong jsonrpc"),
    ('{"jsonrpc":2.0,"id":1,"method":"m"}', 1, "jsonrpc not a string"),
    ('{"jsonrpc":"2.0","id":1,"method":5}', 1, "method not a string"),
    ('{"jsonrpc":"2.0","id":1,"method":null}', 1, "method null"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":"x"}', 1, "params a string"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":3}', 1, "params a number"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":null}', 1, "params null"),
    ('{"jsonrpc":"2.0","id":null,"method":"m"}', None, "null id (MCP)"),
    ('{"jsonrpc":"2.0","id":1.5,"method":"m"}', None, "fractional id"),
    ('{"jsonrpc":"2.0","id":1.0,"method":"m"}', None, "float id"),
    ('{"jsonrpc":"2.0","id":true,"method":"m"}', None, "boolean id"),
    ('{"jsonrpc":"2.0","id":{},"method":"m"}', None, "object id"),
    ('{"jsonrpc":"2.0","id":[1],"method":"m"}', None, "array id"),
    ('{"jsonrpc":"2.0","id":9223372036854775808,"method":"m"}', None, "id above int64"),
    ('{"jsonrpc":"2.0","id":1,"method":"m","result":{}}', 1, "request with result"),
    ('{"jsonrpc":"2.0","id":1}', 1, "neither method nor result"),
    ('{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}', 1, "result and error"),
    ('{"jsonrpc":"2.0","result":{}}', None, "response without id"),
    ('{"jsonrpc":"2.0","id":null,"result":{}}', None, "result with null id"),
    ('{"jsonrpc":"2.0","id":1,"error":"bad"}', 1, "error not an object"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":"1","message":"m"}}', 1, "error code a string"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":1.5,"message":"m"}}', 1, "error code fractional"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":true,"message":"m"}}', 1, "error code boolean"),
    ('{"jsonrpc":"2.0","id":1,"error":{"code":1}}', 1, "error without message"),
    ('{"jsonrpc":"2.0","id":false,"error":{"code":1,"message":"m"}}', None, "error with boolean id"),
]


@pytest.mark.parametrize(("body", "echo_id", "why"), INVALID_REQUESTS, ids=[why for *_, why in INVALID_REQUESTS])
def test_invalid_requests_are_32600_echoing_readable_ids(body: str, echo_id: object, why: str) -> None:
    message = parse_message(body)
    assert isinstance(message, InvalidMessage), why
    assert message.code == ErrorCode.INVALID_REQUEST
    assert message.id == echo_id
    assert message.to_response()["error"]["code"] == -32600


def test_batches_are_named_in_the_error() -> None:
    message = parse_message(b'[{"jsonrpc":"2.0","id":1,"method":"m"}]')
    assert isinstance(message, InvalidMessage)
    assert "batch" in message.message


def test_error_builders() -> None:
    assert jsonrpc.method_not_found(4, "x/y") == {
        "jsonrpc": "2.0",
        "id": 4,
        "error": {"code": -32601, "message": "Method not found: x/y"},
    }
    assert jsonrpc.invalid_params("a", "unknown tool")["error"]["code"] == -32602
    assert jsonrpc.internal_error(None) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32603, "message": "Internal error"},
    }
    assert jsonrpc.header_mismatch(1, "Mcp-Name")["error"]["code"] == -32020
    unsupported = jsonrpc.unsupported_protocol_version(2, "1999-01-01", ("2025-11-25", "2026-07-28"))
    assert unsupported["error"]["code"] == -32022
    assert unsupported["error"]["data"] == {"supported": ["2025-11-25", "2026-07-28"], "requested": "1999-01-01"}
    missing = jsonrpc.missing_required_client_capability(3, {"sampling": {}})
    assert missing["error"] == {
        "code": -32021,
        "message": "Missing required client capability",
        "data": {"requiredCapabilities": {"sampling": {}}},
    }
    assert jsonrpc.error_object(1, "m", None, with_data=True) == {"code": 1, "message": "m", "data": None}


def test_codes_match_the_specs() -> None:
    assert [c.value for c in ErrorCode][:5] == [-32700, -32600, -32601, -32602, -32603]
    assert ErrorCode.HEADER_MISMATCH == -32020
    assert ErrorCode.MISSING_REQUIRED_CLIENT_CAPABILITY == -32021
    assert ErrorCode.UNSUPPORTED_PROTOCOL_VERSION == -32022


@pytest.mark.parametrize(
    "message",
    [
        jsonrpc.request(1, "tools/call", {"name": "héllo", "arguments": {"n": 1.25}}),
        jsonrpc.notification("notifications/progress", {"progress": 1}),
        jsonrpc.result_response("x", {"content": []}),
        jsonrpc.error_response(None, -32700, "Parse error"),
    ],
)
def test_encode_round_trips_through_the_parser(message: dict[str, object]) -> None:
    encoded = jsonrpc.encode(message)
    assert b" " not in encoded.replace(b"Parse error", b"")
    parsed = parse_message(encoded)
    assert not isinstance(parsed, InvalidMessage)
    assert parsed.raw == message


def test_encode_survives_lone_surrogates_from_json_escapes() -> None:
    parsed = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"s":"\\ud800"}}')
    assert isinstance(parsed, Request)
    encoded = jsonrpc.encode(parsed.raw)
    assert encoded.isascii() and b"\\ud800" in encoded
    assert parse_message(encoded) == parsed


def test_encode_rejects_nan() -> None:
    with pytest.raises(ValueError):
        jsonrpc.encode({"x": float("nan")})


def test_top_level_string_full_of_brackets_is_not_deep() -> None:
    message = parse_message(json.dumps("[{" * 500))
    assert isinstance(message, InvalidMessage) and message.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_bodies(wrap: type) -> None:
    message = parse_message(wrap(b'{"jsonrpc":"2.0","id":1,"method":"m"}'))
    assert isinstance(message, Request) and message.id == 1
