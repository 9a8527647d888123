"""Error answers of the LLM gateway, in the format of the API the client speaks (sans-I/O).

A client of /v1/chat/completions gets OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``; a client of /v1/messages gets Anthropic's, ``{"type": "error", "error": {"type",
"message"}}``. Both SDKs raise their status-specific exception from these (400
BadRequestError, 404 NotFoundError, 413, 429 RateLimitError, 5xx InternalServerError...).

Two sources of errors:

- the gateway's own (`gateway_error`): malformed JSON and a missing model (400), an unknown
  model (404), an oversized body (413), a request the target API cannot carry (400), no
  provider left to try (503);
- a provider's (`provider_error`): its status is passed through, its message is kept (read
  from an OpenAI, Azure or Anthropic error body; a body that is none of them becomes a generic
  message), and Retry-After / retry-after-ms are passed on, so the client's SDK backs off as
  the provider asked. The error type is re-derived from the status in the client's format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from dataplane.llm.wire import ApiFormat, json_bytes, sse_data, sse_named

JSON_CONTENT_TYPE: Final = b"application/json"
# Response headers of a provider error passed on to the client (the SDKs' retry logic reads them).
PASSED_ERROR_HEADERS: Final = frozenset({b"retry-after", b"retry-after-ms", b"x-should-retry"})
# How much of a provider error body is read for its message.
MAX_ERROR_BODY: Final = 64 * 1024
MAX_MESSAGE_CHARS: Final = 2000

# Anthropic's error types by status (its documented set); 529 is its "overloaded".
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# OpenAI's error types by status (what api.openai.com sends in error.type).
_OPENAI_TYPES: Final = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A complete error answer: status, headers (lower-case names) and the JSON body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def document(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


def error_type(api: ApiFormat, status: int) -> str:
    """The error type a provider of that format gives a status."""
    if api == "anthropic":
        return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_document(
    api: ApiFormat, status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The error body, as a document, in the client's format."""
    if api == "anthropic":
        return {"type": "error", "error": {"type": error_type(api, status), "message": message}}
    if code is None and status == 429:
        code = "rate_limit_exceeded"
    return {"error": {"message": message, "type": error_type(api, status), "param": param, "code": code}}


def gateway_error(
    api: ApiFormat,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> ErrorResponse:
    """An error the gateway itself answers."""
    headers: list[tuple[bytes, bytes]] = [(b"content-type", JSON_CONTENT_TYPE)]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(0, int(retry_after + 0.999))).encode()))
    body = json_bytes(error_document(api, status, message, param=param, code=code))
    return ErrorResponse(status, tuple(headers), body)


# The gateway's own refusals, named so callers and tests agree on wording and codes.


def malformed_json(api: ApiFormat, detail: str) -> ErrorResponse:
    return gateway_error(api, 400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json")


def missing_model(api: ApiFormat) -> ErrorResponse:
    return gateway_error(api, 400, "you must provide a model parameter", param="model", code="missing_model")


def unknown_model(api: ApiFormat, model: str, *, operation: str | None = None) -> ErrorResponse:
    """404: no provider serves `model`, or (`operation` named) none of its providers offers that."""
    if operation is None:
        message = f"The model `{model}` does not exist or is not served by this gateway."
    else:
        message = f"The model `{model}` is served by this gateway, but none of its providers offers {operation}."
    return gateway_error(api, 404, message, param="model", code="model_not_found")


def body_too_large(api: ApiFormat, limit: int) -> ErrorResponse:
    message = f"Request body too large: at most {limit} bytes are accepted."
    return gateway_error(api, 413, message, code="request_too_large")


def cannot_translate(api: ApiFormat, field: str, reason: str) -> ErrorResponse:
    return gateway_error(api, 400, f"{field}: {reason}", param=field, code="unsupported_parameter")


def no_provider(api: ApiFormat, model: str, retry_after: float | None = None) -> ErrorResponse:
    message = f"No provider for model `{model}` is available right now; try again later."
    return gateway_error(api, 503, message, code="no_provider_available", retry_after=retry_after)


def credentials_refused(api: ApiFormat, status: int, provider: str) -> ErrorResponse:
    """A provider refused the key the gateway holds for it: a 502, not the provider's 401/403 (the
    client's own credentials were fine, and a provider's message may quote part of the key)."""
    message = f"provider {provider} refused the gateway's credentials (HTTP {status}); the gateway's log has why"
    return gateway_error(api, 502, message, code="provider_credentials_refused")


def provider_message(body: bytes, status: int) -> tuple[str, str | None, str | None]:
    """(message, param, code) of a provider error body: OpenAI and Azure ``{"error": {...}}``,
    Anthropic ``{"type": "error", "error": {...}}``, or a bare ``{"message"}``. A body that is
    none of these (HTML from a proxy, empty) gives a generic message naming the status."""
    document: Any = None
    if body and len(body) <= MAX_ERROR_BODY:
        try:
            document = json.loads(body)
        except ValueError:
            document = None
    inner = document.get("error") if isinstance(document, dict) else None
    source = inner if isinstance(inner, dict) else document if isinstance(document, dict) else {}
    message = source.get("message")
    if not isinstance(message, str) or not message:
        message = f"the provider answered HTTP {status}"
    param = source.get("param") if isinstance(source.get("param"), str) else None
    code = source.get("code")
    code = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None
    return message[:MAX_MESSAGE_CHARS], param, code


def provider_error(
    api: ApiFormat, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *, provider: str = ""
) -> ErrorResponse:
    """A provider's error answer for the client: same status, message kept, client's format,
    Retry-After (and retry-after-ms, x-should-retry) passed on."""
    message, param, code = provider_message(body, status)
    if provider:
        message = f"{message} (provider {provider})"
    passed = [(b"content-type", JSON_CONTENT_TYPE)]
    passed += [(name.lower(), value) for name, value in headers if name.lower() in PASSED_ERROR_HEADERS]
    document = error_document(api, status, message, param=param, code=code)
    return ErrorResponse(status, tuple(passed), json_bytes(document))


def retry_after_seconds(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """A provider's Retry-After (seconds; retry-after-ms wins, as the SDKs read it), None if absent
    or an HTTP date (not worth a clock here: the failover's own ejectFor applies)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in (b"retry-after", b"retry-after-ms"):
            found[lowered] = value
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        raw = found.get(name)
        if raw is None:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            continue
        if value >= 0 and value == value and value != float("inf"):
            return value * scale
    return None


def stream_error_event(api: ApiFormat, message: str, *, status: int = 502) -> bytes:
    """The event that ends a stream that broke: each SDK raises an APIError from it.

    OpenAI's SDK raises on a data payload with an ``error`` key; Anthropic's on an ``error``
    event. Neither is followed by a normal end ([DONE] / message_stop)."""
    document = error_document(api, status, message)
    if api == "anthropic":
        return sse_named("error", document)
    return sse_data(document)


def error_from_document(api: ApiFormat, document: Mapping[str, Any], status: int) -> bytes:
    """A provider's in-stream error event payload re-shaped for the client's stream."""
    message, _, _ = provider_message(json_bytes(document), status)
    return stream_error_event(api, message, status=status)
