"""The provider stand-ins: OpenAI, Anthropic and Azure OpenAI servers with per-instance knobs.

Each request goes: route (unknown path: the provider's 404) -> credentials (401) -> a pending
``hold_next`` of 0 events waits -> a pending ``fail_next`` answers its error -> a pending
``garbage_next`` answers its bytes -> the endpoint validates (400/404 as the provider words them)
and answers, taking the next ``script`` reply (generation endpoints) and the next ``cut_next`` /
``fail_stream_next`` (generation and embeddings). Every request is recorded in ``requests`` first.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio

from . import anthropic_wire, openai_wire
from ._http import HttpReply, RecordedRequest, RunningServer, serve_http
from .script import Fault, Garbage, Hold, Reply, StreamFault, all_text, count_tokens, last_user_text, resolve_answer

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"


@dataclass
class Produced:
    """An endpoint's answer before the knobs apply: a JSON payload or event-stream frames."""

    status: int = 200
    payload: Any = None
    frames: list[bytes] | None = None
    model_answer: bool = False  # takes the next cut_next / fail_stream_next
    headers: dict[str, str] = field(default_factory=dict)


class RequestError(Exception):
    """A request the provider refuses: becomes the provider's error body with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.code, self.param = status, message, error_type, code, param


Endpoint = Callable[[RecordedRequest, int, re.Match[str]], Produced]


class ProviderStandIn:
    """What every stand-in shares: the recorded requests, the knobs and the request pipeline."""

    provider: ClassVar[str] = ""
    default_models: ClassVar[tuple[str, ...]] = ()

    def __init__(self, api_key: str, models: Sequence[str] | None) -> None:
        self.api_key = api_key
        self.models: list[str] | None = list(models) if models is not None else None  # None: any model is served
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # the stand-in's own failures (re-raised when the block ends)
        self.omit_usage = False  # answer without usage (as some OpenAI-compatible servers do)
        self._replies: deque[Reply] = deque()
        self._faults: deque[Fault] = deque()
        self._stream_faults: deque[StreamFault] = deque()
        self._holds: deque[Hold] = deque()
        self._garbage: deque[Garbage] = deque()
        self._seq = 0
        self._arrived = anyio.Event()
        self._server: RunningServer | None = None
        self._routes: list[tuple[str, re.Pattern[str], Endpoint]] = []

    # --- addresses ---

    @property
    def origin(self) -> str:
        if self._server is None:
            raise RuntimeError(f"the {self.provider} stand-in is not serving")
        return self._server.origin

    @property
    def port(self) -> int:
        return int(self.origin.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        """The base URL to give the provider's SDK."""
        return self.origin

    # --- knobs ---

    def script(self, *replies: Reply | str) -> None:
        """The next generation requests answer these, in order (a string is a text reply)."""
        self._replies.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    def fail_next(
        self,
        count: int = 1,
        status: int = 429,
        *,
        retry_after: float | None = None,
        message: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests get ``status`` with the provider's error body; ``retry_after``
        (seconds) sets ``retry-after`` and ``retry-after-ms``."""
        self._faults.extend([Fault(status, retry_after, message, error_type, code, dict(headers or {}))] * count)

    def cut_next(self, after_events: int = 1) -> None:
        """The next model answer closes the connection after ``after_events`` stream events (for a JSON
        body: bytes), without ending the HTTP message."""
        self._stream_faults.append(StreamFault(after_events))

    def fail_stream_next(
        self, after_events: int = 1, error_type: str | None = None, message: str | None = None
    ) -> None:
        """The next streamed answer sends the provider's in-stream error after ``after_events`` events
        and ends (OpenAI ``data: {"error": ...}``, Anthropic ``event: error``); a JSON answer is cut
        after that many bytes instead."""
        self._stream_faults.append(StreamFault(after_events, error_type or self._default_stream_error, message))

    def hold_next(self, after_events: int = 0) -> Hold:
        """The next request waits at the returned hold until the test releases it."""
        hold = Hold(after_events)
        self._holds.append(hold)
        return hold

    def garbage_next(
        self, body: bytes = b"<html>upstream garbage</html>", status: int = 200, content_type: str = "text/html"
    ) -> None:
        """The next request is answered with these raw bytes."""
        self._garbage.append(Garbage(body, status, content_type))

    # --- what was received ---

    @property
    def last_request(self) -> RecordedRequest:
        if not self.requests:
            raise AssertionError(f"the {self.provider} stand-in received no request")
        return self.requests[-1]

    async def wait_for_requests(self, count: int) -> list[RecordedRequest]:
        """Wait until ``count`` requests arrived (bound it with ``anyio.fail_after``)."""
        while len(self.requests) < count:
            await self._arrived.wait()
        return self.requests[:count]

    # --- serving ---

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[ProviderStandIn]:
        async with serve_http(self._handle, self._record) as server:
            self._server = server
            try:
                yield self
            finally:
                self._server = None
        if self.errors:
            raise RuntimeError(f"the {self.provider} stand-in failed") from self.errors[0]

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        arrived, self._arrived = self._arrived, anyio.Event()
        arrived.set()

    async def _handle(self, request: RecordedRequest) -> HttpReply:
        self._seq += 1
        seq = self._seq
        try:
            return await self._pipeline(request, seq)
        except Exception as error:  # a bug in the stand-in: fail the test at the end of the block
            self.errors.append(error)
            return HttpReply(500, [("content-type", "text/plain")], f"stand-in failure: {error!r}".encode())

    async def _pipeline(self, request: RecordedRequest, seq: int) -> HttpReply:
        endpoint, match = self._match(request)
        if endpoint is None or match is None:
            return self._error_reply(seq, self._unknown_route(request))
        refusal = self._check_credentials(request)
        if refusal is not None:
            return self._error_reply(seq, refusal)
        hold = self._holds.popleft() if self._holds else None
        if hold is not None and hold.after_events == 0:
            await hold.wait()
            hold = None
        if self._faults:
            fault = self._faults.popleft()
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                headers["retry-after"] = _seconds_text(fault.retry_after)
                headers["retry-after-ms"] = str(round(fault.retry_after * 1000))
            error = RequestError(fault.status, fault.message or "", error_type=fault.error_type, code=fault.code)
            return self._error_reply(seq, error, headers)
        if self._garbage:
            garbage = self._garbage.popleft()
            headers = [("content-type", garbage.content_type), *self._headers(seq).items()]
            return HttpReply(garbage.status, headers, garbage.body)
        try:
            produced = endpoint(request, seq, match)
        except RequestError as error:
            return self._error_reply(seq, error)
        return await self._reply(seq, produced, hold)

    def _match(self, request: RecordedRequest) -> tuple[Endpoint | None, re.Match[str] | None]:
        for method, pattern, endpoint in self._routes:
            match = pattern.fullmatch(request.path)
            if match is not None and method == request.method:
                return endpoint, match
        return None, None

    async def _reply(self, seq: int, produced: Produced, hold: Hold | None) -> HttpReply:
        stream_fault = self._stream_faults.popleft() if produced.model_answer and self._stream_faults else None
        headers = {**self._headers(seq), **produced.headers}
        if produced.frames is None:
            body = json.dumps(produced.payload).encode()
            if hold is not None:
                await hold.wait()
            cut = stream_fault.after_events if stream_fault is not None else None
            return HttpReply(produced.status, [("content-type", JSON_TYPE), *headers.items()], body, cut_after=cut)
        headers = {"content-type": SSE_TYPE, "cache-control": "no-cache", **headers}
        cut = stream_fault.after_events if stream_fault is not None and stream_fault.error_type is None else None
        error_fault = stream_fault if stream_fault is not None and stream_fault.error_type is not None else None
        frames = _frames(produced.frames, hold, error_fault, self._stream_error_frame)
        return HttpReply(produced.status, list(headers.items()), frames, cut_after=cut)

    # --- per provider ---

    _default_stream_error: ClassVar[str] = "server_error"

    def _headers(self, seq: int) -> dict[str, str]:
        raise NotImplementedError

    def _check_credentials(self, request: RecordedRequest) -> RequestError | None:
        raise NotImplementedError

    def _unknown_route(self, request: RecordedRequest) -> RequestError:
        raise NotImplementedError

    def _error_reply(self, seq: int, error: RequestError, headers: Mapping[str, str] | None = None) -> HttpReply:
        raise NotImplementedError

    def _stream_error_frame(self, fault: StreamFault) -> bytes:
        raise NotImplementedError

    # --- shared endpoint helpers ---

    def _json_object(self, request: RecordedRequest) -> dict[str, Any]:
        if not isinstance(request.json, dict):
            raise RequestError(400, self._bad_json_message)
        return request.json

    _bad_json_message: ClassVar[str] = "The request body is not valid JSON."

    def _next_reply(self) -> Reply | None:
        return self._replies.popleft() if self._replies else None

    def _model_list(self) -> list[str]:
        return list(self.models) if self.models is not None else list(self.default_models)


async def _frames(
    frames: list[bytes], hold: Hold | None, error: StreamFault | None, error_frame: Callable[[StreamFault], bytes]
) -> AsyncIterator[bytes]:
    """The stream's frames, holding and breaking where the knobs say."""
    for index, frame in enumerate(frames):
        if hold is not None and index == hold.after_events:
            await hold.wait()
        if error is not None and index == error.after_events:
            yield error_frame(error)
            return
        yield frame
    if hold is not None and hold.after_events >= len(frames):
        await hold.wait()


def _seconds_text(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


# ---------------------------------------------------------------- OpenAI


class OpenAIStandIn(ProviderStandIn):
    """OpenAI at ``{origin}/v1``: chat completions, embeddings, models, responses; ``Authorization:
    Bearer <api_key>``."""

    provider = "openai"
    default_models = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    _bad_json_message = (
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
        "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
    )
    azure: ClassVar[bool] = False

    def __init__(
        self, api_key: str = "sk-openai-standin", models: Sequence[str] | None = None, embedding_dimensions: int = 8
    ) -> None:
        super().__init__(api_key, models)
        self.embedding_dimensions = embedding_dimensions
        self._routes = [
            ("POST", re.compile(r"/v1/chat/completions"), self._chat),
            ("POST", re.compile(r"/v1/embeddings"), self._embeddings),
            ("GET", re.compile(r"/v1/models"), self._models),
            ("GET", re.compile(r"/v1/models/(?P<model>[^/]+)"), self._model),
            ("POST", re.compile(r"/v1/responses"), self._responses),
        ]

    @property
    def url(self) -> str:
        return f"{self.origin}/v1"

    def _headers(self, seq: int) -> dict[str, str]:
        return {
            "x-request-id": f"req_standin{seq:06d}",
            "openai-version": "2020-10-01",
            "openai-processing-ms": "1",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-limit-tokens": "10000000",
            "x-ratelimit-remaining-tokens": "9999000",
        }

    def _check_credentials(self, request: RecordedRequest) -> RequestError | None:
        authorization = request.headers.get("authorization", "")
        if not authorization:
            return RequestError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.api_key:
            shown = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else key
            return RequestError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return None

    def _unknown_route(self, request: RecordedRequest) -> RequestError:
        return RequestError(404, f"Invalid URL ({request.method} {request.path})")

    def _error_reply(self, seq: int, error: RequestError, headers: Mapping[str, str] | None = None) -> HttpReply:
        body = openai_wire.error_body(error.status, error.message or None, error.error_type, error.code, error.param)
        all_headers = [("content-type", JSON_TYPE), *self._headers(seq).items(), *(headers or {}).items()]
        return HttpReply(error.status, all_headers, json.dumps(body).encode())

    def _stream_error_frame(self, fault: StreamFault) -> bytes:
        return openai_wire.sse_data(openai_wire.stream_error_payload(fault.error_type, fault.message))

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "you must provide a model parameter")
        if self.models is not None and model not in self.models:
            raise RequestError(
                404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
            )
        return model

    def _answer_model(self, requested: str) -> str:
        """The ``model`` the answer names (OpenAI: the requested one; Azure: the deployment's model)."""
        return requested

    def _chat(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        body = self._json_object(request)
        messages = body.get("messages")
        if messages is None:
            raise RequestError(
                400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
            )
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                400,
                "Invalid 'messages': expected a non-empty array.",
                param="messages",
                code="empty_array" if isinstance(messages, list) else "invalid_type",
            )
        model = self._answer_model(self._check_model(body))
        stream = body.get("stream") is True
        options = body.get("stream_options")
        if options is not None and not stream:
            raise RequestError(
                400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
            )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        answer = resolve_answer(
            self._next_reply(),
            last_user_text(messages),
            count_tokens(all_text(messages)),
            limit if isinstance(limit, int) else None,
        )
        if not stream:
            payload = openai_wire.chat_completion(seq, model, answer, omit_usage=self.omit_usage, azure=self.azure)
            return Produced(payload=payload, model_answer=True)
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunks = openai_wire.chat_chunks(
            seq, model, answer, include_usage=include_usage, omit_usage=self.omit_usage, azure=self.azure
        )
        return Produced(frames=[*map(openai_wire.sse_data, chunks), openai_wire.DONE_FRAME], model_answer=True)

    def _embeddings(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        body = self._json_object(request)
        if "input" not in body:
            raise RequestError(
                400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
            )
        inputs = openai_wire.embedding_inputs(body["input"])
        if inputs is None:
            raise RequestError(
                400,
                "'input' must be a string, an array of strings or an array of token arrays.",
                param="input",
                code="invalid_type",
            )
        model = self._answer_model(self._check_model(body))
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise RequestError(
                400,
                f"Invalid value for 'encoding_format': '{encoding}'. Supported values are: 'float' and 'base64'.",
                param="encoding_format",
                code="invalid_value",
            )
        dimensions = body.get("dimensions", self.embedding_dimensions)
        if not isinstance(dimensions, int) or dimensions < 1:
            raise RequestError(400, "Invalid 'dimensions': expected a positive integer.", param="dimensions")
        payload = openai_wire.embeddings(model, inputs, encoding, dimensions, omit_usage=self.omit_usage)
        return Produced(payload=payload, model_answer=True)

    def _models(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        return Produced(payload=openai_wire.model_list(self._model_list()))

    def _model(self, request: RecordedRequest, seq: int, match: re.Match[str]) -> Produced:
        model = match["model"]
        if self.models is not None and model not in self.models:
            raise RequestError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return Produced(payload=openai_wire.model_object(model))

    def _responses(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        body = self._json_object(request)
        model = self._answer_model(self._check_model(body))
        raw_input = body.get("input")
        limit = body.get("max_output_tokens")
        answer = resolve_answer(
            self._next_reply(),
            openai_wire.responses_input_text(raw_input),
            openai_wire.responses_input_words(raw_input, body.get("instructions")),
            limit if isinstance(limit, int) else None,
        )
        if body.get("stream") is not True:
            payload = openai_wire.response_object(seq, model, body, answer, omit_usage=self.omit_usage)
            return Produced(payload=payload, model_answer=True)
        events = openai_wire.response_events(seq, model, body, answer, omit_usage=self.omit_usage)
        return Produced(frames=[openai_wire.sse_event(name, payload) for name, payload in events], model_answer=True)


# ---------------------------------------------------------------- Azure OpenAI


class AzureOpenAIStandIn(OpenAIStandIn):
    """Azure OpenAI: ``/openai/deployments/{deployment}/chat/completions|embeddings?api-version=...``,
    ``/openai/models`` and ``/openai/responses`` (api-version required), and the v1 API under
    ``/openai/v1/`` (no api-version; the body's ``model`` names the deployment). Credentials: the
    ``api-key`` header, or ``Authorization: Bearer`` with the same key. Answers name the deployment's
    model, carry Azure's content-filter results, and a stream opens with Azure's prompt-filter chunk
    (no choices, blank id and model)."""

    provider = "azure-openai"
    azure = True
    _api_version = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|preview|latest")

    def __init__(
        self,
        api_key: str = "azure-standin-key",
        deployments: Mapping[str, str] | None = None,
        embedding_dimensions: int = 8,
    ) -> None:
        super().__init__(api_key, None, embedding_dimensions)
        self.deployments: dict[str, str] | None = dict(deployments) if deployments is not None else None
        deployment = r"/openai/deployments/(?P<deployment>[^/]+)"
        self._routes = [
            ("POST", re.compile(deployment + "/chat/completions"), self._versioned(self._chat)),
            ("POST", re.compile(deployment + "/embeddings"), self._versioned(self._embeddings)),
            ("GET", re.compile(r"/openai/models"), self._versioned(self._models)),
            ("POST", re.compile(r"/openai/responses"), self._versioned(self._responses)),
            ("POST", re.compile(r"/openai/v1/chat/completions"), self._chat),
            ("POST", re.compile(r"/openai/v1/embeddings"), self._embeddings),
            ("GET", re.compile(r"/openai/v1/models"), self._models),
            ("POST", re.compile(r"/openai/v1/responses"), self._responses),
        ]
        self._current_deployment: str | None = None

    @property
    def url(self) -> str:
        """The ``azure_endpoint`` for ``AsyncAzureOpenAI``."""
        return self.origin

    @property
    def v1_url(self) -> str:
        """The base URL of the v1 API, for a plain ``AsyncOpenAI``."""
        return f"{self.origin}/openai/v1"

    def _headers(self, seq: int) -> dict[str, str]:
        return {
            "apim-request-id": f"00000000-0000-4000-8000-{seq:012d}",
            "x-request-id": f"00000000-0000-4000-9000-{seq:012d}",
            "x-ms-region": "Sweden Central",
            "x-ratelimit-remaining-requests": "999",
            "x-ratelimit-remaining-tokens": "999000",
        }

    def _check_credentials(self, request: RecordedRequest) -> RequestError | None:
        key = request.headers.get("api-key")
        if key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if key != self.api_key:
            return RequestError(
                401,
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional API "
                "endpoint for your resource.",
            )
        return None

    def _unknown_route(self, request: RecordedRequest) -> RequestError:
        return RequestError(404, "Resource not found")

    def _error_reply(self, seq: int, error: RequestError, headers: Mapping[str, str] | None = None) -> HttpReply:
        body = openai_wire.azure_error_body(error.status, error.message or None, error.code)
        all_headers = [("content-type", JSON_TYPE), *self._headers(seq).items(), *(headers or {}).items()]
        return HttpReply(error.status, all_headers, json.dumps(body).encode())

    def _versioned(self, endpoint: Endpoint) -> Endpoint:
        def checked(request: RecordedRequest, seq: int, match: re.Match[str]) -> Produced:
            version = request.query.get("api-version")
            if version is None or not self._api_version.fullmatch(version):
                raise RequestError(404, "Resource not found")
            deployment = match.groupdict().get("deployment")
            self._current_deployment = deployment
            try:
                return endpoint(request, seq, match)
            finally:
                self._current_deployment = None

        return checked

    def _check_model(self, body: dict[str, Any]) -> str:
        name = self._current_deployment or body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "model is required", code="BadRequest")
        if self.deployments is not None and name not in self.deployments:
            raise RequestError(
                404,
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again.",
                code="DeploymentNotFound",
            )
        return name

    def _answer_model(self, requested: str) -> str:
        return self.deployments.get(requested, requested) if self.deployments is not None else requested

    def _model_list(self) -> list[str]:
        if self.deployments is not None:
            return sorted(set(self.deployments.values()))
        return list(self.default_models)


# ---------------------------------------------------------------- Anthropic


class AnthropicStandIn(ProviderStandIn):
    """Anthropic at ``{origin}/v1``: messages (and ``count_tokens``), models; ``x-api-key`` and
    ``anthropic-version`` checked (the key as ``x-api-key`` or ``Authorization: Bearer``)."""

    provider = "anthropic"
    default_models = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
    _default_stream_error = "overloaded_error"
    _bad_json_message = "There was an error parsing the body of your request: it is not valid JSON."

    def __init__(
        self,
        api_key: str = "sk-ant-standin",
        models: Sequence[str] | None = None,
        api_versions: frozenset[str] = anthropic_wire.API_VERSIONS,
    ) -> None:
        super().__init__(api_key, models)
        self.api_versions = api_versions
        self._routes = [
            ("POST", re.compile(r"/v1/messages"), self._messages),
            ("POST", re.compile(r"/v1/messages/count_tokens"), self._count_tokens),
            ("GET", re.compile(r"/v1/models"), self._models),
        ]

    def _headers(self, seq: int) -> dict[str, str]:
        return {
            "request-id": anthropic_wire.request_id(seq),
            "anthropic-organization-id": "00000000-0000-4000-8000-000000000000",
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
        }

    def _check_credentials(self, request: RecordedRequest) -> RequestError | None:
        # The key comes as ``x-api-key`` or, as the 2.x SDK sends it, ``Authorization: Bearer``.
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if key is None:
            return RequestError(401, "x-api-key header is required")
        if key != self.api_key:
            return RequestError(401, "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if version is None:
            return RequestError(400, "anthropic-version: header is required")
        if version not in self.api_versions:
            return RequestError(400, f"anthropic-version: invalid version: {version}")
        return None

    def _unknown_route(self, request: RecordedRequest) -> RequestError:
        return RequestError(404, "Not found")

    def _error_reply(self, seq: int, error: RequestError, headers: Mapping[str, str] | None = None) -> HttpReply:
        body = anthropic_wire.error_body(error.status, seq, error.message or None, error.error_type)
        all_headers = [("content-type", JSON_TYPE), *self._headers(seq).items(), *(headers or {}).items()]
        return HttpReply(error.status, all_headers, json.dumps(body).encode())

    def _stream_error_frame(self, fault: StreamFault) -> bytes:
        return openai_wire.sse_event("error", anthropic_wire.stream_error(fault.error_type, fault.message))

    def _validated(self, request: RecordedRequest, *, need_max_tokens: bool) -> dict[str, Any]:
        body = self._json_object(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "model: Field required")
        if "messages" not in body:
            raise RequestError(400, "messages: Field required")
        if not isinstance(body["messages"], list):
            raise RequestError(400, "messages: Input should be a valid list")
        if need_max_tokens and not isinstance(body.get("max_tokens"), int):
            raise RequestError(
                400,
                "max_tokens: Field required"
                if "max_tokens" not in body
                else "max_tokens: Input should be a valid integer",
            )
        if self.models is not None and model not in self.models:
            raise RequestError(404, f"model: {model}")
        return body

    @staticmethod
    def _input_words(body: dict[str, Any]) -> int:
        system = body.get("system")
        system_text = (
            system
            if isinstance(system, str)
            else " ".join(b.get("text", "") for b in system if isinstance(b, dict))
            if isinstance(system, list)
            else ""
        )
        return count_tokens(system_text) + count_tokens(all_text(body["messages"]))

    def _messages(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        body = self._validated(request, need_max_tokens=True)
        answer = resolve_answer(
            self._next_reply(),
            last_user_text(body["messages"], roles=("user",)),
            self._input_words(body),
            body["max_tokens"],
        )
        if body.get("stream") is not True:
            return Produced(
                payload=anthropic_wire.message(seq, body["model"], answer, omit_usage=self.omit_usage),
                model_answer=True,
            )
        events = anthropic_wire.stream_events(seq, body["model"], answer, omit_usage=self.omit_usage)
        return Produced(frames=[openai_wire.sse_event(name, payload) for name, payload in events], model_answer=True)

    def _count_tokens(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        body = self._validated(request, need_max_tokens=False)
        return Produced(payload=anthropic_wire.count_tokens_body(max(self._input_words(body), 1)))

    def _models(self, request: RecordedRequest, seq: int, _match: re.Match[str]) -> Produced:
        return Produced(payload=anthropic_wire.model_list(self._model_list()))


# ---------------------------------------------------------------- context managers


@asynccontextmanager
async def serve_openai(
    api_key: str = "sk-openai-standin", models: Sequence[str] | None = None, embedding_dimensions: int = 8
) -> AsyncIterator[OpenAIStandIn]:
    """An OpenAI stand-in on a fresh 127.0.0.1 port until the block ends (``.url`` is the SDK base URL)."""
    peer = OpenAIStandIn(api_key, models, embedding_dimensions)
    async with peer.serve():
        yield peer


@asynccontextmanager
async def serve_azure_openai(
    api_key: str = "azure-standin-key", deployments: Mapping[str, str] | None = None, embedding_dimensions: int = 8
) -> AsyncIterator[AzureOpenAIStandIn]:
    """An Azure OpenAI stand-in (``.url`` is the ``azure_endpoint``; ``deployments`` maps deployment
    names to model names, None serves any deployment under its own name)."""
    peer = AzureOpenAIStandIn(api_key, deployments, embedding_dimensions)
    async with peer.serve():
        yield peer


@asynccontextmanager
async def serve_anthropic(
    api_key: str = "sk-ant-standin", models: Sequence[str] | None = None
) -> AsyncIterator[AnthropicStandIn]:
    """An Anthropic stand-in (``.url`` is the SDK base URL)."""
    peer = AnthropicStandIn(api_key, models)
    async with peer.serve():
        yield peer


__all__ = [
    "AnthropicStandIn",
    "AzureOpenAIStandIn",
    "OpenAIStandIn",
    "ProviderStandIn",
    "serve_anthropic",
    "serve_azure_openai",
    "serve_openai",
]
