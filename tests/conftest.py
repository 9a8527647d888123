"""Fixtures every test folder can use."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """One event loop for the session: grpc.aio delivers late completions to the loop that
    started a call, so a loop per test can fail the next test with a stray callback."""
    return "asyncio"


@pytest.fixture(scope="session")
async def shared_event_loop() -> AsyncIterator[None]:
    """Keep one event loop open for every test that uses this (anyio keeps a loop while a
    fixture of that scope lives). grpc.aio delivers a late completion of an ended call to
    the loop that started it; were that loop closed, the error would hit the next test.
    Use it with `pytest.mark.usefixtures("shared_event_loop")` in modules that use grpc.aio."""
    yield


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
