"""The proxy's accepted-state bookkeeping: responses become candidates; only commits change state."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from dataplane.xds.state import ResponseRejected, SubscriptionState
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, pack


def backend(name: str) -> pb.Backend:
    return pb.Backend(name=name, http=pb.HttpBackend())


def sotw(type_url: str, version: str, *messages) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url, version_info=version, nonce=f"n-{version}", resources=[pack(m) for m in messages]
    )


def delta(type_url: str, upserts=(), removed=()) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce="n",
        resources=[discovery_pb2.Resource(name=m.name, version=f"v-{m.name}", resource=pack(m)) for m in upserts],
        removed_resources=list(removed),
    )


def test_sotw_response_replaces_the_whole_type_only_after_commit() -> None:
    state = SubscriptionState()
    first = state.candidate_from_sotw(sotw(BACKEND, "1", backend("ns/a"), backend("ns/b")))
    assert state.resources()[BACKEND] == {}
    assert set(state.resources(first)[BACKEND]) == {"ns/a", "ns/b"}
    state.commit(first)
    second = state.candidate_from_sotw(sotw(BACKEND, "2", backend("ns/b")))
    assert set(state.resources(second)[BACKEND]) == {"ns/b"}
    assert set(state.resources()[BACKEND]) == {"ns/a", "ns/b"}, "an uncommitted candidate must not change state"
    assert state.types[BACKEND].version == "1"


def test_delta_upserts_and_removals_apply_to_the_accepted_set() -> None:
    state = SubscriptionState()
    state.commit(state.candidate_from_delta(delta(BACKEND, [backend("ns/a"), backend("ns/b")])))
    candidate = state.candidate_from_delta(delta(BACKEND, [backend("ns/c")], removed=["ns/a", "ns/unknown"]))
    assert set(state.resources(candidate)[BACKEND]) == {"ns/b", "ns/c"}
    state.commit(candidate)
    assert state.initial_versions(BACKEND) == {"ns/b": "v-ns/b", "ns/c": "v-ns/c"}


def test_wrong_type_inside_any_is_rejected_naming_the_index() -> None:
    state = SubscriptionState()
    response = sotw(BACKEND, "1")
    response.resources.append(pack(pb.Listener(name="ns/gw/http")))
    with pytest.raises(ResponseRejected, match=r"Backend resources\[0\]"):
        state.candidate_from_sotw(response)


def test_duplicate_and_nameless_resources_are_rejected() -> None:
    state = SubscriptionState()
    with pytest.raises(ResponseRejected, match="sent twice"):
        state.candidate_from_sotw(sotw(BACKEND, "1", backend("ns/a"), backend("ns/a")))
    with pytest.raises(ResponseRejected, match="name is empty"):
        state.candidate_from_sotw(sotw(BACKEND, "1", pb.Backend()))


def test_delta_name_must_match_body() -> None:
    state = SubscriptionState()
    response = delta(BACKEND, [backend("ns/a")])
    response.resources[0].name = "ns/other"
    with pytest.raises(ResponseRejected, match="does not match"):
        state.candidate_from_delta(response)


def test_unsubscribed_type_is_rejected() -> None:
    state = SubscriptionState(type_urls=(LISTENER,))
    with pytest.raises(ResponseRejected, match="unsubscribed"):
        state.candidate_from_sotw(sotw(BACKEND, "1"))


def test_config_version_changes_with_any_type_version() -> None:
    state = SubscriptionState()
    a = state.candidate_from_sotw(sotw(BACKEND, "1"))
    b = state.candidate_from_sotw(sotw(BACKEND, "2"))
    assert a.config_version(state.types) != b.config_version(state.types)
    assert a.config_version(state.types) == state.candidate_from_sotw(sotw(BACKEND, "1")).config_version(state.types)
