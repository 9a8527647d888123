"""JSON-RPC 2.0 framing for MCP: one HTTP body in, one typed message (or a typed failure) out.

Sans-I/O and allocation-light: the parser never raises on client input; it returns either a
message or an `InvalidMessage` that already knows its JSON-RPC error code and the id to echo.

Rules applied (JSON-RPC 2.0 and MCP "Base Protocol"):
- The body must be UTF-8 (MCP), valid JSON, one object. Batches (arrays) are refused with
  -32600: MCP removed them in 2025-06-18.
- `"jsonrpc"` must be exactly `"2.0"`.
- Ids are strings or integers; MCP forbids null ids, and booleans/floats are not ids. Integer
  ids must fit in a signed 64-bit integer, the widest id other SDKs (Go, Rust) can hold.
- `method` is a string; `params`, when present, is an object or an array (null is not).
- A response has an id and exactly one of `result` / `error`; `error` has an integer `code`
  and a string `message`. An error response may carry a null id (the peer could not read ours).

Hostile input policy (documented because other parsers differ, and a gateway that reads a body
differently from the upstream it forwards to is a security hole):
- Duplicate object keys anywhere are a parse error (-32700): first-wins and last-wins parsers
  would otherwise see different `method` or `name` values in the same bytes.
- `NaN`/`Infinity` literals and numbers that overflow a float are a parse error: they are not
  JSON (RFC 8259) and could not be re-encoded.
- Integers longer than Python's digit limit (4300) are a parse error, not a crash.
- Nesting deeper than `max_depth` (default 128) is a parse error, checked without recursion.
- A leading byte-order mark is a parse error (RFC 8259 forbids emitting one; MCP requires UTF-8).
Size limits are the caller's job (enforce them before calling `parse_message`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

JSONRPC_VERSION: Final = "2.0"
DEFAULT_MAX_DEPTH: Final = 128
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class ErrorCode(IntEnum):
    """JSON-RPC 2.0 codes plus the ones MCP defines in its reserved -32020..-32099 range."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # MCP 2026-07-28 (basic/index "Error Codes").
    HEADER_MISMATCH = -32020
    MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
    UNSUPPORTED_PROTOCOL_VERSION = -32022
    # Session era only (2025-11-25 and earlier); 2026-07-28 servers must not emit them, but a
    # gateway bridging eras must recognise them from older upstreams.
    RESOURCE_NOT_FOUND_LEGACY = -32002
    URL_ELICITATION_REQUIRED_LEGACY = -32042


RequestId = str | int
Params = dict[str, Any] | list[Any] | None


@dataclass(frozen=True, slots=True)
class Request:
    """A call that expects a response. `raw` is the decoded object, kept for rewriting and re-encoding."""

    id: RequestId
    method: str
    params: Params
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Params
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Response:
    id: RequestId
    result: Any
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ErrorObject:
    code: int
    message: str
    data: Any = None
    has_data: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.has_data:
            out["data"] = self.data
        return out


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    id: RequestId | None
    error: ErrorObject
    raw: dict[str, Any] = field(repr=False, compare=False)


Message = Request | Notification | Response | ErrorResponse


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """Why a body is not an acceptable JSON-RPC message, and what to answer.

    `id` is the request id when it could be read (JSON-RPC: echo it), otherwise None.
    """

    code: ErrorCode
    message: str
    id: RequestId | None = None

    def to_response(self) -> dict[str, Any]:
        return error_response(self.id, self.code, self.message)


class _Rejected(ValueError):
    """Raised inside the decoder hooks; caught by `parse_message` and turned into -32700."""


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Rejected("duplicate object key")
    return obj


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Rejected("number out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Rejected(f"{name} is not JSON")


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_hook, parse_float=_parse_float, parse_constant=_parse_constant, strict=True
)


def _too_deep(text: str, value: Any, max_depth: int) -> bool:
    """True when `value` nests containers deeper than `max_depth`.

    A text with fewer brackets than the limit cannot exceed it, which settles nearly every real
    message with one C-level count; only the rest pays for a level-by-level walk (no recursion).
    """
    if text.count("[") + text.count("{") <= max_depth or not isinstance(value, dict | list):
        return False
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        below: list[Any] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below
    return False


def decode_json(body: bytes | bytearray | memoryview | str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode one JSON text with the hostile-input policy above. Raises `ValueError` with a reason."""
    if isinstance(body, str):
        text = body
    else:
        try:
            text = str(body, "utf-8")  # strict: invalid UTF-8 raises, no BOM sniffing as json.loads does
        except UnicodeDecodeError as exc:
            raise ValueError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nesting too deep") from None
    except _Rejected as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, or an integer over the interpreter's digit limit
        raise ValueError("integer too long" if "digits" in str(exc) else str(exc)) from None
    if _too_deep(text, value, max_depth):
        raise ValueError("nesting too deep")
    return value


def _valid_id(value: Any) -> bool:
    if type(value) is str:
        return True
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


def parse_message(
    body: bytes | bytearray | memoryview | str, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> Message | InvalidMessage:
    """Parse one HTTP body (or one SSE `data:` payload) into a typed JSON-RPC message."""
    try:
        value = decode_json(body, max_depth=max_depth)
    except ValueError as exc:
        return InvalidMessage(ErrorCode.PARSE_ERROR, f"Parse error: {exc}")
    return classify(value)


def classify(value: Any) -> Message | InvalidMessage:
    """Turn an already-decoded JSON value into a typed message (for callers that decoded it elsewhere)."""
    if type(value) is not dict:
        if type(value) is list:
            return InvalidMessage(ErrorCode.INVALID_REQUEST, "Invalid Request: batches are not supported")
        return InvalidMessage(ErrorCode.INVALID_REQUEST, "Invalid Request: expected a JSON object")

    has_id = "id" in value
    raw_id = value.get("id")
    # Echo the id in the error only when it is one we could legitimately answer to.
    echo_id: RequestId | None = raw_id if has_id and _valid_id(raw_id) else None

    if value.get("jsonrpc") != JSONRPC_VERSION:
        return InvalidMessage(ErrorCode.INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', echo_id)

    if "method" in value:
        method = value["method"]
        if type(method) is not str:
            return InvalidMessage(ErrorCode.INVALID_REQUEST, 'Invalid Request: "method" must be a string', echo_id)
        if "result" in value or "error" in value:
            return InvalidMessage(
                ErrorCode.INVALID_REQUEST, 'Invalid Request: a request cannot carry "result" or "error"', echo_id
            )
        params = value.get("params")
        if "params" in value and type(params) is not dict and type(params) is not list:
            return InvalidMessage(
                ErrorCode.INVALID_REQUEST, 'Invalid Request: "params" must be an object or an array', echo_id
            )
        if not has_id:
            return Notification(method, params, value)
        if not _valid_id(raw_id):
            return InvalidMessage(
                ErrorCode.INVALID_REQUEST, 'Invalid Request: "id" must be a string or a 64-bit integer'
            )
        return Request(raw_id, method, params, value)

    has_result = "result" in value
    has_error = "error" in value
    if has_result == has_error:
        return InvalidMessage(
            ErrorCode.INVALID_REQUEST,
            'Invalid Request: expected "method", or exactly one of "result" and "error"',
            echo_id,
        )
    if not has_id:
        return InvalidMessage(ErrorCode.INVALID_REQUEST, 'Invalid Request: a response must carry "id"')
    if has_result:
        if not _valid_id(raw_id):
            return InvalidMessage(
                ErrorCode.INVALID_REQUEST, 'Invalid Request: "id" must be a string or a 64-bit integer'
            )
        return Response(raw_id, value["result"], value)
    if raw_id is not None and not _valid_id(raw_id):
        return InvalidMessage(ErrorCode.INVALID_REQUEST, 'Invalid Request: "id" must be a string, an integer or null')
    error = value["error"]
    if type(error) is not dict:
        return InvalidMessage(ErrorCode.INVALID_REQUEST, 'Invalid Request: "error" must be an object', echo_id)
    code = error.get("code")
    message = error.get("message")
    if type(code) is not int or type(message) is not str:
        return InvalidMessage(
            ErrorCode.INVALID_REQUEST,
            'Invalid Request: "error" needs an integer "code" and a string "message"',
            echo_id,
        )
    has_data = "data" in error
    return ErrorResponse(raw_id, ErrorObject(code, message, error.get("data"), has_data), value)


# ---------------------------------------------------------------------------------------------
# Building messages. Everything returns plain dicts so callers can add to them before `encode`.


def error_object(code: int, message: str, data: Any = None, *, with_data: bool | None = None) -> dict[str, Any]:
    """An `error` member. `data` is included when given (or forced with `with_data=True`)."""
    out: dict[str, Any] = {"code": int(code), "message": message}
    if with_data if with_data is not None else data is not None:
        out["data"] = data
    return out


def error_response(request_id: RequestId | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response; `request_id` None becomes `"id": null` as JSON-RPC requires."""
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error_object(code, message, data)}


def result_response(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result}


def request(request_id: RequestId, method: str, params: Params = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": request_id, "method": method}
    if params is not None:
        out["params"] = params
    return out


def notification(method: str, params: Params = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "method": method}
    if params is not None:
        out["params"] = params
    return out


def method_not_found(request_id: RequestId | None, method: str) -> dict[str, Any]:
    return error_response(request_id, ErrorCode.METHOD_NOT_FOUND, f"Method not found: {method}")


def invalid_params(request_id: RequestId | None, message: str, data: Any = None) -> dict[str, Any]:
    return error_response(request_id, ErrorCode.INVALID_PARAMS, f"Invalid params: {message}", data)


def internal_error(request_id: RequestId | None, message: str = "Internal error") -> dict[str, Any]:
    """Keep `message` free of internals: it reaches the client."""
    return error_response(request_id, ErrorCode.INTERNAL_ERROR, message)


def header_mismatch(request_id: RequestId | None, message: str) -> dict[str, Any]:
    return error_response(request_id, ErrorCode.HEADER_MISMATCH, f"Header mismatch: {message}")


def unsupported_protocol_version(
    request_id: RequestId | None, requested: str, supported: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """`data` carries `supported` and `requested` so the client can retry (2026-07-28 schema)."""
    return error_response(
        request_id,
        ErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
        f"Unsupported protocol version: {requested}",
        {"supported": list(supported), "requested": requested},
    )


def missing_required_client_capability(request_id: RequestId | None, required: dict[str, Any]) -> dict[str, Any]:
    """`required` lists only the missing capabilities, in the ClientCapabilities shape."""
    return error_response(
        request_id,
        ErrorCode.MISSING_REQUIRED_CLIENT_CAPABILITY,
        "Missing required client capability",
        {"requiredCapabilities": required},
    )


_ENCODER_UTF8: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ENCODER_ASCII: Final = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def encode(message: dict[str, Any] | list[Any]) -> bytes:
    """Compact UTF-8 JSON. Lone surrogates (legal in JSON escapes, not in UTF-8) fall back to \\u escapes."""
    try:
        return _ENCODER_UTF8.encode(message).encode("utf-8")
    except UnicodeEncodeError:
        return _ENCODER_ASCII.encode(message).encode("ascii")
