"""`agentgate status`: the control plane's debug view of its proxies (like istioctl proxy-status)."""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.resources import TYPE_ORDER, short_name


async def print_status(target: str, gateway: str = "", as_json: bool = False) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = debug_pb2_grpc.DebugServiceStub(channel)
        try:
            reply = await stub.ListProxies(debug_pb2.ListProxiesRequest(gateway=gateway), timeout=5)
        except grpc.aio.AioRpcError as exc:
            print(f"agentgate status: cannot reach the control plane at {target}: {exc.details()}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(MessageToDict(reply), indent=2))
        return 0
    print(f"{'PROXY':40} {'GATEWAY':28} {'STREAM':6} " + " ".join(f"{short_name(t):>10}" for t in TYPE_ORDER))
    for proxy in reply.proxies:
        states = {t.type_url: t.state for t in proxy.types}
        row = " ".join(f"{states.get(t, '-'):>10}" for t in TYPE_ORDER)
        print(f"{proxy.node_id:40} {proxy.gateway:28} {proxy.stream_kind:6} {row}")
        print("  " + _versions(proxy))
        for t in proxy.types:
            if t.last_nack.message:
                print(f"  NACK {short_name(t.type_url)} version {t.last_nack.version}: {t.last_nack.message}")
    for nack in reply.recent_nacks:
        print(f"recent NACK from {nack.node_id} ({nack.gateway}) {short_name(nack.type_url)}: {nack.message}")
    return 0


def _versions(proxy: debug_pb2.ProxyStatus) -> str:
    """The config versions a proxy acked, against the snapshot: one figure when every type acked it."""
    acked = {short_name(t.type_url): t.acked_version or "-" for t in proxy.types}
    snapshot = proxy.snapshot_version or "-"
    if acked and all(version == snapshot for version in acked.values()):
        return f"snapshot {snapshot}, acked by every type"
    listed = " ".join(f"{name}={version}" for name, version in acked.items())
    return f"snapshot {snapshot}, acked {listed or 'nothing yet'}"
