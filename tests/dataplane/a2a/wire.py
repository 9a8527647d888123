"""Recording what the a2a-sdk client really sends, so the classifier tests read SDK bytes, not ours."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from a2a.client import Client

from tests.peers.a2a_agents import Binding, RunningAgent, agent_client


@dataclass(frozen=True)
class Sent:
    """One request on the wire; ``path`` is relative to the agent's mount (its base path removed)."""

    method: str
    path: str
    version_header: str | None
    body: bytes


@asynccontextmanager
async def recording_client(
    agent: RunningAgent, *, binding: Binding, version: str, streaming: bool = True
) -> AsyncIterator[tuple[Client, list[Sent]]]:
    """An SDK client for ``agent`` and the list its requests are appended to."""
    sent: list[Sent] = []

    async def hook(request: httpx.Request) -> None:
        path = request.url.raw_path.decode()
        sent.append(
            Sent(
                request.method,
                path.removeprefix(agent.base_path) or "/",
                request.headers.get("a2a-version"),
                request.content,
            )
        )

    async with (
        httpx.AsyncClient(event_hooks={"request": [hook]}, timeout=httpx.Timeout(10.0)) as http,
        agent_client(agent.url, binding=binding, version=version, streaming=streaming, http=http) as client,
    ):
        yield client, sent
