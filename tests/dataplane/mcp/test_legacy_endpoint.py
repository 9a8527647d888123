"""The legacy HTTP+SSE downstream (2024-11-05) through the real proxy, in front of two real SDK targets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.types import ElicitResult

from dataplane.mcp.legacy_endpoint import LegacyLink
from dataplane.mcp.sse import SseEvent, SseParser
from tests.conftest import free_port
from tests.dataplane.mcp.test_endpoint import mcp_config
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve

pytestmark = pytest.mark.anyio

JSON_HEADERS = {"content-type": "application/json"}
INIT_2024 = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "old", "version": "1"}}


@pytest.fixture
async def http_target() -> AsyncIterator[int]:
    async with serve(build_app(build_server(), "streamable")) as port:
        yield port


def only_link(links: dict[str, LegacyLink]) -> LegacyLink:
    (link,) = links.values()
    return link


async def test_the_sdk_sse_client_lists_calls_gets_progress_and_elicits_through_two_targets(http_target: int) -> None:
    port = free_port()
    progress: list[float] = []
    asked: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"text": "green"})

    async with running_proxy(mcp_config(port, http_target)) as server:
        legacy = server._handler.mcp.legacy
        with anyio.fail_after(60):
            transport = sse_client(f"http://127.0.0.1:{port}/mcp/sse")
            async with Client(transport, mode="legacy", elicitation_callback=elicit) as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                assert {"web__add", "web__count", "web__ask", "local__echo", "local__work"} <= tools
                added = await client.call_tool("web__add", {"a": 20, "b": 22})
                assert added.content[0].text == "42"  # type: ignore[union-attr]
                echoed = await client.call_tool("local__echo", {"text": "old"})
                assert echoed.content[0].text == "old"  # type: ignore[union-attr]
                counted = await client.call_tool("web__count", {"n": 3}, progress_callback=on_progress)
                assert counted.content[0].text == "counted 3" and progress == [1, 2, 3]  # type: ignore[union-attr]
                answered = await client.call_tool("web__ask", {"question": "colour?"})
                assert answered.content[0].text == "answer: green" and asked == ["colour?"]  # type: ignore[union-attr]
                link = only_link(legacy._links)
                assert len(server._handler.mcp.sessions) == 0  # no sealed token: the stream holds the session
            # The client closed its stream: the session ends with it.
            await link.session.closed.wait()
        assert len(legacy) == 0


class Stream:
    """A raw legacy SSE stream: its events, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_bytes()
        self._parser = SseParser()
        self._pending: list[SseEvent] = []

    async def next(self) -> SseEvent:
        while not self._pending:
            self._pending = self._parser.feed(await anext(self._chunks))
        return self._pending.pop(0)

    async def message(self) -> dict[str, Any]:
        event = await self.next()
        assert event.event == "message", event
        return json.loads(event.data)


async def test_a_2024_client_negotiates_its_version_and_bad_input_gets_clear_errors(http_target: int) -> None:
    first_port, second_port = free_port(), free_port()
    async with (
        running_proxy(mcp_config(first_port, http_target)) as server,
        running_proxy(mcp_config(second_port, http_target)),
        httpx.AsyncClient(timeout=30) as client,
    ):
        base = f"http://127.0.0.1:{first_port}"
        with anyio.fail_after(60):
            async with client.stream("GET", f"{base}/mcp/sse", headers={"accept": "text/event-stream"}) as response:
                assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
                stream = Stream(response)
                endpoint = await stream.next()
                assert endpoint.event == "endpoint" and endpoint.data.startswith("/mcp/message?sessionId=")
                post_url = base + endpoint.data

                async def post(body: Any, **headers: str) -> httpx.Response:
                    content = body if isinstance(body, bytes) else json.dumps(body).encode()
                    return await client.post(post_url, content=content, headers={**JSON_HEADERS, **headers})

                init = await post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_2024})
                assert init.status_code == 202 and init.content == b""
                result = (await stream.message())["result"]
                assert result["protocolVersion"] == "2024-11-05" and "tools" in result["capabilities"]
                assert (await post({"jsonrpc": "2.0", "method": "notifications/initialized"})).status_code == 202
                assert (await post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).status_code == 202
                listed = await stream.message()
                assert listed["id"] == 2 and {"web__add", "local__echo"} <= {
                    t["name"] for t in listed["result"]["tools"]
                }

                # Bad JSON: 400 with the JSON-RPC parse error; the stream and session go on.
                malformed = await post(b"{nope")
                assert malformed.status_code == 400 and malformed.json()["error"]["code"] == -32700
                wrong_type = await post({"jsonrpc": "2.0", "id": 3, "method": "ping"}, **{"content-type": "text/plain"})
                assert wrong_type.status_code == 415
                unknown = await client.post(
                    f"{base}/mcp/message?sessionId=nope", json={"jsonrpc": "2.0", "method": "x"}
                )
                assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32600
                missing = await client.post(f"{base}/mcp/message", json={"jsonrpc": "2.0", "method": "x"})
                assert missing.status_code == 400
                # Another worker of the gateway does not hold this stream: a clear 421, not a hang.
                session_id = endpoint.data.partition("sessionId=")[2]
                elsewhere = await client.post(
                    f"http://127.0.0.1:{second_port}/mcp/message?sessionId={session_id}",
                    json={"jsonrpc": "2.0", "id": 4, "method": "ping"},
                )
                assert elsewhere.status_code == 421 and "another worker" in elsewhere.json()["error"]["message"]
                wrong_method = await client.put(post_url, json={"jsonrpc": "2.0", "id": 5, "method": "ping"})
                assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
                post_to_stream = await client.post(
                    f"{base}/mcp/sse", json={"jsonrpc": "2.0", "id": 6, "method": "ping"}
                )
                assert post_to_stream.status_code == 405 and post_to_stream.headers["allow"] == "GET"
                not_sse = await client.get(f"{base}/mcp/sse", headers={"accept": "application/json"})
                assert not_sse.status_code == 406
                unknown_method = await post({"jsonrpc": "2.0", "id": 7, "method": "nope"})
                assert unknown_method.status_code == 202
                assert (await stream.message())["error"]["code"] == -32601
                assert (await post({"jsonrpc": "2.0", "id": 8, "method": "ping"})).status_code == 202
                assert await stream.message() == {"jsonrpc": "2.0", "id": 8, "result": {}}
                link = only_link(server._handler.mcp.legacy._links)
            # The stream ended: so did its session, and its id is gone.
            await link.session.closed.wait()
            gone = await client.post(post_url, json={"jsonrpc": "2.0", "id": 9, "method": "ping"})
            assert gone.status_code == 404


async def test_the_route_timeout_bounds_requests_but_not_the_stream(http_target: int) -> None:
    port = free_port()
    config = mcp_config(port, http_target, request_timeout=1.0, stdio=False)
    async with running_proxy(config), httpx.AsyncClient(timeout=30) as client:
        base = f"http://127.0.0.1:{port}"
        with anyio.fail_after(30):
            async with client.stream("GET", f"{base}/mcp/sse", headers={"accept": "text/event-stream"}) as response:
                stream = Stream(response)
                post_url = base + (await stream.next()).data
                init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_2024}
                await client.post(post_url, json=init)
                assert (await stream.message())["result"]["protocolVersion"] == "2024-11-05"
                # An elicitation nobody answers: the request times out at the route's bound, on the stream.
                ask = {"name": "ask", "arguments": {"question": "anyone?"}}  # one target: no prefix
                await client.post(post_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": ask})
                assert (await stream.message())["method"] == "elicitation/create"
                failed = await stream.message()
                assert failed["id"] == 2 and "timed out" in failed["error"]["message"]
                # Past the route's timeout, the stream still serves.
                add = {"name": "add", "arguments": {"a": 1, "b": 2}}
                await client.post(post_url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": add})
                while (answer := await stream.message()).get("id") != 3:
                    assert answer.get("method") == "notifications/cancelled"  # the target's own cancellation
                assert answer["result"]["content"][0]["text"] == "3"


async def test_an_idle_stream_gets_keepalive_comments(http_target: int) -> None:
    port = free_port()
    async with (
        running_proxy(mcp_config(port, http_target, stdio=False)) as server,
        httpx.AsyncClient(timeout=30) as client,
    ):
        server._handler.mcp.legacy.keepalive = 0.05
        seen = b""
        with anyio.fail_after(30):
            url = f"http://127.0.0.1:{port}/mcp/sse"
            async with client.stream("GET", url, headers={"accept": "text/event-stream"}) as response:
                async for data in response.aiter_bytes():
                    seen += data
                    if b": keepalive\n\n" in seen:
                        break
        assert seen.startswith(b"event: endpoint\n") and seen.count(b"event: ") == 1
