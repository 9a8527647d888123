"""Token budgets and token limits charged with the usage the response reports, on the real request
path: a ProxyServer in front of a real HTTP upstream answering like an LLM API (OpenAI JSON and
event streams, an Anthropic stream cut short), redis-server for a global budget."""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from dataplane.http.server import ProxyServer
from dataplane.policy.budget import LocalBudget
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.llm.test_usage import ANTHROPIC_STREAM, OPENAI_STREAM
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.policy.test_chain import (
    APP,
    LISTENER_NAME,
    RULE,
    build,
    jwt_authentication,
    policy,
    rate_limit,
    token,
)
from tests.peers.redis import redis_server

pytestmark = pytest.mark.anyio

# An OpenAI chat completion that used 600 tokens.
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 450, "completion_tokens": 150, "total_tokens": 600},
    }
).encode()
JSON = [(b"content-type", b"application/json")]
EVENT_STREAM = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# The Anthropic stream up to (without) its message_delta: input 472 + 28 read from the cache, output 2.
ANTHROPIC_HEAD = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")]
ANTHROPIC_HEAD_TOKENS = 502

Handler = Callable[[H1Exchange], Awaitable[None]]


async def completion(exchange: H1Exchange) -> None:
    await exchange.read_body()
    await exchange.respond(200, COMPLETION, JSON)


async def openai_stream(exchange: H1Exchange) -> None:
    """Chunked, event by event, the last chunk before [DONE] carrying usage 600."""
    await exchange.read_body()
    await exchange.send_head(200, EVENT_STREAM)
    for event in OPENAI_STREAM.split(b"\n\n")[:-1]:
        await exchange.send(event + b"\n\n")
    await exchange.end()


async def anthropic_stream_cut(exchange: H1Exchange) -> None:
    """message_start and some content, then the upstream connection breaks."""
    await exchange.read_body()
    await exchange.send_head(200, EVENT_STREAM)
    await exchange.send(ANTHROPIC_HEAD)
    exchange.closed = True  # the peer closes the connection mid-body


def budget_policy(tokens: int = 1000, *, store: str = "") -> pb.Policy:
    budget = pb.TokenBudget(name="daily", tokens=tokens, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    if store:
        budget.scope = pb.LIMIT_SCOPE_GLOBAL
        budget.store.CopyFrom(pb.RedisStore(url=store))
    return policy(authentication=jwt_authentication(), token_budgets=pb.TokenBudgets(budgets=[budget]))


def auth(sub: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token(sub=sub).decode()}"}


async def post_three(port: int, sub: str = "alice") -> list[httpx.Response]:
    """Three requests one after another (the proxy charges each before serving the next on the connection)."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as client:
        return [
            await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=auth(sub))
            for _ in range(3)
        ]


def local_budget(server: ProxyServer) -> LocalBudget:
    chain = server._handler._policy_table.for_request(LISTENER_NAME, RULE, APP)
    assert chain is not None
    budget = chain.budgets[0].limiter
    assert isinstance(budget, LocalBudget)
    return budget


async def test_a_budget_is_charged_with_the_usage_of_a_json_response() -> None:
    port = free_port()
    async with H1Peer(completion) as peer, running_proxy(build(port, budget_policy(), upstream_port=peer.port)):
        alice = await post_three(port)
        async with httpx.AsyncClient() as client:
            bob = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, headers=auth("bob"))
    # Checked before the request: 0 then 600 are under 1000; charged after: 1200 refuses the third.
    assert [r.status_code for r in alice] == [200, 200, 429]
    assert alice[0].content == alice[1].content == COMPLETION  # passed through untouched
    assert "token budget 'default/p/daily'" in alice[2].text and int(alice[2].headers["retry-after"]) >= 1
    assert bob.status_code == 200  # another key, another budget
    assert len(peer.requests) == 3


async def test_a_budget_is_charged_with_the_usage_in_the_last_chunk_of_an_event_stream() -> None:
    port = free_port()
    async with H1Peer(openai_stream) as peer, running_proxy(build(port, budget_policy(), upstream_port=peer.port)):
        answers = await post_three(port)
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[0].headers["content-type"] == "text/event-stream"
    assert answers[0].content == answers[1].content == OPENAI_STREAM  # every event, unchanged
    assert int(answers[2].headers["retry-after"]) >= 1
    assert len(peer.requests) == 2


async def test_a_token_rate_limit_is_charged_the_same_way() -> None:
    port = free_port()
    limit = rate_limit("llm-tokens", capacity=1000, per=3600.0)
    limit.unit = pb.RateLimit.UNIT_TOKENS
    limits = pb.Policy(name="default/p")
    limits.CopyFrom(policy(authentication=jwt_authentication(), rate_limits=pb.RateLimits(limits=[limit])))
    async with H1Peer(completion) as peer, running_proxy(build(port, limits, upstream_port=peer.port)):
        answers = await post_three(port)
    assert [r.status_code for r in answers] == [200, 200, 429]
    # A token limit looks before the request (takes nothing) and is charged 600 after each response.
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["1000", "400", "0"]
    assert answers[2].headers["x-ratelimit-limit"] == "1000" and int(answers[2].headers["retry-after"]) >= 1
    assert len(peer.requests) == 2


async def test_a_stream_cut_by_the_upstream_is_charged_what_it_reported_so_far() -> None:
    port = free_port()
    async with H1Peer(anthropic_stream_cut) as peer:
        config = build(port, budget_policy(), upstream_port=peer.port)
        async with running_proxy(config) as server:
            outcomes: list[int | str] = []
            for _ in range(3):
                async with httpx.AsyncClient() as client:
                    try:
                        response = await client.post(
                            f"http://127.0.0.1:{port}/v1/messages", json={}, headers=auth("alice")
                        )
                        outcomes.append(response.status_code)
                    except httpx.RemoteProtocolError:
                        outcomes.append("cut")  # the proxy closed the client connection: the only signal left
            remaining = local_budget(server).status("alice").remaining
    # Each cut stream charged message_start's usage (502): 0 and 502 pass the check, 1004 does not.
    assert outcomes == ["cut", "cut", 429]
    assert remaining == 0
    assert len(peer.requests) == 2


async def test_a_client_that_goes_away_mid_stream_is_charged_what_was_seen() -> None:
    port = free_port()
    client_left, ran_out = anyio.Event(), anyio.Event()

    async def endless(exchange: H1Exchange) -> None:
        await exchange.read_body()
        await exchange.send_head(200, EVENT_STREAM)
        await exchange.send(ANTHROPIC_HEAD)
        await client_left.wait()
        delta = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0}\n\n'
        for _ in range(100_000):  # until the proxy drops this connection (it stops at the client's close)
            await exchange.send(delta)
        ran_out.set()  # not reached when the proxy stopped relaying

    async with H1Peer(endless) as peer, running_proxy(build(port, budget_policy(), upstream_port=peer.port)) as server:
        budget = local_budget(server)
        with anyio.fail_after(20):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            head = "POST /v1/messages HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n"
            head += f"authorization: {auth('alice')['authorization']}\r\n\r\n{{}}"
            await stream.send(head.encode())
            seen = b""
            while b"message_start" not in seen:
                seen += await stream.receive()
            await stream.aclose()
            client_left.set()
            # The proxy notices at its next write, ends the request and charges: polled, it has no event.
            while server.in_flight:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        remaining = budget.status("alice").remaining
    assert remaining == 1000 - ANTHROPIC_HEAD_TOKENS
    assert not ran_out.is_set()  # the charge followed the client's departure, not the stream's end


async def test_bodies_without_readable_usage_charge_nothing() -> None:
    port = free_port()

    async def answers(exchange: H1Exchange) -> None:
        await exchange.read_body()
        target = exchange.request.target
        if target == b"/gzip":  # an encoded body is not inflated: its usage is not read
            await exchange.respond(200, gzip.compress(COMPLETION), [*JSON, (b"content-encoding", b"gzip")])
        elif target == b"/text":
            await exchange.respond(200, b"usage: 600 tokens", [(b"content-type", b"text/plain")])
        else:
            await exchange.respond(500, b'{"error": {"message": "overloaded"}}', JSON)

    async with H1Peer(answers) as peer, running_proxy(build(port, budget_policy(), upstream_port=peer.port)) as server:
        async with httpx.AsyncClient() as client:
            statuses = [
                (await client.get(f"http://127.0.0.1:{port}{path}", headers=auth("alice"))).status_code
                for path in ("/gzip", "/text", "/error", "/gzip")
            ]
        remaining = local_budget(server).status("alice").remaining
    assert statuses == [200, 200, 500, 200]
    assert remaining == 1000


async def test_a_global_budget_is_charged_in_redis_and_a_dead_redis_never_fails_the_response() -> None:
    port, redis_port = free_port(), free_port()
    store = f"redis://127.0.0.1:{redis_port}/0"
    async with (
        H1Peer(completion) as peer,
        running_proxy(build(port, budget_policy(store=store), upstream_port=peer.port)),
    ):
        with anyio.fail_after(30):
            async with redis_server(redis_port):
                shared = await post_three(port)
            # Redis is down: the check fails open, the charge fails (logged): the responses are whole.
            down = await post_three(port, "carol")
    assert [r.status_code for r in shared] == [200, 200, 429]
    assert [r.status_code for r in down] == [200, 200, 200]
    assert all(r.content == COMPLETION for r in down)
