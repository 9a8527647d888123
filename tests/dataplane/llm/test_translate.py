"""OpenAI chat completions <-> Anthropic messages translation, every output checked by parsing it with
the official SDKs' own pydantic types (requests with their TypedDicts through a strict TypeAdapter)."""

from __future__ import annotations

import json
from typing import Any

import anthropic.types as at
import pytest
from anthropic.types import message_create_params
from openai.types.chat import ChatCompletion, completion_create_params
from pydantic import TypeAdapter

from dataplane.llm.translate import (
    ANTHROPIC_MESSAGES_FIELDS,
    DEFAULT_MAX_TOKENS,
    OPENAI_CHAT_FIELDS,
    TranslationError,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    finish_reason,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
    stop_reason,
)
from dataplane.llm.usage import UsageMeter

OPENAI_REQUEST = TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
ANTHROPIC_REQUEST = TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PNG = "iVBORw0KGgo="


def sdk_fields(typed_dict: Any) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def anthropic_valid(body: dict[str, Any]) -> None:
    """The SDK's request type minus the sampling fields this SDK version dropped (2023-06-01 takes them)."""
    ANTHROPIC_REQUEST.validate_python({k: v for k, v in body.items() if k not in ("temperature", "top_p", "top_k")})


def test_known_fields_cover_every_sdk_request_field() -> None:
    """Every field the SDKs can send is mapped, dropped or refused on purpose (none passes by accident)."""
    assert sdk_fields(completion_create_params.CompletionCreateParamsStreaming) <= OPENAI_CHAT_FIELDS
    assert sdk_fields(message_create_params.MessageCreateParamsStreaming) <= ANTHROPIC_MESSAGES_FIELDS


# --------------------------------------------------------------------- OpenAI -> Anthropic


def test_system_prompts_multi_turn_tools_and_results() -> None:
    body = {
        "model": "smart",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Weather in Paris and Lyon?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
            {"role": "user", "content": "Thanks, and tomorrow?"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 256,
        "stop": "END",
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "agent-7",
    }
    OPENAI_REQUEST.validate_python(body)
    out = openai_to_anthropic_request(body, model="claude-sonnet-4-5")
    anthropic_valid(out)
    assert out["model"] == "claude-sonnet-4-5"
    assert out["system"] == [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Lyon"}},
    ]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
        {"type": "text", "text": "Thanks, and tomorrow?"},
    ]
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert (out["max_tokens"], out["stop_sequences"], out["metadata"]) == (256, ["END"], {"user_id": "agent-7"})
    assert (out["temperature"], out["top_p"]) == (0.2, 0.9)


def test_one_system_prompt_is_a_string_and_max_tokens_has_a_default() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    out = openai_to_anthropic_request(body, model="claude")
    anthropic_valid(out)
    assert out["system"] == "Be brief."
    assert out["max_tokens"] == DEFAULT_MAX_TOKENS
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert openai_to_anthropic_request({**body, "max_tokens": 9}, model="c")["max_tokens"] == 9


def test_sampling_parameters_only_reach_the_version_that_takes_them() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "top_p": 0.5}
    out = openai_to_anthropic_request(body, model="c", anthropic_version="2026-10-21")
    assert "temperature" not in out and "top_p" not in out
    ANTHROPIC_REQUEST.validate_python(out)


def test_images_become_base64_or_url_sources() -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    OPENAI_REQUEST.validate_python(body)
    out = openai_to_anthropic_request(body, model="c")
    anthropic_valid(out)
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_unknown_fields_pass_through_and_openai_only_fields_are_dropped() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "seed": 7,
        "logprobs": True,
        "frequency_penalty": 0.5,
        "stream_options": {"include_usage": True},
        "stream": True,
    }
    out = openai_to_anthropic_request(body, model="c")
    assert out["top_k"] == 5 and out["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert out["stream"] is True
    assert not {"seed", "logprobs", "frequency_penalty", "stream_options"} & set(out)


def test_json_schema_response_format_becomes_output_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    out = openai_to_anthropic_request(body, model="c")
    anthropic_valid(out)
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n": 2}, "n"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": "hi"}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ],
)
def test_what_cannot_be_carried_names_the_field(change: dict[str, Any], field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(TranslationError) as caught:
        openai_to_anthropic_request(body, model="c")
    assert caught.value.field == field


def test_anthropic_message_becomes_a_chat_completion() -> None:
    message = at.Message.model_validate(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_input_tokens": 4,
                "cache_creation_input_tokens": 2,
            },
        }
    ).model_dump(mode="json")
    completion = ChatCompletion.model_validate(anthropic_to_openai_response(message, created=1700000000), strict=True)
    choice = completion.choices[0]
    assert (completion.id, completion.model, completion.created) == ("msg_01", "claude-sonnet-4-5", 1700000000)
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", "Checking both.")
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )  # type: ignore[union-attr]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        16,
        5,
        21,
    )
    assert (
        completion.usage.prompt_tokens_details is not None and completion.usage.prompt_tokens_details.cached_tokens == 4
    )
    # The one usage reader sees the same tokens in both shapes.
    assert meter_usage(message) == meter_usage(completion.model_dump(mode="json")) == (16, 5, 21)


def meter_usage(document: dict[str, Any]) -> tuple[int, int, int]:
    meter = UsageMeter.for_response([(b"content-type", b"application/json")])
    meter.feed(json.dumps(document).encode())
    usage = meter.finish()
    assert usage is not None
    return usage.input_tokens, usage.output_tokens, usage.total_tokens


def test_usage_reads_the_same_in_both_shapes() -> None:
    message = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "c",
        "content": [{"type": "text", "text": "x"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 2,
        },
    }
    assert meter_usage(message) == meter_usage(anthropic_to_openai_response(message, created=0)) == (16, 5, 21)


@pytest.mark.parametrize(
    ("anthropic_stop", "openai_finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        (None, "stop"),
    ],
)
def test_finish_reasons_map(anthropic_stop: str | None, openai_finish: str) -> None:
    assert finish_reason(anthropic_stop) == openai_finish


# --------------------------------------------------------------------- Anthropic -> OpenAI


def test_anthropic_request_becomes_a_chat_request() -> None:
    body = {
        "model": "claude-alias",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Use metric."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "x", "signature": "s"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "18C"}],
                        "is_error": False,
                    },
                    {"type": "text", "text": "And Lyon?"},
                ],
            },
        ],
        "tools": [
            {"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object", "properties": {}}}
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "metadata": {"user_id": "agent-7"},
        "stream": True,
        "top_k": 3,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "logit_bias": {"1": 2},
    }
    out = anthropic_to_openai_request(body, model="gpt-4o")
    TypeAdapter(completion_create_params.CompletionCreateParamsStreaming).validate_python(out)
    assert out["messages"] == [
        {"role": "system", "content": "Be terse.\n\nUse metric."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "user", "content": "And Lyon?"},
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {}},
                "description": "Weather.",
            },
        }
    ]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("required", False)
    assert (out["max_completion_tokens"], out["stop"], out["user"], out["model"]) == (300, ["END"], "agent-7", "gpt-4o")
    assert out["stream_options"] == {"include_usage": True}
    assert "top_k" not in out and "thinking" not in out
    assert out["logit_bias"] == {"1": 2}  # unknown to Anthropic's API: passed on untouched


def test_openai_compatible_servers_get_max_tokens_and_usage_can_be_left_out() -> None:
    body = {"model": "x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    out = anthropic_to_openai_request(body, model="llama3:8b", max_tokens_field="max_tokens", stream_usage=False)
    assert (out["max_tokens"], "stream_options" in out, out["messages"]) == (
        5,
        False,
        [{"role": "user", "content": "hi"}],
    )


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": [{"type": "document", "source": {}}]}, "messages[0].content[0]"),
        (
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}],
            },
            "messages[0].content[0].content[0]",
        ),
        ({"role": "system", "content": "x"}, "messages[0].role"),
        (
            {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]},
            "messages[0].content[0].source",
        ),
    ],
)
def test_anthropic_blocks_that_cannot_be_carried_name_the_field(message: dict[str, Any], field: str) -> None:
    with pytest.raises(TranslationError) as caught:
        anthropic_to_openai_request({"model": "m", "max_tokens": 5, "messages": [message]}, model="g")
    assert caught.value.field == field


def test_server_tools_are_refused() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    with pytest.raises(TranslationError) as caught:
        anthropic_to_openai_request(body, model="g")
    assert caught.value.field == "tools[0]"


def test_chat_completion_becomes_an_anthropic_message() -> None:
    completion = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "logprobs": None,
                    "message": {
                        "role": "assistant",
                        "content": "Checking.",
                        "refusal": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                            },
                            {
                                "id": "call_2",
                                "type": "function",
                                "function": {"name": "broken", "arguments": "{not json"},
                            },
                        ],
                    },
                }
            ],
            "usage": {
                "prompt_tokens": 20,
                "completion_tokens": 7,
                "total_tokens": 27,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        }
    ).model_dump(mode="json")
    message = at.Message.model_validate(openai_to_anthropic_response(completion), strict=True)
    assert (message.id, message.model, message.stop_reason) == ("chatcmpl-1", "gpt-4o-2024-08-06", "tool_use")
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert message.content[2].input == {"arguments": "{not json"}  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        12,
        8,
        7,
    )
    assert meter_usage(completion) == meter_usage(message.model_dump(mode="json")) == (20, 7, 27)


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_stop_reasons_map(finish: str | None, stop: str) -> None:
    assert stop_reason(finish) == stop


def test_round_trip_keeps_a_conversation() -> None:
    """OpenAI -> Anthropic -> OpenAI gives back the same conversation (tool ids, texts, order)."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": "A",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "R"},
        {"role": "user", "content": "Q2"},
    ]
    there = openai_to_anthropic_request({"model": "m", "messages": messages}, model="c")
    back = anthropic_to_openai_request(there, model="m")
    assert back["messages"] == messages
