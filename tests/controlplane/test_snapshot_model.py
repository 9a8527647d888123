"""Snapshots: content-addressed versions, the no-op publish, references and the consistency check."""

from __future__ import annotations

import anyio
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshot import (
    ResponseCache,
    SnapshotCache,
    SnapshotInconsistent,
    build_snapshot,
    referable_keys,
    references,
    with_nonce,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET, TYPE_ORDER, unpack

GW = "ns/gw"
Kind = pb.PolicyTargetRef


def route(name: str, *backends: str, listeners: tuple[str, ...] = ("ns/gw/http",), **fields: object) -> pb.Route:
    return pb.Route(
        name=name, listeners=listeners, backends=[pb.BackendRef(backend=b, weight=1) for b in backends], **fields
    )


def policy(kind: int, name: str) -> dict[str, pb.Policy]:
    return {"ns/p": pb.Policy(name="ns/p", targets=[pb.PolicyTargetRef(kind=kind, name=name)])}  # type: ignore[arg-type]


def config(**extra: dict) -> dict:
    resources: dict = {
        BACKEND: {"ns/b1": pb.Backend(name="ns/b1"), "ns/b2": pb.Backend(name="ns/b2")},
        TARGET: {"ns/b1/t": pb.Target(name="ns/b1/t", backend="ns/b1")},
        LISTENER: {"ns/gw/http": pb.Listener(name="ns/gw/http", gateway=GW, port=8080)},
        ROUTE: {"ns/r/0": route("ns/r/0", "ns/b1", route_key="ns/r")},
    }
    resources.update(extra)
    return resources


def test_versions_are_content_hashes_shared_by_replicas() -> None:
    one, two = build_snapshot(GW, config()), build_snapshot(GW, config())
    assert one is not two
    assert one.version == two.version
    assert [one.type_version(t) for t in TYPE_ORDER] == [two.type_version(t) for t in TYPE_ORDER]
    assert one.resources(ROUTE)["ns/r/0"].version == two.resources(ROUTE)["ns/r/0"].version


def test_a_changed_resource_changes_only_its_own_type_version() -> None:
    before = build_snapshot(GW, config())
    after = build_snapshot(GW, config(**{ROUTE: {"ns/r/0": route("ns/r/0", "ns/b2", route_key="ns/r")}}))
    assert after.version != before.version
    assert after.type_version(ROUTE) != before.type_version(ROUTE)
    for unchanged in (BACKEND, TARGET, LISTENER, POLICY):
        assert after.type_version(unchanged) == before.type_version(unchanged)


def test_resource_is_packed_once_as_any() -> None:
    snapshot = build_snapshot(GW, config())
    resource = snapshot.resources(ROUTE)["ns/r/0"]
    packed = discovery_pb2.Resource.FromString(resource.delta_field[2:]).resource  # skip the 2-byte field header
    assert packed.SerializeToString(deterministic=True) == resource.packed
    assert unpack(ROUTE, packed) == route("ns/r/0", "ns/b1", route_key="ns/r")


def test_set_snapshot_with_unchanged_content_returns_the_same_object() -> None:
    cache = SnapshotCache()
    first = cache.set_snapshot(GW, config())
    assert cache.set_snapshot(GW, config()) is first
    assert cache.get_snapshot(GW) is first
    assert cache.gateways() == [GW]
    second = cache.set_snapshot(GW, config(**{POLICY: {"ns/p": pb.Policy(name="ns/p")}}))
    # Unchanged resources are shared with the previous snapshot, not serialized into new copies.
    assert second.resources(ROUTE)["ns/r/0"] is first.resources(ROUTE)["ns/r/0"]
    assert cache.history(GW) == (second, first)


def test_inconsistent_snapshot_is_refused_and_the_previous_one_stays() -> None:
    cache = SnapshotCache()
    good = cache.set_snapshot(GW, config())
    broken = config(**{ROUTE: {"ns/r/0": route("ns/r/0", "ns/missing", listeners=("ns/gw/nope",))}})
    with pytest.raises(SnapshotInconsistent) as caught:
        cache.set_snapshot(GW, broken)
    text = str(caught.value)
    assert "Route 'ns/r/0' references Backend 'ns/missing'" in text
    assert "Route 'ns/r/0' references Listener 'ns/gw/nope'" in text
    assert len(caught.value.problems) == 2
    assert cache.get_snapshot(GW) is good


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({TARGET: {"ns/x/t": pb.Target(name="ns/x/t", backend="ns/x")}}, "Target 'ns/x/t' references Backend 'ns/x'"),
        ({POLICY: policy(Kind.KIND_ROUTE, "ns/q")}, "Policy 'ns/p' references Route 'ns/q'"),
        ({POLICY: policy(Kind.KIND_GATEWAY, "o/g")}, "Policy 'ns/p' targets Gateway 'o/g'"),
        ({POLICY: policy(Kind.KIND_UNSPECIFIED, "ns/b1")}, "unspecified kind"),
        (
            {
                ROUTE: {
                    "ns/r/0": pb.Route(
                        name="ns/r/0", listeners=["ns/gw/http"],
                        backends=[pb.BackendRef(backend="ns/b1", filters=[pb.RouteFilter()])],
                    ),
                    "ns/r/1": route("ns/r/1", ""),
                }
            },
            "Route 'ns/r/1' references Backend ''",
        ),
        ({ROUTE: {"ns/other": route("ns/r/0", "ns/b1")}}, "differs from its name"),
        ({"type.googleapis.com/x.Y": {}}, "unknown type URL"),
        ({BACKEND: {"ns/b1": pb.Listener(name="ns/b1")}}, "is a Listener, expected Backend"),
        ({ROUTE: {"ns/r/0": pb.Backend(name="ns/r/0")}}, "is a Backend, expected Route"),
    ],
)
def test_consistency_check_names_the_resource_and_the_dangling_reference(extra: dict, expected: str) -> None:
    cache = SnapshotCache()
    with pytest.raises(SnapshotInconsistent, match=expected):
        cache.set_snapshot(GW, config(**extra))
    assert cache.get_snapshot(GW) is None


def test_policy_targets_resolve_by_kind() -> None:
    targets = [
        pb.PolicyTargetRef(kind=Kind.KIND_GATEWAY, name=GW),
        pb.PolicyTargetRef(kind=Kind.KIND_LISTENER, name="ns/gw/http"),
        pb.PolicyTargetRef(kind=Kind.KIND_ROUTE, name="ns/r"),  # the HTTPRoute, through route_key
        pb.PolicyTargetRef(kind=Kind.KIND_ROUTE_RULE, name="ns/r/0"),
        pb.PolicyTargetRef(kind=Kind.KIND_BACKEND, name="ns/b2"),
    ]
    policy = pb.Policy(name="ns/p", targets=targets)
    assert references(POLICY, policy) == {
        (LISTENER, "ns/gw/http"), (ROUTE, "ns/r"), (ROUTE, "ns/r/0"), (BACKEND, "ns/b2"),
    }
    SnapshotCache().set_snapshot(GW, config(**{POLICY: {"ns/p": policy}}))


def test_route_references_include_filter_level_backends_unless_it_answers_directly() -> None:
    nested = pb.BackendRef(backend="ns/b1", filters=[pb.RouteFilter()])
    message = pb.Route(name="ns/r/0", listeners=["l1", "l2"], backends=[nested, pb.BackendRef(backend="ns/b2")])
    assert references(ROUTE, message) == {(LISTENER, "l1"), (LISTENER, "l2"), (BACKEND, "ns/b1"), (BACKEND, "ns/b2")}
    message.backends.append(pb.BackendRef(weight=2, direct_response_status=500))  # an unresolved share
    assert references(ROUTE, message) == {(LISTENER, "l1"), (LISTENER, "l2"), (BACKEND, "ns/b1"), (BACKEND, "ns/b2")}
    message.direct_response_status = 500
    assert references(ROUTE, message) == {(LISTENER, "l1"), (LISTENER, "l2")}
    assert references(TARGET, pb.Target(name="b/t", backend="b")) == {(BACKEND, "b")}
    assert references(BACKEND, pb.Backend(name="b")) == set()
    assert referable_keys(ROUTE, pb.Route(name="ns/r/0", route_key="ns/r")) == {"ns/r/0", "ns/r"}


def test_remove_snapshot_serves_an_empty_one_and_leaves_gateways() -> None:
    cache = SnapshotCache()
    cache.set_snapshot(GW, config())
    cache.remove_snapshot(GW)
    removed = cache.get_snapshot(GW)
    assert removed is not None and removed.resource_count() == 0
    assert cache.gateways() == []
    assert cache.set_snapshot(GW, config()).resource_count() == 5
    assert cache.gateways() == [GW]


@pytest.mark.anyio
async def test_wait_for_change_wakes_on_a_new_snapshot_only() -> None:
    cache = SnapshotCache()
    seen: list[str] = []

    async def watch() -> None:
        snapshot = await cache.wait_for_change(GW, None)
        seen.append(snapshot.version)
        snapshot = await cache.wait_for_change(GW, snapshot)
        seen.append(snapshot.version)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            first = cache.set_snapshot(GW, config())
            await anyio.wait_all_tasks_blocked()
            cache.set_snapshot(GW, config())  # same content: no wake-up
            await anyio.wait_all_tasks_blocked()
            assert seen == [first.version]
            second = cache.set_snapshot(GW, config(**{POLICY: {}, TARGET: {}}))
    assert seen == [first.version, second.version]


def test_response_bodies_are_built_once_and_nonced_per_stream() -> None:
    responses = ResponseCache()
    snapshot = build_snapshot(GW, config())
    resources = tuple(snapshot.resources(ROUTE).values())
    body = responses.sotw(GW, ROUTE, snapshot.type_version(ROUTE), resources)
    assert responses.sotw(GW, ROUTE, snapshot.type_version(ROUTE), resources) is body
    assert (responses.builds, responses.hits) == (1, 1)
    one = discovery_pb2.DiscoveryResponse.FromString(with_nonce(body, "1"))
    two = discovery_pb2.DiscoveryResponse.FromString(with_nonce(body, "n-2"))
    assert (one.nonce, two.nonce) == ("1", "n-2")
    assert one.version_info == snapshot.type_version(ROUTE) and one.type_url == ROUTE
    assert [unpack(ROUTE, r).name for r in one.resources] == ["ns/r/0"]

    delta = responses.delta(GW, ROUTE, snapshot.type_version(ROUTE), resources, ("ns/gone",))
    decoded = discovery_pb2.DeltaDiscoveryResponse.FromString(with_nonce(delta, "3"))
    assert decoded.nonce == "3" and list(decoded.removed_resources) == ["ns/gone"]
    assert [(r.name, r.version) for r in decoded.resources] == [("ns/r/0", resources[0].version)]
    assert responses.delta(GW, ROUTE, snapshot.type_version(ROUTE), resources, ()) is not delta


def test_response_cache_drops_bodies_of_superseded_versions_and_is_bounded() -> None:
    cache = SnapshotCache(ResponseCache(max_entries_per_gateway=3))
    old = cache.set_snapshot(GW, config())
    for type_url in TYPE_ORDER:
        cache.responses.sotw(GW, type_url, old.type_version(type_url), tuple(old.resources(type_url).values()))
    assert cache.responses.entries(GW) == 3  # the LRU bound
    new = cache.set_snapshot(GW, config(**{ROUTE: {"ns/r/0": route("ns/r/0", "ns/b2")}}))
    # Listener's and Policy's bodies (versions unchanged) survive; Route's old body is dropped.
    assert cache.responses.entries(GW) == 2
    assert new.type_version(ROUTE) != old.type_version(ROUTE)
