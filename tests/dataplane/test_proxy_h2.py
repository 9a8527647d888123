"""HTTP/2 through the proxy: prior knowledge and TLS ALPN downstream, h2 upstreams (cleartext and TLS)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest

from dataplane.http.limits import ProxyLimits
from tests.conftest import free_port
from tests.dataplane.peers import tls
from tests.dataplane.peers.config import backend, compile_resources, listener, route, simple_config, target
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.h2peer import H2Exchange, H2Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.peers.raw import read_until_closed
from tests.peers.nginx import nginx

pytestmark = pytest.mark.anyio


def h2_client(**options: object) -> httpx.AsyncClient:
    """HTTP/2 only: over cleartext httpx then speaks prior knowledge."""
    return httpx.AsyncClient(http1=False, http2=True, **options)  # type: ignore[arg-type]


async def test_prior_knowledge_client_multiplexes_requests_to_nginx(tmp_path: Path) -> None:
    port = free_port()
    async with nginx(tmp_path) as upstream_server:
        upstream = upstream_server.h1_port
        async with running_proxy(simple_config(port, upstream)), h2_client() as client:
            responses: list[httpx.Response] = []

            async def get(index: int) -> None:
                responses.append(await client.get(f"http://127.0.0.1:{port}/n{index}"))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tasks:
                    for index in range(10):
                        tasks.start_soon(get, index)
    assert len(responses) == 10
    assert all(r.http_version == "HTTP/2" and r.text == "hello from nginx\n" for r in responses)


async def test_curl_prior_knowledge_request_is_forwarded_with_forwarding_headers() -> None:
    port = free_port()
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)):
        result = await anyio.run_process(
            [
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "-H",
                "te: trailers",
                "-H",
                "cookie: a=1",
                "-H",
                "cookie: b=2",
                f"http://127.0.0.1:{port}/curl?x=1",
            ],
            check=False,
            stderr=subprocess.STDOUT,
        )
    assert result.returncode == 0, result.stdout
    echoed = json.loads(result.stdout)
    headers = dict(echoed["headers"])
    assert echoed["target"] == "/curl?x=1"
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-for"] == "127.0.0.1"
    assert "te" not in headers  # toward HTTP/1.1 even "trailers" goes
    assert headers["cookie"] == "a=1; b=2"  # split HTTP/2 cookies joined for HTTP/1.1


async def test_tls_listener_negotiates_h2_or_http11_by_alpn() -> None:
    port = free_port()
    async with H1Peer() as peer:
        config = compile_resources(
            listener(port, tls=tls.server_pem()), backend(), target("default/app", peer.port), route()
        )
        async with running_proxy(config):
            async with httpx.AsyncClient(http2=True, verify=tls.client_context()) as client:
                over_h2 = await client.get(f"https://127.0.0.1:{port}/tls")
            async with httpx.AsyncClient(verify=tls.client_context()) as client:
                over_h1 = await client.get(f"https://127.0.0.1:{port}/tls")
    assert over_h2.http_version == "HTTP/2" and over_h1.http_version == "HTTP/1.1"
    for response in (over_h2, over_h1):
        assert response.status_code == 200
        assert dict(response.json()["headers"])["x-forwarded-proto"] == "https"


async def test_http1_client_to_h2_upstream_shares_one_connection() -> None:
    port = free_port()
    async with (
        H2Peer() as peer,
        running_proxy(simple_config(port, peer.port, http2=True)),
        httpx.AsyncClient() as one,
        httpx.AsyncClient() as two,
    ):
        first = await one.get(f"http://127.0.0.1:{port}/a", headers={"te": "trailers", "connection": "keep-alive"})
        second = await two.post(f"http://127.0.0.1:{port}/b", content=b"body bytes")
    assert first.json()["authority"] == f"127.0.0.1:{port}"
    assert first.json()["method"] == "GET" and second.json()["body"] == "body bytes"
    assert ["te", "trailers"] in first.json()["headers"]
    assert all(name != "connection" for name, _ in first.json()["headers"])
    assert peer.connections == 1


async def test_h2_upstream_max_concurrent_streams_is_respected() -> None:
    port = free_port()
    all_arrived = anyio.Event()
    active_by_connection: dict[int, int] = {}
    peak: dict[int, int] = {}
    arrived = 0

    async def held(exchange: H2Exchange) -> None:
        nonlocal arrived
        number = exchange.connection_number
        active_by_connection[number] = active_by_connection.get(number, 0) + 1
        peak[number] = max(peak.get(number, 0), active_by_connection[number])
        arrived += 1
        if arrived == 4:
            all_arrived.set()
        await all_arrived.wait()
        active_by_connection[number] -= 1
        await exchange.respond(200, b"done")

    async with (
        H2Peer(held, max_concurrent_streams=2) as peer,
        running_proxy(simple_config(port, peer.port, http2=True)),
        h2_client() as client,
    ):
        results: list[httpx.Response] = []

        async def get() -> None:
            results.append(await client.get(f"http://127.0.0.1:{port}/"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tasks:
                for _ in range(4):
                    tasks.start_soon(get)
    assert [r.text for r in results] == ["done"] * 4
    assert peer.connections == 2 and max(peak.values()) == 2


async def test_h2_upstream_over_tls_with_alpn_and_sni() -> None:
    port = free_port()
    async with H2Peer(ssl_context=tls.server_context(["h2"])) as peer:
        config = compile_resources(
            listener(port),
            backend(http2=True, ca_pem=tls.ca_pem(), server_name="upstream.test"),
            target("default/app", peer.port),
            route(),
        )
        async with running_proxy(config), httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/secure")
    assert response.status_code == 200 and response.json()["target"] == "/secure"


async def test_tls_upstream_with_untrusted_certificate_is_502() -> None:
    port = free_port()
    async with H1Peer(ssl_context=tls.server_context(["http/1.1"])) as peer:
        other_ca = __import__("trustme").CA().cert_pem.bytes()
        config = compile_resources(listener(port), backend(ca_pem=other_ca), target("default/app", peer.port), route())
        async with running_proxy(config), httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 502 and "TLS handshake" in response.text


async def test_h2_upstream_trailers_reach_a_chunked_http1_client() -> None:
    port = free_port()

    async def grpc_like(exchange: H2Exchange) -> None:
        await exchange.send_head(200, [(b"content-type", b"application/grpc")])
        await exchange.send(b"payload")
        await exchange.end([(b"grpc-status", b"0")])

    async with (
        H2Peer(grpc_like) as peer,
        running_proxy(simple_config(port, peer.port, http2=True)),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        received = b""
        with anyio.fail_after(5):
            while not received.endswith(b"\r\n\r\n") or b"grpc-status" not in received:
                received += await stream.receive()
    assert b"transfer-encoding: chunked" in received
    assert received.endswith(b"7\r\npayload\r\n0\r\ngrpc-status: 0\r\n\r\n")


async def test_h2_upstream_goaway_moves_new_requests_to_a_new_connection() -> None:
    port = free_port()
    async with (
        H2Peer(goaway_after=1) as peer,
        running_proxy(simple_config(port, peer.port, http2=True)),
        httpx.AsyncClient() as client,
    ):
        first = await client.get(f"http://127.0.0.1:{port}/one")
        second = await client.get(f"http://127.0.0.1:{port}/two")
    assert first.status_code == 200 and second.status_code == 200
    assert (first.json()["connection"], second.json()["connection"]) == (1, 2)


async def test_large_bodies_flow_both_ways_under_flow_control() -> None:
    """1 MiB up and 1 MiB down: larger than every initial HTTP/2 window on both hops."""
    port = free_port()
    payload = bytes(range(256)) * 4096

    async def digest_and_reply(exchange: H2Exchange) -> None:
        body = await exchange.read_body()
        await exchange.respond(200, hashlib.sha256(body).hexdigest().encode() + b"\n" + payload)

    async with (
        H2Peer(digest_and_reply) as peer,
        running_proxy(simple_config(port, peer.port, http2=True)),
        h2_client() as client,
    ):
        with anyio.fail_after(20):
            response = await client.post(f"http://127.0.0.1:{port}/big", content=payload)
    digest, _, body = response.content.partition(b"\n")
    assert digest.decode() == hashlib.sha256(payload).hexdigest()
    assert body == payload


async def test_server_sent_events_over_h2_pass_event_by_event() -> None:
    port = free_port()
    client_has_first = anyio.Event()

    async def events(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-type", b"text/event-stream")])
        await exchange.send(b"data: one\n\n")
        await client_has_first.wait()
        await exchange.send(b"data: two\n\n")
        await exchange.end()

    async with H1Peer(events) as peer, running_proxy(simple_config(port, peer.port)), h2_client() as client:
        seen: list[str] = []
        with anyio.fail_after(5):
            async with client.stream("GET", f"http://127.0.0.1:{port}/events") as response:
                async for line in response.aiter_lines():
                    if line:
                        seen.append(line)
                        client_has_first.set()
    assert response.http_version == "HTTP/2" and seen == ["data: one", "data: two"]


async def test_h2_request_body_is_streamed_to_the_upstream() -> None:
    port = free_port()
    first_piece_arrived = anyio.Event()

    async def collect(exchange: H1Exchange) -> None:
        pieces = []
        while piece := await exchange.receive_body_chunk():
            pieces.append(piece)
            first_piece_arrived.set()
        await exchange.respond(200, b"|".join(pieces))

    async def body() -> object:
        yield b"first"
        await first_piece_arrived.wait()
        yield b"second"

    async with H1Peer(collect) as peer, running_proxy(simple_config(port, peer.port)), h2_client() as client:
        with anyio.fail_after(5):
            response = await client.post(f"http://127.0.0.1:{port}/", content=body())
    assert response.text.startswith("first|") and response.text.replace("|", "") == "firstsecond"


async def test_errors_over_h2_carry_status_and_reason() -> None:
    port = free_port()
    config = compile_resources(listener(port), route(backends=[("default/missing", 1)]))
    async with running_proxy(config), h2_client() as client:
        response = await client.get(f"http://127.0.0.1:{port}/x")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 503 and "default/missing" in response.text


async def test_upstream_failure_after_the_head_resets_the_h2_stream() -> None:
    port = free_port()

    async def truncated(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-length", b"100")])
        await exchange.send(b"only part")
        exchange.closed = True

    async with (
        H1Peer(truncated) as peer,
        running_proxy(simple_config(port, peer.port)),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
        client.send_headers(1, headers, end_stream=True)
        await stream.send(client.data_to_send())
        events: list[object] = []
        with anyio.fail_after(5):
            while not any(isinstance(e, h2.events.StreamReset) for e in events):
                events += client.receive_data(await stream.receive())
                await stream.send(client.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"only part"
    reset = next(e for e in events if isinstance(e, h2.events.StreamReset))
    assert reset.stream_id == 1 and reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR


async def test_too_many_h2_request_headers_is_431() -> None:
    port = free_port()
    limits = ProxyLimits(max_header_count=20)
    async with (
        H1Peer() as peer,
        running_proxy(simple_config(port, peer.port), limits),
        h2_client() as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/", headers={f"x-h{i}": "v" for i in range(30)})
        fine = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 431 and "header fields" in response.text
    assert fine.status_code == 200


async def test_plaintext_on_a_tls_listener_is_dropped_and_tls_keeps_working() -> None:
    port = free_port()
    async with H1Peer() as peer:
        config = compile_resources(
            listener(port, tls=tls.server_pem()), backend(), target("default/app", peer.port), route()
        )
        async with running_proxy(config), await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            with anyio.fail_after(5):
                answer = await read_until_closed(stream)
            async with httpx.AsyncClient(verify=tls.client_context()) as client:
                response = await client.get(f"https://127.0.0.1:{port}/")
    assert not answer.startswith(b"HTTP/1.1 200")
    assert response.status_code == 200


async def test_http1_upstream_over_tls() -> None:
    port = free_port()
    async with H1Peer(ssl_context=tls.server_context(["http/1.1"])) as peer:
        config = compile_resources(
            listener(port), backend(ca_pem=tls.ca_pem()), target("default/app", peer.port, host="localhost"), route()
        )
        async with running_proxy(config), httpx.AsyncClient() as client:
            responses = [await client.get(f"http://127.0.0.1:{port}/tls{i}") for i in range(3)]
    assert [r.json()["target"] for r in responses] == ["/tls0", "/tls1", "/tls2"]
    assert peer.connections == 1  # TLS keep-alive reuse


async def test_weighted_backends_skip_zero_weight() -> None:
    port = free_port()
    async with H1Peer() as a, H1Peer() as b:
        config = compile_resources(
            listener(port),
            backend("default/a"),
            target("default/a", a.port),
            backend("default/b"),
            target("default/b", b.port),
            route(backends=[("default/a", 0), ("default/b", 5)]),
        )
        async with running_proxy(config), httpx.AsyncClient() as client:
            for _ in range(5):
                assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
    assert (len(a.requests), len(b.requests)) == (0, 5)
