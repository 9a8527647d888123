"""The downstream MCP endpoint through the real proxy, in front of real SDK targets (HTTP and stdio)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.types import ElicitResult

from dataplane.config.model import RuntimeConfig
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

STDIO_SERVER = str(Path(__file__).parents[2] / "peers" / "mcp_servers" / "stdio_tools_server.py")
KEY = pb.McpSessionKey(id="k1", key=b"k" * 32)
ACCEPT_BOTH = "application/json, text/event-stream"
POST_HEADERS = {"accept": ACCEPT_BOTH, "content-type": "application/json"}


def mcp_config(
    port: int,
    http_port: int,
    *,
    max_body: int = 0,
    request_timeout: float | None = None,
    allowed_origins: tuple[str, ...] = (),
    stdio: bool = True,
) -> RuntimeConfig:
    backend = pb.Backend(
        name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY], allowed_origins=list(allowed_origins))
    )
    if max_body:
        backend.mcp.max_request_body_bytes = max_body
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
        mcp=pb.McpServer(name="local", stdio=pb.McpStdioTransport(command=sys.executable, args=[STDIO_SERVER])),
    )
    mcp_route = route(backends=[("default/mcp", 1)], request_timeout=request_timeout)
    targets = (web, local) if stdio else (web,)
    return compile_resources(listener(port), backend, *targets, mcp_route)


@pytest.fixture
async def http_target() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


async def test_the_sdk_client_lists_calls_gets_progress_and_elicits_through_two_targets(http_target: int) -> None:
    port = free_port()
    progress: list[float] = []
    asked: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"text": "blue"})

    async with running_proxy(mcp_config(port, http_target)) as server:
        with anyio.fail_after(60):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", elicitation_callback=elicit) as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"web__add", "web__ask", "local__echo", "local__work"} <= tools
                added = await client.call_tool("web__add", {"a": 2, "b": 3})
                assert added.content[0].text == "5"
                echoed = await client.call_tool("local__echo", {"text": "hi"})
                assert echoed.content[0].text == "hi"
                worked = await client.call_tool("local__work", {"steps": 3}, progress_callback=on_progress)
                assert worked.content[0].text == "done 3"
                assert progress == [1, 2, 3]
                answered = await client.call_tool("web__ask", {"question": "colour?"})
                assert answered.content[0].text == "answer: blue" and asked == ["colour?"]
                assert len(server._handler.mcp.sessions) == 1
        # The client DELETEs its session on exit.
        assert len(server._handler.mcp.sessions) == 0


def messages(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a JSON or SSE reply."""
    if response.headers["content-type"] == "application/json":
        return [response.json()]
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


async def initialize(client: httpx.AsyncClient, url: str) -> str:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    response = await client.post(url, json=body, headers=POST_HEADERS)
    assert response.status_code == 200, response.text
    assert response.json()["result"]["protocolVersion"] == "2025-06-18"
    session = response.headers["mcp-session-id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
    assert (await client.post(url, json=initialized, headers=headers)).status_code == 202
    return session


async def test_a_second_worker_resumes_the_session_with_the_same_keys(http_target: int) -> None:
    first_port, second_port = free_port(), free_port()
    async with (
        running_proxy(mcp_config(first_port, http_target)),
        running_proxy(mcp_config(second_port, http_target)) as second,
        httpx.AsyncClient(timeout=30) as client,
    ):
        session = await initialize(client, f"http://127.0.0.1:{first_port}/mcp")
        headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        add = {"name": "web__add", "arguments": {"a": 1, "b": 1}}
        call: dict[str, Any] = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": add}
        response = await client.post(f"http://127.0.0.1:{second_port}/mcp", json=call, headers=headers)
        assert response.status_code == 200
        assert response.json()["result"]["content"][0]["text"] == "2"
        call["id"] = 3
        call["params"] = {"name": "local__echo", "arguments": {"text": "again"}}
        response = await client.post(f"http://127.0.0.1:{second_port}/mcp", json=call, headers=headers)
        assert response.json()["result"]["content"][0]["text"] == "again"
        assert len(second._handler.mcp.sessions) == 1
        deleted = await client.delete(f"http://127.0.0.1:{second_port}/mcp", headers=headers)
        assert deleted.status_code == 204
        # The upstream session is gone, so the first worker's copy now fails too.
        call["id"] = 4
        call["params"] = add
        response = await client.post(f"http://127.0.0.1:{first_port}/mcp", json=call, headers=headers)
        assert "error" in response.json() or response.status_code == 404


async def test_the_get_stream_is_open_until_the_session_is_deleted(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)), httpx.AsyncClient(timeout=30) as client:
        session = await initialize(client, url)
        headers = {"accept": "text/event-stream", "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        opened = anyio.Event()
        ended: list[bytes] = []

        async def listen() -> None:
            async with client.stream("GET", url, headers=headers) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"] == "text/event-stream"
                opened.set()
                ended.append(await stream.aread())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listen)
                await opened.wait()
                deleted = await client.delete(url, headers=headers)
                assert deleted.status_code == 204
        assert ended == [b""]
        gone = await client.get(url, headers=headers)
        assert gone.status_code == 404


async def test_a_draining_worker_ends_the_get_stream_instead_of_waiting_for_the_deadline(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with (
        running_proxy(mcp_config(port, http_target, stdio=False)) as server,
        httpx.AsyncClient(timeout=30) as client,
    ):
        session = await initialize(client, url)
        headers = {"accept": "text/event-stream", "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        opened = anyio.Event()
        ended: list[int] = []

        async def listen() -> None:
            async with client.stream("GET", url, headers=headers) as stream:
                opened.set()
                await stream.aread()
                ended.append(stream.status_code)

        # A drain deadline of 60 s: the shutdown must finish long before it, with the stream ended cleanly.
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listen)
                await opened.wait()
                await server.shutdown(60)
        assert ended == [200]


async def test_bad_input_gets_the_protocol_errors(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target, max_body=4096)), httpx.AsyncClient(timeout=30) as client:
        session = await initialize(client, url)
        headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}

        malformed = await client.post(url, content=b"{not json", headers=headers)
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == -32700
        batch = await client.post(url, json=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}], headers=headers)
        assert batch.status_code == 400 and batch.json()["error"]["code"] == -32600
        unknown = await client.post(url, json={"jsonrpc": "2.0", "id": 5, "method": "nope"}, headers=headers)
        assert unknown.json()["error"]["code"] == -32601 and unknown.json()["id"] == 5
        call = {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "web__missing", "arguments": {}}}
        tool = await client.post(url, json=call, headers=headers)
        assert tool.json()["error"]["code"] == -32602
        wrong_accept = await client.post(url, json=call, headers={**headers, "accept": "application/json"})
        assert wrong_accept.status_code == 406
        no_session = {k: v for k, v in headers.items() if k != "mcp-session-id"}
        assert (await client.post(url, json=call, headers=no_session)).status_code == 400
        bad = await client.post(url, json=call, headers={**headers, "mcp-session-id": session[:-4] + "AAAA"})
        assert bad.status_code == 404
        huge = {"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"pad": "x" * 5000}}
        assert (await client.post(url, json=huge, headers=headers)).status_code == 413
        version = await client.post(url, json=call, headers={**headers, "mcp-protocol-version": "1999-01-01"})
        assert version.status_code == 400
        foreign = await client.post(url, json=call, headers={**headers, "origin": "http://evil.example"})
        assert foreign.status_code == 403
        assert (await client.put(url, json=call, headers=headers)).status_code == 405
        assert (await client.get(url, headers={**headers, "accept": "application/json"})).status_code == 406
        ping = await client.post(url, json={"jsonrpc": "2.0", "id": 8, "method": "ping"}, headers=headers)
        assert ping.status_code == 200 and ping.json() == {"jsonrpc": "2.0", "id": 8, "result": {}}


async def test_an_unanswered_elicitation_streams_then_times_out_cleanly(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    async with running_proxy(mcp_config(port, http_target)) as server, httpx.AsyncClient(timeout=30) as client:
        session = await initialize(client, url)
        server._handler.mcp.request_timeout = 1.0
        headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        ask = {"name": "web__ask", "arguments": {"question": "anyone?"}}
        call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": ask}
        with anyio.fail_after(20):
            response = await client.post(url, json=call, headers=headers)
        assert response.headers["content-type"] == "text/event-stream"
        events = messages(response)
        # The target's elicitation reached the client with a gateway id, then the request failed cleanly.
        assert events[0]["method"] == "elicitation/create" and str(events[0]["id"]).startswith("gw-")
        assert events[-1]["id"] == 9 and events[-1]["error"]["code"] == -32001
        # The session still serves.
        add = {
            "jsonrpc": "2.0",
            "id": 10,
            "method": "tools/call",
            "params": {"name": "web__add", "arguments": {"a": 1, "b": 2}},
        }
        answer = await client.post(url, json=add, headers=headers)
        # It may carry, on an SSE stream, the target's cancellation of its abandoned elicitation first.
        assert messages(answer)[-1]["result"]["content"][0]["text"] == "3"


async def test_allowed_origins_apply_to_the_streamable_and_the_legacy_paths(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    config = mcp_config(port, http_target, allowed_origins=("https://app.example",))
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        listed = await client.post(url, json=body, headers={**POST_HEADERS, "origin": "https://app.example"})
        assert listed.status_code == 200 and "mcp-session-id" in listed.headers
        assert (await client.post(url, json=body, headers=POST_HEADERS)).status_code == 200  # no Origin: not a browser
        refused = await client.post(url, json=body, headers={**POST_HEADERS, "origin": "https://evil.example"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == -32600
        # With a list configured, the request's own host is not implied.
        same_host = await client.post(url, json=body, headers={**POST_HEADERS, "origin": f"http://127.0.0.1:{port}"})
        assert same_host.status_code == 403

        sse = f"{url}/sse"
        stream_headers = {"accept": "text/event-stream"}
        assert (await client.get(sse, headers={**stream_headers, "origin": "https://evil.example"})).status_code == 403
        message = await client.post(f"{url}/message?sessionId=x", json=body, headers={"origin": "https://evil.example"})
        assert message.status_code == 403
        with anyio.fail_after(30):
            for origin in ({"origin": "https://app.example"}, {}):
                async with client.stream("GET", sse, headers={**stream_headers, **origin}) as response:
                    assert response.status_code == 200
                    first = await anext(response.aiter_bytes())
                    assert first.startswith(b"event: endpoint\ndata: /mcp/message?sessionId=")


async def test_the_route_timeout_bounds_posts_but_not_the_get_stream(http_target: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    config = mcp_config(port, http_target, request_timeout=1.0, stdio=False)
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        session = await initialize(client, url)
        headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        get_headers = {"accept": "text/event-stream", "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        opened = anyio.Event()
        ended: list[bytes] = []

        async def listen() -> None:
            async with client.stream("GET", url, headers=get_headers) as stream:
                assert stream.status_code == 200
                opened.set()
                ended.append(await stream.aread())

        # One target: its tools go unprefixed.
        params = {"name": "ask", "arguments": {"question": "anyone?"}}
        ask = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listen)
                await opened.wait()
                # The POST gets its own bound (the route's 1 s): a JSON-RPC error, not a cut connection.
                answer = await client.post(url, json=ask, headers=headers)
                assert messages(answer)[-1]["error"]["code"] == -32001
                assert "timed out" in messages(answer)[-1]["error"]["message"]
                # The GET stream outlived the route's timeout: it ends cleanly only when the session does.
                assert (await client.delete(url, headers=headers)).status_code == 204
        assert ended == [b""]


async def test_a_session_id_too_long_to_seal_is_a_json_rpc_error_on_initialize() -> None:
    deleted: list[str] = []
    ended = anyio.Event()

    async def long_id_target(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A target whose upstream session id is too long for any sealed token."""
        if scope["type"] == "lifespan":
            while (event := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {key.decode(): value.decode() for key, value in scope["headers"]}
        if scope["method"] == "DELETE":
            deleted.append(headers.get("mcp-session-id", ""))
            ended.set()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        message = json.loads(body) if body else {}
        if scope["method"] != "POST" or "id" not in message:
            await send({"type": "http.response.start", "status": 202 if scope["method"] == "POST" else 405})
            await send({"type": "http.response.body", "body": b""})
            return
        result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "long"}}
        answer = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        response_headers = [(b"content-type", b"application/json"), (b"mcp-session-id", b"s" * 3000)]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": answer})

    port = free_port()
    async with (
        serve(long_id_target) as target_port,
        running_proxy(mcp_config(port, target_port)) as server,
        httpx.AsyncClient(timeout=30) as client,
    ):
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        with anyio.fail_after(30):
            response = await client.post(f"http://127.0.0.1:{port}/mcp", json=body, headers=POST_HEADERS)
        assert response.status_code == 200 and "mcp-session-id" not in response.headers
        error = response.json()["error"]
        assert response.json()["id"] == 1 and error["code"] == -32603 and "do not fit" in error["message"]
        assert len(server._handler.mcp.sessions) == 0
        # The upstream session opened for it is ended (just after the answer), not leaked.
        with anyio.fail_after(10):
            await ended.wait()
        assert deleted == ["s" * 3000]


async def test_a_body_that_stops_arriving_gets_408_within_the_route_timeout(http_target: int) -> None:
    port = free_port()
    config = mcp_config(port, http_target, request_timeout=0.5, stdio=False)
    head = (
        b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"accept: application/json, text/event-stream\r\ncontent-length: 100\r\n\r\n"
    )
    async with running_proxy(config):
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(head + b'{"jsonrpc": "2.0", ')  # and then nothing more
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
