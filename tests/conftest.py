"""Fixtures every test folder can use."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """One event loop for the session: grpc.aio delivers late completions to the loop that
    started a call, so a loop per test can fail the next test with a stray callback."""
    return "asyncio"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
