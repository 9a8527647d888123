"""The a2a-sdk test agents (tests/peers/a2a_agents.py) called directly with the a2a-sdk client: every
binding and version the gateway tests will route, so a gateway failure there is the gateway's."""

from __future__ import annotations

import anyio
import httpx
import pytest
from a2a.client import Client
from a2a.helpers import get_artifact_text, get_message_text
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)

from tests.peers.a2a_agents import (
    CARD_PATH,
    LEGACY_CARD_PATH,
    Binding,
    agent_client,
    fetch_card,
    serve_agent,
)

pytestmark = pytest.mark.anyio

CLIENTS: list[tuple[Binding, str]] = [(b, v) for v in ("1.0", "0.3") for b in ("JSONRPC", "HTTP+JSON")]


def user_message(text: str, *, task_id: str = "", context_id: str = "") -> SendMessageRequest:
    message = Message(role=Role.ROLE_USER, message_id=f"m-{text}", parts=[Part(text=text)])
    if task_id:
        message.task_id = task_id
    if context_id:
        message.context_id = context_id
    return SendMessageRequest(message=message)


async def collect(client: Client, request: SendMessageRequest) -> list[StreamResponse]:
    with anyio.fail_after(10):
        return [event async for event in client.send_message(request)]


def kinds(events: list[StreamResponse]) -> list[str]:
    out = []
    for event in events:
        kind = event.WhichOneof("payload")
        if kind == "status_update":
            kind = TaskState.Name(event.status_update.status.state)
        out.append(kind)
    return out


async def test_card_names_the_agent_at_both_well_known_paths() -> None:
    async with serve_agent("planner", base_path="/a2a") as agent:
        for path in (CARD_PATH, LEGACY_CARD_PATH):
            card = await fetch_card(agent.url, card_path=path)
            assert card.name == "planner"
            assert {(i.protocol_binding, i.protocol_version) for i in card.supported_interfaces} == {
                ("JSONRPC", "1.0"),
                ("HTTP+JSON", "1.0"),
                ("JSONRPC", "0.3"),
                ("HTTP+JSON", "0.3"),
            }
            assert all(i.url == agent.url for i in card.supported_interfaces)
        async with httpx.AsyncClient() as http:
            raw = (await http.get(f"{agent.origin}/a2a{CARD_PATH}")).json()
        # Both eras' fields are on the wire: 1.0 supportedInterfaces and 0.3 url / additionalInterfaces.
        assert raw["url"] == agent.url and raw["preferredTransport"] == "JSONRPC"
        assert raw["additionalInterfaces"] == [{"transport": "HTTP+JSON", "url": agent.url}]


@pytest.mark.parametrize(("binding", "version"), CLIENTS)
async def test_streamed_echo_goes_working_artifact_completed(binding: Binding, version: str) -> None:
    async with serve_agent() as agent, agent_client(agent.url, binding=binding, version=version) as client:
        events = await collect(client, user_message("hello"))
        assert kinds(events) == ["task", "TASK_STATE_WORKING", "artifact_update", "TASK_STATE_COMPLETED"]
        assert get_artifact_text(events[2].artifact_update.artifact) == "echo: hello"
        task_id = events[0].task.id
        with anyio.fail_after(10):
            task = await client.get_task(GetTaskRequest(id=task_id))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert task.context_id == events[0].task.context_id


@pytest.mark.parametrize(("binding", "version"), CLIENTS)
async def test_unary_send_returns_the_finished_task(binding: Binding, version: str) -> None:
    async with (
        serve_agent() as agent,
        agent_client(agent.url, binding=binding, version=version, streaming=False) as client,
    ):
        (event,) = await collect(client, user_message("countdown 2"))
        assert event.task.status.state == TaskState.TASK_STATE_COMPLETED
        assert get_artifact_text(event.task.artifacts[0]) == "echo: countdown 2"


async def test_reply_is_a_single_message_without_a_task() -> None:
    async with serve_agent("planner") as agent, agent_client(agent.url) as client:
        (event,) = await collect(client, user_message("reply hi"))
        assert get_message_text(event.message) == "planner: hi"


async def test_countdown_reports_each_step() -> None:
    async with serve_agent() as agent, agent_client(agent.url) as client:
        events = await collect(client, user_message("countdown 3"))
        steps = [get_message_text(e.status_update.status.message) for e in events if e.HasField("status_update")]
        assert steps == ["", "3", "2", "1", ""]
        assert kinds(events)[-1] == "TASK_STATE_COMPLETED"


@pytest.mark.parametrize(("binding", "version"), CLIENTS)
async def test_slow_task_is_cancelled_and_its_stream_ends(binding: Binding, version: str) -> None:
    async with serve_agent() as agent, agent_client(agent.url, binding=binding, version=version) as client:
        seen: list[StreamResponse] = []
        with anyio.fail_after(10):
            async for event in client.send_message(user_message("slow please")):
                seen.append(event)
                if event.HasField("status_update") and event.status_update.status.state == TaskState.TASK_STATE_WORKING:
                    cancelled = await client.cancel_task(CancelTaskRequest(id=event.status_update.task_id))
                    assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        assert kinds(seen)[-1] == "TASK_STATE_CANCELED"
        assert agent.activity.cancelled == [seen[0].task.id]


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0")])
async def test_subscribe_follows_a_running_task(binding: Binding, version: str) -> None:
    async with serve_agent() as agent, agent_client(agent.url, binding=binding, version=version) as client:
        with anyio.fail_after(10):
            (first,) = await collect_first(client, user_message("slow one"))
            task_id = first.task.id
            await agent.activity.started_event(task_id).wait()
            subscribed: list[StreamResponse] = []
            async for event in client.subscribe(SubscribeToTaskRequest(id=task_id)):
                subscribed.append(event)
                if len(subscribed) == 1:
                    await client.cancel_task(CancelTaskRequest(id=task_id))
        assert subscribed[0].task.id == task_id
        assert kinds(subscribed)[-1] == "TASK_STATE_CANCELED"


async def collect_first(client: Client, request: SendMessageRequest) -> list[StreamResponse]:
    """The first event of a stream (the rest is abandoned, which closes it)."""
    stream = client.send_message(request)
    try:
        return [await anext(stream)]
    finally:
        await stream.aclose()


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0"), ("JSONRPC", "0.3")])
async def test_push_notification_configs_round_trip(binding: Binding, version: str) -> None:
    async with serve_agent() as agent, agent_client(agent.url, binding=binding, version=version) as client:
        (event,) = (await collect(client, user_message("hello")))[:1]
        task_id = event.task.id
        with anyio.fail_after(10):
            created = await client.create_task_push_notification_config(
                TaskPushNotificationConfig(task_id=task_id, id="hook-1", url="https://hooks.example.com/a2a")
            )
            assert created.url == "https://hooks.example.com/a2a"
            got = await client.get_task_push_notification_config(
                GetTaskPushNotificationConfigRequest(task_id=task_id, id="hook-1")
            )
            assert got.url == "https://hooks.example.com/a2a"
            listed = await client.list_task_push_notification_configs(
                ListTaskPushNotificationConfigsRequest(task_id=task_id)
            )
            assert [c.id for c in listed.configs] == ["hook-1"]
            await client.delete_task_push_notification_config(
                DeleteTaskPushNotificationConfigRequest(task_id=task_id, id="hook-1")
            )
            listed = await client.list_task_push_notification_configs(
                ListTaskPushNotificationConfigsRequest(task_id=task_id)
            )
            assert list(listed.configs) == []


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0")])
async def test_extended_card(binding: Binding, version: str) -> None:
    async with serve_agent() as agent, agent_client(agent.url, binding=binding, version=version) as client:
        with anyio.fail_after(10):
            card = await client.get_extended_agent_card(GetExtendedAgentCardRequest())
        assert card.description == "A test agent (extended card)."
