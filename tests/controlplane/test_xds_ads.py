"""The ADS server end to end: a real grpc.aio server on a free port, real xds-protos clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import grpc
import pytest
import structlog.testing
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from controlplane.grpc_server import RunningGrpcServer, start_grpc_server
from controlplane.snapshot import SnapshotCache, references
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.resources import BACKEND, GATEWAY_METADATA_KEY, LISTENER, POLICY, ROUTE, TARGET, TYPE_ORDER, unpack

GW = "ns/gw"
WAIT = 5.0


def config(
    gateway: str = GW,
    backends: Iterable[str] = ("b1",),
    routes: Mapping[str, Iterable[str]] | None = None,
    listeners: Iterable[str] = ("http",),
) -> dict:
    """A small Gateway: routes map route name -> backend names; every route uses the first listener."""
    listener_keys = [f"{gateway}/{name}" for name in listeners]
    routes = {"r": ("b1",)} if routes is None else routes
    return {
        BACKEND: {f"ns/{b}": pb.Backend(name=f"ns/{b}") for b in backends},
        TARGET: {f"ns/{b}/t": pb.Target(name=f"ns/{b}/t", backend=f"ns/{b}") for b in backends},
        LISTENER: {key: pb.Listener(name=key, gateway=gateway, port=8080) for key in listener_keys},
        ROUTE: {
            f"ns/{name}": pb.Route(
                name=f"ns/{name}", listeners=listener_keys[:1],
                backends=[pb.BackendRef(backend=f"ns/{b}", weight=1) for b in backs],
            )
            for name, backs in routes.items()
        },
    }


def make_node(node_id: str, gateway: str | None = GW) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    if gateway is not None:
        metadata.update({GATEWAY_METADATA_KEY: gateway})
    return base_pb2.Node(id=node_id, metadata=metadata)


@dataclass
class Harness:
    cache: SnapshotCache
    server: RunningGrpcServer
    registry: CollectorRegistry
    channel: grpc.aio.Channel
    clients: list[Client] = field(default_factory=list)

    @property
    def stub(self) -> ads_pb2_grpc.AggregatedDiscoveryServiceStub:
        return ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def proxies(self) -> debug_pb2.ListProxiesResponse:
        with anyio.fail_after(WAIT):
            return await debug_pb2_grpc.DebugServiceStub(self.channel).ListProxies(debug_pb2.ListProxiesRequest())

    async def settled(self, client: Client) -> None:
        """Wait until the server has handled every request this client wrote."""

        def handled() -> bool:
            return any(c.node_id == client.node_id and c.requests >= client.written
                       for c in self.server.proxies.connections())

        with anyio.fail_after(WAIT):
            await self.server.proxies.wait_until(handled)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    cache = SnapshotCache()
    registry = CollectorRegistry()
    server = await start_grpc_server(cache, "127.0.0.1:0", registry=registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            harness = Harness(cache, server, registry, channel)
            yield harness
            # End every call and wait until both sides are done with it, so no gRPC
            # completion of this test's event loop arrives after the loop is closed.
            with anyio.fail_after(WAIT):
                for client in harness.clients:
                    client.call.cancel()
                    await client.call.code()
                await server.proxies.wait_until(lambda: not server.proxies.connections())
    finally:
        with anyio.fail_after(WAIT):
            await server.stop(0)


def _check_references(held: Mapping[str, Mapping[str, object]]) -> None:
    """The client must never hold a resource whose references (of subscribed types) it lacks."""
    for type_url, resources in held.items():
        for name, message in resources.items():
            for ref_type, ref_name in references(type_url, message):  # type: ignore[arg-type]
                if ref_type in held:
                    assert ref_name in held[ref_type], f"{name} points at missing {ref_name}"


@dataclass
class Client:
    """A proxy's side of one stream, holding what it applied (checked after every response)."""

    call: grpc.aio.StreamStreamCall
    node_id: str
    gateway: str | None = GW
    written: int = 0
    # type URL -> name -> message, for the types this client subscribed to.
    held: dict[str, dict[str, object]] = field(default_factory=dict)

    async def write(self, request: object) -> None:
        if self.written == 0:
            request.node.CopyFrom(make_node(self.node_id, self.gateway))  # type: ignore[attr-defined]
        self.held.setdefault(request.type_url, {})  # type: ignore[attr-defined]
        self.written += 1
        with anyio.fail_after(WAIT):
            await self.call.write(request)

    async def read(self) -> object:
        with anyio.fail_after(WAIT):
            response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response


class SotwClient(Client):
    async def request(
        self, type_url: str, names: Iterable[str] = (), *, nonce: str = "", version: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), response_nonce=nonce, version_info=version
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.write(request)

    async def response(self) -> discovery_pb2.DiscoveryResponse:
        response = await self.read()
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        return response

    async def ack(self, response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        """Apply (checking references), then ACK."""
        self.held[response.type_url] = {m.name: m for m in (unpack(response.type_url, r) for r in response.resources)}
        _check_references(self.held)
        await self.request(response.type_url, names, nonce=response.nonce, version=response.version_info)

    async def subscribe_all(self, versions: Mapping[str, str] | None = None) -> dict[str, str]:
        """Subscribe to every type (wildcard), read and ACK one response per type: type -> version."""
        for type_url in TYPE_ORDER:
            await self.request(type_url, version=(versions or {}).get(type_url, ""))
        got = {}
        for _ in TYPE_ORDER:
            response = await self.response()
            got[response.type_url] = response.version_info
            await self.ack(response)
        assert list(got) == list(TYPE_ORDER)
        return got


class DeltaClient(Client):
    async def request(
        self, type_url: str, subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (), *,
        nonce: str = "", initial: Mapping[str, str] | None = None, error: str | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            initial_resource_versions=dict(initial or {}),
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.write(request)

    async def response(self) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await self.read()
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        return response

    def apply(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        held = self.held[response.type_url]
        for resource in response.resources:
            held[resource.name] = unpack(response.type_url, resource.resource)
        for name in response.removed_resources:
            held.pop(name, None)
        _check_references(self.held)

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        """Apply (checking references), then ACK."""
        self.apply(response)
        await self.request(response.type_url, nonce=response.nonce)


def sotw(harness: Harness, node_id: str, gateway: str | None = GW) -> SotwClient:
    client = SotwClient(harness.stub.StreamAggregatedResources(), node_id, gateway)
    harness.clients.append(client)
    return client


def delta(harness: Harness, node_id: str, gateway: str | None = GW) -> DeltaClient:
    client = DeltaClient(harness.stub.DeltaAggregatedResources(), node_id, gateway)
    harness.clients.append(client)
    return client


def resource_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    return [unpack(response.type_url, r).name for r in response.resources]  # type: ignore[attr-defined]


def delta_names(response: discovery_pb2.DeltaDiscoveryResponse) -> tuple[list[str], list[str]]:
    return [r.name for r in response.resources], list(response.removed_resources)


pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]




# --- State of the world ----------------------------------------------------------------


async def test_sotw_no_response_before_a_snapshot_then_ack_is_synced(harness: Harness) -> None:
    client = sotw(harness, "p1")
    for type_url in TYPE_ORDER:
        await client.request(type_url)
    await harness.settled(client)
    [proxy] = (await harness.proxies()).proxies
    assert {t.state for t in proxy.types} == {"STALE"} and proxy.snapshot_version == ""

    snapshot = harness.cache.set_snapshot(GW, config())
    versions = {}
    for _ in TYPE_ORDER:
        response = await client.response()
        versions[response.type_url] = response.version_info
        await client.ack(response)
    assert versions == {t: snapshot.type_version(t) for t in TYPE_ORDER}
    assert sorted(client.held[ROUTE]) == ["ns/r"]
    await harness.settled(client)

    [proxy] = (await harness.proxies()).proxies
    assert (proxy.node_id, proxy.gateway, proxy.stream_kind) == ("p1", GW, "sotw")
    assert proxy.snapshot_version == snapshot.version and proxy.peer
    assert [t.type_url for t in proxy.types] == list(TYPE_ORDER)
    assert all(t.state == "SYNCED" and t.acked_version == t.sent_version == versions[t.type_url] for t in proxy.types)
    assert harness.metric("agentgate_xds_acks_total", type="Route") == 1
    assert harness.metric("agentgate_xds_pushes_total", type="Route") == 1
    assert harness.metric("agentgate_xds_push_ack_seconds_count", type="Route") == 1
    assert harness.metric("agentgate_xds_connected_proxies", stream="sotw") == 1
    assert harness.metric("agentgate_xds_snapshot_info", gateway=GW, version=snapshot.version) == 1


async def test_sotw_nack_is_parked_visible_and_never_resent(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config())
    client = sotw(harness, "p1")
    accepted = await client.subscribe_all()
    await harness.settled(client)

    rejected = harness.cache.set_snapshot(GW, config(listeners=("http", "bad")))
    response = await client.response()
    assert response.type_url == LISTENER
    with structlog.testing.capture_logs() as logs:
        await client.request(LISTENER, nonce=response.nonce, version=accepted[LISTENER], error="Listener bad: port")
        await harness.settled(client)
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    expected = {"node": "p1", "gateway": GW, "type": "Listener", "version": response.version_info,
                "nonce": response.nonce, "message": "Listener bad: port"}
    assert {key: warning.get(key) for key in expected} == expected
    assert harness.metric("agentgate_xds_nacks_total", type="Listener") == 1

    [proxy] = (await harness.proxies()).proxies
    listener_status = proxy.types[2]
    assert listener_status.state == "NACKED"
    assert listener_status.sent_version == rejected.type_version(LISTENER) == listener_status.last_nack.version
    assert listener_status.acked_version == accepted[LISTENER]
    assert listener_status.last_nack.message == "Listener bad: port"
    assert listener_status.last_nack.nonce == response.nonce and listener_status.last_nack.node_id == "p1"

    # An unrelated change: only the Route goes out, the parked Listener set is not re-sent.
    harness.cache.set_snapshot(GW, config(listeners=("http", "bad"), routes={"r": ("b1",), "s": ("b1",)}))
    response = await client.response()
    assert (response.type_url, resource_names(response)) == (ROUTE, ["ns/r", "ns/s"])
    await client.ack(response)
    # A newer Listener set: the very next response, never the NACKed one again.
    newer = harness.cache.set_snapshot(GW, config(listeners=("http", "good"), routes={"r": ("b1",), "s": ("b1",)}))
    response = await client.response()
    assert (response.type_url, response.version_info) == (LISTENER, newer.type_version(LISTENER))
    assert resource_names(response) == [f"{GW}/good", f"{GW}/http"]
    await client.ack(response)
    await harness.settled(client)
    [proxy] = (await harness.proxies()).proxies
    assert proxy.types[2].state == "SYNCED"
    assert proxy.types[2].last_nack.version == rejected.type_version(LISTENER)

    client.call.cancel()
    with anyio.fail_after(WAIT):
        await harness.server.proxies.wait_until(lambda: not harness.server.proxies.connections())
    listing = await harness.proxies()
    assert not listing.proxies
    assert [(n.node_id, n.type_url, n.version) for n in listing.recent_nacks] == [
        ("p1", LISTENER, rejected.type_version(LISTENER))
    ]
    assert harness.metric("agentgate_xds_connected_proxies", stream="sotw") == 0


async def test_sotw_stale_nonce_is_ignored(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}))
    client = sotw(harness, "p1")
    await client.request(ROUTE)
    old = await client.response()
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",), "t": ("b1",)}))
    latest = await client.response()
    # Answering the older response, and asking for "ns/r" only: stale, so ignored entirely.
    await client.request(ROUTE, ["ns/r"], nonce=old.nonce, version=old.version_info)
    await harness.settled(client)
    assert harness.metric("agentgate_xds_acks_total", type="Route") == 0
    await client.ack(latest)
    await harness.settled(client)
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",), "u": ("b1",)}))
    response = await client.response()
    assert resource_names(response) == ["ns/r", "ns/s", "ns/u"]  # still the wildcard subscription
    assert harness.metric("agentgate_xds_acks_total", type="Route") == 1


async def test_sotw_reconnect_with_held_versions_gets_only_what_changed(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config())
    first = sotw(harness, "p1")
    versions = await first.subscribe_all()
    first.call.cancel()

    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}))
    again = sotw(harness, "p1-again")
    again.held = {t: dict(resources) for t, resources in first.held.items()}
    for type_url in TYPE_ORDER:
        await again.request(type_url, version=versions[type_url])
    response = await again.response()
    assert (response.type_url, resource_names(response)) == (ROUTE, ["ns/r", "ns/s"])
    await again.ack(response)
    await harness.settled(again)
    # Nothing else was pending: the next response is the next change.
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}, listeners=("http", "more")))
    response = await again.response()
    assert response.type_url == LISTENER


async def test_sotw_reconnect_after_a_removal_is_made_before_broken(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1", "b2"), routes={"r": ("b2",)}))
    first = sotw(harness, "p1")
    versions = await first.subscribe_all()
    first.call.cancel()

    # While the proxy is away, b2 goes and the route moves to b3.
    harness.cache.set_snapshot(GW, config(backends=("b1", "b3"), routes={"r": ("b3",)}))
    again = sotw(harness, "p1-again")
    again.held = {t: dict(resources) for t, resources in first.held.items()}
    for type_url in TYPE_ORDER:
        await again.request(type_url, version=versions[type_url])
    steps = []
    for _ in range(4):
        response = await again.response()
        steps.append((response.type_url, resource_names(response)))
        await again.ack(response)  # applies, checking the client never holds a dangling reference
    assert steps == [
        (BACKEND, ["ns/b1", "ns/b2", "ns/b3"]),  # its held versions map back to sets: b2 still in use
        (TARGET, ["ns/b1/t", "ns/b3/t"]),
        (ROUTE, ["ns/r"]),
        (BACKEND, ["ns/b1", "ns/b3"]),
    ]


async def test_sotw_removals_and_removed_gateway(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}))
    client = sotw(harness, "p1")
    await client.subscribe_all()
    harness.cache.set_snapshot(GW, config())
    response = await client.response()
    assert (response.type_url, resource_names(response)) == (ROUTE, ["ns/r"])
    await client.ack(response)

    harness.cache.remove_snapshot(GW)
    seen = []
    for _ in range(4):
        response = await client.response()
        seen.append(response.type_url)
        assert resource_names(response) == []
        await client.ack(response)
    # Backend and Listener stay while the Route (and Target) that use them are held; then go (pass 2).
    assert seen == [TARGET, ROUTE, LISTENER, BACKEND]
    assert {t: len(h) for t, h in client.held.items()} == dict.fromkeys(TYPE_ORDER, 0)


async def test_sotw_route_switching_backend_is_made_before_broken(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1",), routes={"r": ("b1",)}))
    client = sotw(harness, "p1")
    await client.subscribe_all()
    harness.cache.set_snapshot(GW, config(backends=("b2",), routes={"r": ("b2",)}))
    steps = []
    for _ in range(4):
        response = await client.response()
        steps.append((response.type_url, resource_names(response)))
        await client.ack(response)  # applies, checking the client never holds a dangling reference
    assert steps == [
        (BACKEND, ["ns/b1", "ns/b2"]),  # b1 kept: the held Route still uses it
        (TARGET, ["ns/b2/t"]),
        (ROUTE, ["ns/r"]),
        (BACKEND, ["ns/b2"]),  # the Route moved: b1 goes
    ]
    assert client.held[ROUTE]["ns/r"].backends[0].backend == "ns/b2"  # type: ignore[attr-defined]


async def test_sotw_wildcard_and_named_subscriptions(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1", "b2", "b3")))
    client = sotw(harness, "p1")
    await client.request(BACKEND, ["ns/b2", "ns/ghost"])
    response = await client.response()
    assert resource_names(response) == ["ns/b2"]
    await client.ack(response, ["ns/b2", "ns/b3"])
    response = await client.response()
    assert resource_names(response) == ["ns/b2", "ns/b3"]
    await client.ack(response, [])  # empty after naming something: nothing, not wildcard
    response = await client.response()
    assert resource_names(response) == []
    await client.ack(response, ["*"])
    response = await client.response()
    assert resource_names(response) == ["ns/b1", "ns/b2", "ns/b3"]
    await client.ack(response, ["*"])
    await harness.settled(client)
    [proxy] = (await harness.proxies()).proxies
    assert list(proxy.types[0].subscribed) == ["*"]


# --- Delta -----------------------------------------------------------------------------


async def test_delta_wildcard_ack_and_nack_without_resend(harness: Harness) -> None:
    snapshot = harness.cache.set_snapshot(GW, config())
    client = delta(harness, "d1")
    for type_url in TYPE_ORDER:
        await client.request(type_url)
    for type_url in TYPE_ORDER:  # the first wildcard request is answered even when empty
        response = await client.response()
        assert (response.type_url, response.system_version_info) == (type_url, snapshot.type_version(type_url))
        await client.ack(response)
    assert sorted(client.held[LISTENER]) == [f"{GW}/http"] and client.held[POLICY] == {}
    await harness.settled(client)
    [proxy] = (await harness.proxies()).proxies
    assert proxy.stream_kind == "delta" and {t.state for t in proxy.types} == {"SYNCED"}

    rejected = harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}))
    response = await client.response()
    assert delta_names(response) == (["ns/s"], [])
    await client.request(ROUTE, nonce=response.nonce, error="Route ns/s: bad")
    await harness.settled(client)
    assert harness.metric("agentgate_xds_nacks_total", type="Route") == 1
    [proxy] = (await harness.proxies()).proxies
    route_status = proxy.types[3]
    assert route_status.state == "NACKED" and route_status.last_nack.version == rejected.type_version(ROUTE)

    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}, listeners=("http", "x")))
    response = await client.response()
    assert response.type_url == LISTENER  # the NACKed Route update is parked, not re-sent
    await client.ack(response)
    newer = harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "t": ("b1",)}, listeners=("http", "x")))
    response = await client.response()
    # The client never accepted ns/s, so it is not removed; ns/t is new.
    assert (response.type_url, response.system_version_info) == (ROUTE, newer.type_version(ROUTE))
    assert delta_names(response) == (["ns/t"], [])


async def test_delta_stale_nonce_still_changes_the_subscription(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1",), "s": ("b1",)}))
    client = delta(harness, "d1")
    await client.request(ROUTE, ["ns/r"])
    old = await client.response()
    assert delta_names(old) == (["ns/r"], [])
    harness.cache.set_snapshot(GW, config(routes={"r": ("b1", "b1"), "s": ("b1",)}))
    latest = await client.response()
    assert delta_names(latest) == (["ns/r"], [])
    await client.ack(old)
    await client.request(ROUTE, ["ns/s", "ns/ghost"], nonce=old.nonce)  # stale nonce, new names
    response = await client.response()
    assert delta_names(response) == (["ns/s"], ["ns/ghost"])
    await client.ack(latest)
    await client.ack(response)
    await harness.settled(client)
    assert harness.metric("agentgate_xds_acks_total", type="Route") == 3
    [proxy] = (await harness.proxies()).proxies
    assert list(proxy.types[0].subscribed) == ["ns/ghost", "ns/r", "ns/s"]
    assert proxy.types[0].state == "SYNCED"


async def test_delta_reconnect_with_initial_versions_gets_only_the_difference(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1", "b2"), listeners=("http", "old")))
    first = delta(harness, "d1")
    for type_url in TYPE_ORDER:
        await first.request(type_url, ["*"])
    held_versions: dict[str, dict[str, str]] = {}
    for _ in TYPE_ORDER:
        response = await first.response()
        held_versions[response.type_url] = {r.name: r.version for r in response.resources}
        await first.ack(response)
    first.call.cancel()

    harness.cache.set_snapshot(GW, config(backends=("b1", "b3"), routes={"r": ("b3",)}))
    again = delta(harness, "d1-again")
    again.held = {t: dict(resources) for t, resources in first.held.items()}
    for type_url in TYPE_ORDER:
        await again.request(type_url, ["*"], initial=held_versions[type_url])
    got = []
    for _ in range(7):
        response = await again.response()
        again.apply(response)  # checks the client never holds a dangling reference
        got.append((response.type_url, *delta_names(response)))
    assert got == [
        (BACKEND, ["ns/b3"], []),
        (TARGET, ["ns/b3/t"], []),
        (ROUTE, ["ns/r"], []),
        (POLICY, [], []),  # nothing differs, but the first wildcard request is answered
        (LISTENER, [], [f"{GW}/old"]),
        (TARGET, [], ["ns/b2/t"]),
        (BACKEND, [], ["ns/b2"]),
    ]


async def test_delta_route_switching_backend_is_made_before_broken(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1",), routes={"r": ("b1",)}))
    client = delta(harness, "d1")
    for type_url in TYPE_ORDER:
        await client.request(type_url)
    for _ in TYPE_ORDER:
        await client.ack(await client.response())
    harness.cache.set_snapshot(GW, config(backends=("b2",), routes={"r": ("b2",)}))
    steps = []
    for _ in range(5):
        response = await client.response()
        steps.append((response.type_url, *delta_names(response)))
        await client.ack(response)  # applies, checking the client never holds a dangling reference
    assert steps == [
        (BACKEND, ["ns/b2"], []), (TARGET, ["ns/b2/t"], []), (ROUTE, ["ns/r"], []),
        (TARGET, [], ["ns/b1/t"]), (BACKEND, [], ["ns/b1"]),
    ]


async def test_delta_named_nonexistent_resource_and_unsubscribe(harness: Harness) -> None:
    harness.cache.set_snapshot(GW, config(backends=("b1", "b2")))
    client = delta(harness, "d1")
    await client.request(BACKEND, ["ns/b1", "ns/nope"])
    response = await client.response()
    assert delta_names(response) == (["ns/b1"], ["ns/nope"])
    await client.ack(response)
    await client.request(BACKEND, unsubscribe=["ns/b1"])
    await harness.settled(client)
    # Unsubscribing sends nothing; the next change of a still-wanted name is the next response.
    harness.cache.set_snapshot(GW, config(backends=("b2", "nope"), routes={"r": ("b2",)}))
    response = await client.response()
    assert delta_names(response) == (["ns/nope"], [])


# --- Many proxies ----------------------------------------------------------------------


async def test_many_proxies_and_gateways_get_their_own_config_from_shared_bodies(harness: Harness) -> None:
    gateways = [f"team{i}/gw" for i in range(5)]
    for gateway in gateways:
        harness.cache.set_snapshot(gateway, config(gateway))
    builds_before = harness.cache.responses.builds
    clients = [sotw(harness, f"p{i}", gateways[i % 5]) for i in range(20)]

    async def run(client: SotwClient) -> None:
        await client.subscribe_all()
        assert sorted(client.held[LISTENER]) == [f"{client.gateway}/http"]

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(run, client)
    # One body per (gateway, type), shared by the four streams of each gateway.
    assert harness.cache.responses.builds - builds_before == 5 * len(TYPE_ORDER)
    assert harness.metric("agentgate_xds_connected_proxies", stream="sotw") == 20
    listing = await harness.proxies()
    assert sorted(p.node_id for p in listing.proxies) == sorted(f"p{i}" for i in range(20))

    deltas = [delta(harness, f"d{i}", gateways[0]) for i in range(4)]
    builds_before = harness.cache.responses.builds
    for client in deltas:
        for type_url in TYPE_ORDER:
            await client.request(type_url)
        for _ in TYPE_ORDER:
            await client.response()
    assert harness.cache.responses.builds - builds_before == len(TYPE_ORDER)
