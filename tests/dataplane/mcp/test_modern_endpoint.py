"""2026-07-28 clients through the real proxy, in front of a modern (dual-era HTTP) and a session-era (stdio) target."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from mcp.types import ElicitResult
from pydantic import BaseModel

from dataplane.config.model import RuntimeConfig
from dataplane.http.server import ProxyServer
from dataplane.mcp.modern import ModernEndpoint
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

KEY = pb.McpSessionKey(id="k1", key=b"k" * 32)
MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}

# A session-era stdio server (the SDK speaks the 2025 handshake over stdio): echo, progress, elicitation.
STDIO_SERVER = """
import warnings
from pydantic import BaseModel
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

warnings.filterwarnings("ignore")
server = MCPServer("stdio-ask")


class Answer(BaseModel):
    text: str


@server.tool()
def echo(text: str) -> str:
    return text


@server.tool()
async def work(steps: int, ctx: Context) -> str:
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    return f"done {steps}"


@server.tool()
async def grow(ctx: Context) -> str:
    server.add_tool(lambda: "new", name="sprout")
    await ctx.request_context.session.send_tool_list_changed()
    return "grown"


@server.tool()
async def hang(ctx: Context) -> str:
    import anyio
    await anyio.Event().wait()
    return "never"


@server.tool()
async def ask(question: str, ctx: Context) -> str:
    first = await ctx.elicit(question, Answer)
    second = await ctx.elicit("and again?", Answer)
    texts = [r.data.text for r in (first, second) if r.action == "accept" and r.data is not None]
    return "answers: " + ",".join(texts)


server.run("stdio")
"""


class Colour(BaseModel):
    text: str


def ask_colour() -> Elicit[Colour]:
    return Elicit("favourite colour?", Colour)


def modern_server() -> MCPServer:
    """The HTTP SDK peer plus a tool whose elicitation is a 2026-07-28 input_required of the target's own."""
    server = build_server()

    @server.tool()
    async def grow(ctx: Context) -> str:
        """Add a tool and announce it to listen streams."""
        server.add_tool(lambda: "fresh", name="bloom")
        await ctx.notify_tools_changed()
        return "grown"

    @server.tool()
    async def paint(colour: Annotated[Colour, Resolve(ask_colour)], ctx: Context) -> str:
        """Paint in the colour the user picks."""
        return f"painted {colour.text}"

    return server


def mcp_config(port: int, http_port: int) -> RuntimeConfig:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    web = pb.Target(
        name="default/mcp/web",
        backend="default/mcp",
        mcp=pb.McpServer(
            name="web",
            streamable_http=pb.McpHttpTransport(address=pb.SocketAddress(host="127.0.0.1", port=http_port)),
        ),
    )
    local = pb.Target(
        name="default/mcp/local",
        backend="default/mcp",
        mcp=pb.McpServer(name="local", stdio=pb.McpStdioTransport(command=sys.executable, args=["-c", STDIO_SERVER])),
    )
    return compile_resources(listener(port), backend, web, local, route(backends=[("default/mcp", 1)]))


@pytest.fixture
async def http_target() -> AsyncIterator[int]:
    async with serve(build_app(modern_server(), "streamable")) as port:
        yield port


def modern(server: ProxyServer) -> ModernEndpoint:
    endpoint = server._handler.mcp.modern
    assert isinstance(endpoint, ModernEndpoint)
    return endpoint


async def test_the_sdk_client_speaks_2026_through_both_eras(http_target: int) -> None:
    port = free_port()
    progress: list[float] = []
    asked: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"text": f"blue{len(asked)}"})

    async with running_proxy(mcp_config(port, http_target)) as server:
        with anyio.fail_after(60):
            async with Client(f"http://127.0.0.1:{port}/mcp", elicitation_callback=elicit) as client:
                assert client.session.protocol_version == MODERN
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"web__add", "web__count", "web__paint", "local__echo", "local__work", "local__ask"} <= tools
                added = await client.call_tool("web__add", {"a": 2, "b": 3})
                assert added.content[0].text == "5"
                echoed = await client.call_tool("local__echo", {"text": "hi"})
                assert echoed.content[0].text == "hi"
                worked = await client.call_tool("local__work", {"steps": 3}, progress_callback=on_progress)
                assert worked.content[0].text == "done 3" and progress == [1, 2, 3]
                counted = await client.call_tool("web__count", {"n": 2}, progress_callback=on_progress)
                assert counted.content[0].text == "counted 2" and progress[3:] == [1, 2]
                # Two elicitations from the session-era stdio target, each bridged as an input_required round.
                answered = await client.call_tool("local__ask", {"question": "colour?"})
                assert answered.content[0].text == "answers: blue1,blue2"
                assert asked == ["colour?", "and again?"]
                # The modern target's own input_required passes through; the retry routes by the prefixed name.
                painted = await client.call_tool("web__paint", {})
                assert painted.content[0].text == "painted blue3"
                assert asked[-1] == "favourite colour?"
        endpoint = modern(server)
        backend = endpoint._backends["default/mcp"]
        assert backend.targets["web"].modern is not None and backend.targets["web"].shared is None
        shared = backend.targets["local"].shared
        assert shared is not None and shared.connected and shared.mux.parked == 0
        # Sessionless: the session-era endpoint never opened a session.
        assert len(server._handler.mcp.sessions) == 0


def messages(response: httpx.Response) -> list[dict[str, Any]]:
    if response.headers["content-type"].startswith("application/json"):
        return [response.json()]
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def post_headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": MODERN,
        "mcp-method": method,
    }
    if name is not None:
        headers["mcp-name"] = name
    return {**headers, **extra}


def call(request_id: int, name: str, arguments: dict[str, Any], **params: Any) -> dict[str, Any]:
    body = {"name": name, "arguments": arguments, "_meta": META, **params}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": body}


async def test_bad_input_gets_the_2026_errors(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)), httpx.AsyncClient(timeout=30) as client:
        echo = call(1, "local__echo", {"text": "x"})
        ok = await client.post(url, json=echo, headers=post_headers("tools/call", "local__echo"))
        assert ok.status_code == 200 and messages(ok)[-1]["result"]["content"][0]["text"] == "x"
        assert messages(ok)[-1]["result"]["resultType"] == "complete"

        async def refused(body: Any, headers: dict[str, str], status: int, code: int) -> dict[str, Any]:
            response = await client.post(url, json=body, headers=headers)
            assert response.status_code == status, response.text
            answer = response.json()
            assert answer["error"]["code"] == code, answer
            return answer

        # Mirrored headers that disagree with the body, or are missing: -32020, 400.
        await refused(echo, post_headers("tools/list", "local__echo"), 400, -32020)
        await refused(echo, post_headers("tools/call", "local__other"), 400, -32020)
        await refused(echo, post_headers("tools/call"), 400, -32020)
        await refused(echo, {**post_headers("tools/call", "local__echo"), "mcp-name": "=?base64?!!?="}, 400, -32020)
        no_method = {k: v for k, v in post_headers("tools/call", "local__echo").items() if k != "mcp-method"}
        await refused(echo, no_method, 400, -32020)
        no_version = {k: v for k, v in post_headers("tools/call", "local__echo").items() if k != "mcp-protocol-version"}
        await refused(echo, no_version, 400, -32020)
        other_meta = call(
            2, "local__echo", {"text": "x"}, _meta={**META, "io.modelcontextprotocol/protocolVersion": "x"}
        )
        await refused(other_meta, post_headers("tools/call", "local__echo"), 400, -32020)
        # A non-ASCII name travels Base64-encoded and matches.
        encoded = call(3, "local__é", {})
        answer = await refused(encoded, post_headers("tools/call", "=?base64?bG9jYWxfX8Op?="), 400, -32602)
        assert answer["id"] == 3  # it reached routing: an unknown tool
        # The envelope: _meta with version and client capabilities.
        bare = {"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {}}
        await refused(bare, post_headers("tools/list"), 400, -32602)
        no_caps = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"_meta": {META_VERSION: MODERN}}}
        await refused(no_caps, post_headers("tools/list"), 400, -32602)
        bad_caps = {"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": {"_meta": {**META, CAPS: []}}}
        await refused(bad_caps, post_headers("tools/list"), 400, -32602)
        # Methods 2026-07-28 removed or never had: -32601, 404.
        ping = {"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"_meta": META}}
        await refused(ping, post_headers("ping"), 404, -32601)
        # A version in the body without the header (no session either): the header rung answers first.
        future = {**META, META_VERSION: "2099-01-01"}
        unknown = {"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {"_meta": future}}
        headers = {k: v for k, v in post_headers("tools/list").items() if k != "mcp-protocol-version"}
        await refused(unknown, headers, 400, -32020)
        # Duplicated routing headers.
        raw = [*post_headers("tools/call", "local__echo").items(), ("mcp-method", "tools/call")]
        response = await client.post(url, content=json.dumps(echo).encode(), headers=raw)
        assert response.status_code == 400 and response.json()["error"]["code"] == -32020
        # Unknown tool: the same -32602 as a hidden one.
        await refused(call(9, "web__missing", {}), post_headers("tools/call", "web__missing"), 400, -32602)
        # A client notification is accepted and dropped; a response from a client is refused.
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
        accepted = await client.post(url, json=note, headers=post_headers("notifications/cancelled"))
        assert accepted.status_code == 202
        reply = {"jsonrpc": "2.0", "id": 1, "result": {}}
        await refused(reply, post_headers("x"), 400, -32600)
        # Forged, foreign and stale requestStates.
        forged = call(10, "local__ask", {"question": "q"}, requestState="s1.k1.AAAA", inputResponses={})
        answer = await refused(forged, post_headers("tools/call", "local__ask"), 400, -32602)
        assert "requestState" in answer["error"]["message"]


META_VERSION = "io.modelcontextprotocol/protocolVersion"
CAPS = "io.modelcontextprotocol/clientCapabilities"


async def test_input_required_retry_lands_on_a_worker_that_does_not_hold_it(http_target: int) -> None:
    first_port, second_port = free_port(), free_port()
    async with (
        running_proxy(mcp_config(first_port, http_target)),
        running_proxy(mcp_config(second_port, http_target)) as second,
        httpx.AsyncClient(timeout=30) as client,
    ):
        ask = call(1, "local__ask", {"question": "colour?"})
        headers = post_headers("tools/call", "local__ask")
        with anyio.fail_after(30):
            first = await client.post(f"http://127.0.0.1:{first_port}/mcp", json=ask, headers=headers)
        result = messages(first)[-1]["result"]
        assert result["resultType"] == "input_required"
        ((key, request),) = result["inputRequests"].items()
        assert request["method"] == "elicitation/create" and request["params"]["message"] == "colour?"
        retry = call(
            2,
            "local__ask",
            {"question": "colour?"},
            requestState=result["requestState"],
            inputResponses={key: {"action": "accept", "content": {"text": "red"}}},
        )
        elsewhere = await client.post(f"http://127.0.0.1:{second_port}/mcp", json=retry, headers=headers)
        error = elsewhere.json()["error"]
        assert elsewhere.status_code == 400 and error["code"] == -32602 and "another worker" in error["message"]
        assert modern(second)._backends["default/mcp"].targets["local"].shared is not None
        # A retry whose arguments differ does not adopt the parked call.
        other = call(3, "local__ask", {"question": "size?"}, requestState=result["requestState"], inputResponses={})
        swapped = await client.post(f"http://127.0.0.1:{first_port}/mcp", json=other, headers=headers)
        assert swapped.json()["error"]["code"] == -32602
        # The right retry on the right worker continues the call (to its second question).
        again = await client.post(f"http://127.0.0.1:{first_port}/mcp", json=retry, headers=headers)
        second_round = messages(again)[-1]["result"]
        assert second_round["resultType"] == "input_required"
        assert [r["params"]["message"] for r in second_round["inputRequests"].values()] == ["and again?"]
        # The first state was used up.
        replay = await client.post(f"http://127.0.0.1:{first_port}/mcp", json=retry, headers=headers)
        assert replay.json()["error"]["code"] == -32602


async def test_a_client_without_the_capability_gets_minus_32021(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)), httpx.AsyncClient(timeout=30) as client:
        ask = call(1, "local__ask", {"question": "colour?"}, _meta={**META, CAPS: {}})
        with anyio.fail_after(30):
            response = await client.post(url, json=ask, headers=post_headers("tools/call", "local__ask"))
        error = messages(response)[-1]["error"]
        assert error["code"] == -32021 and error["data"] == {"requiredCapabilities": {"elicitation": {}}}
        # The shared session still serves.
        echo = await client.post(
            url, json=call(2, "local__echo", {"text": "y"}), headers=post_headers("tools/call", "local__echo")
        )
        assert messages(echo)[-1]["result"]["content"][0]["text"] == "y"


async def test_an_unanswered_input_request_expires_and_the_shared_session_survives(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)) as server, httpx.AsyncClient(timeout=30) as client:
        endpoint = modern(server)
        ask = call(1, "local__ask", {"question": "colour?"})
        with anyio.fail_after(30):
            response = await client.post(url, json=ask, headers=post_headers("tools/call", "local__ask"))
            state = messages(response)[-1]["result"]["requestState"]
            shared = endpoint._backends["default/mcp"].targets["local"].shared
            assert shared is not None and shared.mux.parked == 1
            # Nobody retries: once its deadline passes, the parked call is cancelled upstream.
            shared.mux.clock = lambda: math.inf
            expired = when_mux(shared.mux, lambda: shared.mux.parked == 0)
            shared._expiry_changed.set()
            await expired.wait()
            assert shared.mux.parked == 0
        retry = call(2, "local__ask", {"question": "colour?"}, requestState=state, inputResponses={})
        late = await client.post(url, json=retry, headers=post_headers("tools/call", "local__ask"))
        assert late.json()["error"]["code"] == -32602
        echo = await client.post(
            url, json=call(3, "local__echo", {"text": "z"}), headers=post_headers("tools/call", "local__echo")
        )
        assert messages(echo)[-1]["result"]["content"][0]["text"] == "z"


async def test_listen_relays_both_eras_and_ends_gracefully_on_shutdown(http_target: int) -> None:
    port = free_port()
    async with running_proxy(mcp_config(port, http_target)) as server:
        with anyio.fail_after(60):
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                await client.list_tools()  # the catalogs are learnt, so a change must forget them
                async with client.listen(tools_list_changed=True) as subscription:
                    assert subscription.honored.tools_list_changed is True
                    assert (await client.call_tool("web__grow", {})).content[0].text == "grown"
                    event = await subscription.__anext__()
                    assert type(event).__name__ == "ToolsListChanged"
                    # The new tool routes at once: the change notification made the gateway forget the catalog.
                    assert (await client.call_tool("web__bloom", {})).content[0].text == "fresh"
                    assert (await client.call_tool("local__grow", {})).content[0].text == "grown"
                    event = await subscription.__anext__()
                    assert type(event).__name__ == "ToolsListChanged"
                    assert (await client.call_tool("local__sprout", {})).content[0].text == "new"
                    # The worker shuts down: the stream ends with its final result, not a drop.
                    await modern(server).aclose()
                    rest = [event async for event in subscription]
                    assert rest == []


def when_mux(mux: Any, condition: Callable[[], bool]) -> anyio.Event:
    """An event set once ``condition`` holds after one of the mux's inputs (no polling)."""
    reached = anyio.Event()
    for name in ("from_lease", "from_upstream", "close_lease", "upstream_lost", "expire"):
        original = getattr(mux, name)

        def observed(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            result = _original(*args, **kwargs)
            if condition():
                reached.set()
            return result

        setattr(mux, name, observed)
    if condition():
        reached.set()
    return reached


async def test_a_client_that_goes_away_cancels_its_call_upstream(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)) as server, httpx.AsyncClient(timeout=30) as client:
        endpoint = modern(server)
        echo = call(1, "local__echo", {"text": "warm"})
        await client.post(url, json=echo, headers=post_headers("tools/call", "local__echo"))
        shared = endpoint._backends["default/mcp"].targets["local"].shared
        assert shared is not None
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                hang = partial(client.post, url, json=call(2, "local__hang", {}))
                busy = when_mux(shared.mux, lambda: shared.mux.in_flight == 1)
                tasks.start_soon(partial(hang, headers=post_headers("tools/call", "local__hang")))
                await busy.wait()
                idle = when_mux(shared.mux, lambda: shared.mux.in_flight == 0)
                tasks.cancel_scope.cancel()  # the client hangs up
            await idle.wait()
            assert shared.mux.in_flight == 0
        # A request outliving request_timeout gets a JSON-RPC error, and the session goes on.
        endpoint.request_timeout = 0.5
        with anyio.fail_after(30):
            slow = await client.post(
                url, json=call(3, "local__hang", {}), headers=post_headers("tools/call", "local__hang")
            )
        assert slow.status_code == 200 and slow.json()["error"]["code"] == -32001
        endpoint.request_timeout = 30
        again = await client.post(
            url, json=call(4, "local__echo", {"text": "on"}), headers=post_headers("tools/call", "local__echo")
        )
        assert messages(again)[-1]["result"]["content"][0]["text"] == "on"
