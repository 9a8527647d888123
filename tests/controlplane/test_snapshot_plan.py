"""Push planning without sockets: what each client is sent, and in which order."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from controlplane.snapshot import (
    DeltaPush,
    DeltaTypeState,
    Resource,
    Snapshot,
    SotwPush,
    SotwTypeState,
    Subscription,
    build_snapshot,
    check_consistency,
    plan_delta,
    plan_sotw,
    set_version,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET, TYPE_ORDER, short_name

GW = "ns/gw"
Kind = pb.PolicyTargetRef


def route(name: str, *backends: str, listener: str = "l1") -> pb.Route:
    return pb.Route(name=name, listeners=[listener], backends=[pb.BackendRef(backend=b) for b in backends])


def snap(
    backends: tuple[str, ...] = ("b1",),
    routes: Mapping[str, pb.Route] | None = None,
    listeners: tuple[str, ...] = ("l1",),
    targets: Mapping[str, str] | None = None,
    policies: Mapping[str, pb.Policy] | None = None,
) -> Snapshot:
    resources = {
        BACKEND: {b: pb.Backend(name=b) for b in backends},
        LISTENER: {name: pb.Listener(name=name, port=80) for name in listeners},
        ROUTE: dict(routes if routes is not None else {"r": route("r", "b1")}),
        TARGET: {t: pb.Target(name=t, backend=b) for t, b in (targets or {}).items()},
        POLICY: dict(policies or {}),
    }
    check_consistency(GW, resources)
    return build_snapshot(GW, resources)


def names(resources: tuple[Resource, ...]) -> list[str]:
    return [r.name for r in resources]


# --- State of the world ----------------------------------------------------------------


def sotw_synced(snapshot: Snapshot, subscription: Subscription | None = None) -> dict[str, SotwTypeState]:
    """A wildcard client that holds `snapshot` exactly."""
    return {
        t: SotwTypeState(subscription or Subscription(), snapshot.resources(t), snapshot.type_version(t))
        for t in TYPE_ORDER
    }


def sotw_apply(held: dict[str, Mapping[str, Resource]], pushes: list[SotwPush]) -> None:
    """A client applying each response in turn, asserting it never holds a dangling reference."""
    for push in pushes:
        held[push.type_url] = {r.name: r for r in push.resources}
        keys = {(t, k) for t, rs in held.items() for r in rs.values() for k in r.keys}
        for resources in held.values():
            for resource in resources.values():
                missing = resource.refs - keys
                assert not missing, f"after {short_name(push.type_url)} push, {resource.name} lacks {missing}"


def test_sotw_first_plan_sends_every_subscribed_type_in_type_order_even_empty() -> None:
    snapshot = snap()
    fresh = {t: SotwTypeState(Subscription(), {}) for t in TYPE_ORDER}
    pushes = plan_sotw(snapshot, fresh)
    assert [p.type_url for p in pushes] == list(TYPE_ORDER)
    assert [p.version for p in pushes] == [snapshot.type_version(t) for t in TYPE_ORDER]
    assert names(pushes[1].resources) == []  # no Targets: still answered


def test_sotw_nothing_changed_sends_nothing() -> None:
    snapshot = snap()
    assert plan_sotw(snapshot, sotw_synced(snapshot)) == []


def test_sotw_route_switching_backend_keeps_the_old_backend_until_the_route_moved() -> None:
    before = snap(backends=("b1",), routes={"r": route("r", "b1")})
    after = snap(backends=("b2",), routes={"r": route("r", "b2")})
    pushes = plan_sotw(after, sotw_synced(before))
    assert [(short_name(p.type_url), names(p.resources)) for p in pushes] == [
        ("Backend", ["b1", "b2"]),  # pass 1: b1 retained, the held Route still points at it
        ("Route", ["r"]),
        ("Backend", ["b2"]),  # pass 2: the final set
    ]
    assert pushes[0].version == set_version(pushes[0].resources) != after.type_version(BACKEND)
    assert pushes[2].version == after.type_version(BACKEND)
    held = {t: dict(before.resources(t)) for t in TYPE_ORDER}
    sotw_apply(held, pushes)
    assert {t: set(rs) for t, rs in held.items()} == {t: set(after.resources(t)) for t in TYPE_ORDER}


def test_sotw_removed_listener_and_route_leave_referrers_first() -> None:
    before = snap(listeners=("l1", "l2"), routes={"r1": route("r1", "b1"), "r2": route("r2", "b1", listener="l2")})
    after = snap(listeners=("l1",), routes={"r1": route("r1", "b1")})
    pushes = plan_sotw(after, sotw_synced(before))
    # Pass 1 would send Listener {l1, l2}, which the client already holds: skipped.
    assert [(short_name(p.type_url), names(p.resources)) for p in pushes] == [
        ("Route", ["r1"]),
        ("Listener", ["l1"]),
    ]


def test_sotw_parked_nacked_version_is_not_resent_until_a_newer_one_exists() -> None:
    v1, v2, v3 = snap(), snap(backends=("b1", "b2")), snap(backends=("b1", "b3"))
    state = sotw_synced(v1)
    # The client NACKed v2's Backend set: it still holds v1's, and v2 is parked.
    state[BACKEND] = SotwTypeState(Subscription(), v1.resources(BACKEND), v2.type_version(BACKEND),
                                   parked_version=v2.type_version(BACKEND))
    assert plan_sotw(v2, state) == []
    pushes = plan_sotw(v3, state)
    assert [(p.type_url, p.version) for p in pushes] == [(BACKEND, v3.type_version(BACKEND))]


def test_sotw_named_subscription_gets_exactly_the_named_set() -> None:
    snapshot = snap(backends=("b1", "b2", "b3"))
    state = {BACKEND: SotwTypeState(Subscription(False, frozenset({"b3", "b1", "ghost"})), {})}
    [push] = plan_sotw(snapshot, state)
    assert names(push.resources) == ["b1", "b3"]
    assert push.version == set_version(push.resources)
    assert plan_sotw(snapshot, {BACKEND: SotwTypeState(Subscription(False), {})})[0].resources == ()


CONFIGS = [
    snap(),
    snap(backends=("b2",), routes={"r": route("r", "b2")}),
    snap(backends=("b1", "b2"), listeners=("l1", "l2"), targets={"t1": "b1", "t2": "b2"},
         routes={"r": route("r", "b1", "b2", listener="l2"), "s": route("s", "b2")},
         policies={"p": pb.Policy(name="p", targets=[pb.PolicyTargetRef(kind=Kind.KIND_ROUTE_RULE, name="s"),
                                                     pb.PolicyTargetRef(kind=Kind.KIND_BACKEND, name="b1")])}),
    snap(backends=("b3",), listeners=("l3",), targets={"t3": "b3"}, routes={"q": route("q", "b3", listener="l3")}),
    snap(backends=(), listeners=(), routes={}),
]


@pytest.mark.parametrize(("start", "end"), list(itertools.permutations(range(len(CONFIGS)), 2)))
def test_sotw_client_never_holds_a_dangling_reference(start: int, end: int) -> None:
    before, after = CONFIGS[start], CONFIGS[end]
    held = {t: dict(before.resources(t)) for t in TYPE_ORDER}
    sotw_apply(held, plan_sotw(after, sotw_synced(before)))
    assert {t: set(rs) for t, rs in held.items()} == {t: set(after.resources(t)) for t in TYPE_ORDER}


# --- Delta -----------------------------------------------------------------------------


def delta_synced(snapshot: Snapshot) -> dict[str, DeltaTypeState]:
    return {
        t: DeltaTypeState(Subscription(), {n: r.version for n, r in snapshot.resources(t).items()})
        for t in TYPE_ORDER
    }


def delta_apply(held: dict[str, dict[str, Resource]], pushes: list[DeltaPush]) -> None:
    for push in pushes:
        held[push.type_url].update({r.name: r for r in push.upserts})
        for name in push.removals:
            held[push.type_url].pop(name, None)
        keys = {(t, k) for t, rs in held.items() for r in rs.values() for k in r.keys}
        for resources in held.values():
            for resource in resources.values():
                assert not resource.refs - keys, f"{resource.name} lacks {resource.refs - keys}"


def summary(pushes: list[DeltaPush]) -> list[tuple[str, list[str], list[str]]]:
    return [(short_name(p.type_url), names(p.upserts), list(p.removals)) for p in pushes]


def test_delta_first_wildcard_request_is_answered_even_when_empty() -> None:
    snapshot = snap()
    fresh = {t: DeltaTypeState(Subscription(), {}, must_respond=True) for t in TYPE_ORDER}
    assert summary(plan_delta(snapshot, fresh)) == [
        ("Backend", ["b1"], []), ("Target", [], []), ("Listener", ["l1"], []), ("Route", ["r"], []),
        ("Policy", [], []),
    ]
    assert plan_delta(snapshot, {t: DeltaTypeState(Subscription(), {}) for t in (TARGET, POLICY)}) == []


def test_delta_upserts_in_type_order_then_removals_in_reverse() -> None:
    before = snap(backends=("b1",), routes={"r": route("r", "b1")})
    after = snap(backends=("b2",), routes={"r": route("r", "b2")})
    pushes = plan_delta(after, delta_synced(before))
    assert summary(pushes) == [("Backend", ["b2"], []), ("Route", ["r"], []), ("Backend", [], ["b1"])]
    assert all(p.system_version == after.type_version(p.type_url) for p in pushes)


def test_delta_reconnect_gets_only_the_difference_plus_removals() -> None:
    before = snap(listeners=("l1", "l2"))
    after = snap(backends=("b1", "b3"), listeners=("l1",), routes={"r": route("r", "b3")})
    state = {t: DeltaTypeState(Subscription(), s.known, must_respond=True) for t, s in delta_synced(before).items()}
    assert summary(plan_delta(after, state)) == [
        ("Backend", ["b3"], []), ("Target", [], []), ("Route", ["r"], []), ("Policy", [], []),
        ("Listener", [], ["l2"]),
    ]


def test_delta_named_subscriptions_forced_and_nonexistent() -> None:
    snapshot = snap(backends=("b1", "b2"))
    known = {"b1": snapshot.resources(BACKEND)["b1"].version}
    state = {BACKEND: DeltaTypeState(Subscription(False, frozenset({"b1", "b2", "ghost"})), known,
                                     forced=frozenset({"b1", "ghost"}))}
    # b1 is unchanged but newly subscribed: sent anyway; ghost does not exist: reported removed.
    assert summary(plan_delta(snapshot, state)) == [("Backend", ["b1", "b2"], ["ghost"])]
    settled = {BACKEND: DeltaTypeState(Subscription(False, frozenset({"b1", "b2", "ghost"})),
                                       {n: r.version for n, r in snapshot.resources(BACKEND).items()})}
    assert plan_delta(snapshot, settled) == []


def test_delta_parked_version_sends_only_newly_subscribed_names() -> None:
    snapshot = snap(backends=("b1", "b2"))
    state = {BACKEND: DeltaTypeState(Subscription(), {}, forced=frozenset({"b2"}),
                                     parked_version=snapshot.type_version(BACKEND))}
    assert summary(plan_delta(snapshot, state)) == [("Backend", ["b2"], [])]
    state[BACKEND] = DeltaTypeState(Subscription(), {}, parked_version=snapshot.type_version(BACKEND))
    assert plan_delta(snapshot, state) == []
    newer = snap(backends=("b1", "b2", "b9"))
    assert summary(plan_delta(newer, state)) == [("Backend", ["b1", "b2", "b9"], [])]


def test_delta_merges_adjacent_upsert_and_removal_of_the_last_type() -> None:
    policy = pb.Policy(name="p2", targets=[pb.PolicyTargetRef(kind=Kind.KIND_BACKEND, name="b1")])
    before = snap(policies={"p1": pb.Policy(name="p1")})
    after = snap(policies={"p2": policy})
    assert summary(plan_delta(after, delta_synced(before))) == [("Policy", ["p2"], ["p1"])]


@pytest.mark.parametrize(("start", "end"), list(itertools.permutations(range(len(CONFIGS)), 2)))
def test_delta_client_never_holds_a_dangling_reference(start: int, end: int) -> None:
    before, after = CONFIGS[start], CONFIGS[end]
    held = {t: dict(before.resources(t)) for t in TYPE_ORDER}
    delta_apply(held, plan_delta(after, delta_synced(before)))
    assert {t: set(rs) for t, rs in held.items()} == {t: set(after.resources(t)) for t in TYPE_ORDER}
