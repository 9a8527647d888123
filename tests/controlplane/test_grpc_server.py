"""The assembled gRPC server: reflection (grpcurl), health, bad streams, shutdown."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.grpc_server import RunningGrpcServer, start_grpc_server
from controlplane.snapshot import SnapshotCache
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.resources import BACKEND, GATEWAY_METADATA_KEY, ROUTE, unpack

GRPCURL = Path(sys.executable).parent / "grpcurl"
WAIT = 5.0
GW = "ns/gw"

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]




@pytest.fixture
async def server() -> AsyncIterator[tuple[RunningGrpcServer, SnapshotCache, CollectorRegistry]]:
    cache = SnapshotCache()
    registry = CollectorRegistry()
    running = await start_grpc_server(cache, "127.0.0.1:0", registry=registry)
    try:
        yield running, cache, registry
    finally:
        with anyio.fail_after(WAIT):
            await running.stop(0)


def node(gateway: object = GW, node_id: str = "proxy-1") -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    if gateway is not None:
        metadata.update({GATEWAY_METADATA_KEY: gateway})
    return base_pb2.Node(id=node_id, metadata=metadata)


async def grpcurl(port: int, *args: str) -> str:
    with anyio.fail_after(WAIT * 2):
        result = await anyio.run_process([str(GRPCURL), "-plaintext", f"127.0.0.1:{port}", *args], check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_grpcurl_lists_and_describes_every_service(server: tuple) -> None:
    running, cache, _ = server
    assert running.port > 0
    listed = (await grpcurl(running.port, "list")).split()
    assert listed == [
        "agentgate.debug.v1.DebugService",
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    described = await grpcurl(running.port, "describe", "agentgate.debug.v1.DebugService")
    assert "rpc ListProxies ( .agentgate.debug.v1.ListProxiesRequest )" in described
    assert "rpc ListSnapshots" in described
    methods = (await grpcurl(running.port, "list", "envoy.service.discovery.v3.AggregatedDiscoveryService")).split()
    assert methods == [
        "envoy.service.discovery.v3.AggregatedDiscoveryService.DeltaAggregatedResources",
        "envoy.service.discovery.v3.AggregatedDiscoveryService.StreamAggregatedResources",
    ]
    snapshot = cache.set_snapshot(GW, {BACKEND: {"ns/b1": pb.Backend(name="ns/b1")}})
    listing = json.loads(await grpcurl(running.port, "agentgate.debug.v1.DebugService/ListSnapshots"))
    [entry] = listing["snapshots"]
    assert (entry["gateway"], entry["version"]) == (GW, snapshot.version)
    backend_version = snapshot.resources(BACKEND)["ns/b1"].version
    assert entry["types"][0]["resources"] == [{"name": "ns/b1", "version": backend_version}]


async def test_health_reports_serving_then_not_serving_on_stop(server: tuple) -> None:
    running, _, _ = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with anyio.fail_after(WAIT):
            for service in ("", "envoy.service.discovery.v3.AggregatedDiscoveryService",
                            "agentgate.debug.v1.DebugService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await running.health.enter_graceful_shutdown()
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("request_", "detail"),
    [
        (discovery_pb2.DiscoveryRequest(type_url=ROUTE, node=node(None)), 'node.metadata["gateway"] is missing'),
        (discovery_pb2.DiscoveryRequest(type_url=ROUTE, node=node(5)), "is missing or not a string"),
        (discovery_pb2.DiscoveryRequest(type_url=ROUTE, node=node("just-a-name")), 'expected "namespace/name"'),
        (discovery_pb2.DiscoveryRequest(type_url=ROUTE), "must carry node"),
        (discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/x.Cluster", node=node()), "unknown type_url"),
    ],
)
async def test_bad_first_request_ends_the_stream_with_invalid_argument(
    server: tuple, request_: discovery_pb2.DiscoveryRequest, detail: str
) -> None:
    running, _, _ = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        with anyio.fail_after(WAIT):
            await call.write(request_)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (caught.value.details() or "")
    assert not running.proxies.connections()


async def test_delta_unknown_type_later_in_the_stream_is_invalid_argument(server: tuple) -> None:
    running, cache, _ = server
    cache.set_snapshot(GW, {BACKEND: {"ns/b1": pb.Backend(name="ns/b1")}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
        with anyio.fail_after(WAIT):
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, node=node()))
            response = await call.read()
            assert [r.name for r in response.resources] == ["ns/b1"]
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url="nope"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown type_url 'nope'" in (caught.value.details() or "")


async def test_stop_ends_open_streams_with_unavailable_and_refuses_new_ones(server: tuple) -> None:
    running, cache, registry = server
    cache.set_snapshot(GW, {BACKEND: {"ns/b1": pb.Backend(name="ns/b1")}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        calls = [stub.StreamAggregatedResources(), stub.DeltaAggregatedResources()]
        with anyio.fail_after(WAIT):
            await calls[0].write(discovery_pb2.DiscoveryRequest(type_url=BACKEND, node=node(node_id="s")))
            await calls[1].write(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, node=node(node_id="d")))
            sotw_response, delta_response = await calls[0].read(), await calls[1].read()
            assert unpack(BACKEND, sotw_response.resources[0]).name == delta_response.resources[0].name == "ns/b1"
            assert registry.get_sample_value("agentgate_xds_connected_proxies", {"stream": "delta"}) == 1
            await running.stop(5)  # returns once streams ended, without using the grace period
            for call in calls:
                assert await call.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in await call.details()
    assert not running.proxies.connections()
    assert registry.get_sample_value("agentgate_xds_connected_proxies", {"stream": "sotw"}) == 0
    assert b"agentgate_xds_pushes_total" in generate_latest(registry)


async def test_debug_filters_by_gateway_and_client_end_of_stream_is_clean(server: tuple) -> None:
    running, cache, _ = server
    for gateway in ("a/gw", "b/gw"):
        cache.set_snapshot(gateway, {BACKEND: {"ns/b1": pb.Backend(name="ns/b1")}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        debug = debug_pb2_grpc.DebugServiceStub(channel)
        calls = {}
        with anyio.fail_after(WAIT):
            for gateway in ("a/gw", "b/gw"):
                call = calls[gateway] = stub.StreamAggregatedResources()
                await call.write(discovery_pb2.DiscoveryRequest(type_url=BACKEND, node=node(gateway, gateway)))
                await call.read()
            only_b = await debug.ListProxies(debug_pb2.ListProxiesRequest(gateway="b/gw"))
            assert [(p.node_id, p.gateway) for p in only_b.proxies] == [("b/gw", "b/gw")]
            snapshots = await debug.ListSnapshots(debug_pb2.ListSnapshotsRequest(gateway="a/gw"))
            assert [s.gateway for s in snapshots.snapshots] == ["a/gw"]
            # The proxy closes its side: the server ends the stream with OK.
            await calls["a/gw"].done_writing()
            assert await calls["a/gw"].code() == grpc.StatusCode.OK
            await running.proxies.wait_until(lambda: len(running.proxies.connections()) == 1)
            calls["b/gw"].cancel()
            await running.proxies.wait_until(lambda: not running.proxies.connections())


async def test_address_in_use_is_a_clear_error(server: tuple) -> None:
    running, cache, _ = server
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{running.port}"):
        await start_grpc_server(cache, f"127.0.0.1:{running.port}", registry=CollectorRegistry())
