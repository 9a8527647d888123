"""Per-stream protocol state without sockets: requests in, feedback and planned responses out."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane.snapshot import ResponseCache, Snapshot, build_snapshot
from controlplane.xds import DeltaStream, RequestRejected, SotwStream, SyncState
from controlplane.xds.records import FeedbackKind, Outgoing, node_identity
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TYPE_ORDER

GW = "ns/gw"


def snap(*backends: str, routes: dict[str, str] | None = None) -> Snapshot:
    return build_snapshot(GW, {
        BACKEND: {b: pb.Backend(name=b) for b in backends},
        LISTENER: {"l": pb.Listener(name="l", port=80)},
        ROUTE: {r: pb.Route(name=r, listeners=["l"], backends=[pb.BackendRef(backend=b)])
                for r, b in (routes or {}).items()},
    })


def sotw_request(type_url: str, names: tuple[str, ...] = (), nonce: str = "", version: str = "",
                 error: str | None = None) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce,
                                             version_info=version)
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def decode(outgoing: Outgoing) -> discovery_pb2.DiscoveryResponse:
    response = discovery_pb2.DiscoveryResponse.FromString(outgoing.data)
    assert (response.nonce, response.version_info, response.type_url) == (
        outgoing.nonce, outgoing.version, outgoing.type_url)
    return response


def test_sotw_ack_stale_and_nack_parking() -> None:
    stream, responses = SotwStream("n", GW), ResponseCache()
    assert stream.handle(sotw_request(BACKEND), 0.0, 0.0).kind is FeedbackKind.SUBSCRIBE
    v1 = snap("b1")
    [first] = stream.plan(v1, responses, 1.0)
    assert decode(first).version_info == v1.type_version(BACKEND)
    ack = stream.handle(sotw_request(BACKEND, nonce=first.nonce, version=first.version), 1.5, 0.0)
    assert (ack.kind, ack.version, ack.latency) == (FeedbackKind.ACK, first.version, 0.5)
    assert stream.plan(v1, responses, 2.0) == []  # nothing changed: nothing sent

    v2 = snap("b1", "b2")
    [second] = stream.plan(v2, responses, 3.0)
    stale = stream.handle(sotw_request(BACKEND, ("b1",), nonce=first.nonce), 3.1, 0.0)
    assert stale.kind is FeedbackKind.STALE and not stream.dirty
    nack = stream.handle(sotw_request(BACKEND, nonce=second.nonce, version=first.version, error="no"), 3.2, 42.0)
    assert nack.kind is FeedbackKind.NACK and nack.nack is not None
    assert (nack.nack.version, nack.nack.message, nack.nack.at) == (second.version, "no", 42.0)
    [status] = stream.status(v2)
    assert status.state is SyncState.NACKED and status.acked_version == first.version
    assert stream.plan(v2, responses, 4.0) == []  # parked: the NACKed version is not re-sent

    [third] = stream.plan(snap("b1", "b3"), responses, 5.0)
    assert [r.type_url for r in decode(third).resources] == [BACKEND, BACKEND]
    assert stream.status(None)[0].state is SyncState.STALE


def test_sotw_reconnect_claims_map_back_through_history() -> None:
    old, new = snap("b1", "b2", routes={"r": "b2"}), snap("b1", "b3", routes={"r": "b3"})
    stream = SotwStream("n", GW)
    for type_url in (BACKEND, ROUTE, LISTENER):
        stream.handle(sotw_request(type_url, version=old.type_version(type_url)), 0.0, 0.0)
    pushes = [(o.type_url, len(decode(o).resources)) for o in stream.plan(new, ResponseCache(), 1.0, (new, old))]
    # Backend keeps b2 while the held Route uses it; the unchanged Listener is not re-sent.
    assert pushes == [(BACKEND, 3), (ROUTE, 1), (BACKEND, 2)]


def test_reconnecting_streams_hold_pushes_until_every_type_is_requested() -> None:
    fresh = SotwStream("n", GW, reconnect_window=1.0)
    fresh.handle(sotw_request(BACKEND), 10.0, 0.0)
    assert fresh.hold_until() is None

    back = SotwStream("n", GW, reconnect_window=1.0)
    back.handle(sotw_request(BACKEND, version="v-old"), 10.0, 0.0)
    assert back.hold_until() == 11.0
    for type_url in TYPE_ORDER[1:]:
        back.handle(sotw_request(type_url, version="v-old"), 10.1, 0.0)
    assert back.hold_until() is None

    delta = DeltaStream("n", GW, reconnect_window=1.0)
    delta.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, initial_resource_versions={"b1": "x"}), 5, 0)
    assert delta.hold_until() == 6.0


def test_delta_nack_reverts_what_the_client_holds_and_parks_the_version() -> None:
    stream, responses = DeltaStream("n", GW), ResponseCache()
    stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND), 0.0, 0.0)
    [first] = stream.plan(snap("b1"), responses, 0.0)
    stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, response_nonce=first.nonce), 0.0, 0.0)
    rejected = snap("b1", "b2")
    [second] = stream.plan(rejected, responses, 1.0)
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, response_nonce=second.nonce)
    request.error_detail.message = "b2 is bad"
    assert stream.handle(request, 1.0, 0.0).kind is FeedbackKind.NACK
    assert stream.plan(rejected, responses, 2.0) == []
    [third] = stream.plan(snap("b1", "b2", "b3"), responses, 3.0)
    response = discovery_pb2.DeltaDiscoveryResponse.FromString(third.data)
    assert [r.name for r in response.resources] == ["b2", "b3"]  # b2 was never accepted: sent again


def test_delta_unsubscribing_the_wildcard_forgets_unnamed_resources() -> None:
    stream, responses = DeltaStream("n", GW), ResponseCache()
    stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, resource_names_subscribe=["*", "b1"]), 0, 0)
    [first] = stream.plan(snap("b1", "b2"), responses, 0.0)
    assert [r.name for r in discovery_pb2.DeltaDiscoveryResponse.FromString(first.data).resources] == ["b1", "b2"]
    stream.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, resource_names_unsubscribe=["*"],
                                                      response_nonce=first.nonce), 0.0, 0.0)
    assert stream.types[BACKEND].known.keys() == {"b1"}
    assert stream.plan(snap("b1", "b2", "b3"), responses, 1.0) == []  # b3 is not wanted any more
    assert list(stream.status(None)[0].subscribed) == ["b1"]


def test_unknown_type_url_is_rejected() -> None:
    with pytest.raises(RequestRejected, match="unknown type_url 'x'"):
        SotwStream("n", GW).handle(sotw_request("x"), 0.0, 0.0)
    with pytest.raises(RequestRejected, match="unknown type_url ''"):
        DeltaStream("n", GW).handle(discovery_pb2.DeltaDiscoveryRequest(), 0.0, 0.0)


@pytest.mark.parametrize(
    ("gateway", "error"),
    [("ns/gw", None), ("gw", "expected"), ("ns/", "expected"), ("a/b/c", "expected"), (None, "missing")],
)
def test_node_identity(gateway: str | None, error: str | None) -> None:
    metadata = struct_pb2.Struct()
    if gateway is not None:
        metadata.update({"gateway": gateway})
    node = base_pb2.Node(id="proxy", metadata=metadata)
    if error is None:
        assert node_identity(node, present=True) == ("proxy", gateway)
    else:
        with pytest.raises(RequestRejected, match=error):
            node_identity(node, present=True)
