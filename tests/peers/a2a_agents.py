"""Real A2A agents built with PyPI ``a2a-sdk`` (1.x), served in-process on 127.0.0.1, and its client.

One agent serves the JSON-RPC binding at ``{base}/`` and the HTTP+JSON binding under ``{base}`` (with the
SDK's 0.3 compatibility on both, so 0.3 method names and ``/v1/...`` paths work too), its card at
``{base}/.well-known/agent-card.json`` and ``{base}/.well-known/agent.json``, streaming, cancel, push
notification configs (stored, never sent) and an extended card. The card lists each binding twice, as
1.0 and 0.3 interfaces, so it carries both the 1.0 ``supportedInterfaces`` and the 0.3 ``url`` /
``additionalInterfaces`` (that is how the SDK serves a card for both eras).

What the agent does depends on the first word of the user's text (``PeerExecutor``):

- ``slow ...``: a task that reports ``working`` and then waits until it is cancelled (``canceled``);
- ``countdown N``: ``working`` N times (messages "N", "N-1", ... "1"), then the artifact, then ``completed``;
- ``reply ...``: a single message and no task;
- anything else (echo): ``working`` -> artifact ``echo: <text>`` -> ``completed``.

``serve_agent`` binds the socket before uvicorn starts, so clients can connect at once (the kernel
queues them) and nothing waits or sleeps for readiness; uvicorn is stopped when the block ends.
``agent_client`` builds the SDK client for an agent URL and a chosen binding and protocol version.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import httpx
import uvicorn
from a2a.client import ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver
from a2a.client.client import Client
from a2a.helpers import get_message_text, new_task_from_user_message, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryPushNotificationConfigStore, InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Role
from starlette.applications import Starlette

Binding = Literal["JSONRPC", "HTTP+JSON"]
CARD_PATH = "/.well-known/agent-card.json"
LEGACY_CARD_PATH = "/.well-known/agent.json"


@dataclass
class AgentActivity:
    """What the agent saw, so tests can wait on it instead of sleeping."""

    started: dict[str, anyio.Event] = field(default_factory=dict)  # task id -> the task began working
    cancelled: list[str] = field(default_factory=list)

    def started_event(self, task_id: str) -> anyio.Event:
        return self.started.setdefault(task_id, anyio.Event())


class PeerExecutor(AgentExecutor):
    """The test agent's behaviour (see the module docstring)."""

    def __init__(self, name: str, activity: AgentActivity) -> None:
        self.name = name
        self.activity = activity

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        text = get_message_text(context.message)
        word, _, rest = text.partition(" ")
        if word == "reply":
            await event_queue.enqueue_event(
                new_text_message(f"{self.name}: {rest}", context_id=context.context_id, role=Role.ROLE_AGENT)
            )
            return
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        self.activity.started_event(task.id).set()
        if word == "slow":
            await asyncio.Event().wait()  # until the framework cancels this coroutine (CancelTask)
        if word == "countdown":
            for step in range(int(rest or "3"), 0, -1):
                await updater.start_work(updater.new_agent_message([new_text_part(str(step))]))
        await updater.add_artifact([new_text_part(f"echo: {text}")], name="echo")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        self.activity.cancelled.append(context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def build_card(name: str, url: str, *, description: str = "A test agent.") -> AgentCard:
    """The card of an agent whose bindings both live at ``url`` (1.0 and 0.3 interfaces of each)."""
    interfaces = [
        AgentInterface(url=url, protocol_binding=binding, protocol_version=version)
        for version in ("1.0", "0.3")
        for binding in ("JSONRPC", "HTTP+JSON")
    ]
    return AgentCard(
        name=name,
        description=description,
        version="1.0.0",
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(streaming=True, push_notifications=True, extended_agent_card=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="echo", description="Echoes, counts down, or waits.", tags=["test"])],
        documentation_url=f"{url.rstrip('/')}/docs",
        icon_url="https://cdn.example.com/icon.png",
    )


def build_app(name: str, url: str, base_path: str = "", activity: AgentActivity | None = None) -> Starlette:
    """The agent's ASGI app (card, JSON-RPC and REST routes under ``base_path``)."""
    card = build_card(name, url)
    extended = build_card(name, url, description="A test agent (extended card).")
    handler = DefaultRequestHandler(
        agent_executor=PeerExecutor(name, activity or AgentActivity()),
        task_store=InMemoryTaskStore(),
        agent_card=card,
        push_config_store=InMemoryPushNotificationConfigStore(),
        extended_agent_card=extended,
    )
    routes = [
        *create_agent_card_routes(card, card_url=f"{base_path}{CARD_PATH}"),
        *create_agent_card_routes(card, card_url=f"{base_path}{LEGACY_CARD_PATH}"),
        *create_jsonrpc_routes(handler, rpc_url=f"{base_path}/", enable_v0_3_compat=True),
        *create_rest_routes(handler, enable_v0_3_compat=True, path_prefix=base_path),
    ]
    return Starlette(routes=routes)


@dataclass(frozen=True)
class RunningAgent:
    name: str
    port: int
    base_path: str
    activity: AgentActivity

    @property
    def url(self) -> str:
        """The interface URL (both bindings): the JSON-RPC endpoint, and the REST base."""
        return f"http://127.0.0.1:{self.port}{self.base_path}/"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def serve_agent(name: str = "echo-agent", *, base_path: str = "") -> AsyncIterator[RunningAgent]:
    """Serve one agent on a fresh 127.0.0.1 port until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    agent = RunningAgent(name, sock.getsockname()[1], base_path.rstrip("/"), AgentActivity())
    app = build_app(name, agent.url, agent.base_path, agent.activity)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # leave pytest's handlers
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [sock])
            try:
                yield agent
            finally:
                server.should_exit = True
                server.force_exit = True  # open SSE streams (a slow task) must not hold the shutdown
    finally:
        sock.close()


async def fetch_card(url: str, *, card_path: str = CARD_PATH, headers: dict[str, str] | None = None) -> AgentCard:
    """The agent card at ``url`` as the SDK resolves it."""
    async with httpx.AsyncClient(headers=headers) as http:
        return await A2ACardResolver(http, url).get_agent_card(relative_card_path=card_path)


def select_interfaces(card: AgentCard, binding: Binding, version: str) -> AgentCard:
    """A copy of ``card`` offering only the interfaces of ``binding`` at ``version``, so the SDK client speaks
    exactly that (it would otherwise prefer 1.0)."""
    chosen = AgentCard()
    chosen.CopyFrom(card)
    del chosen.supported_interfaces[:]
    chosen.supported_interfaces.extend(
        i for i in card.supported_interfaces if i.protocol_binding == binding and i.protocol_version == version
    )
    if not chosen.supported_interfaces:
        raise ValueError(f"the card offers no {binding} {version} interface")
    return chosen


@asynccontextmanager
async def agent_client(
    url: str,
    *,
    binding: Binding = "JSONRPC",
    version: str = "1.0",
    streaming: bool = True,
    card: AgentCard | None = None,
    headers: dict[str, str] | None = None,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[Client]:
    """The a2a-sdk client for the agent at ``url`` (its card fetched from there unless given), speaking
    ``binding`` at protocol ``version``; closed when the block ends. Pass ``http`` to watch the wire (event
    hooks); it is left open."""
    resolved = card if card is not None else await fetch_card(url, headers=headers)
    own_http = http is None
    client_http = http if http is not None else httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10.0))
    config = ClientConfig(streaming=streaming, httpx_client=client_http, supported_protocol_bindings=[binding])
    client = ClientFactory(config).create(select_interfaces(resolved, binding, version))
    try:
        yield client
    finally:
        await client.close()
        if own_http:
            await client_http.aclose()
