"""Real OTLP trace receivers for the tracing tests: an OTLP/gRPC TraceService (opentelemetry-proto's
servicer on grpc.aio) and the OTLP/HTTP receiver of PyPI `oteltap`, both on 127.0.0.1. Each collects
the spans it receives; `wait_for` waits on receipt with a bounded deadline (no sleeps).

Use the gRPC one from modules marked `pytest.mark.usefixtures("shared_event_loop")` (grpc.aio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import free_port


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def attributes_of(attributes: Any) -> dict[str, Any]:
    """OTLP KeyValues as a plain dict."""
    pairs: list[KeyValue] = list(attributes)
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One received span, decoded for assertions. `resource` is empty where the receiver does not
    hand it out (oteltap gives spans alone)."""

    name: str
    kind: int
    trace_id: int
    span_id: int
    parent_span_id: int  # 0 for a root
    attributes: dict[str, Any]
    status_code: int  # opentelemetry.proto.trace.v1.Status.StatusCode
    status_message: str
    trace_state: str
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @classmethod
    def of(cls, span: Span, resource: dict[str, Any] | None = None, scope: str = "") -> ReceivedSpan:
        return cls(
            name=span.name,
            kind=span.kind,
            trace_id=int.from_bytes(span.trace_id, "big"),
            span_id=int.from_bytes(span.span_id, "big"),
            parent_span_id=int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else 0,
            attributes=attributes_of(span.attributes),
            status_code=span.status.code,
            status_message=span.status.message,
            trace_state=span.trace_state,
            resource=resource or {},
            scope=scope,
        )


class _Collected:
    """Spans received so far, and a way to wait until they satisfy a condition."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._changed = anyio.Event()

    def add(self, spans: list[ReceivedSpan]) -> None:
        self.spans.extend(spans)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], *, within: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans once `condition(spans)` holds; TimeoutError after `within` seconds."""
        with anyio.fail_after(within):
            while not condition(self.spans):
                await self._changed.wait()
        return self.spans

    async def wait_for_count(self, count: int, *, within: float = 10.0) -> list[ReceivedSpan]:
        return await self.wait_for(lambda spans: len(spans) >= count, within=within)


class OtlpGrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer, _Collected):
    """An OTLP/gRPC collector's TraceService: keeps every ExportTraceServiceRequest and its spans.
    `hold` (an event) makes Export wait until it is set, to stand for a stuck collector."""

    def __init__(self) -> None:
        _Collected.__init__(self)
        self.port = 0
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.hold: anyio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if self.hold is not None:
            await self.hold.wait()
        self.requests.append(request)
        self.metadata.append({key: value for key, value in context.invocation_metadata() or ()})
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan.of(span, resource, scope_spans.scope.name))
        self.add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def otlp_grpc_receiver() -> AsyncIterator[OtlpGrpcReceiver]:
    """A TraceService on 127.0.0.1 (a port the kernel picks), stopped when the block ends."""
    receiver = OtlpGrpcReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        await server.stop(grace=None)


class OtlpHttpReceiver(_Collected):
    """oteltap's OTLP/HTTP (protobuf) receiver; spans arrive without their resource."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    @property
    def endpoint(self) -> str:
        """The traces URL (what OTEL_EXPORTER_OTLP_TRACES_ENDPOINT would be)."""
        return f"http://127.0.0.1:{self.port}/v1/traces"


@asynccontextmanager
async def otlp_http_receiver(port: int | None = None) -> AsyncIterator[OtlpHttpReceiver]:
    """oteltap listening on 127.0.0.1:`port` (a free one by default), stopped when the block ends."""
    from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

    receiver = OtlpHttpReceiver(port or free_port())
    tap = OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(http_port=receiver.port))
    await tap.start()
    try:
        async with anyio.create_task_group() as group:

            async def collect(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                stream = tap.stream_traces()
                # The stream subscribes on its first step, which runs before `start` returns to
                # the caller: no span exported after this can be missed.
                task_status.started()
                async for span in stream:
                    receiver.add([ReceivedSpan.of(span)])

            await group.start(collect)
            try:
                yield receiver
            finally:
                group.cancel_scope.cancel()
    finally:
        await tap.stop()
