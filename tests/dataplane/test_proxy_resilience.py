"""Policies on the forward path with real peers: retries, timeouts, idle streams, CORS, header
modifiers and upstream credentials (Policy resources compiled through the real config path)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

import anyio
import httpx
import pytest
from google.protobuf.duration_pb2 import Duration

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.peers.config import GATEWAY, backend, listener, route, target
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.h2peer import H2Exchange, H2Peer
from tests.dataplane.peers.proxy import running_proxy

pytestmark = pytest.mark.anyio

Kind = pb.PolicyTargetRef
RULE = "default/r/0"
TINY_BACKOFF = {"backoff_base": Duration(nanos=1_000_000), "backoff_max": Duration(nanos=2_000_000)}


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def policy(name: str = "default/p", *, on: pb.PolicyTargetRef | None = None, **sections: object) -> pb.Policy:
    ref = on or pb.PolicyTargetRef(kind=Kind.KIND_ROUTE_RULE, name=RULE)
    return pb.Policy(name=name, targets=[ref], **sections)  # type: ignore[arg-type]


def retry_policy(attempts: int = 2, *on: int, **resilience: object) -> pb.Policy:
    retry = pb.Retry(attempts=attempts, on=list(on), **TINY_BACKOFF)  # type: ignore[arg-type]
    return policy(resilience=pb.Resilience(retry=retry, **resilience))  # type: ignore[arg-type]


def config(
    listen_port: int,
    upstream_ports: Iterable[tuple[int, int]],
    *policies: pb.Policy,
    http2: bool = False,
    listeners: Iterable[pb.Listener] = (),
) -> RuntimeConfig:
    """One route for "/" to one backend whose targets are (port, weight) pairs, plus policies."""
    listener_messages = list(listeners) or [listener(listen_port)]
    targets = [target("default/app", p, name=f"t{i}", weight=w) for i, (p, w) in enumerate(upstream_ports)]
    resources: dict[str, dict[str, object]] = {
        LISTENER: {m.name: m for m in listener_messages},
        BACKEND: {"default/app": backend(http2=http2, connect_timeout=1.0)},
        TARGET: {t.name: t for t in targets},
        ROUTE: {RULE: route(RULE, listeners=[m.name for m in listener_messages])},
        POLICY: {p.name: p for p in policies},
    }
    return compile_config(resources, version="v1")  # type: ignore[arg-type]


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in stream])


def echoed_headers(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        out.setdefault(name, []).append(value)
    return out


# --- retries ----------------------------------------------------------------------------------


async def test_503_then_200_is_retried_and_the_small_body_sent_again() -> None:
    port = free_port()

    async def flaky(exchange: H1Exchange) -> None:
        body = await exchange.read_body()
        if len(exchange.peer.requests) == 1:
            await exchange.respond(503, b"warming up")
        else:
            await exchange.respond(200, b"got " + body)

    async with H1Peer(flaky) as peer:
        proxy_config = config(port, [(peer.port, 1)], retry_policy(2, pb.Retry.ON_5XX))
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{port}/do", content=b"payload")
    assert response.status_code == 200 and response.text == "got payload"
    assert [r.body for r in peer.requests] == [b"payload", b"payload"]


async def test_5xx_is_relayed_when_retries_run_out() -> None:
    port = free_port()

    async def down(exchange: H1Exchange) -> None:
        await exchange.respond(503, b"still down")

    async with (
        H1Peer(down) as peer,
        running_proxy(config(port, [(peer.port, 1)], retry_policy(2, pb.Retry.ON_5XX))),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 503 and response.text == "still down"
    assert len(peer.requests) == 3  # the first try and two retries


async def test_5xx_is_not_retried_without_the_5xx_condition() -> None:
    port = free_port()

    async def down(exchange: H1Exchange) -> None:
        await exchange.respond(500, b"broken")

    async with (
        H1Peer(down) as peer,
        running_proxy(config(port, [(peer.port, 1)], retry_policy(3))),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 500 and len(peer.requests) == 1


async def test_connect_failure_is_retried_on_another_endpoint() -> None:
    port, dead = free_port(), free_port()
    async with H1Peer() as peer:
        # The dead target carries nearly all the weight, so the first try almost always goes there.
        proxy_config = config(port, [(dead, 1000), (peer.port, 1)], retry_policy(1, pb.Retry.ON_CONNECT_FAILURE))
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            responses = [await client.get(f"http://127.0.0.1:{port}/n{i}") for i in range(5)]
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.target for r in peer.requests] == [b"/n0", b"/n1", b"/n2", b"/n3", b"/n4"]


async def test_connect_failure_without_retries_is_502() -> None:
    port, dead = free_port(), free_port()
    async with running_proxy(config(port, [(dead, 1)], retry_policy(0))), httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 502 and "refused" in response.text


async def test_a_large_streamed_post_is_not_retried() -> None:
    port = free_port()

    async def reject(exchange: H1Exchange) -> None:
        await exchange.read_body()
        await exchange.respond(503, b"overloaded")

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield b"x" * 16384  # 256 KiB, chunked: more than the replay buffer holds

    async with (
        H1Peer(reject) as peer,
        running_proxy(config(port, [(peer.port, 1)], retry_policy(3, pb.Retry.ON_5XX))),
        httpx.AsyncClient() as client,
    ):
        response = await client.post(f"http://127.0.0.1:{port}/upload", content=upload())
    assert response.status_code == 503 and response.text == "overloaded"
    assert len(peer.requests) == 1 and len(peer.requests[0].body) == 16 * 16384


async def test_h2_upstream_503_then_200_replays_the_body() -> None:
    port = free_port()
    seen: list[bytes] = []

    async def flaky(exchange: H2Exchange) -> None:
        seen.append(await exchange.read_body())
        if len(seen) == 1:
            await exchange.respond(503, b"no")
        else:
            await exchange.respond(200, b"yes " + seen[-1])

    async with H2Peer(flaky) as peer:
        proxy_config = config(port, [(peer.port, 1)], retry_policy(1, pb.Retry.ON_5XX), http2=True)
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            response = await client.put(f"http://127.0.0.1:{port}/", content=b"data")
    assert response.status_code == 200 and response.text == "yes data"
    assert seen == [b"data", b"data"]


# --- timeouts ---------------------------------------------------------------------------------


async def test_per_try_timeout_ends_a_silent_try_and_the_retry_answers() -> None:
    port = free_port()
    never = anyio.Event()

    async def first_silent(exchange: H1Exchange) -> None:
        if len(exchange.peer.requests) == 1:
            await never.wait()
        await exchange.respond(200, b"second try")

    async with H1Peer(first_silent) as peer:
        proxy_config = config(port, [(peer.port, 1)], retry_policy(1, per_try_timeout=seconds(0.2)))
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            with anyio.fail_after(5):
                response = await client.get(f"http://127.0.0.1:{port}/")
        never.set()
    assert response.status_code == 200 and response.text == "second try"
    assert len(peer.requests) == 2


async def test_per_try_timeout_without_retries_is_504() -> None:
    port = free_port()
    never = anyio.Event()

    async def silent(exchange: H1Exchange) -> None:
        await never.wait()

    resilience = pb.Resilience(per_try_timeout=seconds(0.2))
    async with (
        H1Peer(silent) as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(resilience=resilience))),
        httpx.AsyncClient() as client,
    ):
        with anyio.fail_after(5):
            response = await client.get(f"http://127.0.0.1:{port}/")
        never.set()
    assert response.status_code == 504 and "per-try timeout" in response.text


async def test_policy_request_timeout_bounds_the_whole_request() -> None:
    port = free_port()
    never = anyio.Event()

    async def silent(exchange: H1Exchange) -> None:
        await never.wait()

    resilience = pb.Resilience(request_timeout=seconds(0.3), retry=pb.Retry(attempts=5, **TINY_BACKOFF))
    async with (
        H1Peer(silent) as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(resilience=resilience))),
        httpx.AsyncClient() as client,
    ):
        with anyio.fail_after(5):
            response = await client.get(f"http://127.0.0.1:{port}/")
        never.set()
    assert response.status_code == 504 and "request timeout of 0.3s" in response.text


async def test_idle_stream_is_ended_cleanly() -> None:
    port = free_port()
    never = anyio.Event()

    async def one_event_then_quiet(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-type", b"text/event-stream")])
        await exchange.send(b"data: first\n\n")
        await never.wait()

    resilience = pb.Resilience(stream_idle_timeout=seconds(0.3))
    async with (
        H1Peer(one_event_then_quiet) as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(resilience=resilience))),
        httpx.AsyncClient() as client,
    ):
        with anyio.fail_after(5):
            async with client.stream("GET", f"http://127.0.0.1:{port}/events") as response:
                body = await collect(response.aiter_bytes())
        never.set()
    # The client read a complete response (the last chunk arrived), not a broken connection.
    assert response.status_code == 200 and body == b"data: first\n\n"


async def test_idle_stream_with_a_content_length_is_aborted() -> None:
    port = free_port()
    never = anyio.Event()

    async def half_then_quiet(exchange: H1Exchange) -> None:
        await exchange.send_head(200, [(b"content-length", b"10")])
        await exchange.send(b"12345")
        await never.wait()

    resilience = pb.Resilience(stream_idle_timeout=seconds(0.3))
    async with (
        H1Peer(half_then_quiet) as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(resilience=resilience))),
        httpx.AsyncClient() as client,
    ):
        with anyio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://127.0.0.1:{port}/")
        never.set()


# --- CORS, header modifiers, credentials ------------------------------------------------------


async def test_cors_preflight_is_answered_at_the_gateway() -> None:
    port = free_port()
    cors = pb.Cors(allow_origins=["https://app.example.com"], allow_methods=["GET", "PUT"], allow_headers=["x-tenant"])
    async with (
        H1Peer() as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(cors=cors))),
        httpx.AsyncClient() as client,
    ):
        url = f"http://127.0.0.1:{port}/api"
        ok = await client.options(
            url,
            headers={
                "origin": "https://app.example.com",
                "access-control-request-method": "PUT",
                "access-control-request-headers": "x-tenant",
            },
        )
        refused = await client.options(
            url, headers={"origin": "https://evil.example", "access-control-request-method": "PUT"}
        )
        plain_options = await client.options(url)
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert ok.headers["access-control-allow-methods"] == "GET, PUT"
    assert ok.headers["access-control-allow-headers"] == "x-tenant"
    assert refused.status_code == 403 and "origin 'https://evil.example' is not allowed" in refused.text
    assert plain_options.status_code == 200  # not a preflight: forwarded
    assert [r.method for r in peer.requests] == [b"OPTIONS"]


async def test_cors_headers_on_actual_responses_replace_the_upstreams() -> None:
    port = free_port()

    async def permissive(exchange: H1Exchange) -> None:
        await exchange.respond(200, b"ok", [(b"access-control-allow-origin", b"*")])

    cors = pb.Cors(allow_origins=["https://app.example.com"], expose_headers=["x-request-id"])
    async with (
        H1Peer(permissive) as peer,
        running_proxy(config(port, [(peer.port, 1)], policy(cors=cors))),
        httpx.AsyncClient() as client,
    ):
        allowed = await client.get(f"http://127.0.0.1:{port}/", headers={"origin": "https://app.example.com"})
        other = await client.get(f"http://127.0.0.1:{port}/", headers={"origin": "https://evil.example"})
    assert allowed.headers.get_list("access-control-allow-origin") == ["https://app.example.com"]
    assert allowed.headers["access-control-expose-headers"] == "x-request-id"
    assert allowed.headers["vary"] == "origin"
    assert "access-control-allow-origin" not in other.headers and other.text == "ok"


async def test_policy_header_modifiers_apply_to_request_and_response() -> None:
    port = free_port()
    request_headers = pb.HeaderModifier(
        set=[pb.HeaderModifier.Header(name="x-env", value="prod")],
        add=[pb.HeaderModifier.Header(name="x-via", value="gateway")],
        remove=["x-debug"],
    )
    response_headers = pb.HeaderModifier(
        set=[pb.HeaderModifier.Header(name="x-served-by", value="agentgate")], remove=["server"]
    )
    modifiers = policy(request_headers=request_headers, response_headers=response_headers)
    async with (
        H1Peer() as peer,
        running_proxy(config(port, [(peer.port, 1)], modifiers)),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(
            f"http://127.0.0.1:{port}/", headers={"x-env": "dev", "x-via": "client", "x-debug": "1"}
        )
    seen = echoed_headers(response)
    assert seen["x-env"] == ["prod"] and seen["x-via"] == ["client", "gateway"] and "x-debug" not in seen
    assert response.headers["x-served-by"] == "agentgate"


async def test_upstream_credential_replaces_the_callers() -> None:
    port = free_port()
    credentials = pb.UpstreamCredentials(value="Bearer backend-key")
    async with H1Peer() as peer:
        proxy_config = config(port, [(peer.port, 1)], policy(upstream_credentials=credentials))
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/", headers={"authorization": "Bearer caller"})
    assert echoed_headers(response)["authorization"] == ["Bearer backend-key"]


async def test_listener_policy_follows_the_listener_a_request_came_through() -> None:
    port = free_port()
    shared = [
        listener(port, name="api", hostname="api.example.com"),
        listener(port, name="www", hostname="*.example.com"),
    ]

    def tag(listener_name: str, value: str) -> pb.Policy:
        ops = pb.HeaderModifier(set=[pb.HeaderModifier.Header(name="x-listener", value=value)])
        ref = pb.PolicyTargetRef(kind=Kind.KIND_LISTENER, name=f"{GATEWAY}/{listener_name}")
        return policy(f"default/{value}", on=ref, request_headers=ops)

    async with H1Peer() as peer:
        proxy_config = config(port, [(peer.port, 1)], tag("api", "api"), tag("www", "www"), listeners=shared)
        async with running_proxy(proxy_config), httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{port}/"
            api = await client.get(url, headers={"host": "api.example.com"})
            www = await client.get(url, headers={"host": "www.example.com"})
    assert echoed_headers(api)["x-listener"] == ["api"]
    assert echoed_headers(www)["x-listener"] == ["www"]
    assert json.loads(www.text)["target"] == "/"
