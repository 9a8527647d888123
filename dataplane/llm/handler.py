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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import anyio

from dataplane.config.llm import DEFAULT_ANTHROPIC_VERSION
from dataplane.config.model import (
    LlmBackendSettings,
    LlmProviderSettings,
    RuntimeConfig,
    UpstreamCluster,
    UpstreamTarget,
)
from dataplane.config.policy import RetrySettings
from dataplane.http.errors import ProxyError
from dataplane.http.messages import Headers, ProxyRequest, ResponseSink, read_whole_body
from dataplane.llm.errors import (
    MAX_ERROR_BODY,
    ErrorResponse,
    body_too_large,
    cannot_translate,
    credentials_refused,
    gateway_error,
    malformed_json,
    missing_model,
    no_provider,
    provider_error,
    provider_message,
    retry_after_seconds,
    stream_error_event,
    unknown_model,
)
from dataplane.llm.metering import CHARGE_TIMEOUT
from dataplane.llm.routing import (
    CREDENTIAL_STATUSES,
    Attempt,
    Operation,
    ProviderHealth,
    candidates,
    is_failover_status,
    provider_format,
    route_model,
    upstream_headers,
    upstream_target,
)
from dataplane.llm.stream_translate import (
    CUT_MESSAGE,
    TOO_LARGE_MESSAGE,
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
)
from dataplane.llm.tokens import OutputTokenEstimate, estimate_input_tokens, estimated_usage
from dataplane.llm.translate import (
    TRANSLATION_FAULTS,
    TranslationError,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)
from dataplane.llm.usage import BodyKind, TokenUsage, UsageMeter
from dataplane.llm.wire import DEFAULT_EVENT_CAP, ApiFormat, drop_usage_chunks, json_bytes
from dataplane.observability.request import Observability, RequestTelemetry
from dataplane.policy.authorize import llm_variables
from dataplane.policy.chain import Admitted
from dataplane.policy.identity import Identity
from dataplane.policy.resilience import FailureKind, RetryState, failure_kind
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
# A whole answer in the other API is read before it is reshaped: at most this much.
MAX_TRANSLATED_ANSWER: Final = 16 * 1024 * 1024
# After a translated stream's end, the provider's own body end is awaited this long and this much at most.
_DRAIN_TIMEOUT: Final = 1.0
_DRAIN_LIMIT: Final = 64 * 1024
# A provider's error body is read this long at most (it only gives the error's message).
_ERROR_BODY_TIMEOUT: Final = 5.0
# The routes, by the end of the path (the route may mount the gateway under a prefix).
_OPERATIONS: Final[tuple[tuple[str, Operation, ApiFormat], ...]] = (
    ("/chat/completions", "chat", "openai"),
    ("/embeddings", "embeddings", "openai"),
    ("/messages", "messages", "anthropic"),
    ("/models", "models", "openai"),
)


@dataclass(frozen=True, slots=True)
class LlmResilience:
    """Bounds of one LLM request. `deadline` is the event-loop time the whole request must end by
    (the route's or the policy's request timeout); `per_try` bounds each provider try until its
    response head; `idle` cuts an answer whose body stalls this long; `retry` runs the failover
    list again after every provider failed, for the causes it names."""

    deadline: float | None = None
    per_try: float | None = None
    idle: float | None = None
    retry: RetrySettings | None = None


NO_RESILIENCE: Final = LlmResilience()


@dataclass(slots=True)
class LlmRequest:
    """What the proxy hands the LLM handler: the request, its backend, the admitting policy outcome."""

    request: ProxyRequest
    cluster: UpstreamCluster
    path: str
    admitted: Admitted | None
    telemetry: RequestTelemetry
    # The route's (or else the policy's) timeouts and the policy's retries.
    resilience: LlmResilience = NO_RESILIENCE


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


def cost_owner(identity: Identity | None) -> str:
    """Who an LLM call's tokens are allocated to: a service-account token's namespace, else an API
    key's name (keys are named after the namespace they are issued to), else "" (unknown). A JWT's
    subject is not used: it is unbounded, and a metric label must not be."""
    if identity is None:
        return ""
    if identity.namespace:
        return identity.namespace
    return identity.principal if identity.method == "apikey" else ""


def policy_refusal(path: str, status: int, message: str, code: str) -> ErrorResponse:
    """A policy's refusal (401, 403, 429 budget or limit, 5xx failing closed) of an LLM request, in
    the format of the API its path speaks, so the SDK's error carries the message and code."""
    found = operation_of(path)
    return gateway_error(found[1] if found is not None else "openai", status, message, code=code)


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
        tokens_field = "max_tokens" if provider.type == "openai_compatible" else "max_completion_tokens"
        return anthropic_to_openai_request(
            body, model=attempt.model, max_tokens_field=tokens_field, stream_usage=settings.stream_usage
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

    def provider_clusters(self) -> dict[str, UpstreamCluster]:
        """The pool-ready clusters of every configured provider, by name (the pools keep theirs)."""
        return {
            upstream.cluster.name: upstream.cluster
            for _, providers in self._upstreams.values()
            for upstream in providers.values()
        }

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
        raw = await read_whole_body(request, settings.max_request_bytes)
        if raw is None:
            await _answer(sink, body_too_large(api, settings.max_request_bytes))
            return
        try:
            body = json.loads(raw, parse_constant=_not_json, parse_float=_finite_float) if raw else None
        except (ValueError, RecursionError) as exc:
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
        if admitted is not None:
            decision = admitted.authorize("llm", llm_variables(model))
            if not decision.allowed:
                llm.telemetry.authorized(decision, admitted.deferred_policy)
                await _answer(sink, gateway_error(api, 403, f"model `{model}` is not allowed for this caller"))
                return
        health = self.health(llm.cluster.name)
        if route_model(settings, model, health, operation) is None:
            served = operation != "chat" and bool(candidates(settings, model))
            await _answer(sink, unknown_model(api, model, operation=operation if served else None))
            return
        progress = _Progress()
        deadline = llm.resilience.deadline
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
            await self._serve(llm, sink, settings, api, operation, body, model, health, progress)
        if scope.cancelled_caught:
            await _end_on_timeout(sink, api, progress)

    async def _serve(
        self,
        llm: LlmRequest,
        sink: ResponseSink,
        settings: LlmBackendSettings,
        api: ApiFormat,
        operation: Operation,
        body: dict[str, Any],
        model: str,
        health: ProviderHealth,
        progress: _Progress,
    ) -> None:
        """Rounds of the failover list: a round ends at the first answer that goes to the client;
        after a round where every provider failed, the policy's retry may run another."""
        began = time.perf_counter()
        carried = [(n, v) for n, v in llm.request.headers if n in _CARRIED_HEADERS]
        resilience = llm.resilience
        retries = RetryState(resilience.retry, deadline=resilience.deadline)
        while True:
            route = route_model(settings, model, health, operation)
            attempts = route.attempts if route is not None else ()
            failure = _Failure()
            for attempt in attempts:
                answered = await self._try(
                    llm, sink, settings, api, operation, body, attempt, health, carried, failure, progress, began
                )
                if answered:
                    return
            delay = _retry_delay(retries, failure, anyio.current_time())
            if delay is None:
                break
            log.info(
                "llm providers all failed, retrying", model=model, cause=failure.cause, retry=retries.retries,
                backoff=round(delay, 4),
            )  # fmt: skip
            if delay > 0:
                await anyio.sleep(delay)
        if failure.error is not None:
            await _answer(sink, failure.error)
            return
        await _answer(sink, no_provider(api, attempts[0].model if attempts else model))

    async def _try(
        self,
        llm: LlmRequest,
        sink: ResponseSink,
        settings: LlmBackendSettings,
        api: ApiFormat,
        operation: Operation,
        body: dict[str, Any],
        attempt: Attempt,
        health: ProviderHealth,
        carried: Headers,
        failure: _Failure,
        progress: _Progress,
        began: float,
    ) -> bool:
        """One provider try. True when the client got its answer (an error the request itself
        caused included); False when the provider failed and `failure` says how."""
        provider = attempt.provider
        try:
            payload = json_bytes(upstream_body(api, operation, body, attempt, settings))
        except TranslationError as exc:
            # Not the provider's failure: a later provider (of the client's own API) may carry it.
            failure.cause, failure.error = None, cannot_translate(api, exc.field, exc.reason)
            return False
        except TRANSLATION_FAULTS as exc:
            # A field of the wrong type (`"stop": 5`, `"tools": 5`) the translator did not check.
            message = f"the request cannot be carried to provider {provider.name}: {exc}"
            failure.cause, failure.error = None, gateway_error(api, 400, message)
            return False
        target = upstream_target(provider, operation, attempt.model)
        if target is None:
            return False
        upstream = self._provider_upstream(llm.cluster, provider)
        headers: Headers = [_JSON, (b"content-length", b"%d" % len(payload)), *carried]
        if provider.type == "anthropic":
            headers += [(n, v) for n, v in llm.request.headers if n == b"anthropic-beta"]
        headers += upstream_headers(provider)
        head_request = UpstreamRequest(
            b"POST", target.encode("latin-1"), provider.authority.encode("latin-1"), headers, True, len(payload)
        )
        pool = self._pools.get(upstream.cluster, upstream.target)
        per_try = llm.resilience.per_try
        exchange: Exchange | None = None
        try:
            with anyio.fail_after(math.inf if per_try is None else per_try):
                exchange = await pool.open(head_request, payload)  # type: ignore[call-arg]
                head = await exchange.response()
        except (ProxyError, TimeoutError) as exc:
            if exchange is not None:
                exchange.abort()
            if isinstance(exc, TimeoutError):
                message = f"provider {provider.name} sent no response within {per_try:g}s"
                failure.failed("reset", gateway_error(api, 504, message, code="provider_timeout"))
            else:
                failure.failed(failure_kind(exc) or "reset", failure.error)
                message = exc.message
            log.info("llm provider failed, trying the next", provider=provider.name, error=message)
            health.record_failure(provider.name, threshold=settings.consecutive_failures, eject_for=settings.eject_for)
            return False
        if head.status != 200 and head.status < 400:
            exchange.abort()
            message = f"provider {provider.name} answered HTTP {head.status}, not an answer"
            await _answer(sink, gateway_error(api, 502, message))
            return True
        if head.status >= 400:
            error_body = await _read_error_body(exchange, llm.resilience.idle)
            if head.status in CREDENTIAL_STATUSES:
                # The gateway's key for this provider is wrong or lacks access: the client is told
                # which provider (never the provider's message: it may quote the key); the log says why.
                reason, _, _ = provider_message(error_body, head.status)
                log.warning("llm provider refused the gateway's credentials", provider=provider.name,
                            status=head.status, reason=reason)  # fmt: skip
                error = credentials_refused(api, head.status, provider.name)
            else:
                error = provider_error(api, head.status, head.headers, error_body, provider=provider.name)
            if not is_failover_status(head.status):
                await _answer(sink, error)  # the request's own fault: it would fail anywhere
                return True
            retry_after = retry_after_seconds(head.headers)
            health.record_failure(
                provider.name,
                threshold=settings.consecutive_failures,
                eject_for=settings.eject_for,
                retry_after=retry_after,
            )
            log.info("llm provider failed, trying the next", provider=provider.name, status=head.status)
            failure.failed(head.status, error, retry_after)
            return False
        health.record_success(provider.name)
        record = llm.telemetry.record
        record.llm_provider = provider.name
        record.llm_provider_model = attempt.model
        record.upstream_address = provider.authority
        estimate = OutputTokenEstimate() if _estimates_output(settings, provider) else None
        relay = _Relay(exchange, sink, api, llm.resilience.idle, progress, began, estimate)
        try:
            await relay.run(head.headers, provider, body)
        finally:
            if not exchange.complete:
                exchange.abort()
            usage = relay.usage()  # what the answer reported, so far when it was cut or cancelled
            if usage is None:
                usage = _estimate(api, operation, body, relay.estimate)
                record.llm_usage_estimated = usage is not None
            with anyio.CancelScope(shield=True):
                first = relay.first if progress.stream else None  # time to first token: streams only
                await self._settle(llm, provider, attempt, operation, usage, time.perf_counter() - began, first)
        return True

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
        if first_chunk is not None:
            record.llm_first_token_ms = round(first_chunk * 1000, 3)
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
            genai_provider = _GENAI_PROVIDER.get(provider.type, provider.name)
            if usage is not None:
                metrics.record_llm_tokens(
                    llm.cluster.name, cost_owner(admitted.identity if admitted is not None else None),
                    genai_provider, attempt.model, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                )  # fmt: skip
            metrics.record_llm(
                genai_provider,
                "embeddings" if operation == "embeddings" else "chat",
                attempt.model,
                input_tokens=usage.input_tokens if usage is not None else None,
                output_tokens=usage.output_tokens if usage is not None else None,
                duration=duration,
                time_to_first_chunk=first_chunk,
            )


@dataclass(slots=True)
class _Progress:
    """How far the client's answer got: started as an event stream, ended."""

    stream: bool = False
    ended: bool = False


@dataclass(slots=True)
class _Failure:
    """The last failed try of a round: its retry cause, the error the client gets when no try is
    left, and the provider's Retry-After."""

    cause: FailureKind | int | None = None
    error: ErrorResponse | None = None
    retry_after: float | None = None

    def failed(self, cause: FailureKind | int, error: ErrorResponse | None, retry_after: float | None = None) -> None:
        self.cause = cause
        self.error = error
        self.retry_after = retry_after


def _retry_delay(state: RetryState, failure: _Failure, now: float) -> float | None:
    """The wait before another round, or None. A 429 counts as a retryable 5xx (the provider is
    overloaded, as with 503) when its Retry-After is no longer than the policy's longest backoff;
    the wait is then at least that Retry-After."""
    cause = failure.cause
    retry = state.retry
    if cause is None or retry is None:
        return None
    retry_after = failure.retry_after
    if cause == 429:
        if retry_after is not None and retry_after > retry.backoff_max:
            return None
        cause = 503
    delay = state.decide(cause, now)
    if delay is None or retry_after is None:
        return delay
    delay = max(delay, retry_after)
    if state.deadline is not None and now + delay >= state.deadline:
        return None
    return delay


def _estimates_output(settings: LlmBackendSettings, provider: LlmProviderSettings) -> bool:
    """Whether an answer's output tokens are estimated as it passes, in case the provider reports
    no usage: always for whole answers (read only when no usage is found), for streams only where
    usage may well be missing (not asked for, or a self-hosted server that may ignore the ask),
    since it costs a parse of every event."""
    return provider.type == "openai_compatible" or not settings.stream_usage


def _estimate(
    api: ApiFormat, operation: Operation, body: dict[str, Any], estimate: OutputTokenEstimate | None
) -> TokenUsage | None:
    """The usage charged when the provider reported none: the request's input estimated, and the
    answer's output where it was observed."""
    if operation == "embeddings":
        return None
    output = estimate.total() if estimate is not None else 0
    return estimated_usage(estimate_input_tokens(api, body), output)


async def _end_on_timeout(sink: ResponseSink, api: ApiFormat, progress: _Progress) -> None:
    """The request's deadline passed: a 504 in the client's format, or an error event ending a
    stream already under way, or (a whole answer half sent) the connection cut."""
    message = "the request timed out"
    if not sink.started:
        await _answer(sink, gateway_error(api, 504, message, code="timeout"))
    elif progress.stream and not progress.ended:
        await sink.write(stream_error_event(api, message, status=504))
        await sink.end([])
        progress.ended = True
    elif not progress.ended:
        sink.abort()


class _Relay:
    """A provider's success answer sent on to the client: passed through or translated, streams
    event by event. `first` is the time to the first body piece; `estimate` sees the answer's
    documents; `usage()` is the usage the answer reported, so far if it was cut or cancelled."""

    __slots__ = ("_api", "_began", "_exchange", "_idle", "_progress", "_sink", "_usage", "estimate", "first")

    def __init__(
        self,
        exchange: Exchange,
        sink: ResponseSink,
        api: ApiFormat,
        idle: float | None,
        progress: _Progress,
        began: float,
        estimate: OutputTokenEstimate | None,
    ) -> None:
        self._exchange = exchange
        self._sink = sink
        self._api = api
        self._idle = math.inf if idle is None else idle
        self._progress = progress
        self._began = began
        self.estimate = estimate
        self.first: float | None = None
        # What reads the answer's usage (a meter or a translator), once the answer is under way.
        self._usage: Callable[[], TokenUsage | None] | None = None

    def usage(self) -> TokenUsage | None:
        return self._usage() if self._usage is not None else None

    async def _read(self) -> bytes:
        """The next body piece; raises ProxyError when the answer breaks, TimeoutError when it stalls."""
        with anyio.fail_after(self._idle):
            return await self._exchange.read()

    def _mark_first(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self._began

    async def run(self, headers: Headers, provider: LlmProviderSettings, body: dict[str, Any]) -> None:
        kind = UsageMeter.for_response(headers).kind
        translated = self._api != provider_format(provider)
        if kind is BodyKind.EVENT_STREAM:
            self._progress.stream = True
            if translated:
                await self._translated_stream(body)
            else:
                await self._stream(hide_usage=self._api == "openai" and not _asks_for_usage(body))
        elif translated:
            await self._translated_whole()
        else:
            await self._whole(headers)

    async def _whole(self, headers: Headers) -> None:
        """A whole answer passed through piece by piece (never held: embeddings can be large)."""
        observer = self.estimate.observe if self.estimate is not None else None
        meter = UsageMeter(BodyKind.JSON, observer=observer)
        self._usage = meter.finish
        sink = self._sink
        data, complete = self._exchange.take_body()
        meter.feed(data)
        content_type = _content_type(headers)
        if complete:
            self._mark_first()
            await sink.start(200, [content_type, (b"content-length", b"%d" % len(data))], len(data), data, True)
            self._progress.ended = True
            return
        length = _content_length(headers)
        head: Headers = [content_type] if length is None else [content_type, (b"content-length", b"%d" % length)]
        await sink.start(200, head, length, data, False)
        while True:
            try:
                piece = await self._read()
            except (ProxyError, TimeoutError) as exc:
                log.info("llm provider answer cut off", error=getattr(exc, "message", "stalled"))
                sink.abort()  # a JSON body half sent cannot be ended cleanly
                self._progress.ended = True
                return
            if not piece:
                break
            self._mark_first()
            meter.feed(piece)
            await sink.write(piece)
        await sink.end([])
        self._progress.ended = True

    async def _translated_whole(self) -> None:
        """A whole answer in the other API: read (up to MAX_TRANSLATED_ANSWER), then reshaped. An
        answer too large or cut off is a 502, yet the usage it carried (or an estimate) is charged:
        the provider spent those tokens."""
        api = self._api
        observer = self.estimate.observe if self.estimate is not None else None
        meter = UsageMeter(BodyKind.JSON, observer=observer)
        self._usage = meter.finish
        data, complete = self._exchange.take_body()
        meter.feed(data)
        chunks = [data]
        size = len(data)
        while True:
            if size > MAX_TRANSLATED_ANSWER:
                message = f"the provider's answer is larger than {MAX_TRANSLATED_ANSWER} bytes, too large to translate"
                await _answer(self._sink, gateway_error(api, 502, message))
                return
            if complete:
                break
            try:
                piece = await self._read()
            except (ProxyError, TimeoutError):
                await _answer(self._sink, gateway_error(api, 502, "the provider's answer was cut off"))
                return
            if not piece:
                break
            meter.feed(piece)
            size += len(piece)
            chunks.append(piece)
        self._mark_first()
        raw = b"".join(chunks)
        try:
            document = json.loads(raw)
        except ValueError:
            await _answer(self._sink, gateway_error(api, 502, "the provider answered with a body that is not JSON"))
            return
        try:
            if not isinstance(document, dict):
                raise TypeError("not a JSON object")
            if api == "openai":
                out = anthropic_to_openai_response(document, created=int(time.time()))
            else:
                out = openai_to_anthropic_response(document)
            raw = json_bytes(out)
        except TRANSLATION_FAULTS:
            message = "the provider answered with a body that is not a valid answer of its API"
            await _answer(self._sink, gateway_error(api, 502, message))
            return
        await self._sink.start(200, [_JSON, (b"content-length", b"%d" % len(raw))], len(raw), raw, True)
        self._progress.ended = True

    async def _translated_stream(self, body: dict[str, Any]) -> None:
        translator: AnthropicToOpenAIStream | OpenAIToAnthropicStream
        if self._api == "openai":
            translator = AnthropicToOpenAIStream(created=int(time.time()), include_usage=_asks_for_usage(body))
        else:
            observer = self.estimate.observe if self.estimate is not None else None
            translator = OpenAIToAnthropicStream(model=str(body.get("model", "")), observer=observer)
        self._usage = translator.usage
        sink = self._sink
        await sink.start(200, [_EVENT_STREAM, (b"cache-control", b"no-cache")], None, b"", False)
        data, complete = self._exchange.take_body()
        while True:
            if data:
                self._mark_first()
                out = translator.feed(data)
                if out:
                    await sink.write(out)
                if translator.ended:
                    break
            if complete:
                break
            try:
                data = await self._read()
            except (ProxyError, TimeoutError):
                break
            if not data:
                break
        tail = translator.close()
        if tail:
            await sink.write(tail)
        await sink.end([])
        self._progress.ended = True
        if translator.finished:
            await self._drain()

    async def _drain(self) -> None:
        """The answer ended (message_stop, [DONE]) before the provider's body did (its last chunk is
        on the way): read that end, bounded, so the connection goes back to its pool rather than
        being closed and a new one opened for the next request."""
        await _read_on(self._exchange, _DRAIN_LIMIT, min(self._idle, _DRAIN_TIMEOUT))

    async def _stream(self, *, hide_usage: bool) -> None:
        """A stream passed through, whole events only: a cut stream's unfinished event is dropped
        and an error event in the client's format ends it, so the SDK raises instead of parsing
        half an event. `hide_usage`: the usage chunk was asked for by the gateway, not the client,
        so it is read and not forwarded. One event is at most DEFAULT_EVENT_CAP bytes."""
        api = self._api
        observer = self.estimate.observe if self.estimate is not None else None
        meter = UsageMeter(BodyKind.EVENT_STREAM, observer=observer)
        self._usage = meter.finish
        sink = self._sink
        await sink.start(200, [_EVENT_STREAM, (b"cache-control", b"no-cache")], None, b"", False)
        pending = b""
        cut = too_large = False
        data, complete = self._exchange.take_body()
        while True:
            if data:
                self._mark_first()
                meter.feed(data)
                pending += data
                boundary = _events_end(pending)
                if boundary > 0:
                    events = pending[:boundary]
                    await sink.write(drop_usage_chunks(events) if hide_usage else events)
                    pending = pending[boundary:]
                if len(pending) > DEFAULT_EVENT_CAP:
                    too_large = True
                    break
            if complete:
                break
            if meter.done:
                break  # the answer is whole ([DONE], message_stop): the body's own end is not waited for
            try:
                data = await self._read()
            except (ProxyError, TimeoutError):
                cut = True
                break
            if not data:
                break
        intact = not cut and not too_large
        if intact:
            meter.finish()  # the body ended: a last event without its blank line still counts
        if too_large:
            await sink.write(stream_error_event(api, TOO_LARGE_MESSAGE))
        elif not meter.done:
            # A cut, or a stream without its end ([DONE], message_stop): never end as if it were whole.
            await sink.write(stream_error_event(api, CUT_MESSAGE))
        elif pending:
            await sink.write(drop_usage_chunks(pending) if hide_usage else pending)
        await sink.end([])
        self._progress.ended = True
        if intact and meter.done:
            await self._drain()


def _asks_for_usage(body: dict[str, Any]) -> bool:
    """Whether an OpenAI client asked for the usage chunk of its stream (stream_options.include_usage)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _not_json(constant: str) -> NoReturn:
    """json.loads takes NaN and Infinity, which JSON has not (a provider would refuse the body)."""
    raise ValueError(f"{constant} is not a JSON value")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refusing one too large for it (1e400 would go out as Infinity)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _events_end(pending: bytes) -> int:
    """Where the whole events in `pending` end (after their blank line), 0 when none has."""
    lf = pending.rfind(b"\n\n")
    crlf = pending.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _content_type(headers: Headers) -> tuple[bytes, bytes]:
    """The provider's content-type (JSON when it named none): a pass-through answer keeps it."""
    for name, value in headers:
        if name == b"content-type":
            return (b"content-type", value)
    return _JSON


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_error_body(exchange: Exchange, idle: float | None = None) -> bytes:
    """Up to MAX_ERROR_BODY bytes of a provider's error answer (its message is all that is kept),
    read for at most `_ERROR_BODY_TIMEOUT` (or the idle bound, when shorter): a stalled error body
    must not hold up the failover."""
    data, _ = exchange.take_body()
    parts = [data]
    await _read_on(
        exchange, MAX_ERROR_BODY - len(data), min(math.inf if idle is None else idle, _ERROR_BODY_TIMEOUT), parts
    )
    if not exchange.complete:
        exchange.abort()
    return b"".join(parts)


async def _read_on(exchange: Exchange, limit: int, within: float, keep: list[bytes] | None = None) -> None:
    """Read the rest of an upstream body, bounded: until it ends or breaks, past `limit` bytes or
    after `within` seconds; the pieces go to `keep` when given (else they are dropped)."""
    size = 0
    try:
        with anyio.move_on_after(within):
            while not exchange.complete and size <= limit:
                piece = await exchange.read()
                if not piece:
                    break
                size += len(piece)
                if keep is not None:
                    keep.append(piece)
    except ProxyError:
        pass


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


__all__ = [
    "NO_RESILIENCE",
    "LlmHandler",
    "LlmRequest",
    "LlmResilience",
    "operation_of",
    "policy_refusal",
    "provider_upstreams",
    "upstream_body",
]
