"""Error answers in the client's format. The official SDK clients read each one (through httpx's
in-process transport, which hands them the exact bytes this module produces; the test_gateway*.py
files check the same answers through the running proxy) and must raise their status-specific exception with
the message, and honour Retry-After."""

from __future__ import annotations

import json
from collections.abc import Callable

import anthropic
import httpx
import httpx2
import openai
import pytest

from dataplane.llm import errors
from dataplane.llm.errors import ErrorResponse
from dataplane.llm.wire import ApiFormat


def answering(response: ErrorResponse | Callable[[], httpx.Response]) -> httpx.Client:
    """An httpx client (the OpenAI SDK's) whose transport answers with these bytes."""

    def handler(request: httpx.Request) -> httpx.Response:
        if callable(response):
            return response()
        return httpx.Response(response.status, headers=list(response.headers), content=response.body)

    return httpx.Client(transport=httpx.MockTransport(handler))


def answering2(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> httpx2.Client:
    """The same for the Anthropic SDK, which runs on httpx2."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers=headers, content=body)

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def openai_raises(response: ErrorResponse) -> openai.APIStatusError:
    client = openai.OpenAI(
        api_key="k", base_url="http://gateway.test/v1", http_client=answering(response), max_retries=0
    )
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return caught.value


def anthropic_raises(response: ErrorResponse) -> anthropic.APIStatusError:
    http_client = answering2(response.status, list(response.headers), response.body)
    client = anthropic.Anthropic(api_key="k", base_url="http://gateway.test", http_client=http_client, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    return caught.value


@pytest.mark.parametrize(
    ("make", "status", "openai_class", "anthropic_class"),
    [
        (
            lambda api: errors.malformed_json(api, "Expecting value: line 1 column 1"),
            400,
            openai.BadRequestError,
            anthropic.BadRequestError,
        ),
        (errors.missing_model, 400, openai.BadRequestError, anthropic.BadRequestError),
        (lambda api: errors.unknown_model(api, "gpt-9"), 404, openai.NotFoundError, anthropic.NotFoundError),
        (lambda api: errors.body_too_large(api, 1024), 413, openai.APIStatusError, anthropic.APIStatusError),
        (
            lambda api: errors.cannot_translate(api, "n", "only one choice"),
            400,
            openai.BadRequestError,
            anthropic.BadRequestError,
        ),
        (
            lambda api: errors.no_provider(api, "gpt-4o", retry_after=2.5),
            503,
            openai.InternalServerError,
            anthropic.InternalServerError,
        ),
    ],
)
def test_gateway_errors_raise_the_sdks_exceptions(
    make: Callable[[ApiFormat], ErrorResponse], status: int, openai_class: type, anthropic_class: type
) -> None:
    openai_error = openai_raises(make("openai"))
    assert type(openai_error) is openai_class or (
        openai_class is openai.APIStatusError and openai_error.status_code == status
    )
    assert openai_error.status_code == status
    body = make("openai").document()
    assert openai_error.message.endswith(body["error"]["message"])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    anthropic_error = anthropic_raises(make("anthropic"))
    assert isinstance(anthropic_error, anthropic_class) and anthropic_error.status_code == status
    document = make("anthropic").document()
    assert document["type"] == "error" and anthropic_error.body == document


def test_unknown_model_names_the_model_and_the_param() -> None:
    document = errors.unknown_model("openai", "gpt-9").document()["error"]
    assert (document["param"], document["code"], document["type"]) == (
        "model",
        "model_not_found",
        "invalid_request_error",
    )
    assert "`gpt-9`" in document["message"]
    assert errors.unknown_model("anthropic", "x").document()["error"]["type"] == "not_found_error"
    assert errors.body_too_large("anthropic", 1).document()["error"]["type"] == "request_too_large"


ANTHROPIC_429 = {
    "type": "error",
    "error": {
        "type": "rate_limit_error",
        "message": "Number of request tokens has exceeded your per-minute rate limit",
    },
    "request_id": "req_1",
}
OPENAI_429 = {
    "error": {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
AZURE_404 = {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}}


@pytest.mark.parametrize("client_api", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (429, ANTHROPIC_429, "Number of request tokens has exceeded your per-minute rate limit"),
        (429, OPENAI_429, "Rate limit reached for requests"),
        (404, AZURE_404, "The API deployment for this resource does not exist."),
        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "Overloaded"),
        (502, None, "the provider answered HTTP 502"),
    ],
)
def test_provider_errors_keep_status_message_and_retry_after(
    client_api: ApiFormat, status: int, body: dict[str, object] | None, message: str
) -> None:
    raw = json.dumps(body).encode() if body is not None else b"<html>bad gateway</html>"
    headers = [(b"Retry-After", b"7"), (b"x-request-id", b"abc"), (b"content-type", b"application/json")]
    response = errors.provider_error(client_api, status, headers, raw, provider="anthropic")
    assert response.status == status
    assert (b"retry-after", b"7") in response.headers and all(name != b"x-request-id" for name, _ in response.headers)
    if client_api == "openai":
        error = openai_raises(response)
        assert isinstance(error, openai.RateLimitError if status == 429 else openai.APIStatusError)
        shown = response.document()["error"]["message"]
    else:
        error = anthropic_raises(response)  # type: ignore[assignment]
        assert isinstance(error, anthropic.RateLimitError if status == 429 else anthropic.APIStatusError)
        shown = response.document()["error"]["message"]
        assert response.document()["error"]["type"] == errors.error_type("anthropic", status)
    assert error.status_code == status
    assert shown == f"{message} (provider anthropic)"
    if body is AZURE_404 and client_api == "openai":
        assert response.document()["error"]["code"] == "DeploymentNotFound"


def test_retry_after_is_honoured_by_the_sdk() -> None:
    """The SDK retries a 429 after the Retry-After passed on (retry-after-ms wins, as the SDKs read it)."""
    answers = [errors.provider_error("openai", 429, [(b"retry-after-ms", b"10")], json.dumps(OPENAI_429).encode())]
    calls: list[int] = []

    def respond() -> httpx.Response:
        calls.append(1)
        if answers:
            first = answers.pop()
            return httpx.Response(first.status, headers=list(first.headers), content=first.body)
        return httpx.Response(200, json={"object": "list", "data": []})

    client = openai.OpenAI(
        api_key="k", base_url="http://gateway.test/v1", http_client=answering(respond), max_retries=1
    )
    assert client.models.list().data == []
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([(b"Retry-After", b"3")], 3.0),
        ([(b"retry-after-ms", b"250"), (b"retry-after", b"9")], 0.25),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")], None),
        ([(b"retry-after", b"-1")], None),
        ([(b"retry-after", b"nan")], None),
        ([], None),
    ],
)
def test_retry_after_seconds(headers: list[tuple[bytes, bytes]], seconds: float | None) -> None:
    assert errors.retry_after_seconds(headers) == seconds


def test_stream_error_events_make_both_sdks_raise() -> None:
    """A cut stream's error ending: the OpenAI SDK raises APIError on the data payload, Anthropic's on the event."""
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}],
    }
    openai_body = b"data: " + json.dumps(chunk).encode() + b"\n\n" + errors.stream_error_event("openai", "stream cut")

    def openai_stream() -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=openai_body)

    client = openai.OpenAI(
        api_key="k", base_url="http://gateway.test/v1", http_client=answering(openai_stream), max_retries=0
    )
    received = []
    with pytest.raises(openai.APIError, match="stream cut"):
        for event in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(event.choices[0].delta.content)
    assert received == ["par"]

    anthropic_body = errors.stream_error_event("anthropic", "stream cut")
    http_client = answering2(200, [(b"content-type", b"text/event-stream")], anthropic_body)
    claude = anthropic.Anthropic(api_key="k", base_url="http://gateway.test", http_client=http_client, max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="stream cut"):
        for _ in claude.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
