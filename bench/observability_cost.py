"""What tracing adds per request, in-process: the calls the proxy makes for one request with one
upstream call (server span, route, client span, traceparent into the upstream headers, both ended).

Three cases, each timed per iteration (p50, p99, mean in microseconds):
- off: no endpoint, the shared no-op handles;
- on, not sampled: parentbased_always_off and a caller that did not sample (ids propagated only);
- sampled: a server span and one client span with attributes, exported by the BatchSpanProcessor's
  thread to a local OTLP receiver (gRPC by default; --protocol http for OTLP/HTTP) while timing runs,
  so the exporter's share of the GIL is in the figures.

    .venv/bin/python bench/observability_cost.py [--requests 50000] [--protocol grpc|http]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from dataplane.http.messages import ProxyRequest
from dataplane.observability.settings import Protocol, SamplerKind, TracingSettings
from dataplane.observability.tracing import Tracing

SAMPLED_PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED_PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def request(traceparent: bytes) -> ProxyRequest:
    headers = [
        (b"host", b"gw.example"),
        (b"user-agent", b"agent/1.0"),
        (b"accept", b"application/json, text/event-stream"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer x"),
        (b"mcp-session-id", b"abc"),
        (b"traceparent", traceparent),
    ]
    return ProxyRequest(b"POST", b"/mcp", b"gw.example", b"http", headers, None, None, b"10.1.2.3",
                        ("0.0.0.0", 8080), 8080, b"1.1")


UPSTREAM_HEADERS = [
    (b"user-agent", b"agent/1.0"),
    (b"accept", b"application/json, text/event-stream"),
    (b"content-type", b"application/json"),
    (b"x-forwarded-for", b"10.1.2.3"),
    (b"x-forwarded-proto", b"http"),
    (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
]


def one_request(tracing: Tracing, incoming: ProxyRequest) -> None:
    span = tracing.server_span(incoming, gateway="default/gw", listener="http")
    span.set_route("default/mcp", backend="default/tools")
    call = span.mcp_span("clock", "tools/call", tool="now", address="127.0.0.1", port=8082)
    call.inject_headers(UPSTREAM_HEADERS)
    call.end(200)
    span.end(200, reason="ok")


def measure(tracing: Tracing, incoming: ProxyRequest, count: int) -> list[float]:
    for _ in range(min(count, 2000)):  # warm-up
        one_request(tracing, incoming)
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        one_request(tracing, incoming)
        samples.append((clock() - started) / 1000)
    return samples


def figures(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"{label:<34} p50 {p50:7.2f} us   p99 {p99:7.2f} us   mean {statistics.fmean(ordered):7.2f} us"


class CountingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> object:
        count = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self.lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


class CountingHttpHandler(BaseHTTPRequestHandler):
    spans = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        CountingHttpHandler.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    args = parser.parse_args()

    off = Tracing(TracingSettings())
    off.start()
    print(figures("tracing off", measure(off, request(SAMPLED_PARENT), args.requests)))

    if args.protocol == "grpc":
        service = CountingTraceService()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        endpoint, protocol = f"http://127.0.0.1:{port}", Protocol.GRPC
        received = lambda: service.spans  # noqa: E731
        stop = lambda: server.stop(None)  # noqa: E731
    else:
        http_server = ThreadingHTTPServer(("127.0.0.1", 0), CountingHttpHandler)
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        endpoint, protocol = f"http://127.0.0.1:{http_server.server_address[1]}/v1/traces", Protocol.HTTP_PROTOBUF
        received = lambda: CountingHttpHandler.spans  # noqa: E731
        stop = http_server.shutdown

    unsampled = Tracing(
        TracingSettings(endpoint=endpoint, protocol=protocol, sampler=SamplerKind.PARENT_BASED_ALWAYS_OFF)
    )
    unsampled.start()
    gc.collect()
    print(figures("tracing on, not sampled", measure(unsampled, request(UNSAMPLED_PARENT), args.requests)))
    anyio.run(unsampled.shutdown)

    # Sampled, paced: 256 requests (one 512-span batch), then a flush outside the timed part. The
    # per-request figures are the request path's own cost; the flushes give the exporter's.
    sampled = Tracing(TracingSettings(endpoint=endpoint, protocol=protocol))
    sampled.start()
    incoming = request(SAMPLED_PARENT)
    measure(sampled, incoming, 2000)
    sampled.force_flush(60)
    gc.collect()
    samples: list[float] = []
    export_s = 0.0
    clock = time.perf_counter_ns
    while len(samples) < args.requests:
        for _ in range(256):
            started = clock()
            one_request(sampled, incoming)
            samples.append((clock() - started) / 1000)
        started = clock()
        sampled.force_flush(60)
        export_s += (clock() - started) / 1e9
    print(figures("sampled (2 spans), request path", samples))
    print(f"{'  + export on the processor thread':<34} {export_s / len(samples) * 1e6:7.2f} us per request "
          f"(OTLP/{args.protocol}, batches of 512 spans)")
    # Sampled, saturated: requests back to back while the processor's thread exports concurrently
    # (the default 2048-span queue; what does not fit is dropped, as in production).
    gc.collect()
    before = sampled.exporter.exported_spans if sampled.exporter else 0
    saturated = measure(sampled, incoming, args.requests)
    sampled.force_flush(60)
    print(figures("sampled, saturated (GIL shared)", saturated))
    exported = (sampled.exporter.exported_spans if sampled.exporter else 0) - before
    anyio.run(sampled.shutdown)
    stop()
    ended = 2 * (args.requests + min(args.requests, 2000))
    print(f"  saturated run: spans ended {ended}, exported {exported} (the rest dropped by the full queue); "
          f"receiver got {received()} in all")


if __name__ == "__main__":
    main()
