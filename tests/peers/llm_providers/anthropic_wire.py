"""Anthropic's Messages wire format as pure functions: the ``message`` object, the named-event stream
(``message_start`` with the input usage, a ``ping``, per block ``content_block_start`` / ``_delta``
(``text_delta`` or ``input_json_delta``) / ``_stop``, ``message_delta`` with the stop reason and the
cumulative usage, ``message_stop``), the in-stream ``error`` event and ``{"type": "error", "error":
{type, message}, "request_id"}`` bodies, as the ``anthropic`` SDK's types and stream decoder read them."""

from __future__ import annotations

import json
from typing import Any

from .script import Answer, ToolCall, split_arguments

API_VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})  # 2026-10-21: what the 2.x SDK sends

# Default error type and message by status.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit. Please try again later."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


def request_id(seq: int) -> str:
    return f"req_standin{seq:06d}"


def error_body(status: int, seq: int, message: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    default_type, default_message = _ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", f"Error {status}.")
    )
    return {
        "type": "error",
        "error": {"type": error_type or default_type, "message": message or default_message},
        "request_id": request_id(seq),
    }


def stream_error(error_type: str | None, message: str | None) -> dict[str, Any]:
    """The payload of an in-stream ``event: error``."""
    error_type = error_type or "overloaded_error"
    default = next((m for t, m in _ERRORS.values() if t == error_type), "Error.")
    return {"type": "error", "error": {"type": error_type, "message": message or default}}


def stop_reason(answer: Answer) -> str:
    if answer.stop:
        return answer.stop
    if answer.tool_calls:
        return "tool_use"
    return "max_tokens" if answer.truncated else "end_turn"


def tool_use_id(call: ToolCall, seq: int, index: int) -> str:
    return call.id or f"toolu_standin{seq:04d}_{index}"


def _usage(answer: Answer, *, output_tokens: int | None = None) -> dict[str, Any]:
    usage = answer.usage
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": usage.cache_creation_tokens, "ephemeral_1h_input_tokens": 0},
        "output_tokens": usage.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }


def _blocks(answer: Answer, seq: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if answer.text is not None:
        blocks.append({"type": "text", "text": answer.text})
    for index, call in enumerate(answer.tool_calls):
        arguments = call.arguments if not isinstance(call.arguments, str) else _loads_or_raw(call.arguments)
        blocks.append({"type": "tool_use", "id": tool_use_id(call, seq, index), "name": call.name, "input": arguments})
    return blocks


def _loads_or_raw(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def message(seq: int, model: str, answer: Answer, *, omit_usage: bool = False) -> dict[str, Any]:
    """A ``message`` object (non-streaming answer)."""
    body: dict[str, Any] = {
        "id": f"msg_standin{seq:06d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _blocks(answer, seq),
        "stop_reason": stop_reason(answer),
        "stop_sequence": None,
    }
    if not omit_usage:
        body["usage"] = _usage(answer)
    return body


def stream_events(
    seq: int, model: str, answer: Answer, *, omit_usage: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, payload) pairs of a streamed message, in order; a ``ping`` follows the first
    ``content_block_start`` as the API sends it."""
    start = {
        "id": f"msg_standin{seq:06d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if not omit_usage:
        start["usage"] = _usage(answer, output_tokens=1)
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
    index = 0

    def block(opening: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        nonlocal index
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening})
        )
        if index == 0:
            events.append(("ping", {"type": "ping"}))
        events.extend(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas
        )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    if answer.text is not None:
        block({"type": "text", "text": ""}, [{"type": "text_delta", "text": piece} for piece in answer.pieces])
    for number, call in enumerate(answer.tool_calls):
        pieces = ["", *split_arguments(call.arguments_json)]  # the API's first input_json_delta is empty
        block(
            {"type": "tool_use", "id": tool_use_id(call, seq, number), "name": call.name, "input": {}},
            [{"type": "input_json_delta", "partial_json": piece} for piece in pieces],
        )
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason(answer), "stop_sequence": None},
    }
    if not omit_usage:
        usage = answer.usage
        delta["usage"] = {
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.cache_creation_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens,
        }
    events.append(("message_delta", delta))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def count_tokens_body(input_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens}


def model_list(model_ids: list[str]) -> dict[str, Any]:
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in model_ids]
    return {
        "data": data,
        "has_more": False,
        "first_id": model_ids[0] if model_ids else None,
        "last_id": model_ids[-1] if model_ids else None,
    }
