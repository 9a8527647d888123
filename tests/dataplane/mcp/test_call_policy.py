"""Policy on the MCP path through the real proxy, in front of a real SDK server, for all three client eras:
rules on a tools/call's arguments, item and HTTP limit headers on admitted answers, CORS on MCP routes, and
resource notifications on a 2026-07-28 listen stream filtered by the caller's visibility."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.mcp.endpoint import POLICY_DENIED, RATE_LIMITED
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.mcp.test_endpoint import POST_HEADERS, messages
from tests.dataplane.mcp.test_modern_endpoint import META
from tests.dataplane.mcp.test_modern_endpoint import post_headers as modern_headers
from tests.dataplane.peers.config import listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.policy.test_chain import MCP, RULE, jwt_authentication, mcp_backend, policy, rate_limit, token
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

VERSION = "2025-06-18"
SEED = "jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['add', 'echo']"
NO_SECRETS = "!(mcp.tool.name == 'echo' && mcp.tool.arguments.message.startsWith('secret'))"
APP_ORIGIN = "https://app.example.com"


def peer_server() -> MCPServer:
    """The SDK peer plus ``echo`` (a string argument for rules to read) and ``touch`` (announces a resource
    change to 2026-07-28 listen streams)."""
    server = build_server()

    @server.tool()
    def echo(message: str) -> str:
        """Say it back."""
        return message

    @server.tool()
    async def touch(uri: str, ctx: Context) -> str:
        """Announce that ``uri`` changed."""
        await ctx.notify_resource_updated(uri)
        return "touched"

    return server


@pytest.fixture
async def target() -> AsyncIterator[int]:
    async with serve(build_app(peer_server(), "streamable")) as port:
        yield port


def config(port: int, mcp_port: int, *policies: pb.Policy, origins: Iterable[str] = ()) -> RuntimeConfig:
    """One listener, rule RULE to the MCP backend (one target, "web", so names are unprefixed), the policies."""
    messages: list[Any] = [listener(port), *mcp_backend(mcp_port, ("web",))]
    messages[1].mcp.allowed_origins.extend(origins)
    messages += [route(RULE, backends=[(MCP, 1)]), *policies]
    kinds = {pb.Listener: LISTENER, pb.Backend: BACKEND, pb.Target: TARGET, pb.Route: ROUTE, pb.Policy: POLICY}
    resources: dict[str, dict[str, Any]] = {kind: {} for kind in kinds.values()}
    for message in messages:
        resources[kinds[type(message)]][message.name] = message
    return compile_config(resources, version="v1")


def tenant_policy(**sections: Any) -> pb.Policy:
    authorization = pb.Authorization(allow=[SEED], require=[NO_SECRETS])
    return policy(authentication=jwt_authentication(), authorization=authorization, **sections)


ACME = {"authorization": f"Bearer {token(tenant='acme').decode()}", "x-tenant": "acme"}


async def open_session(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, str]:
    """Initialize a session-era session; the headers for its next requests."""
    params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    response = await client.post(url, json=body, headers={**POST_HEADERS, **headers})
    assert response.status_code == 200, response.text
    session = {**POST_HEADERS, **headers, "mcp-session-id": response.headers["mcp-session-id"]}
    session["mcp-protocol-version"] = VERSION
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await client.post(url, json=initialized, headers=session)).status_code == 202
    return session


async def rpc(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], request_id: int, method: str, **params: Any
) -> tuple[httpx.Response, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    response = await client.post(url, json=body, headers=headers)
    answer = messages(response)[-1]
    assert answer["id"] == request_id, answer
    return response, answer


def text(answer: dict[str, Any]) -> str:
    return str(answer["result"]["content"][0]["text"])


def assert_policy_denied(response: httpx.Response, answer: dict[str, Any]) -> None:
    assert response.status_code == 200
    assert answer["error"]["code"] == POLICY_DENIED
    assert "policy denied" in answer["error"]["message"]
    assert "startsWith" not in response.text and "require" not in response.text  # no rule text leaks


# --- argument rules, per era ------------------------------------------------------------------------------


async def test_a_session_client_is_refused_a_call_for_its_arguments_but_still_sees_the_tool(target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(config(port, target, tenant_policy())), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            session = await open_session(client, url, ACME)
            _, listed = await rpc(client, url, session, 2, "tools/list")
            _, said = await rpc(client, url, session, 3, "tools/call", name="echo", arguments={"message": "hello"})
            response, denied = await rpc(
                client, url, session, 4, "tools/call", name="echo", arguments={"message": "secret plans"}
            )
            _, hidden = await rpc(client, url, session, 5, "tools/call", name="count", arguments={"n": 1})
            _, added = await rpc(client, url, session, 6, "tools/call", name="add", arguments={"a": 2, "b": 3})
    assert {tool["name"] for tool in listed["result"]["tools"]} == {"add", "echo"}
    assert text(said) == "hello"
    assert_policy_denied(response, denied)
    assert hidden["error"]["code"] == -32602  # hidden fails like unknown, not as "denied"
    assert text(added) == "5"


async def test_a_2026_client_is_refused_a_call_for_its_arguments(target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {**modern_headers("tools/call", "echo"), **ACME}
    async with running_proxy(config(port, target, tenant_policy())), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            _, said = await rpc(
                client, url, headers, 1, "tools/call", name="echo", arguments={"message": "hi"}, _meta=META
            )
            response, denied = await rpc(
                client, url, headers, 2, "tools/call", name="echo", arguments={"message": "secret"}, _meta=META
            )
    assert text(said) == "hi"
    assert_policy_denied(response, denied)


async def test_a_legacy_sse_client_gets_the_refusal_on_its_stream(target: int) -> None:
    port = free_port()
    async with running_proxy(config(port, target, tenant_policy())):
        with anyio.fail_after(30):
            async with Client(sse_client(f"http://127.0.0.1:{port}/mcp/sse", headers=ACME), mode="legacy") as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                said = await client.call_tool("echo", {"message": "hello"})
                with pytest.raises(MCPError) as denied:
                    await client.call_tool("echo", {"message": "secret"})
                after = await client.call_tool("add", {"a": 20, "b": 22})  # the session goes on
    assert tools == {"add", "echo"}
    assert said.content[0].text == "hello"  # type: ignore[union-attr]
    assert denied.value.error.code == POLICY_DENIED
    assert after.content[0].text == "42"  # type: ignore[union-attr]


# --- limit headers on admitted answers --------------------------------------------------------------------


def values(response: httpx.Response, name: str) -> list[str]:
    return response.headers.get_list(name)


async def test_admitted_answers_carry_the_limit_that_counted_them_once(target: int) -> None:
    limits = [rate_limit("per-user", 100, key="jwt.sub"), rate_limit("per-tool", 5, key="mcp.tool.name")]
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    authorization = pb.Authorization(allow=[SEED.replace("'echo']", "'echo', 'count']")], require=[NO_SECRETS])
    limited = policy(
        authentication=jwt_authentication(), authorization=authorization, rate_limits=pb.RateLimits(limits=limits)
    )
    async with running_proxy(config(port, target, limited)), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            session = await open_session(client, url, ACME)
            listed, _ = await rpc(client, url, session, 2, "tools/list")
            called, _ = await rpc(client, url, session, 3, "tools/call", name="add", arguments={"a": 1, "b": 1})
            # Progress comes before the result: an SSE answer.
            streamed, counted = await rpc(
                client, url, session, 4, "tools/call", name="count", arguments={"n": 2}, _meta={"progressToken": 7}
            )
            denied, _ = await rpc(client, url, session, 5, "tools/call", name="echo", arguments={"message": "secret"})
            echoed, _ = await rpc(client, url, session, 7, "tools/call", name="echo", arguments={"message": "hi"})
            modern, _ = await rpc(
                client,
                url,
                {**modern_headers("tools/call", "add"), **ACME},
                6,
                "tools/call",
                name="add",
                arguments={"a": 1, "b": 2},
                _meta=META,
            )
    # A list is counted by the HTTP-level limit only.
    assert values(listed, "x-ratelimit-limit") == ["100"]
    # An item use reports the tighter item limit, once (not next to the HTTP-level copy).
    assert values(called, "x-ratelimit-limit") == ["5"] and values(called, "x-ratelimit-remaining") == ["4"]
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert text(counted) == "counted 2"
    assert values(streamed, "x-ratelimit-limit") == ["5"] and values(streamed, "x-ratelimit-remaining") == ["4"]
    # The denied echo was not counted by its tool's limit (only by the HTTP-level one): the next echo is the first.
    assert values(denied, "x-ratelimit-limit") == ["100"]
    assert values(echoed, "x-ratelimit-limit") == ["5"] and values(echoed, "x-ratelimit-remaining") == ["4"]
    # A 2026-07-28 call: the second add.
    assert values(modern, "x-ratelimit-limit") == ["5"] and values(modern, "x-ratelimit-remaining") == ["3"]


async def test_an_item_limit_refusal_is_still_a_json_rpc_error_with_its_own_headers(target: int) -> None:
    limits = [rate_limit("per-user", 100, key="jwt.sub"), rate_limit("per-tool", 1, key="mcp.tool.name")]
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    proxy_config = config(port, target, tenant_policy(rate_limits=pb.RateLimits(limits=limits)))
    async with running_proxy(proxy_config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            session = await open_session(client, url, ACME)
            await rpc(client, url, session, 2, "tools/call", name="add", arguments={"a": 1, "b": 1})
            limited, refusal = await rpc(client, url, session, 3, "tools/call", name="add", arguments={"a": 1, "b": 1})
    assert limited.status_code == 429 and refusal["error"]["code"] == RATE_LIMITED
    assert values(limited, "x-ratelimit-limit") == ["1"] and values(limited, "retry-after")


# --- CORS --------------------------------------------------------------------------------------------------


async def test_cors_on_an_mcp_route_covers_preflights_answers_and_refusals(target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    cors = pb.Cors(allow_origins=[APP_ORIGIN], allow_methods=["GET", "POST", "DELETE"], allow_headers=["x-tenant"])
    proxy_config = config(port, target, tenant_policy(cors=cors), origins=[APP_ORIGIN])
    browser = {"origin": APP_ORIGIN}
    asked = "content-type, authorization, mcp-session-id, mcp-protocol-version, last-event-id, x-tenant, mcp-param-q"
    async with running_proxy(proxy_config), httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(30):
            preflight = await client.options(
                url,
                headers={
                    **browser,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": asked,
                },
            )
            refused_preflight = await client.options(
                url,
                headers={
                    **browser,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "x-other",
                },
            )
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            anonymous = await client.post(url, json=ping, headers={**POST_HEADERS, **browser})
            session = await open_session(client, url, {**ACME, **browser})
            listed, _ = await rpc(client, url, session, 2, "tools/list")
            initialize = {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "initialize",
                "params": {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            }
            opened = await client.post(url, json=initialize, headers={**POST_HEADERS, **ACME, **browser})
            elsewhere = await client.post(
                url, json=initialize, headers={**POST_HEADERS, **ACME, "origin": "https://evil.example"}
            )
    assert preflight.status_code == 204
    allowed = {name.strip() for name in preflight.headers["access-control-allow-headers"].split(",")}
    assert {name.strip() for name in asked.split(",")} <= allowed
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert refused_preflight.status_code == 403  # the policy's own list still decides other headers
    # A 401 from the policy chain is readable by the page, challenge included.
    assert anonymous.status_code == 401 and anonymous.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = {name.strip() for name in anonymous.headers["access-control-expose-headers"].split(",")}
    assert {"www-authenticate", "mcp-session-id", "x-ratelimit-limit", "retry-after"} <= exposed
    assert listed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert opened.headers["access-control-allow-origin"] == APP_ORIGIN and opened.headers["mcp-session-id"]
    # Another origin: the endpoint's DNS-rebinding check refuses it, and CORS grants it nothing.
    assert elsewhere.status_code == 403 and "access-control-allow-origin" not in elsewhere.headers


# --- notifications on the 2026-07-28 listen stream ------------------------------------------------------


def when_listening(server: MCPServer) -> anyio.Event:
    """Set once the peer has a listen subscriber (the gateway's upstream listen is open)."""
    bus: Any = server._subscriptions
    subscribed = anyio.Event()
    original: Callable[..., Any] = bus.subscribe

    def subscribe(listener: Any) -> Any:
        unsubscribe = original(listener)
        subscribed.set()
        return unsubscribe

    bus.subscribe = subscribe
    return subscribed


async def test_a_listen_stream_drops_updates_of_resources_the_caller_cannot_see() -> None:
    rules = pb.Authorization(allow=["mcp.tool.name == 'touch' || mcp.resource.uri.startsWith('file:///public/')"])
    server = peer_server()
    listening = when_listening(server)
    port = free_port()
    public, private = "file:///public/a", "file:///private/b"
    async with (
        serve(build_app(server, "streamable")) as mcp_port,
        running_proxy(config(port, mcp_port, policy(authorization=rules))),
    ):
        with anyio.fail_after(60):
            async with (
                Client(f"http://127.0.0.1:{port}/mcp") as client,
                client.listen(resource_subscriptions=[private, public]) as subscription,
            ):
                # The hidden URI is acknowledged like any other: nothing tells it apart.
                assert set(subscription.honored.resource_subscriptions or ()) == {private, public}
                await listening.wait()
                assert (await client.call_tool("touch", {"uri": private})).content[0].text == "touched"
                assert (await client.call_tool("touch", {"uri": public})).content[0].text == "touched"
                event = await subscription.__anext__()
    # The peer sent both updates in order on one stream: the first to arrive is the visible one.
    assert type(event).__name__ == "ResourceUpdated"
    assert str(getattr(event, "uri", "")) == public
