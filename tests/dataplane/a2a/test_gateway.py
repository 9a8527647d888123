"""A2A through the real proxy (in-process ProxyServer) in front of real a2a-sdk agents, called with the
a2a-sdk client and raw httpx: cards rewritten to the gateway, JSON-RPC and REST bindings, 0.3 and 1.0
names, streams relayed event by event, identity headers, authorization (incl. cross-namespace), access log
lines, and every kind of bad input or bad agent (non-JSON, unknown method, oversized, agent down,
garbage, a stream cut off mid-way, timeouts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from a2a.client.errors import A2AClientError
from a2a.helpers import get_artifact_text, get_message_text, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryPushNotificationConfigStore, InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import InternalError
from anyio.abc import SocketAttribute, SocketStream
from starlette.applications import Starlette
from structlog.testing import capture_logs

from dataplane.a2a.errors import POLICY_DENIED
from dataplane.a2a.handler import relative_path
from dataplane.a2a.methods import METHODS
from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.http.limits import DEFAULT_LIMITS
from dataplane.policy.authorize import A2A_OPERATIONS, EMPTY_A2A, a2a_variables
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.conftest import free_port
from tests.dataplane.peers.config import listener, route, target
from tests.dataplane.peers.proxy import running_proxy
from tests.dataplane.policy.test_chain import Kind_, jwt_authentication, policy, token
from tests.dataplane.policy.test_jwt import CLUSTER, jwks, rsa_key, service_account_claims, sign
from tests.peers.a2a_agents import (
    CARD_PATH,
    LEGACY_CARD_PATH,
    AgentActivity,
    Binding,
    PeerExecutor,
    agent_client,
    build_card,
    fetch_card,
)

pytestmark = pytest.mark.anyio

CLIENTS: list[tuple[Binding, str]] = [(b, v) for v in ("1.0", "0.3") for b in ("JSONRPC", "HTTP+JSON")]
SA_KEY = rsa_key("cluster-key")
SA_AUDIENCE = "https://agentgate.test"


# --- agents -------------------------------------------------------------------------------------------------


class GatedExecutor(PeerExecutor):
    """The peer agent plus ``gated ...``: a task that reports ``working`` and then waits for the test to
    release ``gate`` before its artifact and ``completed``, so a test knows the last event is not yet out."""

    def __init__(self, name: str, activity: AgentActivity, gate: asyncio.Event) -> None:
        super().__init__(name, activity)
        self.gate = gate

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        text = get_message_text(context.message)
        if not text.startswith("gated"):
            await super().execute(context, event_queue)
            return
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        self.activity.started_event(task.id).set()
        await self.gate.wait()
        await updater.add_artifact([new_text_part(f"echo: {text}")], name="echo")
        await updater.complete()


class HeaderRecorder:
    """ASGI middleware keeping every request's path and header fields (repeats kept), for identity tests."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(name.decode(), value.decode()) for name, value in scope["headers"]]
            self.requests.append((scope["path"], headers))
        await self.app(scope, receive, send)

    def values(self, name: str, index: int = -1) -> list[str]:
        return [value for key, value in self.requests[index][1] if key == name]


@dataclass
class Agent:
    name: str
    port: int
    base_path: str
    activity: AgentActivity
    gate: asyncio.Event
    recorder: HeaderRecorder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}/"


@asynccontextmanager
async def serve_agent(name: str, *, base_path: str = "") -> AsyncIterator[Agent]:
    """A real a2a-sdk agent (both bindings, 0.3 compatibility, the peer's card) on a fresh port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}{base_path}/"
    activity, gate = AgentActivity(), asyncio.Event()
    card = build_card(name, url)
    handler = DefaultRequestHandler(
        agent_executor=GatedExecutor(name, activity, gate),
        task_store=InMemoryTaskStore(),
        agent_card=card,
        push_config_store=InMemoryPushNotificationConfigStore(),
        extended_agent_card=build_card(name, url, description="A test agent (extended card)."),
    )
    app = Starlette(
        routes=[
            *create_agent_card_routes(card, card_url=f"{base_path}{CARD_PATH}"),
            *create_agent_card_routes(card, card_url=f"{base_path}{LEGACY_CARD_PATH}"),
            *create_jsonrpc_routes(handler, rpc_url=f"{base_path}/", enable_v0_3_compat=True),
            *create_rest_routes(handler, enable_v0_3_compat=True, path_prefix=base_path),
        ]
    )
    recorder = HeaderRecorder(app)
    server = uvicorn.Server(uvicorn.Config(recorder, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [sock])
            try:
                yield Agent(name, port, base_path, activity, gate, recorder)
            finally:
                gate.set()
                server.should_exit = server.force_exit = True
    finally:
        sock.close()


RawResponder = Callable[[SocketStream, bytes], Awaitable[None]]


@asynccontextmanager
async def raw_agent(respond: RawResponder) -> AsyncIterator[int]:
    """A misbehaving agent on raw sockets: reads one request (head and content-length body), then
    ``respond`` writes whatever it wants; the connection is closed after it."""

    async def serve(stream: SocketStream) -> None:
        async with stream:
            data = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    body += await stream.receive()
                await respond(stream, head)

    listener_ = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener_, anyio.create_task_group() as tasks:
        tasks.start_soon(listener_.serve, serve)
        yield listener_.extra(SocketAttribute.local_port)
        tasks.cancel_scope.cancel()


async def garbage(stream: SocketStream, head: bytes) -> None:
    body = b"<html>not an agent</html>"
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))


def dying_stream(events: int) -> RawResponder:
    """Answers with an SSE stream of ``events`` working updates for task t1, then drops the connection
    (no final chunk): an agent that crashed mid-stream."""

    async def respond(stream: SocketStream, head: bytes) -> None:
        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for step in range(events):
            result = {"statusUpdate": {"taskId": "t1", "contextId": "c1", "status": {"state": "TASK_STATE_WORKING"}}}
            event = b"data: " + json.dumps({"jsonrpc": "2.0", "id": 7, "result": result}).encode() + b"\n\n"
            if step == 0:
                event = b": ping\n\n" + event
            await stream.send(b"%x\r\n%b\r\n" % (len(event), event))
        await stream.send(b"5\r\ndata:")  # half an event, then the crash

    return respond


async def garbage_event(stream: SocketStream, head: bytes) -> None:
    """One good event, one that is not JSON, then more good ones the client must never see."""
    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 10000\r\n\r\n")
    good = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "t1", "status": {"state": "TASK_STATE_WORKING"}}}}
    await stream.send(b"data: " + json.dumps(good).encode() + b"\n\n")
    await stream.send(b"data: {oops\n\n" + b"data: " + json.dumps(good).encode() + b"\n\n")


# --- the gateway --------------------------------------------------------------------------------------------


def rule_name(agent: str) -> str:
    return f"default/{agent}/0"


def on_rule(agent: str) -> list[pb.PolicyTargetRef]:
    return [pb.PolicyTargetRef(kind=Kind_.KIND_ROUTE_RULE, name=rule_name(agent))]


def gateway_config(
    port: int,
    agents: Iterable[tuple[str, int, str]],
    *policies: pb.Policy,
    request_timeout: float | None = None,
    max_request_bytes: int = 0,
    by_host: str = "",
) -> RuntimeConfig:
    """One listener; per agent (name, port, base path) a Backend ``default/<name>`` (agentName ``name``) and
    a route ``/agents/<name>`` whose prefix is rewritten to the base path; ``by_host``: the first agent is
    also reached at the root of that host."""
    messages: list[Any] = [listener(port)]
    for index, (name, agent_port, base_path) in enumerate(agents):
        key = f"default/{name}"
        settings = pb.A2aBackend(agent_name=name, base_path=base_path or "/", max_request_bytes=max_request_bytes)
        messages += [pb.Backend(name=key, a2a=settings), target(key, agent_port)]
        rewrite = pb.RouteFilter(url_rewrite=pb.UrlRewrite(path=pb.PathModifier(replace_prefix_match=base_path or "/")))
        messages.append(
            route(
                rule_name(name),
                backends=[(key, 1)],
                prefix=f"/agents/{name}",
                filters=[rewrite],
                request_timeout=request_timeout,
            )
        )
        if by_host and index == 0:
            messages.append(route(f"default/{name}-host/0", backends=[(key, 1)], hostnames=[by_host]))
    messages += policies
    kinds = {pb.Listener: LISTENER, pb.Backend: BACKEND, pb.Target: TARGET, pb.Route: ROUTE, pb.Policy: POLICY}
    resources: dict[str, dict[str, Any]] = {kind: {} for kind in kinds.values()}
    for message in messages:
        resources[kinds[type(message)]][message.name] = message
    return compile_config(resources, version="v1")


@asynccontextmanager
async def gateway(agents: Iterable[tuple[str, int, str]], *policies: pb.Policy, **options: Any) -> AsyncIterator[str]:
    """The proxy in this event loop; yields its base URL."""
    port = free_port()
    async with running_proxy(gateway_config(port, agents, *policies, **options), DEFAULT_LIMITS):
        yield f"http://127.0.0.1:{port}"


def user_message(text: str, *, task_id: str = "") -> SendMessageRequest:
    message = Message(role=Role.ROLE_USER, message_id=f"m-{text}", parts=[Part(text=text)])
    if task_id:
        message.task_id = task_id
    return SendMessageRequest(message=message)


def kinds(events: list[StreamResponse]) -> list[str]:
    out = []
    for event in events:
        kind = event.WhichOneof("payload")
        if kind == "status_update":
            kind = TaskState.Name(event.status_update.status.state)
        out.append(kind)
    return out


def rpc(method: str, params: dict[str, Any] | None = None, request_id: int | str = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def send_params(text: str) -> dict[str, Any]:
    return {"message": {"role": "ROLE_USER", "messageId": f"m-{text}", "parts": [{"text": text}]}}


def legacy_send_params(text: str) -> dict[str, Any]:
    return {
        "message": {
            "role": "user",
            "messageId": f"m-{text}",
            "kind": "message",
            "parts": [{"kind": "text", "text": text}],
        }
    }


def sse_payloads(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each SSE event in ``text``."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((name, json.loads("\n".join(data))))
    return out


def a2a_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") == "a2a request"]


# --- pure pieces --------------------------------------------------------------------------------------------


def test_one_a2a_variable_for_every_route() -> None:
    # Every key a handler fills is in the empty variable too, so rules behave the same on every route.
    assert set(EMPTY_A2A) == set(a2a_variables("SendMessage"))
    for method, (operation, _) in METHODS.items():
        assert a2a_variables(method)["operation"] == operation.value
    assert set(A2A_OPERATIONS) <= set(METHODS)
    assert relative_path("/a2a/message:send", "/a2a") == "/message:send"
    assert relative_path("/a2a", "/a2a") == "/"
    assert relative_path("/other", "/a2a") is None
    assert relative_path("/", "") == "/"


# --- cards --------------------------------------------------------------------------------------------------


async def test_the_card_fetched_through_the_prefix_resolves_to_the_gateway_and_the_sdk_client_works() -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        base = f"{gw}/agents/planner/"
        card = await fetch_card(base)
        assert {i.url for i in card.supported_interfaces} == {base}
        assert card.documentation_url == f"{gw}/agents/planner/docs"
        assert card.icon_url == "https://cdn.example.com/icon.png"  # third-party URLs stay
        legacy = await fetch_card(base, card_path=LEGACY_CARD_PATH)
        assert {i.url for i in legacy.supported_interfaces} == {base}
        async with httpx.AsyncClient() as http:
            raw = await http.get(f"{gw}/agents/planner{CARD_PATH}")
            forwarded = await http.get(
                f"{gw}/agents/planner{CARD_PATH}",
                headers={"x-forwarded-proto": "https", "x-forwarded-host": "agents.example.com"},
            )
        assert raw.status_code == 200 and raw.json()["url"] == base
        assert raw.json()["additionalInterfaces"] == [{"transport": "HTTP+JSON", "url": base}]
        assert int(raw.headers["content-length"]) == len(raw.content) and "etag" not in raw.headers
        assert forwarded.json()["url"] == "https://agents.example.com/agents/planner/"
        async with agent_client(base, card=card) as client:
            events = [event async for event in client.send_message(user_message("hello"))]
        assert kinds(events) == ["task", "TASK_STATE_WORKING", "artifact_update", "TASK_STATE_COMPLETED"]
        assert agent.recorder.requests[-1][0] == "/"  # the JSON-RPC call reached the agent's base path


async def test_an_agent_below_a_base_path_and_by_host() -> None:
    async with (
        serve_agent("researcher", base_path="/a2a") as agent,
        gateway([("researcher", agent.port, "/a2a")], by_host="researcher.agents.test") as gw,
    ):
        card = await fetch_card(f"{gw}/agents/researcher/")
        assert {i.url for i in card.supported_interfaces} == {f"{gw}/agents/researcher/"}
        async with httpx.AsyncClient() as http:
            by_host = await http.get(f"{gw}/a2a{CARD_PATH}", headers={"host": "researcher.agents.test"})
        assert by_host.json()["url"] == "http://researcher.agents.test/a2a/"
        async with agent_client(gw, card=card, binding="HTTP+JSON") as client:
            events = [event async for event in client.send_message(user_message("reply hi"))]
        assert get_message_text(events[0].message) == "researcher: hi"
        assert agent.recorder.requests[-1][0] == "/a2a/message:stream"


@pytest.mark.parametrize("binding", ["JSONRPC", "HTTP+JSON"])
async def test_the_extended_card_is_rewritten_too(binding: Binding) -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        base = f"{gw}/agents/planner/"
        card = await fetch_card(base)
        async with agent_client(base, card=card, binding=binding) as client:
            with anyio.fail_after(10):
                extended = await client.get_extended_agent_card(GetExtendedAgentCardRequest())
    assert extended.description == "A test agent (extended card)."
    assert {i.url for i in extended.supported_interfaces} == {base}


async def test_an_agent_answering_garbage_for_its_card_is_a_502_with_a_clear_body() -> None:
    async with raw_agent(garbage) as port, gateway([("planner", port, "")]) as gw, httpx.AsyncClient() as http:
        response = await http.get(f"{gw}/agents/planner{CARD_PATH}")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == 502 and "not valid JSON" in error["message"]
    assert error["details"][0]["reason"] == "INVALID_AGENT_RESPONSE"


# --- calls --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("binding", "version"), CLIENTS)
async def test_sdk_client_through_the_gateway_sends_streams_gets_and_cancels(binding: Binding, version: str) -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        base = f"{gw}/agents/planner/"
        card = await fetch_card(base)
        async with agent_client(base, card=card, binding=binding, version=version) as client:
            with anyio.fail_after(10):
                events = [event async for event in client.send_message(user_message("hello"))]
                assert kinds(events) == ["task", "TASK_STATE_WORKING", "artifact_update", "TASK_STATE_COMPLETED"]
                assert get_artifact_text(events[2].artifact_update.artifact) == "echo: hello"
                task = await client.get_task(GetTaskRequest(id=events[0].task.id))
                assert task.status.state == TaskState.TASK_STATE_COMPLETED
                seen: list[StreamResponse] = []
                async for event in client.send_message(user_message("slow please")):
                    seen.append(event)
                    working = event.HasField("status_update") and event.status_update.status.state
                    if working == TaskState.TASK_STATE_WORKING:
                        cancelled = await client.cancel_task(CancelTaskRequest(id=event.status_update.task_id))
                        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        assert kinds(seen)[-1] == "TASK_STATE_CANCELED"
        assert agent.activity.cancelled == [seen[0].task.id]
        async with agent_client(base, card=card, binding=binding, version=version, streaming=False) as client:
            with anyio.fail_after(10):
                (only,) = [event async for event in client.send_message(user_message("countdown 2"))]
        assert only.task.status.state == TaskState.TASK_STATE_COMPLETED


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0"), ("JSONRPC", "0.3")])
async def test_stream_events_arrive_one_by_one(binding: Binding, version: str) -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        base = f"{gw}/agents/planner/"
        card = await fetch_card(base)
        async with agent_client(base, card=card, binding=binding, version=version) as client:
            seen: list[StreamResponse] = []
            with anyio.fail_after(10):
                async for event in client.send_message(user_message("gated run")):
                    seen.append(event)
                    working = event.HasField("status_update") and event.status_update.status.state
                    if working == TaskState.TASK_STATE_WORKING:
                        # The agent still waits for the gate: its last event is not emitted yet.
                        assert not agent.gate.is_set()
                        agent.gate.set()
    assert kinds(seen) == ["task", "TASK_STATE_WORKING", "artifact_update", "TASK_STATE_COMPLETED"]


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0"), ("JSONRPC", "0.3")])
async def test_push_notification_configs_are_ordinary_calls(binding: Binding, version: str) -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        base = f"{gw}/agents/planner/"
        card = await fetch_card(base)
        async with agent_client(base, card=card, binding=binding, version=version) as client:
            with anyio.fail_after(10):
                events = [event async for event in client.send_message(user_message("hello"))]
                task_id = events[0].task.id
                config = TaskPushNotificationConfig(task_id=task_id, id="hook-1", url="https://hooks.example.com/a2a")
                created = await client.create_task_push_notification_config(config)
                listed = await client.list_task_push_notification_configs(
                    ListTaskPushNotificationConfigsRequest(task_id=task_id)
                )
                await client.delete_task_push_notification_config(
                    DeleteTaskPushNotificationConfigRequest(task_id=task_id, id="hook-1")
                )
    assert created.url == "https://hooks.example.com/a2a"
    assert [c.id for c in listed.configs] == ["hook-1"]


async def test_both_name_sets_over_raw_json_rpc_and_the_version_header_reaches_the_agent() -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        url = f"{gw}/agents/planner/"
        async with httpx.AsyncClient(timeout=10) as http:
            modern = await http.post(url, json=rpc("SendMessage", send_params("hi")), headers={"a2a-version": "1.0"})
            assert agent.recorder.values("a2a-version") == ["1.0"]
            task = modern.json()["result"]["task"]
            got = await http.post(url, json=rpc("GetTask", {"id": task["id"]}, 2), headers={"a2a-version": "1.0"})
            legacy = await http.post(url, json=rpc("message/send", legacy_send_params("hey"), "x"))
            legacy_get = await http.post(url, json=rpc("tasks/get", {"id": legacy.json()["result"]["id"]}, 3))

            async def pieces() -> AsyncIterator[bytes]:  # a chunked request body, read whole by the gateway
                data = json.dumps(rpc("message/send", legacy_send_params("chunks"), 4)).encode()
                for start in range(0, len(data), 16):
                    yield data[start : start + 16]

            chunked = await http.post(url, content=pieces(), headers={"content-type": "application/json"})
            assert agent.recorder.values("content-length") == [
                str(len(json.dumps(rpc("message/send", legacy_send_params("chunks"), 4))))
            ]
    assert modern.status_code == 200 and task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert got.json()["id"] == 2 and got.json()["result"]["id"] == task["id"]
    assert legacy.json()["id"] == "x" and legacy.json()["result"]["status"]["state"] == "completed"
    assert legacy_get.json()["result"]["kind"] == "task"
    assert chunked.json()["result"]["status"]["state"] == "completed"


async def test_two_agents_behind_one_gateway() -> None:
    async with (
        serve_agent("planner") as planner,
        serve_agent("researcher", base_path="/a2a") as researcher,
        gateway([("planner", planner.port, ""), ("researcher", researcher.port, "/a2a")]) as gw,
    ):
        replies = {}
        for name in ("planner", "researcher"):
            base = f"{gw}/agents/{name}/"
            card = await fetch_card(base)
            assert card.name == name
            async with agent_client(base, card=card) as client:
                with anyio.fail_after(10):
                    (event,) = [e async for e in client.send_message(user_message(f"reply to {name}"))]
            replies[name] = get_message_text(event.message)
        assert planner.recorder.values("x-target-agent") == ["planner"]
        assert researcher.recorder.values("x-target-agent") == ["researcher"]
    assert replies == {"planner": "planner: to planner", "researcher": "researcher: to researcher"}


async def test_an_access_log_line_per_request_with_task_state_and_ids() -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")]) as gw:
        url = f"{gw}/agents/planner/"
        with capture_logs() as logs:
            async with httpx.AsyncClient(timeout=10) as http:
                await http.get(f"{url}.well-known/agent-card.json")
                unary = await http.post(url, json=rpc("message/send", legacy_send_params("hi")))
                body = rpc("SendStreamingMessage", send_params("countdown 1"), 5)
                streamed = await http.post(url, json=body, headers={"a2a-version": "1.0"})
                task_id = unary.json()["result"]["id"]
                await http.get(f"{gw}/agents/planner/tasks/{task_id}", headers={"a2a-version": "1.0"})
    card, sent, stream, got = a2a_lines(logs)
    assert card["a2a_card"] == CARD_PATH and card["status"] == 200 and card["agent"] == "planner"
    assert sent["a2a_method"] == "message/send" and sent["a2a_operation"] == "SendMessage"
    assert sent["a2a_version"] == "0.3" and sent["a2a_binding"] == "jsonrpc"
    assert (sent["a2a_task_id"], sent["a2a_task_state"], sent["status"]) == (task_id, "completed", 200)
    assert sent["a2a_context_id"] == unary.json()["result"]["contextId"]
    stream_context = sse_payloads(streamed.text)[0][1]["result"]["task"]["contextId"]
    assert stream["a2a_operation"] == "SendStreamingMessage" and stream["a2a_task_state"] == "completed"
    assert stream["a2a_context_id"] == stream_context and stream["a2a_events"] >= 4
    assert got["a2a_binding"] == "rest" and got["a2a_operation"] == "GetTask" and got["a2a_task_id"] == task_id
    assert got["a2a_task_state"] == "completed" and isinstance(got["duration_ms"], float)


# --- identity and authorization -----------------------------------------------------------------------------


def bearer_headers(**claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(**claims).decode()}"}


async def test_identity_headers_reach_the_agent_and_client_copies_are_stripped() -> None:
    spoofed = {"x-source-agent": "root", "x-target-agent": "billing"}
    authn = policy(authentication=jwt_authentication(mode=pb.Authentication.MODE_OPTIONAL), on=on_rule("planner"))
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")], authn) as gw:
        url = f"{gw}/agents/planner/"
        async with httpx.AsyncClient(timeout=10) as http:
            signed = await http.post(
                url, json=rpc("tasks/get", {"id": "none"}), headers={**spoofed, **bearer_headers()}
            )
            assert signed.json()["error"]["code"] == -32001  # the agent's own TaskNotFound, passed through
            assert agent.recorder.values("x-source-agent") == ["alice"]
            assert agent.recorder.values("x-target-agent") == ["planner"]
            assert agent.recorder.values("authorization") == []
            await http.post(url, json=rpc("tasks/get", {"id": "none"}), headers=spoofed)
            assert agent.recorder.values("x-source-agent") == []
            assert agent.recorder.values("x-target-agent") == ["planner"]
            await http.get(f"{url}.well-known/agent-card.json", headers={**spoofed, **bearer_headers(sub="bob")})
            assert agent.recorder.values("x-source-agent") == ["bob"]


async def test_a_denied_source_gets_403_and_minus_32011_on_both_bindings() -> None:
    rules = pb.Authorization(deny=["source.identity == 'mallory' && a2a.operation == 'SendMessage'"])
    guarded = policy(authentication=jwt_authentication(), authorization=rules, on=on_rule("planner"))
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")], guarded) as gw:
        base = f"{gw}/agents/planner/"
        mallory, alice = bearer_headers(sub="mallory"), bearer_headers(sub="alice")
        async with httpx.AsyncClient(timeout=10) as http:
            denied = await http.post(base, json=rpc("message/send", legacy_send_params("hi"), 42), headers=mallory)
            rest = await http.post(
                f"{base}message:send", json=send_params("hi"), headers={**mallory, "a2a-version": "1.0"}
            )
            other = await http.post(base, json=rpc("tasks/get", {"id": "none"}), headers=mallory)
        card = await fetch_card(base, headers=mallory)  # not a SendMessage: allowed
        async with agent_client(base, card=card, streaming=False, headers=mallory) as client:
            with pytest.raises(A2AClientError, match="403"), anyio.fail_after(10):
                [event async for event in client.send_message(user_message("reply no"))]
        async with agent_client(base, card=card, streaming=False, headers=alice) as client:
            with anyio.fail_after(10):
                (event,) = [event async for event in client.send_message(user_message("reply yes"))]
    assert denied.status_code == 403
    assert denied.json() == {
        "jsonrpc": "2.0",
        "id": 42,
        "error": {
            "code": POLICY_DENIED,
            "message": denied.json()["error"]["message"],
            "data": denied.json()["error"]["data"],
        },
    }
    assert "source.identity" not in denied.text  # no rule text leaks
    assert rest.status_code == 403 and rest.json()["error"]["status"] == "PERMISSION_DENIED"
    assert other.json()["error"]["code"] == -32001  # tasks/get is not denied: the agent answered
    assert get_message_text(event.message) == "planner: yes"
    assert all(path != "/message:send" for path, _ in agent.recorder.requests)


def sa_token(namespace: str, name: str = "agent") -> dict[str, str]:
    return {"authorization": f"Bearer {sign(SA_KEY, service_account_claims(namespace, name)).decode()}"}


def sa_policy(*allow: str, deny: Iterable[str] = ()) -> pb.Policy:
    provider = pb.ServiceAccountProvider(
        name="cluster", issuer=CLUSTER, audiences=[SA_AUDIENCE], jwks=pb.Jwks(inline=json.dumps(jwks(SA_KEY)))
    )
    authorization = pb.Authorization(allow=list(allow), deny=list(deny)) if allow or deny else None
    return policy(
        authentication=pb.Authentication(service_account_providers=[provider]),
        authorization=authorization,
        on=on_rule("planner"),
    )


@pytest.mark.parametrize(
    ("rules", "team_a_allowed"),
    [
        (sa_policy(), False),  # no rules at all
        (sa_policy(deny=["source.serviceAccount == 'intruder'"]), False),  # no allow list: not explicit
        (sa_policy("source.namespace == 'team-a' && a2a.operation == 'GetTask'"), True),
        (sa_policy("source.namespace == 'default'"), False),  # an allow list that does not name team-a
    ],
)
async def test_cross_namespace_calls_need_an_allow_rule(rules: pb.Policy, team_a_allowed: bool) -> None:
    body = rpc("tasks/get", {"id": "none"}, 9)
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")], rules) as gw:
        url = f"{gw}/agents/planner/"
        async with httpx.AsyncClient(timeout=10) as http:
            with capture_logs() as logs:
                team_a = await http.post(url, json=body, headers=sa_token("team-a"))
            same = await http.post(url, json=body, headers=sa_token("default"))
        sources = agent.recorder.values("x-source-agent")
    if team_a_allowed:
        assert team_a.json()["error"]["code"] == -32001  # reached the agent
    else:
        assert team_a.status_code == 403 and team_a.json()["error"]["code"] == POLICY_DENIED
        assert team_a.json()["id"] == 9
        if rules.authorization.allow:
            assert any(line.get("event") == "request denied" for line in logs)
        else:
            assert any(line.get("event") == "a2a cross-namespace call denied" for line in logs)
    same_ns_allowed = not rules.authorization.allow or "default" in rules.authorization.allow[0]
    if same_ns_allowed:
        assert same.json()["error"]["code"] == -32001
        assert sources == ["system:serviceaccount:default:agent"]
    else:
        assert same.status_code == 403


# --- bad input and bad agents -------------------------------------------------------------------------------


async def test_bad_requests_get_clear_protocol_errors_and_are_never_forwarded() -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")], max_request_bytes=2048) as gw:
        url = f"{gw}/agents/planner/"
        async with httpx.AsyncClient(timeout=10) as http:
            before = len(agent.recorder.requests)
            not_json = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
            unknown = await http.post(url, json=rpc("tasks/explode", {}, 3))
            big = await http.post(url, json=rpc("message/send", legacy_send_params("x" * 4096), 4))
            bad_params = await http.post(url, json=rpc("GetTask", {"id": 5}, 5))
            bad_version = await http.post(url, json=rpc("GetTask", {"id": "t"}, 6), headers={"a2a-version": "one"})
            rest_unknown = await http.get(f"{url}nothing/here", headers={"a2a-version": "1.0"})
            rest_verb = await http.delete(f"{url}message:send", headers={"a2a-version": "1.0"})
            assert len(agent.recorder.requests) == before
    assert not_json.status_code == 200 and not_json.json()["error"]["code"] == -32700
    assert not_json.json()["id"] is None
    assert unknown.status_code == 200 and unknown.json()["error"]["code"] == -32601 and unknown.json()["id"] == 3
    assert "tasks/explode" in unknown.json()["error"]["message"]
    assert big.status_code == 413 and big.json()["error"]["code"] == -32600
    assert bad_params.json()["error"]["code"] == -32602 and bad_params.json()["id"] == 5
    assert bad_version.json()["error"]["code"] == -32009
    assert rest_unknown.status_code == 404 and rest_unknown.json()["error"]["status"] == "NOT_FOUND"
    assert rest_verb.status_code == 405 and rest_verb.headers["allow"] == "POST"


async def test_an_agent_that_is_down_is_a_502_with_the_request_id() -> None:
    async with gateway([("planner", free_port(), "")]) as gw, httpx.AsyncClient(timeout=10) as http:
        rpc_answer = await http.post(f"{gw}/agents/planner/", json=rpc("SendMessage", send_params("hi"), "r-1"))
        stream = await http.post(f"{gw}/agents/planner/", json=rpc("SendStreamingMessage", send_params("hi"), 2))
        rest = await http.post(
            f"{gw}/agents/planner/message:send", json=send_params("hi"), headers={"a2a-version": "1.0"}
        )
        card = await http.get(f"{gw}/agents/planner{CARD_PATH}")
    assert rpc_answer.status_code == 502
    assert rpc_answer.json()["id"] == "r-1" and rpc_answer.json()["error"]["code"] == -32603
    assert "'planner' is unavailable" in rpc_answer.json()["error"]["message"]
    assert "127.0.0.1" not in rpc_answer.text  # no addresses for the client
    assert stream.status_code == 502 and stream.json()["id"] == 2
    assert rest.status_code == 502 and rest.json()["error"]["status"] == "UNAVAILABLE"
    assert card.status_code == 502


async def test_an_agent_answering_garbage_to_a_call_is_a_502() -> None:
    async with raw_agent(garbage) as port, gateway([("planner", port, "")]) as gw, httpx.AsyncClient() as http:
        answer = await http.post(f"{gw}/agents/planner/", json=rpc("SendMessage", send_params("hi"), 11))
    assert answer.status_code == 502 and answer.json()["id"] == 11
    assert answer.json()["error"]["code"] == -32006 and "not a JSON-RPC response" in answer.json()["error"]["message"]


async def test_an_agent_dying_mid_stream_leaves_a_final_error_event_and_a_clean_end() -> None:
    async with raw_agent(dying_stream(2)) as port, gateway([("planner", port, "")]) as gw:
        async with httpx.AsyncClient(timeout=10) as http:
            with capture_logs() as logs:
                response = await http.post(f"{gw}/agents/planner/", json=rpc("message/stream", {}, 7))
        events = sse_payloads(response.text)  # the body ended cleanly: httpx read it to the end
    assert response.status_code == 200
    assert [name for name, _ in events] == ["message", "message", "error"]
    assert events[-1][1]["id"] == 7 and events[-1][1]["error"]["code"] == -32603
    assert "'planner' is unavailable" in events[-1][1]["error"]["message"]
    assert response.text.startswith(": ping\n\n")  # comments pass through as the agent sent them
    (line,) = a2a_lines(logs)
    assert line["a2a_events"] == 2 and line["a2a_task_state"] == "working" and line["a2a_task_id"] == "t1"


async def test_a_garbage_stream_event_ends_the_stream_with_an_error_event() -> None:
    async with (
        raw_agent(garbage_event) as port,
        gateway([("planner", port, "")]) as gw,
        httpx.AsyncClient(timeout=10) as http,
    ):
        response = await http.post(f"{gw}/agents/planner/", json=rpc("SendStreamingMessage", {}, 1))
    events = sse_payloads(response.text)
    assert [name for name, _ in events] == ["message", "error"]  # nothing after the bad event
    assert events[-1][1]["error"]["code"] == -32006 and "not a JSON-RPC response" in events[-1][1]["error"]["message"]
    assert "content-length" not in response.headers  # the relay re-frames the stream


async def test_the_sdk_client_surfaces_a_stream_cut_short() -> None:
    async with raw_agent(dying_stream(1)) as port, gateway([("planner", port, "")]) as gw:
        card = await fetch_card_from(gw)
        async with agent_client(f"{gw}/agents/planner/", card=card) as client:
            seen: list[StreamResponse] = []
            with pytest.raises(InternalError) as caught, anyio.fail_after(10):
                async for event in client.send_message(user_message("hi")):
                    seen.append(event)
    assert kinds(seen) == ["TASK_STATE_WORKING"]
    assert "unavailable" in str(caught.value)


async def fetch_card_from(gw: str) -> Any:
    """A card for a raw agent that has none: the peer card pointing at the gateway."""
    return build_card("planner", f"{gw}/agents/planner/")


async def test_a_slow_agent_times_out_with_504_or_a_final_error_event() -> None:
    async with serve_agent("planner") as agent, gateway([("planner", agent.port, "")], request_timeout=0.5) as gw:
        url = f"{gw}/agents/planner/"
        async with httpx.AsyncClient(timeout=10) as http:
            version = {"a2a-version": "1.0"}
            unary = await http.post(url, json=rpc("SendMessage", send_params("gated unary"), 1), headers=version)
            body = rpc("SendStreamingMessage", send_params("gated stream"), 2)
            streamed = await http.post(url, json=body, headers=version)
    assert unary.status_code == 504 and unary.json()["id"] == 1
    assert "did not answer in time" in unary.json()["error"]["message"]
    events = sse_payloads(streamed.text)
    assert streamed.status_code == 200 and events[0][1]["result"]["task"]["status"]["state"] == "TASK_STATE_SUBMITTED"
    assert events[-1][0] == "error" and events[-1][1]["id"] == 2
    assert events[-1][1]["error"]["data"][0]["reason"] == "AGENT_TIMEOUT"
