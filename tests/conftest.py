"""Fixtures every test folder can use."""

from __future__ import annotations

import random
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


# Ports below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by default), so the
# outgoing connections of the tests' own clients and servers never take a port between the moment it
# is chosen here and the moment a server binds it; each is handed out once per test process.
_PORT_RANGE = (20000, 32767)
_handed_out: set[int] = set()
_random = random.Random()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and no other caller got."""
    for _ in range(1000):
        port = _random.randint(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE} after 1000 tries")


@pytest.fixture
def port() -> int:
    return free_port()
