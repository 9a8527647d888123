"""MCP streamable-HTTP header validation per spec version: status codes, JSON-RPC codes, header/body agreement."""

from __future__ import annotations

import json

import pytest

from dataplane.mcp.headers import (
    PROTOCOL_VERSION_WHEN_ABSENT,
    SUPPORTED_PROTOCOL_VERSIONS,
    HeaderError,
    HeaderProblem,
    OriginAllowList,
    check_accept_get,
    check_accept_post,
    check_content_type,
    check_origin,
    check_protocol_version,
    check_request_metadata,
    decode_header_value,
    encode_header_value,
)
from dataplane.mcp.jsonrpc import ErrorCode, Notification, Request, parse_message

MODERN = "2026-07-28"


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        ("application/json, text/event-stream", True),
        ("text/event-stream, application/json", True),
        ("Application/JSON;charset=utf-8 , TEXT/EVENT-STREAM", True),
        ("application/json;q=0.9, text/event-stream;q=0.1", True),
        ("*/*", True),
        ("application/*, text/*", True),
        ("application/json, text/*", True),
        ("application/json", False),
        ("text/event-stream", False),
        ("application/json, text/event-stream;q=0", False),
        ("application/json, text/event-stream;q=oops", False),
        ("application/json;q=0, */*", False),  # the specific refusal beats the wildcard
        ("text/*;q=0, application/json, */*", False),
        ("application/json, text/event-stream, */*;q=0", True),
        ("text/html", False),
        ("", False),
        (None, False),
    ],
)
def test_post_accept_must_cover_json_and_sse(accept: str | None, ok: bool) -> None:
    error = check_accept_post(accept)
    if ok:
        assert error is None
    else:
        assert isinstance(error, HeaderError)
        assert (error.status, error.problem) == (406, HeaderProblem.NOT_ACCEPTABLE)


@pytest.mark.parametrize(
    ("accept", "ok"),
    [("text/event-stream", True), ("*/*", True), ("application/json", False), (None, False)],
)
def test_get_accept_must_cover_sse(accept: str | None, ok: bool) -> None:
    error = check_accept_get(accept)
    assert (error is None) is ok
    if error is not None:
        assert error.status == 406


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("Application/Json", True),
        ("application/json; charset=utf-8", True),
        ('application/json; charset="UTF-8"', True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("application/jsonx", False),
        ("", False),
        (None, False),
    ],
)
def test_content_type_is_json(content_type: str | None, ok: bool) -> None:
    error = check_content_type(content_type)
    assert (error is None) is ok
    if error is not None:
        assert (error.status, error.problem) == (415, HeaderProblem.UNSUPPORTED_MEDIA_TYPE)


@pytest.mark.parametrize("version", SUPPORTED_PROTOCOL_VERSIONS)
def test_supported_versions_are_accepted(version: str) -> None:
    assert check_protocol_version(version) == version


def test_absent_version_means_2025_03_26_unless_required() -> None:
    assert check_protocol_version(None) == PROTOCOL_VERSION_WHEN_ABSENT == "2025-03-26"
    error = check_protocol_version(None, absent_means=None)
    assert isinstance(error, HeaderError) and error.status == 400
    assert error.problem == HeaderProblem.MISSING_PROTOCOL_VERSION
    assert error.jsonrpc_code == ErrorCode.HEADER_MISMATCH


@pytest.mark.parametrize("version", ["1999-01-01", "2025-11-26", "", "latest", "2026-07-28\x00", "é" * 100])
def test_unsupported_version_is_400_with_supported_list(version: str) -> None:
    error = check_protocol_version(version)
    assert isinstance(error, HeaderError)
    assert (error.status, error.problem) == (400, HeaderProblem.UNSUPPORTED_PROTOCOL_VERSION)
    body = error.to_jsonrpc(None)
    assert body is not None
    assert body["error"]["code"] == ErrorCode.UNSUPPORTED_PROTOCOL_VERSION
    assert body["error"]["data"]["supported"] == list(SUPPORTED_PROTOCOL_VERSIONS)
    assert body["error"]["data"]["requested"].isprintable()


def test_version_restricted_to_a_configured_set() -> None:
    error = check_protocol_version("2024-11-05", ("2025-11-25", MODERN))
    assert isinstance(error, HeaderError) and error.status == 400


ALLOW = OriginAllowList.compile(
    ["https://app.example.com", "http://localhost:*", "http://[::1]:*", "HTTP://Upper.Test"]
)


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (None, True),  # non-browser clients send no Origin
        ("https://app.example.com", True),
        ("https://APP.example.com", True),
        ("https://app.example.com:443", True),  # default port is the same origin
        ("https://app.example.com:0443", True),
        ("https://app.example.com:70000", False),
        ("http://upper.test", True),
        ("http://localhost:6274", True),
        ("http://localhost", True),
        ("http://[::1]:3000", True),
        ("https://app.example.com:8443", False),
        ("http://app.example.com", False),  # scheme matters
        ("https://evil.example.com", False),
        ("https://app.example.com.evil.test", False),
        ("https://localhost:6274", False),
        ("null", False),
        ("", False),
        ("not an origin", False),
        ("http://localhost:*", False),
        ("https://app.example.com/path", False),
        ("https://user@app.example.com", False),
    ],
)
def test_origin_allow_list(origin: str | None, ok: bool) -> None:
    error = check_origin(origin, ALLOW)
    assert (error is None) is ok
    if error is not None:
        assert (error.status, error.problem) == (403, HeaderProblem.FORBIDDEN_ORIGIN)
        assert error.to_jsonrpc() is not None and error.to_jsonrpc()["id"] is None  # type: ignore[index]


def test_origin_wildcard_and_null_entries() -> None:
    assert check_origin("https://anything.test", OriginAllowList.compile(["*"])) is None
    assert check_origin("null", OriginAllowList.compile(["null"])) is None
    assert check_origin("https://a.test", OriginAllowList.compile([])) is not None


@pytest.mark.parametrize("entry", ["app.example.com", "https://a.test/path", "https://a.test:port", "https://"])
def test_bad_allow_list_entries_fail_at_config_time(entry: str) -> None:
    with pytest.raises(ValueError):
        OriginAllowList.compile([entry])


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("us-west1", "us-west1"),
        ("get_weather", "get_weather"),
        ("file:///projects/a b.json", "file:///projects/a b.json"),
        ("Hello, 世界", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        (" padded ", "=?base64?IHBhZGRlZCA=?="),
        ("line1\nline2", "=?base64?bGluZTEKbGluZTI=?="),
        ("=?base64?literal?=", "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="),
        ("", "=?base64??="),
    ],
)
def test_header_value_encoding_matches_spec_examples(value: str, encoded: str) -> None:
    assert encode_header_value(value) == encoded
    assert decode_header_value(encoded) == value


@pytest.mark.parametrize(
    "value",
    ["=?base64?!!!?=", "=?base64?SGVsbG8?=", "=?base64?/w==?=", "caf\u00e9", "a\x00b", "a\x7fb"],
)
def test_undecodable_header_values(value: str) -> None:
    assert decode_header_value(value) is None


def _request(method: str, params: dict[str, object] | None = None, *, version: str = MODERN) -> Request:
    body: dict[str, object] = {"_meta": {"io.modelcontextprotocol/protocolVersion": version}}
    body.update(params or {})
    message = parse_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": body}))
    assert isinstance(message, Request)
    return message


@pytest.mark.parametrize(
    ("message", "mcp_method", "mcp_name", "ok"),
    [
        (_request("tools/call", {"name": "get_weather"}), "tools/call", "get_weather", True),
        (_request("prompts/get", {"name": "p"}), "prompts/get", "p", True),
        (_request("resources/read", {"uri": "file:///a.json"}), "resources/read", "file:///a.json", True),
        (_request("tools/call", {"name": "天気"}), "tools/call", encode_header_value("天気"), True),
        (_request("tools/call", {"name": " x "}), "tools/call", "=?base64?IHgg?=", True),
        (_request("tools/list"), "tools/list", None, True),
        (_request("tools/list"), "tools/list", "ignored-for-list", True),
        (_request("tools/call", {"name": "a"}), "tools/call", "b", False),
        (_request("tools/call", {"name": "a"}), "tools/call", None, False),
        (_request("tools/call", {"name": "a"}), "tools/list", "a", False),
        (_request("tools/call", {"name": "a"}), "Tools/Call", "a", False),  # values are case-sensitive
        (_request("tools/call", {"name": "a"}), None, "a", False),
        (_request("tools/call", {"name": "天気"}), "tools/call", "=?base64?not-base64?=", False),
        (_request("tools/call", {"name": "=?base64?YQ==?="}), "tools/call", "=?base64?YQ==?=", False),
        (_request("resources/read", {"uri": "file:///a"}), "resources/read", "file:///b", False),
        (_request("tools/list", version="2025-11-25"), "tools/list", None, False),  # _meta disagrees
    ],
)
def test_modern_headers_must_agree_with_body(
    message: Request, mcp_method: str | None, mcp_name: str | None, ok: bool
) -> None:
    error = check_request_metadata(message, protocol_version=MODERN, mcp_method=mcp_method, mcp_name=mcp_name)
    if ok:
        assert error is None
    else:
        assert isinstance(error, HeaderError)
        assert (error.status, error.jsonrpc_code) == (400, ErrorCode.HEADER_MISMATCH)
        body = error.to_jsonrpc(message.id)
        assert body is not None and body["id"] == 1 and body["error"]["code"] == -32020


def test_missing_name_in_body_is_left_to_the_method_handler() -> None:
    message = _request("tools/call", {})
    assert check_request_metadata(message, protocol_version=MODERN, mcp_method="tools/call", mcp_name=None) is None


def test_request_without_meta_mismatches_the_version_header() -> None:
    message = parse_message(b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
    assert isinstance(message, Request)
    error = check_request_metadata(message, protocol_version=MODERN, mcp_method="tools/list", mcp_name=None)
    assert error is not None and error.problem == HeaderProblem.HEADER_MISMATCH


def test_notifications_need_no_method_header_but_a_wrong_one_fails() -> None:
    message = parse_message(b'{"jsonrpc":"2.0","method":"notifications/cancelled"}')
    assert isinstance(message, Notification)
    assert check_request_metadata(message, protocol_version=MODERN, mcp_method=None, mcp_name=None) is None
    error = check_request_metadata(message, protocol_version=MODERN, mcp_method="tools/call", mcp_name=None)
    assert error is not None and error.status == 400


@pytest.mark.parametrize("version", ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"])
def test_session_era_versions_skip_header_body_checks(version: str) -> None:
    message = _request("tools/call", {"name": "a"}, version=version)
    assert check_request_metadata(message, protocol_version=version, mcp_method="other", mcp_name="b") is None


def test_errors_without_a_jsonrpc_code_have_no_body() -> None:
    error = HeaderError(HeaderProblem.NOT_ACCEPTABLE, 406, "x")
    assert error.to_jsonrpc(1) is None
