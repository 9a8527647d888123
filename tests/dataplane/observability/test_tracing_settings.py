"""Tracing settings from OTEL_* variables and overrides, the sampling decision, and the off and
not-sampled paths of the tracer (nothing exported: no receiver needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dataplane.http.messages import ProxyRequest
from dataplane.observability.propagation import extract
from dataplane.observability.sampling import Sampling
from dataplane.observability.settings import (
    BatchSettings,
    Protocol,
    SamplerKind,
    TracingSettings,
    TracingSettingsError,
    traces_endpoint,
)
from dataplane.observability.tracing import NOOP_CLIENT_SPAN, NOOP_SERVER_SPAN, Tracing

pytestmark = pytest.mark.anyio


def test_no_endpoint_means_off() -> None:
    settings = TracingSettings.from_env({})
    assert settings.endpoint is None and not settings.enabled
    assert settings.protocol is Protocol.HTTP_PROTOBUF
    assert settings.sampler is SamplerKind.PARENT_BASED_ALWAYS_ON
    assert settings.service_name == "agentgate"


def test_base_endpoint_gets_the_traces_path_for_http_only() -> None:
    assert TracingSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}).endpoint == (
        "http://collector:4318/v1/traces"
    )
    assert TracingSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/base/"}).endpoint == (
        "http://c:4318/base/v1/traces"
    )
    grpc = TracingSettings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert (grpc.endpoint, grpc.protocol) == ("http://c:4317", Protocol.GRPC)
    assert traces_endpoint("https://c", "grpc") == "https://c"


def test_traces_variables_win_over_the_general_ones() -> None:
    settings = TracingSettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20abc, x-tenant = t1",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1500",
        }
    )
    assert settings.endpoint == "http://traces:9999/custom"  # used as given
    assert settings.protocol is Protocol.HTTP_PROTOBUF
    assert settings.headers == {"authorization": "Bearer abc", "x-tenant": "t1"}
    assert "Bearer" not in repr(settings)  # credentials stay out of logs
    assert settings.export_timeout_ms == 1500


def test_sampler_service_resource_and_batch_variables() -> None:
    settings = TracingSettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-resource,deployment.environment=prod,k8s.pod.name=p%2C1",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_BSP_MAX_QUEUE_SIZE": "64",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
            "OTEL_BSP_EXPORT_TIMEOUT": "2000",
        }
    )
    assert (settings.sampler, settings.ratio) == (SamplerKind.PARENT_BASED_TRACE_ID_RATIO, 0.25)
    assert settings.service_name == "from-resource"
    assert settings.resource_attributes == {"deployment.environment": "prod", "k8s.pod.name": "p,1"}
    assert settings.batch == BatchSettings(schedule_delay_ms=100, export_timeout_ms=2000, max_queue_size=64,
                                           max_export_batch_size=32)
    named = TracingSettings.from_env({"OTEL_SERVICE_NAME": "gw-east", "OTEL_RESOURCE_ATTRIBUTES": "service.name=x"})
    assert named.service_name == "gw-east"


def test_disabled_by_the_sdk_switches() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert TracingSettings.from_env({**env, "OTEL_SDK_DISABLED": "true"}).endpoint is None
    assert TracingSettings.from_env({**env, "OTEL_TRACES_EXPORTER": "none"}).endpoint is None


def test_explicit_settings_override_the_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_SAMPLER": "always_off"}
    settings = TracingSettings.from_env(
        env, endpoint="http://cli:4317", protocol="grpc", sampler="traceidratio", ratio=0.5, service_name="cli"
    )
    assert (settings.endpoint, settings.protocol, settings.sampler, settings.ratio, settings.service_name) == (
        "http://cli:4317", Protocol.GRPC, SamplerKind.TRACE_ID_RATIO, 0.5, "cli"
    )
    assert TracingSettings.from_env(env, endpoint=None).endpoint is None  # the CLI can turn it off


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://c/x"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "=x"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20"}, "max_export_batch_size"),
    ],
)
def test_bad_variables_are_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(TracingSettingsError, match=named):
        TracingSettings.from_env(env)


def test_bad_overrides_are_refused() -> None:
    with pytest.raises(TracingSettingsError, match="protocol"):
        TracingSettings.from_env({}, protocol="http/json")
    with pytest.raises(TracingSettingsError, match="ratio"):
        TracingSettings.from_env({}, ratio=2.0)
    with pytest.raises(TracingSettingsError, match="unknown tracing setting"):
        TracingSettings.from_env({}, endpiont="http://typo")


LOW = 0xFFFFFFFFFFFFFFFF


def test_sampling_rules() -> None:
    assert Sampling(SamplerKind.ALWAYS_ON).decide(1, False) is True  # not parent-based: ignores the caller
    assert Sampling(SamplerKind.ALWAYS_OFF).decide(1, True) is False
    ratio = Sampling(SamplerKind.TRACE_ID_RATIO, 0.25)
    # The SDK's rule: the low 64 bits of the trace id below ratio * 2^64 (the high bits do not count).
    assert ratio.decide((7 << 64) | (LOW // 4 - 1), None) is True
    assert ratio.decide((7 << 64) | (LOW // 4 + 2), None) is False
    assert ratio.decide(LOW // 4 + 2, True) is False
    assert Sampling(SamplerKind.TRACE_ID_RATIO, 0.0).decide(0, None) is False
    assert Sampling(SamplerKind.TRACE_ID_RATIO, 1.0).decide(LOW, None) is True


def test_parent_based_sampling_follows_the_caller_and_roots_use_the_rule() -> None:
    for kind in (SamplerKind.PARENT_BASED_ALWAYS_ON, SamplerKind.PARENT_BASED_ALWAYS_OFF):
        sampling = Sampling(kind)
        assert sampling.decide(5, True) is True
        assert sampling.decide(5, False) is False
    assert Sampling(SamplerKind.PARENT_BASED_ALWAYS_ON).decide(5, None) is True
    assert Sampling(SamplerKind.PARENT_BASED_ALWAYS_OFF).decide(5, None) is False
    ratio = Sampling(SamplerKind.PARENT_BASED_TRACE_ID_RATIO, 0.5)
    assert ratio.decide(LOW, True) is True  # the caller's decision wins over the ratio
    assert ratio.decide(1, None) is True and ratio.decide(LOW, None) is False  # deferred: the rule decides


def request(headers: list[tuple[bytes, bytes]]) -> ProxyRequest:
    return ProxyRequest(b"GET", b"/a?secret=1", b"gw.example:8080", b"http", headers, None, None, b"10.1.2.3",
                        ("0.0.0.0", 8080), 8080, b"1.1")


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_off_is_one_shared_no_op() -> None:
    tracing = Tracing(TracingSettings())  # no endpoint
    tracing.start()
    assert not tracing.enabled
    headers = [(b"traceparent", TRACEPARENT), (b"accept", b"*/*")]
    span = tracing.server_span(request(headers), gateway="default/gw", listener="http")
    assert span is NOOP_SERVER_SPAN and not span.recording and span.trace_id == 0
    child = span.mcp_span("notes", "tools/call", tool="add")
    assert child is NOOP_CLIENT_SPAN and span.client_span(method=b"GET") is NOOP_CLIENT_SPAN
    # Off means transparent: the client's own trace headers reach the upstream untouched.
    assert child.inject_headers(headers) is headers
    params = {"name": "add"}
    assert child.inject_into_mcp_meta(params) is params
    child.end(200)
    span.end(200, reason="ok")
    await tracing.shutdown()


@pytest.fixture
async def unsampled() -> AsyncIterator[Tracing]:
    # An endpoint nobody listens on: nothing is sampled, so nothing is ever sent there.
    settings = TracingSettings(
        endpoint="http://127.0.0.1:9/v1/traces", sampler=SamplerKind.PARENT_BASED_ALWAYS_OFF, export_timeout_ms=500
    )
    tracing = Tracing(settings)
    tracing.start()
    yield tracing
    await tracing.shutdown(grace=1.0)


async def test_not_sampled_passes_the_callers_context_on(unsampled: Tracing) -> None:
    unsampled_parent = TRACEPARENT[:-2] + b"00"
    span = unsampled.server_span(request([(b"traceparent", unsampled_parent), (b"tracestate", b"a=1")]))
    assert not span.recording
    call = span.client_span(method=b"GET", backend="default/echo")
    out = call.inject_headers([(b"traceparent", b"stale"), (b"accept", b"*/*")])
    assert out == [(b"accept", b"*/*"), (b"traceparent", unsampled_parent), (b"tracestate", b"a=1")]
    meta = call.inject_into_mcp_meta({"name": "x"})
    assert meta == {"name": "x", "_meta": {"traceparent": unsampled_parent.decode(), "tracestate": "a=1"}}
    call.end(200)
    span.end(200)
    assert unsampled.force_flush() and unsampled.exporter is not None
    assert unsampled.exporter.exported_spans == unsampled.exporter.dropped_spans == 0  # nothing was sent


async def test_not_sampled_root_gets_new_ids_with_the_flag_off(unsampled: Tracing) -> None:
    span = unsampled.server_span(request([(b"b3", b"0")]))
    assert not span.recording and span.trace_id != 0
    out = span.mcp_span("t", "tools/list").inject_headers([])
    context = extract(out)
    assert context is not None and context.trace_id == span.trace_id and context.sampled is False
    # The caller used B3, so B3 goes upstream too.
    assert [name for name, _ in out] == [b"traceparent", b"b3"]
    other = unsampled.server_span(request([]))
    assert other.trace_id not in (0, span.trace_id)


async def test_a_sampled_parent_is_recorded_even_under_parentbased_always_off(unsampled: Tracing) -> None:
    span = unsampled.server_span(request([(b"traceparent", TRACEPARENT)]))
    assert span.recording and span.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    span.end(200)
