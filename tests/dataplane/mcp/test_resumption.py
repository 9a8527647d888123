"""Last-Event-ID resumption: the stream buffer (pure), the session's retention and deadlines (against an
in-memory target), and the endpoint end to end with the SDK client and a connection that gets cut."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketStream
from mcp import Client
from mcp.server.mcpserver import Context, MCPServer

from dataplane.config.model import RuntimeConfig, UpstreamCluster
from dataplane.http.server import ProxyServer
from dataplane.mcp.channel import JSON, TargetClosed
from dataplane.mcp.federation import FederationConfig, McpFederation
from dataplane.mcp.sessions import (
    EventPosition,
    EventStream,
    FederatedSession,
    ReplayLimits,
    RequestIdInUse,
    parse_event_id,
)
from dataplane.mcp.sse import SseEvent, SseParser
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from tests.conftest import free_port
from tests.dataplane.peers.config import compile_resources, listener, route
from tests.dataplane.peers.proxy import running_proxy
from tests.peers.mcp_servers.http_sdk import build_app, serve

pytestmark = pytest.mark.anyio

KEY = pb.McpSessionKey(id="k1", key=b"r" * 32)
POST_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INIT_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


# --- the stream buffer, pure --------------------------------------------------------------------------------
def test_event_ids_name_their_stream_and_position() -> None:
    assert parse_event_id("Ab_-9.r3.17") == EventPosition("Ab_-9.r3", 17)
    assert parse_event_id("Ab_-9.r3.17").of_request  # type: ignore[union-attr]
    assert not parse_event_id("x.g1.0").of_request  # type: ignore[union-attr]
    for bad in ("", "x", "x.r3", "x.q3.1", "x.r.1", "x.r3.-1", "x y.r3.1", "x.r3.1.2", "é.r3.1", "x.r3.1e3"):
        assert parse_event_id(bad) is None, bad


def message(n: int, pad: int = 0) -> JSON:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n, "pad": "x" * pad}}


def test_a_stream_numbers_its_events_and_keeps_the_newest_within_count_and_bytes() -> None:
    stream = EventStream("s.r1", ReplayLimits(events=3, bytes=10_000))
    for n in range(1, 6):
        stream.append(message(n))
    assert [event.seq for event in stream.since(0)] == [3, 4, 5]
    assert [event.message["params"]["n"] for event in stream.since(3)] == [4, 5]
    assert stream.since(5) == [] and stream.last_seq == 5 and stream.event_id(4) == "s.r1.4"

    by_bytes = EventStream("s.r2", ReplayLimits(events=100, bytes=400))
    for n in range(1, 5):
        by_bytes.append(message(n, pad=100))
    assert [event.seq for event in by_bytes.since(0)] == [3, 4]
    by_bytes.append(message(5, pad=1000), final=True)  # larger than the bound alone: still kept
    assert [event.seq for event in by_bytes.since(0)] == [5] and by_bytes.finished
    by_bytes.append(message(6))  # nothing follows the final response
    assert by_bytes.last_seq == 5


async def test_a_reader_ends_when_the_stream_finishes_closes_or_is_taken_over() -> None:
    stream = EventStream("s.r1", ReplayLimits())
    stream.reader = 1
    stream.append(message(1))
    assert [event.seq for event in await stream.next(0, 1)] == [1]
    results: list[list[int]] = []

    async def read(cursor: int, reader: int) -> None:
        results.append([event.seq for event in await stream.next(cursor, reader)])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read, 1, 1)
            await anyio.wait_all_tasks_blocked()
            stream.append(message(2), final=True)
        assert results == [[2]]
        assert await stream.next(2, 1) == []  # finished and read
        async with anyio.create_task_group() as tasks:
            other = EventStream("s.g2", ReplayLimits())
            other.reader = 1
            tasks.start_soon(lambda: other.next(0, 1))
            await anyio.wait_all_tasks_blocked()
            other.reader = 2  # a resumption took it over
            other.notify()
        assert await other.next(0, 1) == []
        other.close()
        assert await other.next(0, 2) == []


async def test_a_stream_that_keeps_nothing_drops_events_once_read() -> None:
    stream = EventStream("s.l1", ReplayLimits(), keep=False)
    stream.reader = 1
    stream.append(message(1))
    stream.append(message(2))
    assert [event.seq for event in await stream.next(0, 1)] == [1, 2]
    assert stream.since(0) == []


# --- the session against an in-memory target ---------------------------------------------------------------
class FakeTarget:
    """A target channel in memory that answers initialize and tools/list itself and records the rest."""

    def __init__(self) -> None:
        self.target = "fake"
        self.session_id: str | None = None
        self.calls: list[JSON] = []
        self.cancelled: list[Any] = []
        self.changed = anyio.Event()
        self._send, self._inbox = anyio.create_memory_object_stream[JSON](100)

    async def send(self, message: JSON) -> None:
        method = message.get("method")
        if method == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "f"}}
            self.answer({"jsonrpc": "2.0", "id": message["id"], "result": result})
        elif method == "tools/list":
            tools = [{"name": "slow", "inputSchema": {"type": "object"}}]
            self.answer({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
        elif method == "tools/call":
            self.calls.append(message)
        elif method == "notifications/cancelled":
            self.cancelled.append(message["params"]["requestId"])
        self.changed.set()
        self.changed = anyio.Event()

    def answer(self, message: JSON) -> None:
        self._send.send_nowait(message)

    def progress(self, call: JSON, value: int) -> None:
        token = call["params"]["_meta"]["progressToken"]
        self.answer(
            {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progressToken": token, "progress": value},
            }
        )

    def result(self, call: JSON, text: str) -> None:
        self.answer({"jsonrpc": "2.0", "id": call["id"], "result": {"content": [{"type": "text", "text": text}]}})

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not condition():
                await self.changed.wait()

    async def receive(self) -> JSON:
        try:
            return await self._inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise TargetClosed("closed") from None

    async def aclose(self) -> None:
        self._send.close()


def fake_cluster() -> UpstreamCluster:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    target = pb.Target(
        name="default/mcp/fake",
        backend="default/mcp",
        mcp=pb.McpServer(name="fake", stdio=pb.McpStdioTransport(command="unused")),
    )
    return compile_resources(backend, target).backends["default/mcp"]


@dataclass
class Rig:
    session: FederatedSession
    target: FakeTarget
    ids: list[int] = field(default_factory=lambda: [10])

    async def call(self, within: float = 30) -> tuple[EventStream, int, JSON]:
        """Start a tools/call with a progress token; the stream, its reader and the call as the target got it."""
        self.ids[0] += 1
        request_id = self.ids[0]
        stream = self.session.open_request(request_id, f"p{request_id}", within)
        reader = self.session.attach(stream)
        params = {"name": "slow", "arguments": {}, "_meta": {"progressToken": f"p{request_id}"}}
        await self.session.submit({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})
        count = len(self.target.calls)
        await self.target.wait_for(lambda: len(self.target.calls) > count)
        return stream, reader, self.target.calls[-1]


@asynccontextmanager
async def rig(replay: ReplayLimits) -> AsyncIterator[Rig]:
    cluster = fake_cluster()
    assert cluster.mcp is not None
    target = FakeTarget()
    federation = McpFederation(FederationConfig.from_settings(cluster.mcp))
    session = FederatedSession(cluster, federation, {"fake": target}, 60.0, replay=replay)
    await session.start()
    try:
        stream = session.open_request(1, None, 30)
        reader = session.attach(stream)
        await session.submit({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS})
        with anyio.fail_after(5):
            assert (await stream.next(0, reader))[0].final
        session.detach(stream, reader)
        yield Rig(session, target)
    finally:
        with anyio.fail_after(10):
            await session.aclose()


async def test_a_disconnected_request_stays_pending_for_the_window_then_is_cancelled() -> None:
    async with rig(ReplayLimits(window=0.3)) as r:
        stream, reader, call = await r.call()
        r.target.progress(call, 1)
        with anyio.fail_after(5):
            assert [e.message["params"]["progress"] for e in await stream.next(0, reader)] == [1]
        stream.exposed = True  # the endpoint wrote an event id
        left = time.monotonic()
        r.session.detach(stream, reader)
        assert r.session.stream(stream.key) is stream and not stream.closed
        await r.target.wait_for(lambda: bool(r.target.cancelled))
        assert time.monotonic() - left >= 0.3
        assert r.target.cancelled == [call["id"]]
        assert r.session.stream(stream.key) is None and stream.closed and r.session.active == 0


async def test_a_stream_whose_ids_the_client_never_saw_is_cancelled_at_once() -> None:
    async with rig(ReplayLimits(window=60)) as r:
        stream, reader, call = await r.call()
        r.session.detach(stream, reader)
        await r.target.wait_for(lambda: bool(r.target.cancelled))
        assert r.target.cancelled == [call["id"]] and stream.closed


async def test_resuming_replays_after_the_last_id_then_goes_on_live_until_the_response() -> None:
    async with rig(ReplayLimits()) as r:
        stream, reader, call = await r.call()
        r.target.progress(call, 1)
        r.target.progress(call, 2)
        with anyio.fail_after(5):
            while stream.last_seq < 2:
                await stream.next(stream.last_seq, reader)
        stream.exposed = True
        r.session.detach(stream, reader)  # the client saw event 1 only
        assert r.session.stream(stream.key) is stream
        resumed = r.session.attach(stream)
        with anyio.fail_after(5):
            replayed = await stream.next(1, resumed)
            assert [e.message["params"]["progress"] for e in replayed] == [2]
            r.target.result(call, "done")
            live = await stream.next(2, resumed)
            assert live[0].final and live[0].message["result"]["content"][0]["text"] == "done"
            assert await stream.next(3, resumed) == []
        assert r.target.cancelled == []


async def test_a_request_past_its_deadline_is_answered_with_an_error_and_cancelled() -> None:
    async with rig(ReplayLimits()) as r:
        stream, reader, call = await r.call(within=0.2)
        with anyio.fail_after(5):
            (event,) = await stream.next(0, reader)
        assert event.final and event.message["error"]["code"] == -32001
        assert "timed out" in event.message["error"]["message"]
        await r.target.wait_for(lambda: bool(r.target.cancelled))
        assert r.target.cancelled == [call["id"]]
        r.target.result(call, "late")  # a late answer is dropped, not delivered twice
        assert stream.last_seq == 1


async def test_the_standalone_stream_keeps_messages_while_detached_and_a_new_one_replaces_it() -> None:
    async with rig(ReplayLimits()) as r:
        first = r.session.open_standalone()
        reader = r.session.attach(first)
        first.exposed = True
        r.session.detach(first, reader)
        r.target.answer(message(7))
        with anyio.fail_after(5):
            resumed = r.session.attach(first)
            (event,) = await first.next(0, resumed)
        assert event.message["params"]["n"] == 7 and event.message["params"]["logger"] == "fake"
        second = r.session.open_standalone()
        assert first.closed and r.session.stream(first.key) is None and r.session.stream(second.key) is second


async def test_disconnected_streams_are_bounded_per_session() -> None:
    async with rig(ReplayLimits(retained_streams=2)) as r:
        started = [await r.call() for _ in range(3)]
        for stream, reader, _ in started:
            stream.exposed = True
            r.session.detach(stream, reader)
        oldest, _, call = started[0]
        assert oldest.closed and r.session.stream(oldest.key) is None
        await r.target.wait_for(lambda: bool(r.target.cancelled))
        assert r.target.cancelled == [call["id"]]
        assert all(r.session.stream(stream.key) is stream for stream, _, _ in started[1:])


async def test_a_client_cancel_ends_its_stream_and_a_pending_id_cannot_be_reused() -> None:
    async with rig(ReplayLimits()) as r:
        stream, reader, call = await r.call()
        with pytest.raises(RequestIdInUse):
            r.session.open_request(r.ids[0], None, 30)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": r.ids[0]}}
        await r.session.submit(cancel)
        with anyio.fail_after(5):
            events = await stream.next(0, reader)
        # The stream ends with no response: a cancelled request is not answered.
        assert not events and stream.closed and stream.cancelled
        await r.target.wait_for(lambda: bool(r.target.cancelled))
        assert r.target.cancelled == [call["id"]]


# --- end to end -----------------------------------------------------------------------------------------------
@dataclass
class SlowTool:
    """A target whose tool reports progress, then waits for the test to let it finish."""

    release: anyio.Event = field(default_factory=anyio.Event)
    started: anyio.Event = field(default_factory=anyio.Event)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    finished: list[str] = field(default_factory=list)

    def server(self) -> MCPServer:
        server = MCPServer("slow-peer")

        @server.tool()
        async def slow(ctx: Context) -> str:
            """Report progress, wait for the test, report again, answer."""
            await ctx.report_progress(1, 2, "started")
            self.started.set()
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.set()
                raise
            await ctx.report_progress(2, 2, "done")
            self.finished.append("finished")
            return "finished"

        return server


def slow_config(port: int, target_port: int) -> RuntimeConfig:
    backend = pb.Backend(name="default/mcp", mcp=pb.McpBackend(session_keys=[KEY]))
    address = pb.SocketAddress(host="127.0.0.1", port=target_port)
    target = pb.Target(
        name="default/mcp/slow",
        backend="default/mcp",
        mcp=pb.McpServer(name="slow", streamable_http=pb.McpHttpTransport(address=address)),
    )
    return compile_resources(listener(port), backend, target, route(backends=[("default/mcp", 1)]))


@asynccontextmanager
async def slow_gateway(tool: SlowTool, window: float = 60.0) -> AsyncIterator[tuple[ProxyServer, str]]:
    port = free_port()
    async with (
        serve(build_app(tool.server(), "streamable")) as target_port,
        running_proxy(slow_config(port, target_port)) as server,
    ):
        endpoint = server._handler.mcp
        endpoint.retry_ms = 50
        endpoint.sessions.replay = ReplayLimits(window=window)
        try:
            yield server, f"http://127.0.0.1:{port}/mcp"
        finally:
            tool.release.set()
            with anyio.fail_after(15):
                await server._handler.aclose()


@asynccontextmanager
async def cutting_relay(upstream_port: int, trigger: bytes) -> AsyncIterator[tuple[int, anyio.Event]]:
    """A TCP relay that, once, forwards the server's bytes up to the end of the SSE event containing
    ``trigger`` and then closes that connection both ways; later connections pass untouched."""
    cut = anyio.Event()
    relay = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = relay.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(client: SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", upstream_port) as upstream:

            async def copy_up() -> None:
                async for data in client:
                    await upstream.send(data)
                tasks.cancel_scope.cancel()

            async def copy_down() -> None:
                seen = b""
                async for data in upstream:
                    if not cut.is_set():
                        seen += data
                        at = seen.find(trigger)
                        end = seen.find(b"\n\n", at) if at >= 0 else -1
                        if end >= 0:
                            await client.send(data[: len(data) - (len(seen) - end - 2)])
                            cut.set()
                            break
                    await client.send(data)
                tasks.cancel_scope.cancel()

            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(copy_up)
                    tasks.start_soon(copy_down)
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async with relay, anyio.create_task_group() as tasks:
        tasks.start_soon(relay.serve, handle)
        try:
            yield port, cut
        finally:
            tasks.cancel_scope.cancel()


async def test_the_sdk_client_resumes_a_cut_stream_and_still_gets_the_result() -> None:
    tool = SlowTool()
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, text: str | None) -> None:
        progress.append(done)

    async with slow_gateway(tool) as (_, url):
        gateway_port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with cutting_relay(gateway_port, b"notifications/progress") as (relay_port, cut):
            with anyio.fail_after(30):
                async with (
                    Client(f"http://127.0.0.1:{relay_port}/mcp", mode="legacy") as client,
                    anyio.create_task_group() as tasks,
                ):

                    async def release_after_cut() -> None:
                        await cut.wait()
                        tool.release.set()

                    tasks.start_soon(release_after_cut)
                    result = await client.call_tool("slow", {}, progress_callback=on_progress)
        assert cut.is_set()
        assert result.content[0].text == "finished"  # type: ignore[union-attr]
        assert progress == [1, 2]
        assert tool.finished == ["finished"] and not tool.cancelled.is_set()


async def initialize(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT_PARAMS}
    response = await client.post(url, json=body, headers=POST_HEADERS)
    assert response.status_code == 200, response.text
    headers = {
        **POST_HEADERS,
        "mcp-session-id": response.headers["mcp-session-id"],
        "mcp-protocol-version": "2025-11-25",
    }
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await client.post(url, json=initialized, headers=headers)).status_code == 202
    return headers


class EventReader:
    """Reads the SSE events of one streamed response, in steps."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_bytes()
        self._parser = SseParser()
        self._pending: list[SseEvent] = []

    async def until(self, stop: Callable[[SseEvent], bool]) -> list[SseEvent]:
        """Events up to the first that ``stop`` accepts, or to the end of the response."""
        events: list[SseEvent] = []
        while True:
            while self._pending:
                event = self._pending.pop(0)
                events.append(event)
                if stop(event):
                    return events
            data = await anext(self._chunks, None)
            if data is None:
                return events
            self._pending = self._parser.feed(data)


def is_progress(event: SseEvent) -> bool:
    return "notifications/progress" in event.data


CALL = {
    "jsonrpc": "2.0",
    "id": 5,
    "method": "tools/call",
    "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "t"}},
}


async def test_get_with_last_event_id_replays_then_carries_the_pending_response_live() -> None:
    tool = SlowTool()
    async with slow_gateway(tool) as (_, url), httpx.AsyncClient(timeout=30) as client:
        headers = await initialize(client, url)
        with anyio.fail_after(30):
            async with client.stream("POST", url, json=CALL, headers=headers) as response:
                assert response.headers["content-type"] == "text/event-stream"
                seen = await EventReader(response).until(is_progress)
            priming, progress = seen
            assert priming.data == "" and priming.retry == 50 and priming.id.endswith(".0")  # type: ignore[union-attr]
            stream_key = priming.id.rsplit(".", 1)[0]  # type: ignore[union-attr]
            assert progress.id == f"{stream_key}.1"
            # The client went; the call goes on upstream. Resume after the priming event: the progress is replayed.
            resume = {
                "accept": "text/event-stream",
                **{k: headers[k] for k in ("mcp-session-id", "mcp-protocol-version")},
            }
            async with client.stream("GET", url, headers={**resume, "last-event-id": priming.id}) as response:  # type: ignore[dict-item]
                assert response.status_code == 200
                events = EventReader(response)
                replayed = await events.until(is_progress)
                assert [e.id for e in replayed] == [f"{stream_key}.1"]
                tool.release.set()
                rest = await events.until(lambda e: False)  # live, then the stream ends after the response
            assert [e.id for e in rest] == [f"{stream_key}.2", f"{stream_key}.3"]
            assert '"id":5' in rest[-1].data and "finished" in rest[-1].data
            assert not tool.cancelled.is_set()


async def test_unknown_and_malformed_last_event_ids() -> None:
    tool = SlowTool()
    async with slow_gateway(tool) as (_, url), httpx.AsyncClient(timeout=30) as client:
        headers = await initialize(client, url)
        base = {"accept": "text/event-stream", **{k: headers[k] for k in ("mcp-session-id", "mcp-protocol-version")}}
        malformed = await client.get(url, headers={**base, "last-event-id": "not-ours"})
        assert malformed.status_code == 400 and malformed.json()["error"]["code"] == -32600
        gone = await client.get(url, headers={**base, "last-event-id": "abcdef.r9.4"})
        assert gone.status_code == 400 and "cannot be resumed" in gone.json()["error"]["message"]
        with anyio.fail_after(30):
            # An unknown standalone stream: a fresh one starts (with its own priming event).
            async with client.stream("GET", url, headers={**base, "last-event-id": "abcdef.g9.4"}) as response:
                assert response.status_code == 200
                (priming,) = await EventReader(response).until(lambda e: True)
            assert priming.data == "" and priming.id is not None and ".g" in priming.id


async def test_a_client_that_never_comes_back_has_its_request_cancelled_after_the_window() -> None:
    tool = SlowTool()
    async with slow_gateway(tool, window=0.3) as (_, url), httpx.AsyncClient(timeout=30) as client:
        headers = await initialize(client, url)
        with anyio.fail_after(30):
            async with client.stream("POST", url, json=CALL, headers=headers) as response:
                await EventReader(response).until(is_progress)
            left = time.monotonic()
            await tool.cancelled.wait()
        assert time.monotonic() - left >= 0.3
        assert tool.finished == []
