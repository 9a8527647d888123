"""Spans exported over OTLP/gRPC (our TraceService peer) and OTLP/HTTP (oteltap), asserted as received:
names, kinds, parent/child links, attributes, the incoming trace continued; then shutdown flushing,
a dead collector (throttled logs, nothing raised) and a stuck one (the loop never waits)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from dataplane.http.messages import ProxyRequest
from dataplane.observability.propagation import extract, extract_mcp_meta
from dataplane.observability.settings import BatchSettings, Protocol, SamplerKind, TracingSettings
from dataplane.observability.tracing import Tracing
from tests.conftest import free_port
from tests.peers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, ReceivedSpan, otlp_grpc_receiver, otlp_http_receiver

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

Receiver = OtlpGrpcReceiver | OtlpHttpReceiver
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_UNSET, STATUS_ERROR = 0, 2

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT = 0x00F067AA0BA902B7
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@asynccontextmanager
async def receiver_for(protocol: Protocol) -> AsyncIterator[Receiver]:
    if protocol is Protocol.GRPC:
        async with otlp_grpc_receiver() as grpc_receiver:
            yield grpc_receiver
    else:
        async with otlp_http_receiver() as http_receiver:
            yield http_receiver


def tracing_for(endpoint: str, protocol: Protocol, **overrides: Any) -> Tracing:
    settings = TracingSettings(
        endpoint=endpoint,
        protocol=protocol,
        service_name="agentgate-test",
        resource_attributes={"deployment.environment": "test"},
        # Nothing leaves on a timer during a test: flush() or shutdown() sends.
        batch=BatchSettings(schedule_delay_ms=600_000),
        export_timeout_ms=5000,
    )
    tracing = Tracing(dataclasses.replace(settings, **overrides))
    tracing.start()
    return tracing


@pytest.fixture(params=[Protocol.GRPC, Protocol.HTTP_PROTOBUF], ids=["grpc", "http"])
async def pipeline(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Receiver, Tracing]]:
    async with receiver_for(request.param) as receiver:
        tracing = tracing_for(receiver.endpoint, request.param)
        try:
            yield receiver, tracing
        finally:
            await tracing.shutdown()


def proxy_request(
    headers: list[tuple[bytes, bytes]], method: bytes = b"POST", target: bytes = b"/mcp?token=s3cret"
) -> ProxyRequest:
    return ProxyRequest(method, target, b"gw.example:8080", b"http", [(b"user-agent", b"agent/1.0"), *headers],
                        None, None, b"10.1.2.3", ("0.0.0.0", 8080), 8080, b"1.1")


def by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


async def test_a_request_with_fan_out_retries_and_model_and_agent_calls(pipeline: tuple[Receiver, Tracing]) -> None:
    receiver, tracing = pipeline
    span = tracing.server_span(
        proxy_request([(b"traceparent", TRACEPARENT), (b"tracestate", b"rojo=00f067aa0ba902b7")]),
        gateway="default/gw", listener="http",
    )
    assert span.recording and span.trace_id == TRACE
    span.set_route("default/mcp", backend="default/tools")
    span.set_mcp("tools/call", tool="notes__add", session_id="s-1", request_id=7)

    # An MCP fan-out: a stdio target (context in _meta) and an HTTP one (context in headers).
    notes = span.mcp_span("notes", "tools/call", tool="add", stdio=True, request_id=7)
    params = notes.inject_into_mcp_meta({"name": "add", "arguments": {"text": "hi"}})
    clock = span.mcp_span("clock", "tools/call", tool="now", address="127.0.0.1", port=8082)
    clock_headers = clock.inject_headers([(b"traceparent", b"00-client-stale"), (b"accept", b"application/json")])
    notes.end(200, reason="ok")
    clock.end(200)
    # An upstream retried once: two attempts, two spans.
    first = span.client_span(method=b"POST", backend="default/echo", address="10.0.0.7", port=80, path=b"/v1")
    first.end(503, reason="upstream_error")
    second = span.client_span(method=b"POST", backend="default/echo", address="10.0.0.7", port=80, attempt=1)
    second.end(200)
    # A model call and an agent call.
    model = span.llm_span("openai", "gpt-4o-mini", address="api.example", port=443)
    model.set_usage(120, 30, response_model="gpt-4o-mini-2024-07-18", cache_read_input_tokens=100)
    model.end(200)
    agent = span.a2a_span("SendMessage", agent="planner", backend="default/agents")
    agent.set_a2a(task_id="task-42")
    agent.end(200)
    span.end(200, reason="ok")

    assert await tracing.flush()
    spans = await receiver.wait_for_count(7)
    assert len(spans) == 7
    named = by_name(spans)
    assert sorted(named) == sorted(
        ["POST default/mcp", "tools/call add", "tools/call now", "POST", "chat gpt-4o-mini", "invoke_agent planner"]
    )
    (server,) = named["POST default/mcp"]
    assert server.kind == SERVER and server.trace_id == TRACE and server.parent_span_id == PARENT
    assert server.span_id == span.span_id
    assert server.trace_state == "rojo=00f067aa0ba902b7"
    assert server.status_code == STATUS_UNSET
    assert server.attributes == {
        "http.request.method": "POST",
        "url.path": "/mcp",  # the query (here a token) is never recorded
        "url.scheme": "http",
        "server.address": "gw.example",
        "server.port": 8080,
        "client.address": "10.1.2.3",
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "user_agent.original": "agent/1.0",
        "agentgate.gateway": "default/gw",
        "agentgate.listener": "http",
        "agentgate.route": "default/mcp",
        "agentgate.backend": "default/tools",
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "notes__add",
        "gen_ai.operation.name": "execute_tool",
        "mcp.session.id": "s-1",
        "jsonrpc.request.id": "7",
        "http.response.status_code": 200,
        "agentgate.reason": "ok",
    }
    for child in spans:
        if child is not server:
            assert child.kind == CLIENT and child.trace_id == TRACE and child.parent_span_id == server.span_id

    (notes_span,) = named["tools/call add"]
    assert notes_span.attributes["agentgate.mcp.target"] == "notes"
    assert notes_span.attributes["network.transport"] == "pipe"
    assert notes_span.attributes["gen_ai.tool.name"] == "add"
    # The stdio target got this very span as its parent, in _meta.
    meta_context = extract_mcp_meta(params)
    assert meta_context is not None
    assert (meta_context.trace_id, meta_context.span_id, meta_context.sampled) == (TRACE, notes_span.span_id, True)
    assert params["_meta"]["tracestate"] == "rojo=00f067aa0ba902b7"

    (clock_span,) = named["tools/call now"]
    assert clock_span.attributes["server.address"] == "127.0.0.1" and clock_span.attributes["server.port"] == 8082
    header_context = extract(clock_headers)
    assert header_context is not None
    assert (header_context.trace_id, header_context.span_id) == (TRACE, clock_span.span_id)
    assert (b"accept", b"application/json") in clock_headers
    assert [value for name, value in clock_headers if name == b"traceparent"] == [
        b"00-%032x-%016x-01" % (TRACE, clock_span.span_id)
    ]

    attempts = sorted(named["POST"], key=lambda s: s.attributes.get("http.request.resend_count", 0))
    assert attempts[0].attributes["http.response.status_code"] == 503
    assert attempts[0].status_code == STATUS_ERROR and attempts[0].attributes["error.type"] == "upstream_error"
    assert "http.request.resend_count" not in attempts[0].attributes
    assert attempts[1].attributes["http.request.resend_count"] == 1 and attempts[1].status_code == STATUS_UNSET
    assert attempts[0].attributes["url.path"] == "/v1" and attempts[0].attributes["agentgate.backend"] == "default/echo"

    (llm,) = named["chat gpt-4o-mini"]
    assert {k: v for k, v in llm.attributes.items() if k.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.cache_read.input_tokens": 100,
    }
    (a2a,) = named["invoke_agent planner"]
    assert a2a.attributes["a2a.method.name"] == "SendMessage" and a2a.attributes["a2a.task.id"] == "task-42"
    assert a2a.attributes["gen_ai.agent.name"] == "planner"


async def test_b3_requests_continue_their_trace_and_get_b3_back(pipeline: tuple[Receiver, Tracing]) -> None:
    receiver, tracing = pipeline
    span = tracing.server_span(proxy_request(
        [(b"x-b3-traceid", b"a3ce929d0e0e4736"), (b"x-b3-spanid", b"1111111111111111"), (b"x-b3-sampled", b"1")],
        method=b"GET", target=b"/",
    ))
    span.set_route("default/web")
    call = span.client_span(method=b"GET", backend="default/web")
    headers = call.inject_headers([])
    call.end(404)
    span.end(404, reason="ok")
    single = tracing.server_span(proxy_request([(b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-2222222222222222-d")]))
    single_headers = single.inject_headers([])
    single.end(None, reason="client_closed")

    assert await tracing.flush()
    named = by_name(await receiver.wait_for_count(3))
    (server,) = named["GET default/web"]
    assert (server.trace_id, server.parent_span_id) == (0xA3CE929D0E0E4736, 0x1111111111111111)
    (client,) = named["GET"]
    assert client.parent_span_id == server.span_id and client.status_code == STATUS_ERROR  # 4xx fails a client
    assert server.status_code == STATUS_UNSET  # but not a server
    assert dict(headers) == {
        b"traceparent": b"00-%032x-%016x-01" % (0xA3CE929D0E0E4736, client.span_id),
        b"x-b3-traceid": b"%032x" % 0xA3CE929D0E0E4736,
        b"x-b3-spanid": b"%016x" % client.span_id,
        b"x-b3-sampled": b"1",
    }
    (post,) = named["POST"]  # never routed: named by its method alone
    assert (post.trace_id, post.parent_span_id) == (TRACE, 0x2222222222222222)
    assert post.status_code == STATUS_ERROR and post.attributes["error.type"] == "client_closed"
    assert dict(single_headers)[b"b3"] == b"%032x-%016x-1" % (TRACE, post.span_id)


async def test_a_root_request_starts_a_trace(pipeline: tuple[Receiver, Tracing]) -> None:
    receiver, tracing = pipeline
    span = tracing.server_span(proxy_request([], method=b"BREW"))
    call = span.client_span(method=b"BREW")
    call.end(error=ConnectionResetError("reset by peer"))
    span.end(502, reason="upstream_error")
    assert await tracing.flush()
    spans = await receiver.wait_for_count(2)
    (server,) = [s for s in spans if s.kind == SERVER]
    (client,) = [s for s in spans if s.kind == CLIENT]
    assert server.parent_span_id == 0 and server.trace_id == span.trace_id != 0
    assert server.name == "HTTP" and server.attributes["http.request.method"] == "_OTHER"
    assert server.attributes["http.request.method_original"] == "BREW"
    assert server.status_code == STATUS_ERROR and server.attributes["error.type"] == "upstream_error"
    assert client.parent_span_id == server.span_id and client.attributes["error.type"] == "ConnectionResetError"
    assert client.status_message == "reset by peer"


async def test_grpc_export_carries_resource_scope_and_headers() -> None:
    async with otlp_grpc_receiver() as receiver:
        tracing = tracing_for(receiver.endpoint, Protocol.GRPC, headers={"x-collector-token": "t0k"})
        try:
            tracing.server_span(proxy_request([])).end(200)
            assert await tracing.flush()
            (span,) = await receiver.wait_for_count(1)
        finally:
            await tracing.shutdown()
    assert span.resource["service.name"] == "agentgate-test"
    assert span.resource["deployment.environment"] == "test"
    assert span.resource["telemetry.sdk.language"] == "python"
    assert span.scope == "agentgate.dataplane"
    assert receiver.metadata[0]["x-collector-token"] == "t0k"


@pytest.mark.parametrize("protocol", [Protocol.GRPC, Protocol.HTTP_PROTOBUF], ids=["grpc", "http"])
async def test_shutdown_flushes_what_is_queued(protocol: Protocol) -> None:
    async with receiver_for(protocol) as receiver:
        tracing = tracing_for(receiver.endpoint, protocol)
        for number in range(5):
            span = tracing.server_span(proxy_request([(b"traceparent", TRACEPARENT)]))
            span.set_route(f"default/r{number}")
            span.end(200)
        await tracing.shutdown()  # the worker's drain: no flush() before it
        assert not tracing.enabled
        spans = await receiver.wait_for_count(5)
        assert sorted(s.name for s in spans) == [f"POST default/r{n}" for n in range(5)]
        # After shutdown, requests get the no-op handle and nothing more is sent.
        assert not tracing.server_span(proxy_request([(b"traceparent", TRACEPARENT)])).recording


@pytest.mark.parametrize("protocol", [Protocol.GRPC, Protocol.HTTP_PROTOBUF], ids=["grpc", "http"])
async def test_a_dead_collector_is_logged_throttled_never_raised(protocol: Protocol) -> None:
    port = free_port()  # nothing listens there
    endpoint = f"http://127.0.0.1:{port}" + ("/v1/traces" if protocol is Protocol.HTTP_PROTOBUF else "")
    tracing = tracing_for(endpoint, protocol, export_timeout_ms=300)
    with capture_logs() as logs:
        for _ in range(2):
            span = tracing.server_span(proxy_request([(b"traceparent", TRACEPARENT)]))
            span.client_span(method=b"GET").end(200)
            span.end(200)
            await tracing.flush()  # returns: the failure stays on the exporter's side
        await tracing.shutdown(grace=3.0)
    failures = [entry for entry in logs if entry["event"] == "trace export failed; spans dropped"]
    assert len(failures) == 1, logs  # two failed exports, one line
    assert failures[0]["endpoint"] == endpoint and failures[0]["log_level"] == "warning"
    assert tracing.exporter is not None and tracing.exporter.dropped_spans == 4
    # The exporters' own complaints came through the bridge (throttled), not as raw stderr lines.
    assert all(entry["event"].startswith(("trace export", "opentelemetry: ")) for entry in logs), logs
    assert not any(type(h).__name__ == "OtelLogBridge" for h in logging.getLogger("opentelemetry").handlers)


async def test_a_stuck_collector_never_holds_up_the_loop() -> None:
    async with otlp_grpc_receiver() as receiver:
        receiver.hold = hold = anyio.Event()
        tracing = tracing_for(
            receiver.endpoint, Protocol.GRPC, export_timeout_ms=20_000,
            batch=BatchSettings(schedule_delay_ms=600_000, max_queue_size=64, max_export_batch_size=8),
            sampler=SamplerKind.ALWAYS_ON,
        )
        try:
            with capture_logs() as logs:
                started = time.perf_counter()
                for _ in range(500):
                    tracing.server_span(proxy_request([])).end(200)
                elapsed = time.perf_counter() - started
            # The processor's thread is stuck in an export; the loop only appended (or dropped).
            assert elapsed < 1.0
            full = [entry for entry in logs if "Queue full" in entry["event"]]
            assert len(full) == 1 and full[0]["similar_not_logged"] == 0, logs  # one line for ~430 drops
            hold.set()
            assert await tracing.flush()
            spans = await receiver.wait_for_count(64)
            assert 64 <= len(spans) <= 72  # the queue's 64, plus the batch that was in flight
        finally:
            await tracing.shutdown()
