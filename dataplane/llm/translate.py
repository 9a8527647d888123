"""OpenAI chat completions <-> Anthropic messages, requests and responses (pure functions).

A client speaking one API reaches a provider speaking the other: `openai_to_anthropic_request`
and `anthropic_to_openai_response` serve /v1/chat/completions clients on an Anthropic provider;
`anthropic_to_openai_request` and `openai_to_anthropic_response` serve /v1/messages clients on
an OpenAI-type provider (OpenAI, Azure, OpenAI-compatible). Bodies are parsed JSON documents;
`TranslationError` names the field that cannot be carried (the client gets a 400).

What is carried, OpenAI -> Anthropic:

- system and developer messages (wherever they are) -> top-level ``system``, in order;
- user text and images (data: URLs -> base64 sources, http(s) URLs -> url sources);
- assistant text and ``tool_calls`` -> ``tool_use`` blocks (arguments parsed: they must be a
  JSON object); ``tool`` messages -> ``tool_result`` blocks in the next user turn; consecutive
  turns of one role merge into one message (Anthropic wants them alternating);
- ``tools`` (function tools) -> ``name``/``description``/``input_schema`` (``strict`` kept);
  ``tool_choice`` auto/none/required/{function} -> auto/none/any/{tool};
  ``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``;
- ``max_completion_tokens`` or ``max_tokens`` -> ``max_tokens`` (default `DEFAULT_MAX_TOKENS`,
  Anthropic requires one); ``stop`` -> ``stop_sequences``; ``stream``; ``user`` /
  ``safety_identifier`` -> ``metadata.user_id``; ``response_format`` json_schema ->
  ``output_config.format``;
- ``temperature`` and ``top_p`` only to providers on anthropic-version 2023-06-01 (2026-10-21
  refuses sampling parameters, even at their defaults).

Dropped (no Anthropic equivalent): frequency_penalty, presence_penalty, logit_bias, logprobs,
top_logprobs, seed, store, metadata, service_tier, stream_options (Anthropic streams always
report usage), prediction, prompt_cache_*, reasoning_effort, verbosity, moderation,
web_search_options, modalities ["text"], message ``name``, response_format text/json_object.
Refused (400): ``n`` > 1, audio input or output, file parts, the deprecated
functions/function_call, custom (non-function) tools.

Anthropic -> OpenAI carries the mirror image (system -> a first system message, tool_result
blocks -> ``tool`` messages before the rest of their turn, ``output_config.format`` ->
``response_format``, ``max_tokens`` -> ``max_completion_tokens`` for OpenAI and Azure or
``max_tokens`` for OpenAI-compatible servers, ``stream`` with ``stream_options.include_usage``).
Dropped: top_k, thinking, cache_control, container, service_tier, speed, inference_geo,
diagnostics, user_profile_id, workspace_id, ``output_config.effort``, thinking blocks and a
tool result's ``is_error`` flag. Refused: document, search-result and server-tool blocks, images
inside tool results, server tools.

Fields a translator does not know pass through untouched: they may be the target API's own
(``top_k`` or ``thinking`` sent by an OpenAI client to Claude), and the provider judges them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from dataplane.llm.wire import json_text

DEFAULT_MAX_TOKENS: Final = 4096
# The anthropic-version that still takes temperature and top_p.
SAMPLING_ANTHROPIC_VERSION: Final = "2023-06-01"

OPENAI_CHAT_FIELDS: Final = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
ANTHROPIC_MESSAGES_FIELDS: Final = frozenset(
    {
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "max_tokens",
        "messages",
        "metadata",
        "model",
        "output_config",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "system",
        "temperature",
        "thinking",
        "tool_choice",
        "tools",
        "top_k",
        "top_p",
        "user_profile_id",
        "workspace_id",
    }
)

_OPENAI_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ANTHROPIC_STOP: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_TOOL_CHOICES: Final = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
_OPENAI_TOOL_CHOICES: Final = {"auto": "auto", "none": "none", "any": "required"}


# What a translator raises on a document of the wrong shape it did not check field by field (a
# string where a list belongs): its callers turn these into the protocol's error, never a crash.
TRANSLATION_FAULTS: Final = (TypeError, ValueError, AttributeError, KeyError, IndexError)


class TranslationError(ValueError):
    """A request the target API cannot carry; `field` is where (``messages[2].content[0]``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def finish_reason(stop_reason: str | None) -> str:
    """Anthropic stop_reason -> OpenAI finish_reason."""
    return _OPENAI_FINISH.get(stop_reason or "end_turn", "stop")


def stop_reason(finish: str | None) -> str:
    """OpenAI finish_reason -> Anthropic stop_reason."""
    return _ANTHROPIC_STOP.get(finish or "stop", "end_turn")


def _text_of(content: Any, field: str) -> str:
    """Text of an OpenAI content: a string, or text (and refusal) parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(field, "must be a string or a list of content parts")
    pieces = []
    for index, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "refusal"):
            raise TranslationError(f"{field}[{index}]", "only text parts can be carried here")
        pieces.append(str(part.get("text", part.get("refusal", ""))))
    return "".join(pieces)


# --------------------------------------------------------------------- OpenAI -> Anthropic


def openai_to_anthropic_request(
    body: Mapping[str, Any],
    *,
    model: str,
    anthropic_version: str = SAMPLING_ANTHROPIC_VERSION,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict[str, Any]:
    """An Anthropic messages request for an OpenAI chat completions request, asking `model`."""
    for field in ("functions", "function_call", "audio"):
        if body.get(field) is not None:
            raise TranslationError(field, "cannot be carried to an Anthropic model (use tools / text)")
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError("n", "only one choice can be asked of an Anthropic model")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise TranslationError("modalities", "an Anthropic model answers in text only")
    out: dict[str, Any] = {key: value for key, value in body.items() if key not in OPENAI_CHAT_FIELDS}
    out["model"] = model
    system, messages = _anthropic_messages(body.get("messages"))
    out["messages"] = messages
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 else system
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out["max_tokens"] = max_tokens if max_tokens is not None else default_max_tokens
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream") is not None:
        out["stream"] = body["stream"]
    if anthropic_version == SAMPLING_ANTHROPIC_VERSION:
        for field in ("temperature", "top_p"):
            if body.get(field) is not None:
                out[field] = body[field]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_anthropic_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = _anthropic_tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and (tools or choice):
        choice = dict(choice or {"type": "auto"})
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, Mapping):
            raise TranslationError("response_format.json_schema.schema", "a JSON schema object is required")
        out["output_config"] = {"format": {"type": "json_schema", "schema": dict(schema)}}
    return out


def _anthropic_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, alternating messages) of an OpenAI message list."""
    if not isinstance(messages, list):
        raise TranslationError("messages", "must be a list of messages")
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise TranslationError(where, "must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), f"{where}.content")
            if text:
                system.append({"type": "text", "text": text})
            continue
        if role == "user":
            blocks = _anthropic_user_blocks(message.get("content"), f"{where}.content")
            _append(out, "user", blocks)
        elif role == "assistant":
            blocks = []
            text = _text_of(message.get("content"), f"{where}.content")
            if not text and isinstance(message.get("refusal"), str):
                text = message["refusal"]
            if text:
                blocks.append({"type": "text", "text": text})
            for call_index, call in enumerate(message.get("tool_calls") or ()):
                blocks.append(_tool_use_block(call, f"{where}.tool_calls[{call_index}]"))
            _append(out, "assistant", blocks)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise TranslationError(f"{where}.tool_call_id", "required for a tool message")
            content = message.get("content")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
            if isinstance(content, list):
                _text_of(content, f"{where}.content")  # only text parts
                result["content"] = [{"type": "text", "text": str(p.get("text", ""))} for p in content]
            else:
                result["content"] = _text_of(content, f"{where}.content")
            _append(out, "user", [result], tool_results=True)
        else:
            raise TranslationError(f"{where}.role", f"unsupported role {role!r}")
    return system, out


def _append(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]], *, tool_results: bool = False) -> None:
    """Add a turn, merged into the previous one of the same role; tool results go first."""
    if not blocks:
        return
    if out and out[-1]["role"] == role:
        previous = out[-1]["content"]
        if tool_results:
            at = next((i for i, b in enumerate(previous) if b.get("type") != "tool_result"), len(previous))
            previous[at:at] = blocks
        else:
            previous.extend(blocks)
        return
    out.append({"role": role, "content": blocks})


def _anthropic_user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(where, "must be a string or a list of content parts")
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        field = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            blocks.append(_anthropic_image(url, f"{field}.image_url.url"))
        else:
            raise TranslationError(field, f"content part {kind!r} cannot be carried to an Anthropic model")
    return blocks


def _anthropic_image(url: Any, field: str) -> dict[str, Any]:
    if not isinstance(url, str):
        raise TranslationError(field, "must be a string")
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type.startswith("image/"):
            raise TranslationError(field, "only base64 data: URLs of images can be carried")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(field, "must be a data: or http(s) URL")


def _tool_use_block(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping) or call.get("type", "function") != "function":
        raise TranslationError(where, "only function tool calls can be carried")
    function = call.get("function") or {}
    raw = function.get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise TranslationError(f"{where}.function.arguments", "must be a JSON object") from None
    if not isinstance(arguments, dict):
        raise TranslationError(f"{where}.function.arguments", "must be a JSON object")
    return {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""), "input": arguments}


def _anthropic_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise TranslationError(where, "only function tools can be carried to an Anthropic model")
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise TranslationError(f"{where}.function", "needs a name")
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = dict(function.get("parameters") or {"type": "object", "properties": {}})
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    return out


def _anthropic_tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise TranslationError("tool_choice", f"unsupported value {choice!r}")
        return dict(_TOOL_CHOICES[choice])
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    raise TranslationError("tool_choice", "must be auto, none, required or a function")


def anthropic_to_openai_response(message: Mapping[str, Any], *, created: int) -> dict[str, Any]:
    """An OpenAI chat completion for an Anthropic message (its model and id kept)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": _arguments(block.get("input"))},
                }
            )
        # thinking and redacted_thinking blocks have no place in a chat completion
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": message.get("id", ""),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model", ""),
        "choices": [
            {"index": 0, "message": reply, "finish_reason": finish_reason(message.get("stop_reason")), "logprobs": None}
        ],
    }
    usage = message.get("usage")
    if isinstance(usage, Mapping):
        out["usage"] = openai_usage(usage)
    return out


def _arguments(value: Any) -> str:
    return json_text(value if value is not None else {})


def _tokens(value: Any) -> int:
    """A provider's token count as a JSON integer (a string, a float like 1e400, a bool: 0)."""
    if type(value) is int:
        return max(value, 0)
    if type(value) is float and value.is_integer():
        return max(int(value), 0)
    return 0


def openai_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage: cache reads and writes are prompt tokens there."""
    cache_read = _tokens(usage.get("cache_read_input_tokens"))
    cache_write = _tokens(usage.get("cache_creation_input_tokens"))
    prompt = _tokens(usage.get("input_tokens")) + cache_read + cache_write
    completion = _tokens(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


# --------------------------------------------------------------------- Anthropic -> OpenAI

MaxTokensField = Literal["max_completion_tokens", "max_tokens"]


def anthropic_to_openai_request(
    body: Mapping[str, Any],
    *,
    model: str,
    max_tokens_field: MaxTokensField = "max_completion_tokens",
    stream_usage: bool = True,
) -> dict[str, Any]:
    """An OpenAI chat completions request for an Anthropic messages request, asking `model`."""
    out: dict[str, Any] = {key: value for key, value in body.items() if key not in ANTHROPIC_MESSAGES_FIELDS}
    out["model"] = model
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else _anthropic_text(system, "system")
        messages.append({"role": "system", "content": text})
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise TranslationError("messages", "must be a list of messages")
    for index, message in enumerate(raw):
        messages += _openai_messages(message, f"messages[{index}]")
    out["messages"] = messages
    if body.get("max_tokens") is not None:
        out[max_tokens_field] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    for field in ("temperature", "top_p"):
        if body.get(field) is not None:
            out[field] = body[field]
    if body.get("stream"):
        out["stream"] = True
        if stream_usage:
            out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_openai_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name", "")}}
        elif kind in _OPENAI_TOOL_CHOICES:
            out["tool_choice"] = _OPENAI_TOOL_CHOICES[kind]
        else:
            raise TranslationError("tool_choice.type", f"unsupported value {kind!r}")
        if choice.get("disable_parallel_tool_use") and tools:
            out["parallel_tool_calls"] = False
    output = body.get("output_config")
    if isinstance(output, Mapping) and isinstance(output.get("format"), Mapping):
        schema = output["format"].get("schema")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return out


def _anthropic_text(blocks: Any, where: str) -> str:
    if not isinstance(blocks, list):
        raise TranslationError(where, "must be a string or a list of text blocks")
    pieces = []
    for index, block in enumerate(blocks):
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise TranslationError(f"{where}[{index}]", "only text blocks can be carried here")
        pieces.append(str(block.get("text", "")))
    return "\n\n".join(pieces) if where == "system" else "".join(pieces)


def _openai_messages(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic turn -> OpenAI messages (a user turn's tool results become tool messages first)."""
    if not isinstance(message, Mapping):
        raise TranslationError(where, "must be an object")
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise TranslationError(f"{where}.role", f"unsupported role {role!r}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content", "must be a string or a list of blocks")
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        field = f"{where}.content[{index}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _openai_image_url(block, field)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": _arguments(block.get("input"))},
                }
            )
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            text = result if isinstance(result, str) else _anthropic_text(result, f"{field}.content")
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        else:
            raise TranslationError(field, f"{kind!r} blocks cannot be carried to an OpenAI-type model")
    out = tool_messages
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        reply: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            reply["tool_calls"] = calls
        if text or calls:
            out.append(reply)
    elif parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _openai_image_url(block: Mapping[str, Any], field: str) -> str:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if source.get("type") == "url":
        return str(source.get("url", ""))
    raise TranslationError(f"{field}.source", f"image source {source.get('type')!r} cannot be carried")


def _openai_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or tool.get("type", "custom") not in ("custom", None) or "name" not in tool:
        raise TranslationError(where, "only client tools (name, input_schema) can be carried to an OpenAI-type model")
    function: dict[str, Any] = {"name": tool["name"], "parameters": dict(tool.get("input_schema") or {})}
    if tool.get("description"):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def openai_to_anthropic_response(completion: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic message for an OpenAI chat completion (its first choice; model and id kept)."""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise TypeError("an OpenAI chat completion has a list of choices")  # not an answer: 502
    choice = choices[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = reply.get("content") or reply.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id", ""),
                "name": function.get("name", ""),
                "input": tool_input(function.get("arguments")),
            }
        )
    usage = completion.get("usage")
    return {
        "id": completion.get("id", ""),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model", ""),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": anthropic_usage(usage if isinstance(usage, Mapping) else {}),
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's `input` object. Arguments that are not a JSON object
    (a model's malformed output) are kept whole under ``"arguments"`` rather than lost."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return {"arguments": arguments}
        return parsed if isinstance(parsed, dict) else {"arguments": arguments}
    return dict(arguments) if isinstance(arguments, Mapping) else {}


def anthropic_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI usage -> Anthropic usage: cached prompt tokens are reported apart from input there."""
    prompt = _tokens(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _tokens(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": _tokens(usage.get("completion_tokens")),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def known_fields(api: Literal["openai", "anthropic"]) -> Sequence[str]:
    """The request fields a translator from `api` knows (maps, drops or refuses), sorted."""
    return sorted(OPENAI_CHAT_FIELDS if api == "openai" else ANTHROPIC_MESSAGES_FIELDS)
