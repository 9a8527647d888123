"""The LLM gateway's I/O shell: one request routed to an LLM backend, served through its providers.

Everything decided is decided by the pure cores (routing.py picks the tries, translate.py and
stream_translate.py reshape bodies, errors.py words refusals, usage.py reads tokens); this module
only reads the body, opens upstream exchanges and relays. Providers are not the backend's
`targets`: each provider gets a one-target upstream cluster of its own (its host, port and TLS),
built when a config is applied, so the worker's ordinary pools serve them.

Failover: a connect failure, or a 408/429/5xx answer before any response byte went to the client,
counts against the provider (`ProviderHealth`) and the next try is made. Once a byte went out the
answer is the client's, however it ends; a stream cut mid-way ends with an error event in the
client's format, and the usage seen so far is still charged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio

from dataplane.config.llm import DEFAULT_ANTHROPIC_VERSION
from dataplane.config.model import (
    LlmBackendSettings,
    LlmProviderSettings,
    RuntimeConfig,
    UpstreamCluster,
    UpstreamTarget,
)
from dataplane.http.errors import ProxyError
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink
from dataplane.llm.errors import (
    MAX_ERROR_BODY,
    ErrorResponse,
    body_too_large,
    cannot_translate,
    gateway_error,
    malformed_json,
    missing_model,
    no_provider,
    provider_error,
    retry_after_seconds,
    stream_error_event,
    unknown_model,
)
from dataplane.llm.metering import CHARGE_TIMEOUT
from dataplane.llm.routing import (
    Attempt,
    Operation,
    ProviderHealth,
    is_failover_status,
    provider_format,
    route_model,
    upstream_headers,
    upstream_target,
)
from dataplane.llm.stream_translate import (
    CUT_MESSAGE,
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
)
from dataplane.llm.tokens import estimate_input_tokens, estimated_usage
from dataplane.llm.translate import (
    TranslationError,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)
from dataplane.llm.usage import BodyKind, TokenUsage, UsageMeter
from dataplane.llm.wire import ApiFormat, json_bytes
from dataplane.observability.request import Observability, RequestTelemetry
from dataplane.policy.authorize import llm_variables
from dataplane.policy.chain import Admitted
from dataplane.upstream.exchange import Exchange, UpstreamRequest
from dataplane.upstream.pool import UpstreamPools
from shared.logging import get_logger

log = get_logger("dataplane.llm")

_JSON: Final = (b"content-type", b"application/json")
_EVENT_STREAM: Final = (b"content-type", b"text/event-stream; charset=utf-8")
# Client headers carried to a provider (everything else, credentials first, stays at the gateway).
_CARRIED_HEADERS: Final = frozenset({b"user-agent", b"x-request-id", b"traceparent", b"tracestate"})
# GenAI `gen_ai.provider.name` per provider type (an OpenAI-compatible server is named by itself).
_GENAI_PROVIDER: Final = {"openai": "openai", "anthropic": "anthropic", "azure": "azure.ai.openai"}
# The routes, by the end of the path (the route may mount the gateway under a prefix).
_OPERATIONS: Final[tuple[tuple[str, Operation, ApiFormat], ...]] = (
    ("/chat/completions", "chat", "openai"),
    ("/embeddings", "embeddings", "openai"),
    ("/messages", "messages", "anthropic"),
    ("/models", "models", "openai"),
)


@dataclass(slots=True)
class LlmRequest:
    """What the proxy hands the LLM handler: the request, its backend, the admitting policy outcome."""

    request: ProxyRequest
    cluster: UpstreamCluster
    path: str
    admitted: Admitted | None
    telemetry: RequestTelemetry


@dataclass(frozen=True, slots=True)
class _ProviderUpstream:
    """A provider as the worker's pools see it: a one-target cluster."""

    cluster: UpstreamCluster
    target: UpstreamTarget


def operation_of(path: str) -> tuple[Operation, ApiFormat] | None:
    """The operation a path asks for, and the API format its client speaks; None: not an LLM route."""
    for suffix, operation, api in _OPERATIONS:
        if path.endswith(suffix):
            return operation, api
    return None


def provider_upstreams(cluster: UpstreamCluster) -> dict[str, _ProviderUpstream]:
    """One pool-ready cluster per provider of an LLM backend (its address and TLS; the backend's
    connect/idle timeouts and connection cap)."""
    settings = cluster.llm
    if settings is None:
        return {}
    out: dict[str, _ProviderUpstream] = {}
    for provider in settings.providers:
        target = UpstreamTarget(provider.name, provider.host, provider.port, 1)
        upstream = UpstreamCluster(
            name=f"{cluster.name}#llm/{provider.name}",
            ssl_context=provider.ssl_context,
            server_name=provider.server_name,
            connect_timeout=cluster.connect_timeout,
            idle_timeout=cluster.idle_timeout,
            max_connections=cluster.max_connections,
            targets=(target,),
        )
        out[provider.name] = _ProviderUpstream(upstream, target)
    return out


def upstream_body(
    api: ApiFormat,
    operation: Operation,
    body: dict[str, Any],
    attempt: Attempt,
    settings: LlmBackendSettings,
) -> dict[str, Any]:
    """The body a provider gets for one try: translated when it speaks the other API, the model
    renamed, usage asked for in OpenAI streams. Raises TranslationError."""
    provider = attempt.provider
    target_api = provider_format(provider)
    if api == "openai" and target_api == "anthropic":
        return openai_to_anthropic_request(
            body, model=attempt.model, anthropic_version=provider.anthropic_version or DEFAULT_ANTHROPIC_VERSION
        )
    if api == "anthropic" and target_api == "openai":
        field = "max_tokens" if provider.type == "openai_compatible" else "max_completion_tokens"
        return anthropic_to_openai_request(
            body, model=attempt.model, max_tokens_field=field, stream_usage=settings.stream_usage
        )
    out = dict(body)
    out["model"] = attempt.model
    if operation == "chat" and target_api == "openai" and settings.stream_usage and out.get("stream") is True:
        options = out.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return out


class LlmHandler:
    """Serves requests routed to LLM backends. One per worker; `apply` with each config."""

    def __init__(self, pools: UpstreamPools, observability: Callable[[], Observability]) -> None:
        self._pools = pools
        # A getter: the worker swaps the proxy's recorders after the handlers exist.
        self._observability = observability
        self._health: dict[str, ProviderHealth] = {}
        # backend name -> (its cluster, its providers' upstreams), rebuilt per config.
        self._upstreams: dict[str, tuple[UpstreamCluster, dict[str, _ProviderUpstream]]] = {}

    def apply(self, config: RuntimeConfig) -> None:
        """Build the provider upstreams of `config`; keep health state of providers still configured."""
        upstreams: dict[str, tuple[UpstreamCluster, dict[str, _ProviderUpstream]]] = {}
        for name, cluster in config.backends.items():
            if cluster.kind == "llm" and cluster.llm is not None:
                upstreams[name] = (cluster, provider_upstreams(cluster))
        for name in [name for name in self._health if name not in upstreams]:
            del self._health[name]
        for name, (_, providers) in upstreams.items():
            health = self._health.get(name)
            if health is not None:
                health.forget(set(providers))
        self._upstreams = upstreams

    def health(self, backend: str) -> ProviderHealth:
        health = self._health.get(backend)
        if health is None:
            health = self._health[backend] = ProviderHealth()
        return health

    def _provider_upstream(self, cluster: UpstreamCluster, provider: LlmProviderSettings) -> _ProviderUpstream:
        entry = self._upstreams.get(cluster.name)
        if entry is None or entry[0] is not cluster:
            entry = (cluster, provider_upstreams(cluster))
            self._upstreams[cluster.name] = entry
        return entry[1][provider.name]

    async def handle(self, llm: LlmRequest, sink: ResponseSink) -> None:
        """Serve one request. Raises only ClientGone (and cancellation): everything else is answered."""
        settings = llm.cluster.llm
        assert settings is not None
        found = operation_of(llm.path)
        request = llm.request
        if found is None:
            await _answer(sink, gateway_error("openai", 404, f"no LLM API at {llm.path}", code="unknown_url"))
            return
        operation, api = found
        if operation == "models":
            if request.method not in (b"GET", b"HEAD"):
                await _answer(sink, gateway_error(api, 405, "use GET for the model list"))
                return
            await _answer_json(sink, 200, _model_list(settings))
            return
        if request.method != b"POST":
            await _answer(sink, gateway_error(api, 405, f"use POST for {llm.path}"))
            return
        raw = await _read_body(request, settings.max_request_bytes)
        if raw is None:
            await _answer(sink, body_too_large(api, settings.max_request_bytes))
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            await _answer(sink, malformed_json(api, str(exc)))
            return
        if not isinstance(body, dict):
            await _answer(sink, malformed_json(api, "the body must be a JSON object"))
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            await _answer(sink, missing_model(api))
            return
        llm.telemetry.record.llm_model = model
        admitted = llm.admitted
        if admitted is not None and not admitted.authorize("llm", llm_variables(model)).allowed:
            await _answer(sink, gateway_error(api, 403, f"model `{model}` is not allowed for this caller"))
            return
        health = self.health(llm.cluster.name)
        route = route_model(settings, model, health, operation)
        if route is None:
            await _answer(sink, unknown_model(api, model))
            return
        await self._serve(llm, sink, settings, api, operation, body, route.attempts, health)

    async def _serve(
        self,
        llm: LlmRequest,
        sink: ResponseSink,
        settings: LlmBackendSettings,
        api: ApiFormat,
        operation: Operation,
        body: dict[str, Any],
        attempts: tuple[Attempt, ...],
        health: ProviderHealth,
    ) -> None:
        began = time.perf_counter()
        last_error: ErrorResponse | None = None
        carried = [(n, v) for n, v in llm.request.headers if n in _CARRIED_HEADERS]
        for attempt in attempts:
            provider = attempt.provider
            try:
                payload = json_bytes(upstream_body(api, operation, body, attempt, settings))
            except TranslationError as exc:
                await _answer(sink, cannot_translate(api, exc.field, exc.reason))
                return
            target = upstream_target(provider, operation, attempt.model)
            if target is None:
                continue
            upstream = self._provider_upstream(llm.cluster, provider)
            headers: Headers = [_JSON, (b"content-length", b"%d" % len(payload)), *carried]
            if provider.type == "anthropic":
                headers += [(n, v) for n, v in llm.request.headers if n == b"anthropic-beta"]
            headers += upstream_headers(provider)
            head_request = UpstreamRequest(
                b"POST", target.encode("latin-1"), provider.authority.encode("latin-1"), headers, True, len(payload)
            )
            pool = self._pools.get(upstream.cluster, upstream.target)
            exchange: Exchange | None = None
            try:
                exchange = await pool.open(head_request, payload)  # type: ignore[call-arg]
                head = await exchange.response()
            except ProxyError as exc:
                if exchange is not None:
                    exchange.abort()
                log.info("llm provider unreachable", provider=provider.name, error=exc.message)
                health.record_failure(
                    provider.name, threshold=settings.consecutive_failures, eject_for=settings.eject_for
                )
                continue
            if is_failover_status(head.status) or head.status >= 400:
                error_body = await _read_error_body(exchange)
                error = provider_error(api, head.status, head.headers, error_body, provider=provider.name)
                if not is_failover_status(head.status):
                    await _answer(sink, error)  # the request's own fault: it would fail anywhere
                    return
                health.record_failure(
                    provider.name,
                    threshold=settings.consecutive_failures,
                    eject_for=settings.eject_for,
                    retry_after=retry_after_seconds(head.headers),
                )
                log.info("llm provider failed, trying the next", provider=provider.name, status=head.status)
                last_error = error
                continue
            health.record_success(provider.name)
            llm.telemetry.record.llm_provider = provider.name
            llm.telemetry.record.upstream_address = provider.authority
            usage: TokenUsage | None = None
            first_chunk: float | None = None
            try:
                usage, first_chunk = await _relay(exchange, head.headers, sink, api, provider, body, began)
            finally:
                if not exchange.complete:
                    exchange.abort()
                if usage is None and operation != "embeddings":
                    usage = estimated_usage(estimate_input_tokens(api, body), 0) if head.status < 300 else None
                await self._settle(llm, provider, attempt, operation, usage, time.perf_counter() - began, first_chunk)
            return
        if last_error is not None:
            await _answer(sink, last_error)
            return
        await _answer(sink, no_provider(api, attempts[0].model if attempts else ""))

    async def _settle(
        self,
        llm: LlmRequest,
        provider: LlmProviderSettings,
        attempt: Attempt,
        operation: Operation,
        usage: TokenUsage | None,
        duration: float,
        first_chunk: float | None,
    ) -> None:
        """Charge budgets (bounded, shielded: the request may be being cancelled), fill the access
        record and the GenAI metrics."""
        record = llm.telemetry.record
        if usage is not None:
            record.llm_input_tokens = usage.input_tokens
            record.llm_output_tokens = usage.output_tokens
        admitted = llm.admitted
        if admitted is not None and admitted.wants_usage and usage is not None and usage.total_tokens > 0:
            with anyio.move_on_after(CHARGE_TIMEOUT, shield=True):
                try:
                    await admitted.charge(usage.total_tokens)
                except Exception as exc:  # the answer already went out; budgets err towards admitting
                    log.warning("token usage not charged", tokens=usage.total_tokens, error=repr(exc))
        metrics = self._observability().metrics
        if metrics is not None:
            metrics.record_llm(
                _GENAI_PROVIDER.get(provider.type, provider.name),
                "embeddings" if operation == "embeddings" else "chat",
                attempt.model,
                input_tokens=usage.input_tokens if usage is not None else None,
                output_tokens=usage.output_tokens if usage is not None else None,
                duration=duration,
                time_to_first_chunk=first_chunk,
            )


async def _relay(
    exchange: Exchange,
    upstream_headers_: Headers,
    sink: ResponseSink,
    api: ApiFormat,
    provider: LlmProviderSettings,
    body: dict[str, Any],
    began: float,
) -> tuple[TokenUsage | None, float | None]:
    """Send a provider's success answer to the client: translated or passed through, streams event
    by event. Returns the usage seen and the time to the first chunk (streams)."""
    kind = UsageMeter.for_response(upstream_headers_).kind
    translated = api != provider_format(provider)
    if kind is BodyKind.EVENT_STREAM:
        if translated:
            return await _relay_translated_stream(exchange, sink, api, body, began)
        return await _relay_stream(exchange, sink, api, began)
    data, complete = exchange.take_body()
    chunks = [data]
    while not complete:
        try:
            piece = await exchange.read()
        except ProxyError:
            await _answer(sink, gateway_error(api, 502, "the provider's answer was cut off"))
            return None, None
        if not piece:
            break
        chunks.append(piece)
    raw = b"".join(chunks)
    meter = UsageMeter(BodyKind.JSON)
    meter.feed(raw)
    usage = meter.finish()
    if translated:
        try:
            document = json.loads(raw)
        except ValueError:
            await _answer(sink, gateway_error(api, 502, "the provider answered with a body that is not JSON"))
            return usage, None
        if api == "openai":
            out = anthropic_to_openai_response(document, created=int(time.time()))
        else:
            out = openai_to_anthropic_response(document)
        raw = json_bytes(out)
    await sink.start(200, [_JSON, (b"content-length", b"%d" % len(raw))], len(raw), raw, True)
    return usage, None


async def _relay_translated_stream(
    exchange: Exchange, sink: ResponseSink, api: ApiFormat, body: dict[str, Any], began: float
) -> tuple[TokenUsage | None, float | None]:
    translator: AnthropicToOpenAIStream | OpenAIToAnthropicStream
    if api == "openai":
        options = body.get("stream_options")
        include = isinstance(options, dict) and options.get("include_usage") is True
        translator = AnthropicToOpenAIStream(created=int(time.time()), include_usage=include)
    else:
        translator = OpenAIToAnthropicStream(model=str(body.get("model", "")))
    await sink.start(200, [_EVENT_STREAM, (b"cache-control", b"no-cache")], None, b"", False)
    first: float | None = None
    data, complete = exchange.take_body()
    try:
        while True:
            if data:
                if first is None:
                    first = time.perf_counter() - began
                out = translator.feed(data)
                if out:
                    await sink.write(out)
                if translator.ended:
                    break
            if complete:
                break
            try:
                data = await exchange.read()
            except ProxyError:
                break
            if not data:
                break
        tail = translator.close()
        if tail:
            await sink.write(tail)
        await sink.end([])
    finally:
        if not exchange.complete:
            exchange.abort()
    return translator.usage(), first


async def _relay_stream(
    exchange: Exchange, sink: ResponseSink, api: ApiFormat, began: float
) -> tuple[TokenUsage | None, float | None]:
    """Pass a stream through, whole events only: a cut stream's unfinished event is dropped and an
    error event in the client's format ends it, so the SDK raises instead of parsing half an event."""
    meter = UsageMeter(BodyKind.EVENT_STREAM)
    await sink.start(200, [_EVENT_STREAM, (b"cache-control", b"no-cache")], None, b"", False)
    first: float | None = None
    pending = b""
    cut = False
    data, complete = exchange.take_body()
    try:
        while True:
            if data:
                if first is None:
                    first = time.perf_counter() - began
                meter.feed(data)
                pending += data
                boundary = max(pending.rfind(b"\n\n") + 2, pending.rfind(b"\r\n\r\n") + 4, 0)
                if boundary > 0:
                    await sink.write(pending[:boundary])
                    pending = pending[boundary:]
            if complete:
                break
            try:
                data = await exchange.read()
            except ProxyError:
                cut = True
                break
            if not data:
                break
        if cut or (api == "openai" and not meter.done):
            # A cut (or an OpenAI stream without [DONE]): never end as if the answer were whole.
            await sink.write(stream_error_event(api, CUT_MESSAGE))
        elif pending:
            await sink.write(pending)
        await sink.end([])
    finally:
        if not exchange.complete:
            exchange.abort()
    return meter.finish(), first


async def _read_body(request: ProxyRequest, limit: int) -> bytes | None:
    """The whole request body, None when it exceeds `limit` bytes."""
    source = request.body
    if source is None:
        return b""
    if request.content_length is not None and request.content_length > limit:
        return None
    whole = source.take_complete()
    if whole is not None:
        return whole if len(whole) <= limit else None
    parts: list[bytes] = []
    size = 0
    while True:
        data = await source.read()
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > limit:
            return None
        parts.append(data)


async def _read_error_body(exchange: Exchange) -> bytes:
    """Up to MAX_ERROR_BODY bytes of a provider's error answer (its message is all that is kept)."""
    data, complete = exchange.take_body()
    parts = [data]
    size = len(data)
    try:
        while not complete and size <= MAX_ERROR_BODY:
            piece = await exchange.read()
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
    except ProxyError:
        pass
    if not exchange.complete:
        exchange.abort()
    return b"".join(parts)


def _model_list(settings: LlmBackendSettings) -> dict[str, Any]:
    """The backend's models and aliases, in OpenAI's list shape."""
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "agentgate"} for name in settings.listed_models()]
    return {"object": "list", "data": data}


async def _answer(sink: ResponseSink, error: ErrorResponse) -> None:
    headers = [*error.headers, (b"content-length", b"%d" % len(error.body))]
    await sink.start(error.status, headers, len(error.body), error.body, True)


async def _answer_json(sink: ResponseSink, status: int, document: Any) -> None:
    body = json_bytes(document)
    await sink.start(status, [_JSON, (b"content-length", b"%d" % len(body))], len(body), body, True)


__all__ = ["LlmHandler", "LlmRequest", "operation_of", "provider_upstreams", "upstream_body"]
