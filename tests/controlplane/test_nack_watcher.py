"""NackWatcher over the xDS server's real per-stream state (SotwStream in ConnectedProxies, no
sockets): each NACK reported once with the resources it names, and per-Gateway rejections that
last while the proxy rejects the current config and clear when it takes a newer one."""

from __future__ import annotations

from controlplane.snapshot import ResponseCache, SnapshotCache
from controlplane.status import NackWatcher, Rejection
from controlplane.xds import SotwStream
from controlplane.xds.proxies import ConnectedProxies, ProxyConnection
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import LISTENER
from tests.controlplane.test_xds_streams import sotw_request

GW = "ns/gw"


def listeners(*ports: int) -> dict[str, dict[str, pb.Listener]]:
    return {LISTENER: {f"{GW}/l{port}": pb.Listener(name=f"{GW}/l{port}", gateway=GW, port=port) for port in ports}}


def test_nacks_are_reported_once_and_rejections_follow_the_stream() -> None:
    cache, proxies, responses = SnapshotCache(), ConnectedProxies(), ResponseCache()
    nacks: list[Rejection] = []
    rejections: list[dict[str, str]] = []
    watcher = NackWatcher(proxies, cache, nacks.append, rejections.append)
    stream = SotwStream("proxy-1", GW)
    proxies.add(ProxyConnection(stream, "ipv4:127.0.0.1:1", 0.0))
    stream.handle(sotw_request(LISTENER), 0.0, 0.0)
    snapshot = cache.set_snapshot(GW, listeners(80, 81))
    [sent] = stream.plan(snapshot, responses, 1.0)
    assert watcher.scan() is False and nacks == []

    stream.handle(sotw_request(LISTENER, nonce=sent.nonce, error=f"Listener {GW}/l81: port 81 in use"), 2.0, 50.0)
    assert watcher.scan() is True
    [rejection] = nacks
    assert rejection.resource_names == (f"{GW}/l81",)  # the one the error names
    assert rejection.aggregation_key == (GW, "proxy-1", LISTENER, f"Listener {GW}/l81: port 81 in use")
    described = rejection.describe()
    assert "proxy proxy-1 rejected Listener version" in described and LISTENER in described
    assert rejections[-1] == {GW: f"Proxies reject the current config: {described}"}
    assert watcher.scan() is False  # nothing new: no second report

    fixed = cache.set_snapshot(GW, listeners(80))
    [resent] = stream.plan(fixed, responses, 3.0)
    stream.handle(sotw_request(LISTENER, nonce=resent.nonce, version=resent.version), 3.5, 51.0)
    assert watcher.scan() is True
    assert rejections[-1] == {} and len(nacks) == 1
