"""OpenAI's wire format (and Azure OpenAI's variations of it), as pure functions from a request and
an ``Answer`` to JSON payloads and event-stream frames. Shapes follow the API reference and what the
``openai`` SDK's types and stream decoder read: chat completions and their ``chat.completion.chunk``
stream (``data:`` lines ending with ``data: [DONE]``; ``usage`` only in a last chunk with no choices
when ``stream_options.include_usage`` is set, ``"usage": null`` on the chunks before it), tool calls
streamed as argument deltas keyed by ``index``, embeddings (float lists or base64 little-endian
float32), the model list, the Responses API (text only) and ``{"error": {message, type, param,
code}}`` error bodies."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

from .script import Answer, ToolCall, content_text, count_tokens, split_arguments

CREATED_BASE = 1_700_000_000  # `created` is this plus the response's sequence number: deterministic
FINGERPRINT = "fp_standin"
DONE_FRAME = b"data: [DONE]\n\n"

# Default error fields by status: (type, code, message).
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: ("invalid_request_error", None, "Not found."),
    409: ("invalid_request_error", None, "Conflict."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}


def error_body(
    status: int,
    message: str | None = None,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body for ``status`` (defaults by status, each field overridable)."""
    default_type, default_code, default_message = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Error {status}.")
    )
    return {
        "error": {
            "message": message or default_message,
            "type": error_type or default_type,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }


def azure_error_body(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Azure OpenAI's error body: ``code`` is a string (often the status), no type."""
    return {
        "error": {
            "code": code or str(status),
            "message": message or _ERRORS.get(status, ("", None, f"Error {status}."))[2],
        }
    }


def sse_data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_event(name: str, payload: Any) -> bytes:
    return f"event: {name}\n".encode() + sse_data(payload)


def usage_json(answer: Answer) -> dict[str, Any]:
    usage = answer.usage
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def finish_reason(answer: Answer) -> str:
    if answer.stop:
        return answer.stop
    if answer.tool_calls:
        return "tool_calls"
    return "length" if answer.truncated else "stop"


def tool_call_id(call: ToolCall, seq: int, index: int) -> str:
    return call.id or f"call_{seq:04d}_{index}"


def completion_id(seq: int) -> str:
    return f"chatcmpl-standin{seq:06d}"


_SAFE_FILTER = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}
_PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": _SAFE_FILTER}]


def chat_completion(
    seq: int, model: str, answer: Answer, *, omit_usage: bool = False, azure: bool = False
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []}
    if answer.tool_calls:
        message["tool_calls"] = [
            {
                "id": tool_call_id(call, seq, i),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for i, call in enumerate(answer.tool_calls)
        ]
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(answer)}
    body: dict[str, Any] = {
        "id": completion_id(seq),
        "object": "chat.completion",
        "created": CREATED_BASE + seq,
        "model": model,
        "choices": [choice],
    }
    if not omit_usage:
        body["usage"] = usage_json(answer)
    if azure:
        choice["content_filter_results"] = _SAFE_FILTER
        body["prompt_filter_results"] = _PROMPT_FILTER
    else:
        body["service_tier"] = "default"
    body["system_fingerprint"] = FINGERPRINT
    return body


def chat_chunks(
    seq: int, model: str, answer: Answer, *, include_usage: bool, omit_usage: bool = False, azure: bool = False
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a streamed completion, in order (without ``[DONE]``)."""
    base: dict[str, Any] = {
        "id": completion_id(seq),
        "object": "chat.completion.chunk",
        "created": CREATED_BASE + seq,
        "model": model,
    }
    if not azure:
        base["service_tier"] = "default"
    base["system_fingerprint"] = FINGERPRINT
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if azure:
            choice["content_filter_results"] = {} if finish or not delta.get("content") else _SAFE_FILTER
        return {**base, "choices": [choice]}

    chunks: list[dict[str, Any]] = []
    if azure:  # Azure's first chunk: the prompt filter results, no choices and blank identity fields
        chunks.append(
            {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": _PROMPT_FILTER}
        )
    first: dict[str, Any] = {"role": "assistant", "content": "" if answer.text is not None else None, "refusal": None}
    if answer.text is not None:
        chunks.append(chunk(first))
        chunks.extend(chunk({"content": piece}) for piece in answer.pieces)
    for index, call in enumerate(answer.tool_calls):
        opening = {
            "index": index,
            "id": tool_call_id(call, seq, index),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        delta = {**first, "tool_calls": [opening]} if answer.text is None and index == 0 else {"tool_calls": [opening]}
        chunks.append(chunk(delta))
        chunks.extend(
            chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            for piece in split_arguments(call.arguments_json)
        )
    chunks.append(chunk({}, finish_reason(answer)))
    if include_usage and not omit_usage:
        chunks.append({**base, "choices": [], "usage": usage_json(answer)})
    return chunks


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector for ``text``: float32-exact values in [-0.5, 0.5) from its SHA-256."""
    digest = b""
    counter = 0
    while len(digest) < dimensions:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [byte / 256 - 0.5 for byte in digest[:dimensions]]


def embeddings(
    model: str, inputs: list[str], encoding_format: str, dimensions: int, *, omit_usage: bool = False
) -> dict[str, Any]:
    """An embeddings list: floats, or base64 of the little-endian float32 array."""
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        encoded: Any = vector
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    body: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if not omit_usage:
        tokens = sum(max(count_tokens(text), 1) for text in inputs)
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return body


def embedding_inputs(raw: Any) -> list[str] | None:
    """The inputs of an embeddings request as texts (token arrays as their JSON), None when invalid."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(item, str) for item in raw):
            return list(raw)
        if all(isinstance(item, int) for item in raw):
            return [json.dumps(raw)]
        if all(isinstance(item, list) for item in raw):
            return [json.dumps(item) for item in raw]
    return None


def model_object(model_id: str, owned_by: str = "openai") -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED_BASE, "owned_by": owned_by}


def model_list(model_ids: list[str], owned_by: str = "openai") -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, owned_by) for m in model_ids]}


# --- The Responses API (text output only) ---


def responses_input_text(raw: Any) -> str:
    """The text of the last user input item (or the input string)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        for item in reversed(raw):
            if isinstance(item, dict) and item.get("role", "user") == "user" and "content" in item:
                return content_text(item["content"])
    return ""


def responses_input_words(raw: Any, instructions: Any) -> int:
    words = count_tokens(instructions) if isinstance(instructions, str) else 0
    if isinstance(raw, str):
        return words + count_tokens(raw)
    if isinstance(raw, list):
        words += sum(count_tokens(content_text(i.get("content", ""))) for i in raw if isinstance(i, dict))
    return words


def _response_usage(answer: Answer) -> dict[str, Any]:
    usage = answer.usage
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(seq: int, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {"id": f"msg_standin{seq:06d}", "type": "message", "status": status, "role": "assistant", "content": content}


def response_object(
    seq: int,
    model: str,
    request: dict[str, Any],
    answer: Answer,
    *,
    status: str = "completed",
    omit_usage: bool = False,
) -> dict[str, Any]:
    """A ``response`` object (``status`` in_progress: no output and no usage yet)."""
    done = status == "completed"
    return {
        "id": f"resp_standin{seq:06d}",
        "object": "response",
        "created_at": CREATED_BASE + seq,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": [_message_item(seq, answer.text or "", "completed")] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": request.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": _response_usage(answer) if done and not omit_usage else None,
        "user": None,
        "metadata": request.get("metadata") or {},
    }


def response_events(
    seq: int, model: str, request: dict[str, Any], answer: Answer, *, omit_usage: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, payload) pairs of a streamed response, ``sequence_number`` counting from 0."""
    item_id = f"msg_standin{seq:06d}"
    text = answer.text or ""
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    in_progress = response_object(seq, model, request, answer, status="in_progress")
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": in_progress}),
        ("response.in_progress", {"response": in_progress}),
        ("response.output_item.added", {"output_index": 0, "item": _message_item(seq, None, "in_progress")}),
        ("response.content_part.added", {**where, "part": _output_text("")}),
        *(("response.output_text.delta", {**where, "delta": piece, "logprobs": []}) for piece in answer.pieces),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": _output_text(text)}),
        ("response.output_item.done", {"output_index": 0, "item": _message_item(seq, text, "completed")}),
        ("response.completed", {"response": response_object(seq, model, request, answer, omit_usage=omit_usage)}),
    ]
    return [(name, {"type": name, "sequence_number": n, **payload}) for n, (name, payload) in enumerate(events)]


def stream_error_payload(error_type: str | None, message: str | None) -> dict[str, Any]:
    """The error object OpenAI writes into a broken stream (``data: {"error": ...}``)."""
    return {
        "error": {
            "message": message or "The server had an error while processing your request.",
            "type": error_type or "server_error",
            "param": None,
            "code": None,
        }
    }
