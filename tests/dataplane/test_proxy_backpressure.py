"""Back-pressure: a fast client and a stalled upstream must not make the proxy buffer the body."""

from __future__ import annotations

import tracemalloc

import anyio
import pytest

from tests.conftest import free_port
from tests.dataplane.peers.config import simple_config
from tests.dataplane.peers.h1 import H1Exchange, H1Peer
from tests.dataplane.peers.proxy import running_proxy

pytestmark = pytest.mark.anyio

CHUNK = b"x" * 65536
# Several times what loopback socket buffers hold (about 10 MiB were seen in flight here).
BODY_BYTES = 32 * 1024 * 1024
# No progress for this long means the client is held back: the observation window of a
# negative assertion (nothing more flows), not a wait for a state to be reached.
STALLED_AFTER = 1.0


async def test_stalled_upstream_holds_back_the_client_without_buffering_the_body() -> None:
    first_chunk = anyio.Event()
    resume = anyio.Event()
    received = 0

    async def stall_then_drain(exchange: H1Exchange) -> None:
        nonlocal received
        received += len(await exchange.receive_body_chunk())
        first_chunk.set()
        await resume.wait()
        while chunk := await exchange.receive_body_chunk():
            received += len(chunk)
        await exchange.respond(200, b"got it")

    port = free_port()
    tracemalloc.start()
    try:
        async with (
            H1Peer(stall_then_drain) as peer,
            running_proxy(simple_config(port, peer.port)),
            await anyio.connect_tcp("127.0.0.1", port) as client,
        ):
            head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BODY_BYTES
            await client.send(head)
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            sent = 0

            async def send_body() -> None:
                nonlocal sent
                while sent < BODY_BYTES:
                    await client.send(CHUNK)
                    sent += len(CHUNK)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_body)
                    await first_chunk.wait()
                    for _ in range(60):  # bounded: the body is far larger than any buffer on the way
                        before = sent
                        await anyio.sleep(STALLED_AFTER)
                        if sent == before or sent >= BODY_BYTES:
                            break
                    held_at = sent
                    peak = tracemalloc.get_traced_memory()[1] - baseline
                    tracemalloc.stop()
                    # Flow resumes and nothing is lost once the upstream reads again.
                    resume.set()
                reply = await read_response_after_body(client)
            assert held_at < 24 * 1024 * 1024, f"{held_at} bytes went out before back-pressure held the client"
            assert peak < 8 * 1024 * 1024, f"the proxy held {peak} bytes of Python memory for the body"
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"got it"), reply[:200]
            assert received == BODY_BYTES
    finally:
        tracemalloc.stop()


async def read_response_after_body(client: anyio.abc.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"got it"):
        data += await client.receive()
    return data

