"""ADS client of a proxy worker: subscribes to its Gateway's config, applies, ACKs or NACKs.

Each response becomes a candidate view of all types (state.py); the worker's apply
callback compiles and swaps it as one unit. If apply raises, the response is NACKed
with the error text (naming the rejected resource) and the last good config keeps
serving. The stream reconnects with capped, jittered exponential backoff; the proxy
keeps serving while the control plane is away. How the channel is secured and which token
the stream presents (read again at each reconnect) is the `XdsTransport`'s (channel.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from dataplane.metrics import WorkerMetrics
from dataplane.xds.channel import XdsCredentialsError, XdsTransport
from dataplane.xds.state import Candidate, ResponseRejected, SubscriptionState
from shared.logging import get_logger
from shared.resources import GATEWAY_METADATA_KEY, TYPE_ORDER, short_name

log = get_logger("dataplane.xds")

ApplyConfig = Callable[[dict[str, dict[str, Message]], str], Awaitable[None]]
"""Compile and swap a whole config (resources by type, config version); raise to reject it."""

_INVALID_ARGUMENT = 3


@dataclass(frozen=True)
class AdsSettings:
    target: str
    gateway: str
    node_id: str
    mode: Literal["delta", "sotw"] = "delta"
    backoff_initial: float = 0.2
    backoff_max: float = 10.0


class AdsClient:
    """One long-lived ADS subscription; `run()` never returns until cancelled."""

    def __init__(
        self,
        settings: AdsSettings,
        apply: ApplyConfig,
        metrics: WorkerMetrics | None = None,
        *,
        transport: XdsTransport | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport or XdsTransport(settings.target)
        self._apply = apply
        self._metrics = metrics or WorkerMetrics()
        self.state = SubscriptionState()
        self.connected = False
        self.last_nack: dict[str, str] = {}
        self.config_version = ""
        self.on_update: Callable[[], None] | None = None
        self._node = self._make_node()

    def _make_node(self) -> base_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update({GATEWAY_METADATA_KEY: self.settings.gateway})
        return base_pb2.Node(id=self.settings.node_id, cluster=self.settings.gateway, metadata=metadata)

    async def run(self) -> None:
        delay = self.settings.backoff_initial
        while True:
            self._metrics.xds_reconnects.inc()
            try:
                metadata = self.transport.stream_metadata()  # the token as the file holds it now
                async with self.transport.channel() as channel:
                    await self._run_stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), metadata)
                reason = "stream closed by the control plane"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except XdsCredentialsError as exc:
                reason = str(exc)
            finally:
                was_connected = self.connected  # a response arrived on this stream
                self.connected = False
                self._metrics.xds_connected.set(0)
            if was_connected:
                delay = self.settings.backoff_initial
            log.warning("xds stream ended", target=self.settings.target, reason=reason, retry_in=round(delay, 3))
            await anyio.sleep(delay * random.uniform(0.8, 1.2))  # backoff pacing, not a wait for a condition
            delay = min(delay * 2, self.settings.backoff_max)

    def _mark_connected(self) -> None:
        if not self.connected:
            self.connected = True
            self._metrics.xds_connected.set(1)
            settings = self.settings
            log.info("xds stream up", target=settings.target, gateway=settings.gateway, mode=settings.mode)

    async def _apply_candidate(self, candidate: Candidate) -> str | None:
        """Apply a candidate; return None on success or the rejection text."""
        version = candidate.config_version(self.state.types)
        try:
            await self._apply(self.state.resources(candidate), version)
        except Exception as exc:  # any rejection becomes a NACK; the old config stays
            return str(exc) or type(exc).__name__
        self.state.commit(candidate)
        self.config_version = version
        return None

    def _record(self, type_url: str, version: str, error: str | None) -> None:
        kind = short_name(type_url)
        if error is None:
            self.last_nack.pop(type_url, None)
            self._metrics.xds_updates.labels(kind, "ack").inc()
            log.info("config applied", type=kind, version=version, config_version=self.config_version)
        else:
            self.last_nack[type_url] = error
            self._metrics.xds_updates.labels(kind, "nack").inc()
            log.warning("config rejected", type=kind, version=version, error=error)
        if self.on_update is not None:
            self.on_update()

    # --- the stream ----------------------------------------------------------------------
    # Both flavours share one loop: subscribe to every type, then for each response build
    # a candidate, apply it, and answer with an ACK or a NACK carrying the error text.

    def _subscribe_requests(self) -> list[discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest]:
        requests: list[discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest] = []
        for index, type_url in enumerate(TYPE_ORDER):
            node = self._node if index == 0 else None  # the node travels on the first request only
            if self.settings.mode == "delta":
                requests.append(discovery_pb2.DeltaDiscoveryRequest(
                    node=node, type_url=type_url, resource_names_subscribe=["*"],
                    initial_resource_versions=self.state.initial_versions(type_url),
                ))
            else:
                requests.append(discovery_pb2.DiscoveryRequest(
                    node=node, type_url=type_url, version_info=self.state.types[type_url].version,
                ))
        return requests

    def _candidate(self, response: discovery_pb2.DeltaDiscoveryResponse | discovery_pb2.DiscoveryResponse) -> Candidate:
        if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
            return self.state.candidate_from_delta(response)
        return self.state.candidate_from_sotw(response)

    def _reply(
        self, response: discovery_pb2.DeltaDiscoveryResponse | discovery_pb2.DiscoveryResponse, error: str | None
    ) -> discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest:
        request: discovery_pb2.DeltaDiscoveryRequest | discovery_pb2.DiscoveryRequest
        if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
            request = discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
        else:
            # SotW: version_info is the last version accepted for the type (unchanged on a NACK).
            request = discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                response_nonce=response.nonce,
                version_info=self.state.types[response.type_url].version,
            )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=error))
        return request

    async def _run_stream(
        self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> None:
        delta = self.settings.mode == "delta"
        call = (
            stub.DeltaAggregatedResources(metadata=metadata) if delta
            else stub.StreamAggregatedResources(metadata=metadata)
        )
        first, *rest = self._subscribe_requests()
        await self._write(call, first)
        # The control plane sends the stream's headers once it has accepted the proxy (its token and the
        # Gateway the first request names). Writing the other subscriptions only then means a refusal
        # is read with its own status: a write racing the server's end of the stream turns the status
        # into INTERNAL "Internal error from Core" (grpc/grpc#36066).
        await call.initial_metadata()
        if call.done():
            raise await _final_status(call)
        for request in rest:
            await self._write(call, request)
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._mark_connected()
            try:
                candidate = self._candidate(response)
            except ResponseRejected as exc:
                error: str | None = str(exc)
            else:
                error = await self._apply_candidate(candidate)
            version = response.system_version_info if delta else response.version_info
            self._record(response.type_url, version, error)
            await self._write(call, self._reply(response, error))

    @staticmethod
    async def _write(call: grpc.aio.StreamStreamCall, request: Message) -> None:
        """Write, or raise the stream's own status if the control plane has already ended it."""
        try:
            await call.write(request)
        except asyncio.InvalidStateError:  # grpc.aio: "RPC already finished"
            raise await _final_status(call) from None


async def _final_status(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """The status an ended stream finished with, as the error `AdsClient.run` reports."""
    return grpc.aio.AioRpcError(
        await call.code(), grpc.aio.Metadata(), await call.trailing_metadata() or grpc.aio.Metadata(),
        details=await call.details(),
    )
