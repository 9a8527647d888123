"""HTTP/1.1 through the proxy: real clients (httpx, raw sockets), real upstreams (nginx, h11)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import backend, compile_resources, listener, route, simple_config, target
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.peers.raw import read_response
from tests.peers.nginx import nginx

pytestmark = pytest.mark.anyio


async def raw_exchange(port: int, data: bytes, *, until: bytes = b"\r\n\r\n") -> bytes:
    """Send bytes on a fresh connection; read until `until` has been seen and the connection closes
    or a complete-looking response arrived."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        received = b""
        with anyio.fail_after(5):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received
                if until in received and _complete(received):
                    return received


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")


# --- forwarding -----------------------------------------------------------------------------------


async def test_requests_reach_nginx_and_reuse_one_upstream_connection(tmp_path: Path) -> None:
    port = free_port()
    async with nginx(tmp_path) as upstream_server:
        upstream = upstream_server.h1_port
        async with running_proxy(simple_config(port, upstream)) as server:
            async with httpx.AsyncClient() as client:
                responses = [await client.get(f"http://127.0.0.1:{port}/hello") for _ in range(5)]
            assert all(r.status_code == 200 and r.text == "hello from nginx\n" for r in responses)
            # nginx numbers its client connections: one number means one reused connection.
            assert len({r.headers["x-upstream-connection"] for r in responses}) == 1
            assert server.in_flight == 0


async def test_head_request_keeps_content_length_without_body(tmp_path: Path) -> None:
    port = free_port()
    async with nginx(tmp_path) as upstream_server:
        upstream = upstream_server.h1_port
        async with running_proxy(simple_config(port, upstream)), httpx.AsyncClient() as client:
            head = await client.head(f"http://127.0.0.1:{port}/x")
            after = await client.get(f"http://127.0.0.1:{port}/x")
    assert head.status_code == 200 and head.headers["content-length"] == "17" and head.content == b""
    assert after.text == "hello from nginx\n"


async def test_hop_by_hop_removed_and_forwarding_headers_set() -> None:
    port = free_port()
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)):
        raw = await raw_exchange(
            port,
            b"GET /echo?q=1 HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Private\r\n"
            b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n"
            b"Upgrade: websocket\r\nTE: gzip\r\nX-Forwarded-For: 203.0.113.7\r\nX-Request-Id: req-42\r\n"
            b"Connection: close\r\n\r\n",
        )
    status, _, body = raw.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    echoed = json.loads(body)
    headers = {k: v for k, v in echoed["headers"]}
    assert echoed["target"] == "/echo?q=1"
    for hop in ("connection", "x-private", "keep-alive", "proxy-authorization", "upgrade", "te"):
        assert hop not in headers
    assert headers["host"] == "app.example"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "app.example"
    assert headers["x-request-id"] == "req-42"


async def test_x_request_id_is_created_when_absent() -> None:
    port = free_port()
    async with H1Peer() as peer, running_proxy(simple_config(port, peer.port)), httpx.AsyncClient() as client:
        first = (await client.get(f"http://127.0.0.1:{port}/")).json()
        second = (await client.get(f"http://127.0.0.1:{port}/")).json()
    ids = [dict(r["headers"])["x-request-id"] for r in (first, second)]
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]


async def test_filters_rewrite_url_and_edit_headers() -> None:
    port = free_port()
    filters = [
        pb.RouteFilter(
            url_rewrite=pb.UrlRewrite(hostname="internal.svc", path=pb.PathModifier(replace_prefix_match="/v2"))
        ),
        pb.RouteFilter(
            request_header_modifier=pb.HeaderModifier(
                set=[pb.HeaderModifier.Header(name="X-Set", value="s")],
                add=[pb.HeaderModifier.Header(name="X-Add", value="a")],
                remove=["X-Remove"],
            )
        ),
        pb.RouteFilter(
            response_header_modifier=pb.HeaderModifier(set=[pb.HeaderModifier.Header(name="X-Resp", value="r")])
        ),
    ]
    async with H1Peer() as peer:
        config = compile_resources(
            listener(port), backend(), target("default/app", peer.port), route(prefix="/v1", filters=filters)
        )
        async with running_proxy(config), httpx.AsyncClient() as client:
            response = await client.get(
                f"http://127.0.0.1:{port}/v1/items?x=1", headers={"X-Remove": "gone", "X-Set": "old"}
            )
    echoed = response.json()
    headers = echoed["headers"]
    assert echoed["target"] == "/v2/items?x=1"
    assert ["host", "internal.svc"] in headers
    assert ["x-set", "s"] in headers and ["x-set", "old"] not in headers
    assert ["x-add", "a"] in headers
    assert all(name != "x-remove" for name, _ in headers)
    assert response.headers["x-resp"] == "r"


async def test_redirect_answers_with_location() -> None:
    port = free_port()
    redirect = pb.RouteFilter(
        request_redirect=pb.RequestRedirect(scheme="https", hostname="new.example", status_code=301)
    )
    config = compile_resources(listener(port), backend(), target("default/app", 1), route(filters=[redirect]))
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/a/b?c=d")
    assert response.status_code == 301
    assert response.headers["location"] == "https://new.example/a/b?c=d"


async def test_pipelined_requests_are_answered_in_order() -> None:
    port = free_port()
    async with (
        H1Peer() as peer,
        running_proxy(simple_config(port, peer.port)),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nPOST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        buffer = bytearray()
        with anyio.fail_after(5):
            bodies = [json.loads((await read_response(stream, buffer)).partition(b"\r\n\r\n")[2]) for _ in range(3)]
    assert [(b["method"], b["target"], b["body"]) for b in bodies] == [
        ("GET", "/first", ""),
        ("POST", "/second", "hi"),
        ("GET", "/third", ""),
    ]


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    port = free_port()
    async with (
        H1Peer() as peer,
        running_proxy(simple_config(port, peer.port)),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        with anyio.fail_after(5):
            interim = await stream.receive()
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send(b"data")
            final = await read_response(stream, bytearray())
    assert final.startswith(b"HTTP/1.1 200") and json.loads(final.partition(b"\r\n\r\n")[2])["body"] == "data"
    assert peer.requests[0].header(b"expect") is None


async def test_http10_client_gets_a_close_delimited_streamed_body() -> None:
    port = free_port()

    async def streamed(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-type", b"text/plain")])
        await exchange.send(b"part1 ")
        await exchange.send(b"part2")
        await exchange.end()

    async with H1Peer(streamed) as peer, running_proxy(simple_config(port, peer.port)):
        raw = await raw_exchange(port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", until=b"part2")
        chunked = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and body == b"part1 part2"
    assert b"transfer-encoding: chunked" in chunked.lower()
    assert chunked.endswith(b"6\r\npart1 \r\n5\r\npart2\r\n0\r\n\r\n")


# --- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_request_body_is_streamed_upstream_piece_by_piece(framing: str) -> None:
    port = free_port()
    first_piece_arrived = anyio.Event()
    received: list[bytes] = []

    async def collect(exchange: H1Exchange) -> None:
        while piece := await exchange.receive_body_chunk():
            received.append(piece)
            first_piece_arrived.set()
        await exchange.respond(200, b"".join(received))

    async with (
        H1Peer(collect) as peer,
        running_proxy(simple_config(port, peer.port)),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        if framing == "chunked":
            await stream.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        else:
            await stream.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nfirst")
        with anyio.fail_after(5):
            # The upstream holds the first piece while the client has not sent the rest.
            await first_piece_arrived.wait()
            await stream.send(b"6\r\nsecond\r\n0\r\n\r\n" if framing == "chunked" else b"second")
            response = await read_response(stream, bytearray())
    assert received[0] == b"first"
    assert response.endswith(b"\r\n\r\nfirstsecond")


async def test_server_sent_events_pass_event_by_event() -> None:
    port = free_port()
    client_has_first = anyio.Event()

    async def events(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-type", b"text/event-stream")])
        await exchange.send(b"data: one\n\n")
        await client_has_first.wait()
        await exchange.send(b"data: two\n\n")
        await exchange.end()

    async with H1Peer(events) as peer, running_proxy(simple_config(port, peer.port)), httpx.AsyncClient() as client:
        seen: list[str] = []
        with anyio.fail_after(5):
            async with client.stream("GET", f"http://127.0.0.1:{port}/events") as response:
                assert response.headers["content-type"] == "text/event-stream"
                async for line in response.aiter_lines():
                    if line:
                        seen.append(line)
                        client_has_first.set()
    assert seen == ["data: one", "data: two"]


# --- errors -----------------------------------------------------------------------------------------


async def test_no_route_is_404_naming_method_host_and_path() -> None:
    port = free_port()
    config = compile_resources(listener(port), backend(), target("default/app", 1), route(hostnames=["only.example"]))
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/nowhere", headers={"host": "other.example"})
    assert response.status_code == 404
    assert response.text == "no route for GET other.example/nowhere\n"
    assert response.headers["content-type"].startswith("text/plain")


async def test_all_backend_weights_zero_is_500() -> None:
    port = free_port()
    config = compile_resources(
        listener(port), backend(), target("default/app", 1), route(backends=[("default/app", 0)])
    )
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 500 and "weight 0" in response.text and "default/r/0" in response.text


async def test_direct_response_status_is_answered() -> None:
    port = free_port()
    config = compile_resources(listener(port), backend(), route(direct_response_status=500))
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 500 and "no usable backend" in response.text


async def test_unresolved_backend_share_is_500() -> None:
    port = free_port()
    unresolved = route()
    del unresolved.backends[:]
    unresolved.backends.append(pb.BackendRef(weight=1, direct_response_status=500))
    config = compile_resources(listener(port), unresolved)
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 500 and "could not be resolved" in response.text


async def test_mcp_backend_is_served_by_the_mcp_endpoint() -> None:
    port = free_port()
    mcp = pb.Backend(
        name="default/app",
        mcp=pb.McpBackend(session_keys=[pb.McpSessionKey(id="k", key=b"k" * 32)]),
    )
    server = pb.Target(
        name="default/app/tools", backend="default/app",
        mcp=pb.McpServer(name="tools", stdio=pb.McpStdioTransport(command="tools-server")),
    )
    config = compile_resources(listener(port), mcp, server, route())
    url = f"http://127.0.0.1:{port}/mcp"
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with running_proxy(config) as proxy, httpx.AsyncClient(timeout=30) as client:
        # A session-era request without a session is refused by the MCP endpoint, not proxied.
        response = await client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert response.status_code == 400 and "Mcp-Session-Id" in response.json()["error"]["message"]
        # The only target cannot start: initialize fails naming it, and no session is issued.
        response = await client.post(url, json=initialize)
        await proxy._handler.aclose()
    assert response.status_code == 200 and "mcp-session-id" not in response.headers
    error = response.json()["error"]
    assert error["code"] == -32603 and "tools" in error["message"]


async def test_backend_missing_from_config_is_503_naming_it() -> None:
    port = free_port()
    config = compile_resources(listener(port), route(backends=[("default/missing", 1)]))
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 503 and "default/missing" in response.text


async def test_backend_without_targets_is_503() -> None:
    port = free_port()
    config = compile_resources(listener(port), backend(), route())
    async with running_proxy(config), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 503 and response.text == "backend default/app has no targets\n"


async def test_connection_refused_is_502() -> None:
    port, closed_port = free_port(), free_port()
    async with running_proxy(simple_config(port, closed_port)), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 502 and "refused" in response.text and str(closed_port) in response.text


async def test_garbage_from_upstream_is_502_and_the_proxy_keeps_serving() -> None:
    port = free_port()

    async def garbage(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/bad":
            await exchange.send_raw(b"SPAM SPAM SPAM\r\n\r\n")
        else:
            await exchange.respond(200, b"fine")

    async with H1Peer(garbage) as peer, running_proxy(simple_config(port, peer.port)), httpx.AsyncClient() as client:
        bad = await client.get(f"http://127.0.0.1:{port}/bad")
        good = await client.get(f"http://127.0.0.1:{port}/good")
    assert bad.status_code == 502 and "invalid response" in bad.text
    assert good.status_code == 200 and good.text == "fine"


async def test_upstream_closing_without_response_is_502() -> None:
    port = free_port()

    async def hang_up(exchange: H1Exchange) -> None:
        exchange.closed = True  # the peer closes the connection without answering

    async with H1Peer(hang_up) as peer, running_proxy(simple_config(port, peer.port)), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 502 and "without a complete response" in response.text


async def test_upstream_reset_after_head_aborts_the_client_connection() -> None:
    port = free_port()

    async def truncated(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-length", b"100")])
        await exchange.send(b"only part")
        exchange.closed = True

    async with H1Peer(truncated) as peer, running_proxy(simple_config(port, peer.port)) as server:
        raw = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until=b"only part")
        # The proxy closed the client connection (the only signal left) and finished the request.
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"only part")
        assert server.in_flight == 0


async def test_stale_keepalive_connection_is_retried_once_for_idempotent_requests() -> None:
    port = free_port()

    async def second_request_hangs_up(exchange: H1Exchange) -> None:
        if exchange.request.target == b"/again" and exchange.connection_number == 1:
            exchange.closed = True  # a keep-alive race: closed before any response byte
            return
        await exchange.read_body()
        await exchange.respond(200, b"conn %d" % exchange.connection_number)

    async with (
        H1Peer(second_request_hangs_up) as peer,
        running_proxy(simple_config(port, peer.port)),
        httpx.AsyncClient() as client,
    ):
        first = await client.get(f"http://127.0.0.1:{port}/first")
        again = await client.get(f"http://127.0.0.1:{port}/again")
    assert first.text == "conn 1"
    assert again.status_code == 200 and again.text == "conn 2"
    assert peer.connections == 2


async def test_stale_connection_is_not_retried_for_a_request_with_body() -> None:
    port = free_port()

    async def second_request_hangs_up(exchange: H1Exchange) -> None:
        await exchange.read_body()
        if exchange.request.target == b"/again":
            exchange.closed = True
            return
        await exchange.respond(200, b"ok")

    async with (
        H1Peer(second_request_hangs_up) as peer,
        running_proxy(simple_config(port, peer.port)),
        httpx.AsyncClient() as client,
    ):
        await client.get(f"http://127.0.0.1:{port}/first")
        again = await client.post(f"http://127.0.0.1:{port}/again", content=b"payload")
    assert again.status_code == 502
    assert [r.target for r in peer.requests] == [b"/first", b"/again"]


async def test_pool_exhausted_is_503() -> None:
    port = free_port()
    release = anyio.Event()
    first_arrived = anyio.Event()

    async def slow(exchange: H1Exchange) -> None:
        first_arrived.set()
        await release.wait()
        await exchange.respond(200, b"slow done")

    async with H1Peer(slow) as peer:
        config = compile_resources(
            listener(port),
            backend(max_connections=1, connect_timeout=0.2),
            target("default/app", peer.port),
            route(),
        )
        async with (
            running_proxy(config),
            httpx.AsyncClient() as first_client,
            httpx.AsyncClient() as client,
            anyio.create_task_group() as tasks,
        ):
            results: list[httpx.Response] = []

            async def first() -> None:
                results.append(await first_client.get(f"http://127.0.0.1:{port}/slow"))

            tasks.start_soon(first)
            with anyio.fail_after(5):
                await first_arrived.wait()
                exhausted = await client.get(f"http://127.0.0.1:{port}/other")
            release.set()
    assert exhausted.status_code == 503 and "exhausted" in exhausted.text
    assert results[0].text == "slow done"


async def test_backend_timeout_is_504() -> None:
    port = free_port()
    never = anyio.Event()

    async def silent(exchange: H1Exchange) -> None:
        await never.wait()

    async with H1Peer(silent) as peer:
        async with running_proxy(simple_config(port, peer.port, backend_timeout=0.2)), httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        never.set()
    assert response.status_code == 504 and "backend timeout" in response.text


async def test_request_timeout_is_504() -> None:
    port = free_port()
    never = anyio.Event()

    async def silent(exchange: H1Exchange) -> None:
        await never.wait()

    async with H1Peer(silent) as peer:
        async with running_proxy(simple_config(port, peer.port, request_timeout=0.2)), httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        never.set()
    assert response.status_code == 504 and "request timeout" in response.text
