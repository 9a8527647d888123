"""The worker's side of key rotation: ask the control plane to refetch a JWKS URL.

A token whose ``kid`` no key has may be signed by a key the provider just rotated in. The worker
never calls the provider itself; it asks the control plane (`KeyService.RefreshJwks`), which fetches
(coalesced and throttled across all workers) and, if the keys changed, publishes a new snapshot.
The answer to the token in hand stays 401; tokens after the new snapshot verify.

`JwksRefreshClient.request` is synchronous and never waits, so it can be the `needs_refresh`
callback of `dataplane.policy.jwt.JwksRefreshGate` on the request path: it records the URL and wakes
`run`, the task that makes the calls. Failures (control plane down) are logged and dropped; the gate
lets the next unknown kid ask again after its interval.

Wiring::

    client = JwksRefreshClient(xds_address)
    gate = JwksRefreshGate(client.request)   # one per worker, passed to compile_authn
    task_group.start_soon(client.run)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

import anyio
import grpc
from anyio.abc import TaskStatus

from shared.api.agentgate.policy.v1 import keys_pb2, keys_pb2_grpc
from shared.logging import get_logger

log = get_logger("dataplane.policy.jwks_refresh")

DEFAULT_CALL_TIMEOUT: Final = 10.0
# URLs waiting for a call; more are dropped (the gate asks again later).
MAX_PENDING: Final = 64


class JwksRefreshClient:
    """Sends RefreshJwks calls to the control plane at `target` ("host:port", its gRPC address)."""

    def __init__(
        self,
        target: str,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        channel: Callable[[], grpc.aio.Channel] | None = None,
    ) -> None:
        self.target = target
        # Opens the channel (the worker's adds TLS and its xDS token); default: plaintext to `target`.
        self._open_channel = channel or partial(grpc.aio.insecure_channel, target)
        self.call_timeout = call_timeout
        self._pending: dict[str, None] = {}
        self._wake: anyio.Event | None = None
        self._stub: keys_pb2_grpc.KeyServiceStub | None = None

    def request(self, url: str) -> None:
        """Ask for a refresh of `url` soon (call from the event loop's thread; never blocks)."""
        if url in self._pending or len(self._pending) >= MAX_PENDING:
            return
        self._pending[url] = None
        wake = self._wake
        if wake is not None:
            wake.set()

    async def refresh(self, url: str) -> keys_pb2.RefreshJwksResponse:
        """One RefreshJwks call now (while `run` is running). Raises grpc.aio.AioRpcError:
        NOT_FOUND for a URL no Policy names, UNAVAILABLE when the control plane is down."""
        stub = self._stub
        if stub is None:
            raise RuntimeError("JwksRefreshClient.run is not running")
        return await stub.RefreshJwks(keys_pb2.RefreshJwksRequest(url=url), timeout=self.call_timeout)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send requested refreshes until cancelled (one at a time, in request order)."""
        async with self._open_channel() as channel:
            self._stub = keys_pb2_grpc.KeyServiceStub(channel)
            task_status.started()
            try:
                while True:
                    if not self._pending:
                        self._wake = anyio.Event()
                        await self._wake.wait()
                        continue
                    url = next(iter(self._pending))
                    del self._pending[url]
                    try:
                        response = await self.refresh(url)
                    except grpc.aio.AioRpcError as exc:
                        log.warning("jwks refresh request failed", url=url, code=exc.code().name, detail=exc.details())
                        continue
                    log.info("jwks refresh requested", url=url, refreshed=response.refreshed, error=response.error)
            finally:
                self._stub = None
                self._wake = None


__all__ = ["JwksRefreshClient"]
