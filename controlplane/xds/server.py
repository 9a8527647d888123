"""The ADS gRPC service: a thin shell that feeds requests and snapshot changes to the
per-stream protocol states (sotw.py, delta.py) and writes the bytes they plan.

Responses are pre-serialized and shared between streams (controlplane.snapshot.responses),
so the methods are registered with an identity response serializer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import grpc
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from envoy.service.discovery.v3 import ads_pb2, discovery_pb2

from controlplane.metrics import XdsMetrics
from controlplane.snapshot import Snapshot, SnapshotCache
from controlplane.xds.delta import DeltaStream
from controlplane.xds.proxies import ConnectedProxies, ProxyConnection
from controlplane.xds.records import Feedback, FeedbackKind, RequestRejected, node_identity
from controlplane.xds.sotw import SotwStream
from controlplane.xds.stream import DEFAULT_RECONNECT_WINDOW, AdsStream
from controlplane.xds_auth import ProxyIdentity, Reason, XdsAuthenticator, XdsAuthRefused
from shared.logging import get_logger
from shared.resources import short_name

log = get_logger("controlplane.xds")

# Importing ads_pb2 also registers the service's descriptor, which reflection serves.
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name

# Requests a stream buffers before reading from the client pauses (gRPC flow control then applies).
_REQUEST_BUFFER = 64


class _ClientDone:
    """The client half-closed its side of the stream."""


class _SnapshotChanged:
    pass


_CLIENT_DONE = _ClientDone()
_SNAPSHOT_CHANGED = _SnapshotChanged()

_Event = Any  # a decoded request, _CLIENT_DONE or _SNAPSHOT_CHANGED


def _identity(data: bytes) -> bytes:
    return data


class AdsServer:
    """StreamAggregatedResources (SotW) and DeltaAggregatedResources over one SnapshotCache.

    With `auth`, a stream must carry a valid token and its first request may only name a Gateway
    its identity is allowed (both checked before anything is sent), and it ends when the token
    expires or a periodic review refuses it (controlplane.xds_auth).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: XdsMetrics,
        proxies: ConnectedProxies | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reconnect_window: float = DEFAULT_RECONNECT_WINDOW,
        auth: XdsAuthenticator | None = None,
    ) -> None:
        self.cache = cache
        self.auth = auth
        self.metrics = metrics
        self.proxies = proxies or ConnectedProxies()
        self._reconnect_window = reconnect_window
        self._clock = clock
        self._wall_clock = wall_clock
        self._scopes: set[anyio.CancelScope] = set()
        self._closing = False

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_aggregated_resources,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.delta_aggregated_resources,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )

    async def stream_aggregated_resources(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(SotwStream, requests, context)

    async def delta_aggregated_resources(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(DeltaStream, requests, context)

    async def close(self) -> None:
        """End every stream (UNAVAILABLE, so proxies reconnect elsewhere) and refuse new ones."""
        self._closing = True
        for scope in list(self._scopes):
            scope.cancel()

    async def _serve(
        self,
        new_stream: type[AdsStream],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane is shutting down")
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        rejected: RequestRejected | XdsAuthRefused | None = None
        try:
            with scope:
                rejected = await self._open(new_stream, requests, context)
        finally:
            self._scopes.discard(scope)
        if isinstance(rejected, XdsAuthRefused):
            await context.abort(rejected.code, rejected.message)
        if rejected is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(rejected))
        if scope.cancel_called:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("control plane is shutting down")

    async def _serve_authenticated(
        self,
        stream: AdsStream,
        first: Any,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        identity: ProxyIdentity,
        token: str,
    ) -> RequestRejected | XdsAuthRefused | None:
        """`_attach` for an authenticated proxy, ended early when its credentials stop being valid."""
        ended: list[XdsAuthRefused] = []
        outcome: RequestRejected | XdsAuthRefused | None = None
        stream_scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guard_credentials, identity, token, context.peer(), stream_scope, ended)
            with stream_scope:
                outcome = await self._attach(stream, first, requests, context, identity)
            tg.cancel_scope.cancel()
        return ended[0] if ended else outcome

    async def _guard_credentials(
        self,
        identity: ProxyIdentity,
        token: str,
        peer: str,
        stream_scope: anyio.CancelScope,
        ended: list[XdsAuthRefused],
    ) -> None:
        """Cancel `stream_scope` at the token's expiry, or when a periodic review refuses it.

        A review the API cannot answer keeps the stream (until expiry): the proxy keeps its config.
        """
        auth = self.auth
        assert auth is not None
        expires_at = identity.expires_at
        while True:
            wait = auth.recheck_interval
            if expires_at is not None:
                wait = min(wait, expires_at - auth.clock())
            if wait > 0:
                await anyio.sleep(wait)  # a timer: the token's lifetime or the review period
            if expires_at is not None and auth.clock() >= expires_at:
                refused = XdsAuthRefused(
                    grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_EXPIRED,
                    "token expired: reconnect with the current token (the kubelet rotates projected tokens)",
                )
            else:
                try:
                    await auth.review(token)
                    continue
                except XdsAuthRefused as exc:
                    if exc.reason is Reason.REVIEW_UNAVAILABLE:
                        log.warning("xds token recheck failed; stream kept", identity=identity.username,
                                    error=exc.message)
                        continue
                    refused = exc
            auth.refuse(refused, service="ads", peer=peer, identity=identity.username)
            ended.append(refused)
            stream_scope.cancel()
            return

    async def _open(
        self,
        new_stream: type[AdsStream],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> RequestRejected | XdsAuthRefused | None:
        """Identify the proxy from its first request (with `auth`: check its token and that it may
        serve that Gateway), accept it by sending the stream's headers, then serve it until the
        stream ends.

        Refusals come after the first request was read and before the headers: a client that waits
        for the headers before writing more reads the refusal's status, not a failed write's.
        """
        first = await anext(aiter(requests), None)
        if first is None:
            return None
        peer = context.peer()
        try:
            node_id, gateway = node_identity(first.node, present=first.HasField("node"))
        except RequestRejected as exc:
            log.warning("xds stream refused", peer=peer, reason=str(exc))
            return exc
        stream = new_stream(node_id, gateway, reconnect_window=self._reconnect_window)
        if self.auth is None:
            await context.send_initial_metadata(())
            return await self._attach(stream, first, requests, context)
        try:
            identity, token = await self.auth.authenticate(
                context.invocation_metadata(), service="ads", peer=peer, node=node_id, gateway=gateway
            )
            self.auth.authorize_gateway(identity, gateway, peer=peer, node_id=node_id)
        except XdsAuthRefused as refused:
            return refused
        await context.send_initial_metadata(())
        return await self._serve_authenticated(stream, first, requests, context, identity, token)

    async def _attach(
        self,
        stream: AdsStream,
        first: Any,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        identity: ProxyIdentity | None = None,
    ) -> RequestRejected | None:
        """Register an accepted stream and serve it until it ends."""
        node_id, gateway = stream.node_id, stream.gateway
        connection = ProxyConnection(stream, context.peer(), self._wall_clock())
        self.proxies.add(connection)
        self.metrics.connected_proxies.labels(stream.kind).inc()
        log.info("xds stream opened", node=node_id, gateway=gateway, stream=stream.kind, peer=connection.peer,
                 identity=identity.username if identity is not None else "")
        try:
            return await self._exchange(stream, connection, first, requests, context)
        finally:
            self.proxies.remove(connection)
            self.metrics.connected_proxies.labels(stream.kind).dec()
            log.info("xds stream closed", node=node_id, gateway=gateway, stream=stream.kind)

    async def _exchange(
        self,
        stream: AdsStream,
        connection: ProxyConnection,
        first: Any,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> RequestRejected | None:
        send, receive = anyio.create_memory_object_stream[_Event](_REQUEST_BUFFER)
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(self._read_requests, requests, send.clone())
            tg.start_soon(self._watch_snapshots, stream.gateway, send)
            try:
                await self._run(stream, connection, first, receive, context)
            except RequestRejected as exc:
                return exc
            finally:
                tg.cancel_scope.cancel()
        return None

    async def _run(
        self,
        stream: AdsStream,
        connection: ProxyConnection,
        first: Any,
        events: ObjectReceiveStream[_Event],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Handle every queued event, then plan once against the newest snapshot, then wait."""
        batch: list[_Event] = [first]
        while True:
            for event in batch:
                if event is _CLIENT_DONE:
                    return
                if event is not _SNAPSHOT_CHANGED:
                    connection.requests += 1
                    self._record(stream.handle(event, self._clock(), self._wall_clock()))
            snapshot = self.cache.get_snapshot(stream.gateway)
            wait: float | None = None
            if snapshot is not None and (stream.dirty or snapshot is not stream.planned):
                now = self._clock()
                hold_until = stream.hold_until()
                if hold_until is not None and now < hold_until:
                    wait = hold_until - now  # a reconnecting client is still subscribing
                else:
                    history = self.cache.history(stream.gateway)
                    for outgoing in stream.plan(snapshot, self.cache.responses, now, history):
                        # Shielded: a write cut short by shutdown leaves its send operation
                        # in flight, and gRPC then refuses to send the final status.
                        with anyio.CancelScope(shield=True):
                            await context.write(outgoing.data)
                        self.metrics.pushed(outgoing.type_url)
            self.proxies.changed()
            batch = []
            with anyio.move_on_after(wait):
                batch.append(await events.receive())
            while True:
                try:
                    batch.append(events.receive_nowait())
                except anyio.WouldBlock:
                    break

    def _record(self, feedback: Feedback) -> None:
        if feedback.kind is FeedbackKind.ACK:
            self.metrics.acked(feedback.type_url, feedback.latency)
        elif feedback.kind is FeedbackKind.NACK and feedback.nack is not None:
            nack = feedback.nack
            self.metrics.nacked(feedback.type_url)
            log.warning(
                "xds nack", node=nack.node_id, gateway=nack.gateway, type=short_name(nack.type_url),
                version=nack.version, nonce=nack.nonce, code=nack.code, message=nack.message,
            )

    @staticmethod
    async def _read_requests(requests: AsyncIterator[Any], send: ObjectSendStream[_Event]) -> None:
        async with send:
            async for request in requests:
                await send.send(request)
            await send.send(_CLIENT_DONE)

    async def _watch_snapshots(self, gateway: str, send: ObjectSendStream[_Event]) -> None:
        async with send:
            # Start from None: a snapshot published before this task ran still wakes the stream
            # (the stream skips planning for a snapshot it has already planned).
            seen: Snapshot | None = None
            while True:
                seen = await self.cache.wait_for_change(gateway, seen)
                await send.send(_SNAPSHOT_CHANGED)
