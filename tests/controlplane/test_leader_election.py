"""LeaderElector against the fake Kubernetes API's Lease with the real kubernetes-asyncio client,
driven tick by tick with an injected clock (no sleeping): acquire, renew, a holder that stops
renewing is taken over after the lease duration (measured on the candidate's own clock),
renew failures past the deadline step down without raising, release hands over at once, and a
write racing ours (409) is not leadership."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.status import KubeJson, LeaderElectionSettings, LeaderElector, default_identity, default_namespace
from controlplane.token_review import KubeApiConfig
from tests.peers.kube_api import FakeKubeApi, kube_api

pytestmark = pytest.mark.anyio

SETTINGS = LeaderElectionSettings(namespace="agentgate-system", lease_duration=15, renew_deadline=10, retry_period=2)


@dataclass
class Clock:
    """Monotonic seconds for the elector, and the wall time it stamps the Lease with."""

    seconds: float = 1000.0
    epoch: datetime = datetime(2030, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def wall(self) -> datetime:
        return self.epoch + timedelta(seconds=self.seconds)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@dataclass
class Candidate:
    elector: LeaderElector
    changes: list[bool] = field(default_factory=list)


@dataclass
class Env:
    api: FakeKubeApi
    client: KubeJson
    clock: Clock

    def candidate(self, identity: str, client: KubeJson | None = None) -> Candidate:
        changes: list[bool] = []
        elector = LeaderElector(
            client or self.client, LeaderElectionSettings(**{**SETTINGS.__dict__, "identity": identity}),
            on_change=changes.append, clock=self.clock.monotonic, now=self.clock.wall, rng=lambda: 0.5,
        )
        return Candidate(elector, changes)

    def lease(self) -> Mapping[str, Any]:
        return self.api.get("coordination.k8s.io/v1", "Lease", "agentgate-controlplane", "agentgate-system")["spec"]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with kube_api() as api:
        api_client = await KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig")).api_client()
        try:
            yield Env(api, KubeJson(api_client), Clock())
        finally:
            await api_client.close()


async def test_acquire_renew_and_others_wait(env: Env) -> None:
    a, b = env.candidate("a"), env.candidate("b")
    assert await a.elector.tick() is True
    assert a.changes == [True]
    lease = env.lease()
    assert (lease["holderIdentity"], lease["leaseDurationSeconds"], lease["leaseTransitions"]) == ("a", 15, 0)
    assert lease["renewTime"] == "2030-01-01T00:16:40.000000Z"

    assert await b.elector.tick() is False
    assert b.elector.holder == "a" and b.changes == []
    env.clock.advance(2)
    assert await a.elector.tick() is True
    assert env.lease()["renewTime"] == "2030-01-01T00:16:42.000000Z"
    assert env.lease()["acquireTime"] == lease["acquireTime"]
    assert a.changes == [True]  # renewing is not a new term

    # b keeps seeing renewals: never expired from its point of view.
    for _ in range(10):
        env.clock.advance(2)
        assert await a.elector.tick() is True
        assert await b.elector.tick() is False


async def test_a_holder_that_stops_renewing_is_taken_over(env: Env) -> None:
    a, b = env.candidate("a"), env.candidate("b")
    await a.elector.tick()
    await b.elector.tick()  # b first sees the record now
    env.clock.advance(14.9)
    assert await b.elector.tick() is False  # not yet expired on b's clock
    env.clock.advance(0.2)
    assert await b.elector.tick() is True
    assert b.changes == [True]
    lease = env.lease()
    assert (lease["holderIdentity"], lease["leaseTransitions"]) == ("b", 1)

    # a comes back (it was stuck, not dead): it sees b's record and steps down at once.
    assert await a.elector.tick() is False
    assert a.changes == [True, False]
    assert a.elector.holder == "b"


async def test_renew_failures_past_the_deadline_step_down_without_raising(env: Env) -> None:
    a = env.candidate("a")
    await a.elector.tick()
    env.api.fail_next(1000, code=503, reason="ServiceUnavailable")
    env.clock.advance(2)
    assert await a.elector.tick() is True  # one failure, within the renew deadline
    env.clock.advance(7.9)
    assert await a.elector.tick() is True
    env.clock.advance(0.2)
    assert await a.elector.tick() is False
    assert a.changes == [True, False]

    env.api.heal()
    env.clock.advance(2)
    assert await a.elector.tick() is True  # the Lease still names a: it takes it back
    assert a.changes == [True, False, True]
    assert env.lease()["leaseTransitions"] == 0


async def test_release_hands_over_at_the_next_attempt(env: Env) -> None:
    a, b = env.candidate("a"), env.candidate("b")
    await a.elector.tick()
    assert await b.elector.tick() is False
    await a.elector.release()
    assert a.changes == [True, False]
    lease = env.lease()
    assert "holderIdentity" not in lease and lease["leaseDurationSeconds"] == 1
    env.clock.advance(0.5)
    assert await b.elector.tick() is True  # no waiting out the 15 s lease
    assert (env.lease()["holderIdentity"], env.lease()["leaseTransitions"]) == ("b", 1)
    await a.elector.release()  # not leading: nothing to do
    assert env.lease()["holderIdentity"] == "b"


class RacingClient(KubeJson):
    """Someone else updates the Lease between our read and our write."""

    def __init__(self, inner: KubeJson, api: FakeKubeApi) -> None:
        super().__init__(inner.api_client)
        self.api = api
        self.races = 1

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = await super().get(kind, namespace, name)
        if kind == "Lease" and self.races:
            self.races -= 1
            spec = {**found["spec"], "holderIdentity": "c", "renewTime": "2030-01-01T00:20:00.000000Z"}
            self.api.put({**found, "spec": spec})
        return found


async def test_a_racing_write_is_a_lost_attempt(env: Env) -> None:
    a = env.candidate("a")
    await a.elector.tick()
    await a.elector.release()
    b = env.candidate("b", RacingClient(env.client, env.api))
    assert await b.elector.tick() is False  # 409 on its PUT: c got there first
    assert b.changes == []
    assert await b.elector.tick() is False  # now c holds it, and it is fresh
    assert b.elector.holder == "c"


def test_settings_are_checked() -> None:
    assert SETTINGS.problems() == []
    assert LeaderElectionSettings(lease_duration=10, renew_deadline=10).problems() == [
        "--leader-elect-lease-duration must be greater than --leader-elect-renew-deadline"
    ]
    assert "1.2 x" in LeaderElectionSettings(renew_deadline=2, retry_period=2).problems()[0]
    assert LeaderElectionSettings(lease_name="", retry_period=0).problems()[:2] == [
        "--leader-elect-lease-name must not be empty", "--leader-elect-retry-period must be > 0"
    ]


def test_identity_and_namespace_defaults(tmp_path: Path) -> None:
    assert default_identity({"POD_NAME": "agentgate-controlplane-7d9-x"}) == "agentgate-controlplane-7d9-x"
    assert default_identity({}).rsplit(".", 1)[1].isdigit()
    assert default_namespace({"POD_NAMESPACE": "agentgate-system"}) == "agentgate-system"
    account = tmp_path / "namespace"
    account.write_text("gateways\n")
    assert default_namespace({}, account) == "gateways"
    assert default_namespace({}, tmp_path / "absent") == "default"
