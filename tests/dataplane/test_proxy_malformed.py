"""Bad and hostile input: each gets a clear answer of its protocol's kind, and the worker keeps serving."""

from __future__ import annotations

import contextlib

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from dataplane.http.limits import ProxyLimits
from dataplane.http.server import ProxyServer
from tests.conftest import free_port
from tests.dataplane.peers.config import simple_config
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.peers.raw import read_until_closed

pytestmark = pytest.mark.anyio


async def send_and_read_all(port: int, data: bytes) -> bytes:
    """Send raw bytes and read until the proxy closes the connection."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.fail_after(5):
            return await read_until_closed(stream)


async def still_serving(port: int) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/after")
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"NOT-HTTP\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header"),
        (b"GET /\x01bad HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400, "malformed"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"x" * 70_000 + b"\r\n\r\n", 431, "header section larger"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n", 431, "header"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501, "CONNECT is not supported"),
    ],
)
async def test_bad_requests_get_a_status_with_a_reason_then_close(raw: bytes, status: int, reason: str) -> None:
    port = free_port()
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)):
        answer = await send_and_read_all(port, raw)
        await still_serving(port)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), answer[:200]
    assert reason.encode() in body
    assert b"connection: close" in head


async def test_slow_header_read_times_out_with_408() -> None:
    port = free_port()
    limits = ProxyLimits(header_read_timeout=0.2)
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port), limits):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow")
            with anyio.fail_after(5):
                received = await read_until_closed(stream)
        await still_serving(port)
    assert received.startswith(b"HTTP/1.1 408") and b"request header not received" in received
    assert peer.requests == [peer.requests[0]] and peer.requests[0].target == b"/after"


async def test_idle_keepalive_connection_is_closed_silently() -> None:
    port = free_port()
    limits = ProxyLimits(keepalive_idle_timeout=0.2)
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port), limits) as server:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            with anyio.fail_after(5):
                received = await read_until_closed(stream)
        # One response, then a silent close: no "HTTP/1.1 408" after an idle keep-alive.
        assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1 ") == 1
        assert server.connection_count == 0


async def test_client_disconnecting_mid_body_aborts_the_upstream_request() -> None:
    port = free_port()
    upstream_saw_end = anyio.Event()
    first_piece = anyio.Event()
    upstream_got: list[bytes] = []

    async def reader(exchange: H1Exchange) -> None:
        try:
            while piece := await exchange.receive_body_chunk():
                upstream_got.append(piece)
                first_piece.set()
        finally:
            upstream_saw_end.set()
        if exchange.request.target == b"/after":
            await exchange.respond(200, b"ok")
        else:
            exchange.closed = True

    async with H1Peer(reader) as peer, running_proxy(simple_config(port, peer.port)) as server:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial")
            with anyio.fail_after(5):
                await first_piece.wait()
        with anyio.fail_after(5):
            # The proxy drops the upstream connection: the upstream's body read ends early.
            await upstream_saw_end.wait()
        await still_serving(port)
        assert server.in_flight == 0
    assert b"".join(upstream_got) == b"partial"


async def test_garbage_header_block_after_the_http2_preface_gets_goaway() -> None:
    port = free_port()
    # A HEADERS frame on stream 1 whose HPACK block is junk.
    junk_headers = b"\x00\x00\x08\x01\x04\x00\x00\x00\x01" + b"\xff" * 8
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)):
        answer = await send_and_read_all(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + junk_headers)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        events = client.receive_data(answer)
        await still_serving(port)
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code != 0


async def test_http2_client_reset_mid_response_stops_the_upstream_exchange() -> None:
    port = free_port()
    first_part_sent = anyio.Event()
    never = anyio.Event()

    async def endless(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/after":
            await exchange.respond(200, b"ok")
            return
        await exchange.send_head(200, [(b"content-type", b"text/event-stream")])
        await exchange.send(b"data: 1\n\n")
        first_part_sent.set()
        await never.wait()

    async with H1Peer(endless) as peer:
        server = ProxyServer()
        async with server:
            await server.apply(simple_config(port, peer.port))
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
                client.initiate_connection()
                headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/sse")]
                client.send_headers(1, headers, end_stream=True)
                await stream.send(client.data_to_send())
                received: list[object] = []
                with anyio.fail_after(5):
                    while not any(isinstance(e, h2.events.DataReceived) for e in received):
                        received += client.receive_data(await stream.receive())
                        await stream.send(client.data_to_send())
                    client.reset_stream(1)
                    await stream.send(client.data_to_send())
                    # The same connection keeps working for a new stream.
                    client.send_headers(3, [*headers[:3], (b":path", b"/after")], end_stream=True)
                    await stream.send(client.data_to_send())
                    while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in received):
                        received += client.receive_data(await stream.receive())
                        await stream.send(client.data_to_send())
            assert server.in_flight == 0
        never.set()
    data = b"".join(e.data for e in received if isinstance(e, h2.events.DataReceived) and e.stream_id == 3)
    assert data == b"ok"


async def test_client_gone_while_waiting_for_the_upstream_cancels_the_exchange() -> None:
    port = free_port()
    arrived = anyio.Event()
    upstream_connection_dropped = anyio.Event()

    async def wait_for_drop(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/after":
            await exchange.respond(200, b"ok")
            return
        arrived.set()
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            await exchange.stream.receive()  # nothing more comes: only the proxy's close ends this
        upstream_connection_dropped.set()
        exchange.closed = True

    async with H1Peer(wait_for_drop) as peer, running_proxy(simple_config(port, peer.port)) as server:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
                await arrived.wait()
                assert server.in_flight == 1
            await upstream_connection_dropped.wait()
        assert server.in_flight == 0
        await still_serving(port)
