"""agentgate.debug.v1.DebugService: what each proxy holds, and what the control plane serves.

Operators reach it with `grpcurl -plaintext HOST:PORT agentgate.debug.v1.DebugService/ListProxies`;
NACKs show here with the proxy's own error text, so a rejected config is never silent.
"""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.snapshot import SnapshotCache
from controlplane.xds.proxies import ConnectedProxies, ProxyConnection
from controlplane.xds.records import NackRecord
from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.resources import TYPE_ORDER

_TYPE_RANK = {type_url: index for index, type_url in enumerate(TYPE_ORDER)}


def _timestamp(unix_time: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix_time * 1e9))
    return stamp


def nack_message(nack: NackRecord) -> debug_pb2.NackRecord:
    return debug_pb2.NackRecord(
        node_id=nack.node_id, gateway=nack.gateway, type_url=nack.type_url, version=nack.version,
        nonce=nack.nonce, code=nack.code, message=nack.message, at=_timestamp(nack.at),
    )


class DebugService(debug_pb2_grpc.DebugServiceServicer):
    def __init__(self, cache: SnapshotCache, proxies: ConnectedProxies) -> None:
        self._cache = cache
        self._proxies = proxies

    def _proxy_status(self, connection: ProxyConnection) -> debug_pb2.ProxyStatus:
        current = self._cache.get_snapshot(connection.gateway)
        status = debug_pb2.ProxyStatus(
            node_id=connection.node_id, gateway=connection.gateway, stream_kind=connection.kind,
            peer=connection.peer, connected_at=_timestamp(connection.connected_at),
            snapshot_version=current.version if current is not None else "",
        )
        for type_status in sorted(connection.state.status(current), key=lambda t: _TYPE_RANK[t.type_url]):
            entry = status.types.add(
                type_url=type_status.type_url, sent_version=type_status.sent_version,
                acked_version=type_status.acked_version, state=type_status.state.value,
                subscribed=type_status.subscribed,
            )
            if type_status.last_nack is not None:
                entry.last_nack.CopyFrom(nack_message(type_status.last_nack))
        return status

    async def ListProxies(
        self, request: debug_pb2.ListProxiesRequest, context: grpc.aio.ServicerContext
    ) -> debug_pb2.ListProxiesResponse:
        return debug_pb2.ListProxiesResponse(
            proxies=[self._proxy_status(c) for c in self._proxies.connections(request.gateway)],
            recent_nacks=[nack_message(n) for n in self._proxies.recent_nacks(request.gateway)],
        )

    async def ListSnapshots(
        self, request: debug_pb2.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> debug_pb2.ListSnapshotsResponse:
        response = debug_pb2.ListSnapshotsResponse()
        for snapshot in self._cache.snapshots():
            if request.gateway and snapshot.gateway != request.gateway:
                continue
            entry = response.snapshots.add(gateway=snapshot.gateway, version=snapshot.version)
            for type_url in TYPE_ORDER:
                resources = snapshot.resources(type_url)
                entry.types.add(
                    type_url=type_url,
                    resources=[debug_pb2.ResourceVersion(name=r.name, version=r.version) for r in resources.values()],
                )
        return response
