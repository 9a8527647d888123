"""Config swaps, bind failures, listener removal and graceful shutdown, with requests in flight."""

from __future__ import annotations

import socket

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from dataplane.http.limits import ProxyLimits
from dataplane.http.server import ListenerBindError, ProxyServer
from tests.conftest import free_port
from tests.dataplane.peers.config import backend, compile_resources, listener, route, simple_config, target
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.peers.raw import read_response, read_until_closed

pytestmark = pytest.mark.anyio


class HeldResponses:
    """An upstream handler whose answers wait until the test releases them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrived = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, exchange: H1Exchange) -> None:
        self.arrived.set()
        if exchange.request.target.startswith(b"/slow"):
            await self.release.wait()
        await exchange.respond(200, self.name.encode())


def two_backend_config(port: int, first: int, second: int, *, use: str, version: str) -> object:
    return compile_resources(
        listener(port),
        backend("default/a"),
        target("default/a", first),
        backend("default/b"),
        target("default/b", second),
        route(backends=[(use, 1)]),
        version=version,
    )


async def test_config_swap_keeps_in_flight_requests_on_the_old_config() -> None:
    port = free_port()
    old, new = HeldResponses("old"), HeldResponses("new")
    async with H1Peer(old) as peer_a, H1Peer(new) as peer_b:
        config_a = two_backend_config(port, peer_a.port, peer_b.port, use="default/a", version="v1")
        config_b = two_backend_config(port, peer_a.port, peer_b.port, use="default/b", version="v2")
        async with running_proxy(config_a) as server, httpx.AsyncClient() as slow_client, httpx.AsyncClient() as client:
            results: dict[str, httpx.Response] = {}

            async def slow() -> None:
                results["slow"] = await slow_client.get(f"http://127.0.0.1:{port}/slow")

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(slow)
                    await old.arrived.wait()
                    assert server.in_flight == 1
                    bound_before = server.bound_ports
                    await server.apply(config_b)
                    results["fresh"] = await client.get(f"http://127.0.0.1:{port}/fresh")
                    old.release.set()
            assert server.config.version == "v2"
            assert server.bound_ports == bound_before  # same listener, same socket
    assert results["slow"].text == "old"
    assert results["fresh"].text == "new"


async def test_bind_failure_raises_and_leaves_the_old_config_serving() -> None:
    port, taken = free_port(), free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", taken))
    blocker.listen(1)
    try:
        async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)) as server:
            bad = compile_resources(
                listener(port),
                listener(taken, name="second"),
                backend(),
                target("default/app", peer.port),
                route(listeners=["default/gw/http", "default/gw/second"]),
                version="v2",
            )
            with pytest.raises(ListenerBindError) as raised:
                await server.apply(bad)
            assert "default/gw/second" in str(raised.value) and f"127.0.0.1:{taken}" in str(raised.value)
            assert raised.value.listeners == ("default/gw/second",)
            assert server.config.version == "v1"
            assert set(server.bound_ports) == {("127.0.0.1", port)}
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/still")
            assert response.status_code == 200
    finally:
        blocker.close()


async def test_removed_listener_stops_accepting_while_the_new_one_serves() -> None:
    first, second = free_port(), free_port()
    async with H1Peer() as peer:

        def config(port: int, version: str) -> object:
            return compile_resources(
                listener(port), backend(), target("default/app", peer.port), route(), version=version
            )

        async with running_proxy(config(first, "v1")) as server:
            await server.apply(config(second, "v2"))
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{second}/")).status_code == 200
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"http://127.0.0.1:{first}/")
            assert set(server.bound_ports) == {("127.0.0.1", second)}


async def test_two_servers_share_a_port_with_reuse_port() -> None:
    port = free_port()
    async with (
        H1Peer() as peer,
        running_proxy(simple_config(port, peer.port)),
        ProxyServer() as second,
    ):
        await second.apply(simple_config(port, peer.port))
        assert second.bound_ports == {("127.0.0.1", port): port}


async def test_graceful_shutdown_drains_an_in_flight_request_and_closes_idle_ones() -> None:
    port = free_port()
    held = HeldResponses("drained")
    async with H1Peer(held) as peer:
        server = ProxyServer()
        async with server:
            await server.apply(simple_config(port, peer.port))
            async with (
                await anyio.connect_tcp("127.0.0.1", port) as idle,
                await anyio.connect_tcp("127.0.0.1", port) as busy,
            ):
                await idle.send(b"GET /quick HTTP/1.1\r\nHost: a\r\n\r\n")
                with anyio.fail_after(5):
                    assert (await read_response(idle, bytearray())).startswith(b"HTTP/1.1 200")
                    await busy.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
                    held.arrived = anyio.Event()
                    await held.arrived.wait()
                    shutting_down = anyio.Event()

                    async def shut_down() -> None:
                        shutting_down.set()
                        await server.shutdown(10)

                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(shut_down)
                        await shutting_down.wait()
                        # The idle keep-alive connection is closed at once; new ones are refused.
                        with pytest.raises(anyio.EndOfStream):
                            await idle.receive()
                        with pytest.raises(OSError):
                            await anyio.connect_tcp("127.0.0.1", port)
                        assert server.in_flight == 1
                        held.release.set()
                        answer = await read_until_closed(busy)
            assert server.in_flight == 0
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer and answer.endswith(b"drained")


async def test_shutdown_deadline_closes_what_remains() -> None:
    port = free_port()
    held = HeldResponses("never")
    async with H1Peer(held) as peer:
        server = ProxyServer()
        async with server:
            await server.apply(simple_config(port, peer.port))
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
                with anyio.fail_after(5):
                    await held.arrived.wait()
                    await server.shutdown(0.1)
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await stream.receive()
        held.release.set()


async def test_graceful_shutdown_sends_goaway_to_http2_clients() -> None:
    port = free_port()
    held = HeldResponses("h2 drained")
    async with H1Peer(held) as peer:
        server = ProxyServer(ProxyLimits())
        async with server:
            await server.apply(simple_config(port, peer.port))
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
                client.initiate_connection()
                headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/slow")]
                client.send_headers(1, headers, end_stream=True)
                await stream.send(client.data_to_send())
                events: list[object] = []
                with anyio.fail_after(5):
                    await held.arrived.wait()
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(server.shutdown, 10)
                        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                            events += client.receive_data(await stream.receive())
                        # Keep reading the stream the GOAWAY let finish.
                        client.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
                        held.release.set()
                        while True:
                            try:
                                data = await stream.receive()
                            except (anyio.EndOfStream, anyio.BrokenResourceError):
                                break
                            events += client.receive_data(data)
                            await stream.send(client.data_to_send())
    goaway = next(e for e in events if isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == 0 and goaway.last_stream_id == 1
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == b"h2 drained"
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)
