"""The policy chain on the real request path: a ProxyServer in front of real peers (an echoing HTTP
upstream, an MCP SDK server, redis-server), Policy resources compiled through compile_config."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.mcp.endpoint import RATE_LIMITED
from dataplane.policy.chain import Admitted
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.mcp.test_endpoint import POST_HEADERS, messages
from tests.dataplane.mcp.test_modern_endpoint import META
from tests.dataplane.mcp.test_modern_endpoint import post_headers as modern_headers
from tests.dataplane.peers.config import backend, listener, route, target
from tests.dataplane.peers.h1 import H1Peer
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.policy.test_chain import (
    APP,
    KEY,
    LISTENER_NAME,
    RULE,
    SEED_RULE,
    Kind_,
    bearer,
    build,
    claims,
    ec_key,
    jwt_authentication,
    policy,
    rate_limit,
    raw_token,
    request,
    token,
)
from tests.dataplane.policy.test_jwt import hmac_confusion_token, rsa_key
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.redis import redis_server

pytestmark = pytest.mark.anyio

VERSION = "2025-06-18"


def echoed(response: httpx.Response) -> dict[str, list[str]]:
    """The request headers the echo peer received."""
    out: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        out.setdefault(name, []).append(value)
    return out


# --- HTTP -----------------------------------------------------------------------------------------


async def test_a_good_jwt_passes_with_its_identity_header_and_a_spoofed_copy_stripped() -> None:
    port = free_port()
    async with H1Peer() as peer:
        config = build(port, policy(authentication=jwt_authentication()), upstream_port=peer.port)
        async with running_proxy(config), httpx.AsyncClient() as client:
            headers = {"authorization": f"Bearer {token(sub='alice').decode()}", "x-agent-identity": "root"}
            response = await client.get(f"http://127.0.0.1:{port}/tools", headers=headers)
    assert response.status_code == 200
    seen = echoed(response)
    assert seen["x-agent-identity"] == ["alice"]
    assert "authorization" not in seen  # the gateway's token never reaches the tool


async def test_bad_tokens_get_401_with_www_authenticate_and_never_500() -> None:
    port = free_port()
    now = int(time.time())
    rsa = rsa_key("gw-rsa")
    bad = {
        "expired": token(exp=now - 3600, iat=now - 7200),
        "not yet valid": token(nbf=now + 3600),
        "wrong issuer": token(iss="https://elsewhere.test"),
        "wrong audience": token(aud="elsewhere"),
        "alg none": raw_token({"alg": "none", "typ": "JWT"}, claims()),
        "key confusion": hmac_confusion_token(rsa),
        "unknown kid": token(ec_key("unknown")),
        "oversized": token(padding="x" * 9000),
        "garbage": b"%%%.%%%.%%%",
    }
    async with H1Peer() as peer:
        config = build(port, policy(authentication=jwt_authentication(KEY, rsa)), upstream_port=peer.port)
        async with running_proxy(config), httpx.AsyncClient() as client:
            answers = {
                case: await client.get(
                    f"http://127.0.0.1:{port}/", headers={"authorization": f"Bearer {value.decode()}"}
                )
                for case, value in bad.items()
            }
            missing = await client.get(f"http://127.0.0.1:{port}/")
            refused_reached_upstream = list(peer.requests)
            signed_by_rsa = await client.get(
                f"http://127.0.0.1:{port}/", headers={"authorization": f"Bearer {token(rsa).decode()}"}
            )
    for case, response in [*answers.items(), ("missing", missing)]:
        assert response.status_code == 401, case
        assert response.headers["www-authenticate"].startswith('Bearer realm="agentgate"'), case
    assert 'error="invalid_token"' in answers["expired"].headers["www-authenticate"]
    assert refused_reached_upstream == []
    # The RSA key is configured and a token it really signs passes: the confusion token failed on its alg alone.
    assert signed_by_rsa.status_code == 200


async def test_a_cel_deny_is_403_and_an_allow_passes() -> None:
    port = free_port()
    authz = pb.Authorization(allow=["jwt.tenant == request.headers['x-tenant']"])
    async with H1Peer() as peer:
        config = build(port, policy(authentication=jwt_authentication(), authorization=authz), upstream_port=peer.port)
        async with running_proxy(config), httpx.AsyncClient() as client:
            auth = {"authorization": f"Bearer {token(tenant='acme').decode()}"}
            allowed = await client.get(f"http://127.0.0.1:{port}/", headers={**auth, "x-tenant": "acme"})
            denied = await client.get(f"http://127.0.0.1:{port}/", headers={**auth, "x-tenant": "globex"})
    assert allowed.status_code == 200
    assert denied.status_code == 403 and 'error="insufficient_scope"' in denied.headers["www-authenticate"]
    assert len(peer.requests) == 1


async def test_a_local_limit_answers_429_with_retry_after_and_ratelimit_headers() -> None:
    port = free_port()
    limits = pb.RateLimits(limits=[rate_limit(capacity=2)])
    async with H1Peer() as peer:
        config = build(port, policy(authentication=jwt_authentication(), rate_limits=limits), upstream_port=peer.port)
        async with running_proxy(config), httpx.AsyncClient() as client:
            auth = {"authorization": f"Bearer {token(sub='alice').decode()}"}
            answers = [await client.get(f"http://127.0.0.1:{port}/", headers=auth) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["1", "0", "0"]
    assert answers[0].headers["x-ratelimit-limit"] == "2"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert len(peer.requests) == 2


async def test_a_token_budget_refuses_once_spent() -> None:
    port = free_port()
    budget = pb.TokenBudget(name="daily", tokens=100, key="jwt.sub")
    sections = {"authentication": jwt_authentication(), "token_budgets": pb.TokenBudgets(budgets=[budget])}
    async with H1Peer() as peer, running_proxy(build(port, policy(**sections), upstream_port=peer.port)) as server:
        alice = token(sub="alice")
        async with httpx.AsyncClient() as client:
            first = await client.get(f"http://127.0.0.1:{port}/", headers={"authorization": f"Bearer {alice.decode()}"})
            # What an LLM handler does after the response: charge the real usage.
            chain = server._handler._policy_table.for_request(LISTENER_NAME, RULE, APP)
            assert chain is not None
            outcome = await chain.evaluate(request(port, bearer(alice)))
            assert isinstance(outcome, Admitted)
            await outcome.charge(150)
            spent = await client.get(f"http://127.0.0.1:{port}/", headers={"authorization": f"Bearer {alice.decode()}"})
    assert first.status_code == 200
    assert spent.status_code == 429 and "token budget" in spent.text and int(spent.headers["retry-after"]) >= 1


async def test_an_invalid_policy_fails_closed_with_500() -> None:
    port = free_port()
    broken = pb.Policy(
        name="default/broken",
        targets=[pb.PolicyTargetRef(kind=Kind_.KIND_ROUTE_RULE, name=RULE)],
        invalid_reason="Secret default/keys not found",
    )
    async with (
        H1Peer() as peer,
        running_proxy(build(port, broken, upstream_port=peer.port)),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.status_code == 500 and "default/broken" in response.text
    assert peer.requests == []


# --- global limits through one Redis, two proxies ------------------------------------------------


def two_route_config(port: int, upstream_port: int, store: str) -> RuntimeConfig:
    """Rules /open and /closed, each under a global limit of 3 an hour in ``store``: fail open and fail
    closed when Redis is down."""
    rules = {"default/open/0": "/open", "default/closed/0": "/closed"}
    resources: dict[str, dict[str, Any]] = {
        LISTENER: {LISTENER_NAME: listener(port)},
        BACKEND: {APP: backend(APP)},
        TARGET: {f"{APP}/t0": target(APP, upstream_port)},
        ROUTE: {name: route(name, prefix=prefix) for name, prefix in rules.items()},
        POLICY: {},
    }
    for name, down in (
        ("default/open/0", pb.STORE_DOWN_POLICY_FAIL_OPEN),
        ("default/closed/0", pb.STORE_DOWN_POLICY_FAIL_CLOSED),
    ):
        limit = rate_limit("shared", 3, key="'everyone'", store=store, on_store_down=down)
        ref = pb.PolicyTargetRef(kind=Kind_.KIND_ROUTE_RULE, name=name)
        resources[POLICY][f"{name}-limit"] = policy(
            f"{name}-limit", on=[ref], rate_limits=pb.RateLimits(limits=[limit])
        )
    return compile_config(resources, version="v1")


async def statuses(client: httpx.AsyncClient, urls: Iterable[str]) -> list[int]:
    return [(await client.get(url)).status_code for url in urls]


async def test_a_global_limit_is_shared_by_two_proxies_and_redis_down_follows_the_configured_policy() -> None:
    a, b, redis_port = free_port(), free_port(), free_port()
    store = f"redis://127.0.0.1:{redis_port}/0"
    async with (
        H1Peer() as peer,
        running_proxy(two_route_config(a, peer.port, store)) as first,
        running_proxy(two_route_config(b, peer.port, store)) as second,
        httpx.AsyncClient() as client,
    ):
        open_a, open_b = f"http://127.0.0.1:{a}/open", f"http://127.0.0.1:{b}/open"
        closed_a, closed_b = f"http://127.0.0.1:{a}/closed", f"http://127.0.0.1:{b}/closed"
        with anyio.fail_after(30):
            async with redis_server(redis_port):
                # One bucket of 3 across both proxies (per policy: the two rules count apart).
                assert await statuses(client, [open_a, open_b, open_a, open_b, open_a]) == [200, 200, 200, 429, 429]
                assert await statuses(client, [closed_b, closed_a, closed_b, closed_a]) == [200, 200, 200, 429]
            # Redis is stopped now: fail open admits, fail closed refuses with 503.
            assert await statuses(client, [open_a, open_b, open_a]) == [200, 200, 200]
            down = await client.get(closed_b)
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
        assert "x-ratelimit-limit" not in down.headers  # nothing is known about the quota
        assert len(first._handler.policies.redis) == len(second._handler.policies.redis) == 1


# --- MCP ------------------------------------------------------------------------------------------


async def mcp_session(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, str]:
    """Initialize a session with ``headers`` (credentials); the headers for its next requests."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    response = await client.post(url, json=body, headers={**POST_HEADERS, **headers})
    assert response.status_code == 200, response.text
    session = {**POST_HEADERS, **headers, "mcp-session-id": response.headers["mcp-session-id"]}
    session["mcp-protocol-version"] = VERSION
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await client.post(url, json=initialized, headers=session)).status_code == 202
    return session


_ids = itertools.count(100)


async def rpc(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], method: str, **params: Any
) -> tuple[httpx.Response, dict[str, Any] | None]:
    """One JSON-RPC request; the HTTP response and the JSON-RPC answer (None for a plain-text refusal)."""
    request_id = next(_ids)
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    response = await client.post(url, json=body, headers=headers)
    if not response.headers.get("content-type", "").startswith(("application/json", "text/event-stream")):
        return response, None
    answer = messages(response)[-1]
    assert answer["id"] == request_id
    return response, answer


def tool_names(answer: dict[str, Any]) -> set[str]:
    return {tool["name"] for tool in answer["result"]["tools"]}


@pytest.fixture
async def mcp_target() -> Any:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


async def test_the_seed_rule_hides_other_tools_and_refuses_their_calls_like_unknown_ones(mcp_target: int) -> None:
    port = free_port()
    seed = SEED_RULE.replace("['add', 'search']", "['add']")
    config = build(
        port,
        policy(authentication=jwt_authentication(), authorization=pb.Authorization(allow=[seed])),
        mcp_port=mcp_target,
        mcp_targets=("web",),
    )
    url = f"http://127.0.0.1:{port}/mcp"
    acme = {"authorization": f"Bearer {token(tenant='acme').decode()}", "x-tenant": "acme"}
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            session = await mcp_session(client, url, acme)
            _, listed = await rpc(client, url, session, "tools/list")
            assert tool_names(listed) == {"add"}
            _, added = await rpc(client, url, session, "tools/call", name="add", arguments={"a": 2, "b": 3})
            assert added["result"]["content"][0]["text"] == "5"
            _, hidden = await rpc(client, url, session, "tools/call", name="count", arguments={"n": 1})
            _, unknown = await rpc(client, url, session, "tools/call", name="nonexistent", arguments={})
            assert hidden["error"]["code"] == unknown["error"]["code"] == -32602
            assert hidden["error"]["message"] == "Unknown tool: count"
            # The same session with another tenant's header: this request's variables decide.
            other = {**session, "x-tenant": "globex"}
            _, listed = await rpc(client, url, other, "tools/list")
            assert tool_names(listed) == set()
            # No token: 401 before the session is touched, with the challenge.
            anonymous = {k: v for k, v in session.items() if k != "authorization"}
            response, _ = await rpc(client, url, anonymous, "tools/list")
            assert response.status_code == 401 and "www-authenticate" in response.headers


async def test_a_per_principal_tool_allow_list(mcp_target: int) -> None:
    port = free_port()
    allowed = "mcp.tool.name in {'alice': ['add'], 'bob': ['add', 'count']}[jwt.sub]"
    config = build(
        port,
        policy(authentication=jwt_authentication(), authorization=pb.Authorization(allow=[allowed])),
        mcp_port=mcp_target,
        mcp_targets=("web",),
    )
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            seen = {}
            for principal in ("alice", "bob"):
                session = await mcp_session(client, url, {"authorization": f"Bearer {token(sub=principal).decode()}"})
                _, listed = await rpc(client, url, session, "tools/list")
                seen[principal] = tool_names(listed)
            _, refused = await rpc(client, url, session, "tools/call", name="ask", arguments={"question": "?"})
    assert seen == {"alice": {"add"}, "bob": {"add", "count"}}
    assert refused["error"]["code"] == -32602


async def test_a_limit_keyed_by_tool_refuses_the_call_with_429_and_a_json_rpc_error(mcp_target: int) -> None:
    port = free_port()
    limits = pb.RateLimits(limits=[rate_limit("per-tool", 1, key="jwt.sub + '/' + mcp.tool.name")])
    config = build(
        port,
        policy(authentication=jwt_authentication(), rate_limits=limits),
        mcp_port=mcp_target,
        mcp_targets=("web",),
    )
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            session = await mcp_session(client, url, {"authorization": f"Bearer {token(sub='alice').decode()}"})
            listed = [await rpc(client, url, session, "tools/list") for _ in range(2)]  # lists are not counted
            _, added = await rpc(client, url, session, "tools/call", name="add", arguments={"a": 1, "b": 1})
            response, limited = await rpc(client, url, session, "tools/call", name="add", arguments={"a": 1, "b": 2})
            _, counted = await rpc(client, url, session, "tools/call", name="count", arguments={"n": 1})
    assert all(r.status_code == 200 for r, _ in listed)
    assert added["result"]["content"][0]["text"] == "2"
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit"] == "1"
    assert limited["error"]["code"] == RATE_LIMITED and limited["error"]["data"]["retryAfter"] >= 1
    assert counted["result"]["content"][0]["text"] == "counted 1"


async def test_protected_resource_metadata_is_served_for_the_mcp_route(mcp_target: int) -> None:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    config = build(
        port, policy(authentication=jwt_authentication(resource=resource)), mcp_port=mcp_target, mcp_targets=("web",)
    )
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        document = await client.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp")
        refused = await client.post(resource, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=POST_HEADERS)
    assert document.status_code == 200 and document.headers["content-type"] == "application/json"
    assert json.loads(document.content)["resource"] == resource
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert f'resource_metadata="http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"' in challenge


async def test_a_2026_request_gets_its_callers_visibility_and_limits(mcp_target: int) -> None:
    port = free_port()
    authz = pb.Authorization(allow=["mcp.tool.name in {'alice': ['add', 'count']}[jwt.sub]"])
    limits = pb.RateLimits(limits=[rate_limit("per-tool", 1, key="mcp.tool.name")])
    config = build(
        port,
        policy(authentication=jwt_authentication(), authorization=authz, rate_limits=limits),
        mcp_port=mcp_target,
        mcp_targets=("web",),
    )
    url = f"http://127.0.0.1:{port}/mcp"
    auth = {"authorization": f"Bearer {token(sub='alice').decode()}"}
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            _, listed = await rpc(client, url, {**modern_headers("tools/list"), **auth}, "tools/list", _meta=META)
            call_add = {**modern_headers("tools/call", "add"), **auth}
            _, added = await rpc(
                client, url, call_add, "tools/call", name="add", arguments={"a": 1, "b": 1}, _meta=META
            )
            limited, refusal = await rpc(
                client, url, call_add, "tools/call", name="add", arguments={"a": 1, "b": 1}, _meta=META
            )
            call_ask = {**modern_headers("tools/call", "ask"), **auth}
            _, hidden = await rpc(
                client, url, call_ask, "tools/call", name="ask", arguments={"question": "?"}, _meta=META
            )
    assert listed is not None and tool_names(listed) == {"add", "count"}
    assert added is not None and added["result"]["content"][0]["text"] == "2"
    assert limited.status_code == 429 and refusal is not None and refusal["error"]["code"] == RATE_LIMITED
    assert hidden is not None and hidden["error"]["code"] == -32602


async def test_a_legacy_sse_client_sees_its_tools_and_gets_the_limit_error_on_its_stream(mcp_target: int) -> None:
    port = free_port()
    authz = pb.Authorization(allow=["mcp.tool.name == 'add'"])
    limits = pb.RateLimits(limits=[rate_limit("per-tool", 1, key="mcp.tool.name")])
    config = build(
        port,
        policy(authentication=jwt_authentication(), authorization=authz, rate_limits=limits),
        mcp_port=mcp_target,
        mcp_targets=("web",),
    )
    auth = {"authorization": f"Bearer {token(sub='alice').decode()}"}
    async with running_proxy(config):
        with anyio.fail_after(30):
            transport = sse_client(f"http://127.0.0.1:{port}/mcp/sse", headers=auth)
            async with Client(transport, mode="legacy") as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                added = await client.call_tool("add", {"a": 20, "b": 22})
                with pytest.raises(MCPError) as limited:
                    await client.call_tool("add", {"a": 1, "b": 1})
    assert tools == {"add"}
    assert added.content[0].text == "42"  # type: ignore[union-attr]
    assert limited.value.error.code == RATE_LIMITED
