"""StatusWriter against the fake Kubernetes API (tests/peers/kube_api/) with the real
kubernetes-asyncio client: statuses written through the status subresource with
lastTransitionTime and observedGeneration, only what changed, 409 conflicts read again and
retried (boundedly), other controllers' HTTPRoute parent entries kept, proxy rejections in the
Gateway's Programmed condition, aggregated NACK Events, and nothing written while not leading."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controlplane.model import object_from_manifest
from controlplane.status import KubeJson, Rejection, StatusWriter, TokenBucket
from controlplane.status.kube import KubeApiError
from controlplane.token_review import KubeApiConfig
from controlplane.translate import CONTROLLER_NAME, translate
from controlplane.xds.records import NackRecord
from tests.peers.kube_api import FakeKubeApi, kube_api

pytestmark = pytest.mark.anyio

GATEWAY_API = "gateway.networking.k8s.io/v1"
FOREIGN = "example.com/other-controller"
LISTENER_TYPE = "type.googleapis.com/agentgate.config.v1.Listener"


def manifests(backend: str = "tools") -> list[dict[str, Any]]:
    return [
        {"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": "agentgate"},
         "spec": {"controllerName": CONTROLLER_NAME}},
        {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "protocol": "HTTP", "port": 8080}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tools", "namespace": "default"},
         "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": 80}]}},
        route(backend),
    ]


def route(backend: str, parents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"parentRefs": parents if parents is not None else [{"name": "gw"}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 80}]}]}}


def foreign_parent() -> dict[str, Any]:
    return {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "theirs"},
            "controllerName": FOREIGN,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs",
                            "observedGeneration": 1, "lastTransitionTime": "2020-01-01T00:00:00Z"}]}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Env:
    api: FakeKubeApi
    client: KubeJson
    writer: StatusWriter
    clock: Clock

    def submit(self) -> None:
        """Translate what the API server holds now and hand the statuses to the writer."""
        objects = []
        for (rtype, _, _), raw in self.api.store.objects.items():
            if rtype.kind in ("Event", "Lease"):
                continue
            obj, errors = object_from_manifest(dict(raw))
            assert obj is not None and not errors, errors
            objects.append(obj)
        self.writer.submit(translate(objects).statuses)

    def status(self, kind: str, name: str) -> Mapping[str, Any]:
        api_version = GATEWAY_API if kind in ("Gateway", "HTTPRoute", "GatewayClass") else "agentgate.dev/v1alpha1"
        return self.api.get(api_version, kind, name, "" if kind == "GatewayClass" else "default").get("status") or {}

    def status_puts(self) -> list[str]:
        return [path for method, path in self.api.requests if method == "PUT" and path.endswith("/status")]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with kube_api() as api:
        config = KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
        api_client = await config.api_client()
        try:
            client = KubeJson(api_client)
            clock = Clock()
            yield Env(api, client, StatusWriter(client, identity="replica-a", now=clock), clock)
        finally:
            await api_client.close()


def condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


async def test_statuses_are_written_with_generation_and_transition_times(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.set_leading(True)
    assert await env.writer.flush() == 0

    gateway = env.status("Gateway", "gw")
    assert condition(gateway, "Accepted")["status"] == "True"
    assert condition(gateway, "Programmed")["reason"] == "Programmed"
    listener = gateway["listeners"][0]
    assert listener["attachedRoutes"] == 1
    assert {c["type"] for c in listener["conditions"]} == {"Accepted", "Programmed", "ResolvedRefs", "Conflicted"}
    route_status = env.status("HTTPRoute", "web")
    (parent,) = route_status["parents"]
    assert parent["controllerName"] == CONTROLLER_NAME
    assert condition(parent, "Accepted")["status"] == "True"
    assert condition(parent, "ResolvedRefs")["reason"] == "ResolvedRefs"
    assert condition(env.status("GatewayClass", "agentgate"), "Accepted")["status"] == "True"
    every = [*gateway["conditions"], *listener["conditions"], *parent["conditions"]]
    assert {c["lastTransitionTime"] for c in every} == {"2030-01-01T00:00:00Z"}
    assert {c["observedGeneration"] for c in every} == {1}
    assert env.writer.writes == 3


async def test_only_what_changed_is_written(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.set_leading(True)
    await env.writer.flush()
    puts = len(env.status_puts())

    env.submit()  # the same translation again
    assert env.writer.pending == 0
    assert await env.writer.flush() == 0
    assert len(env.status_puts()) == puts

    # The route now names a missing Service: only its status changes (generation 2, ResolvedRefs False).
    env.clock.now += timedelta(minutes=5)
    env.api.put(route("missing"))
    env.submit()
    assert env.writer.pending == 1
    await env.writer.flush()
    assert env.status_puts()[puts:] == ["/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/web/status"]
    (parent,) = env.status("HTTPRoute", "web")["parents"]
    refs, accepted = condition(parent, "ResolvedRefs"), condition(parent, "Accepted")
    assert (refs["status"], refs["reason"], refs["observedGeneration"]) == ("False", "BackendNotFound", 2)
    assert "missing" in refs["message"]
    assert refs["lastTransitionTime"] == "2030-01-01T00:05:00Z"  # changed status: a new time
    assert accepted["lastTransitionTime"] == "2030-01-01T00:00:00Z"  # same status: the old time


async def test_foreign_parent_entries_are_kept_and_ours_replaced(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    stale_ours = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gone"},
                  "controllerName": CONTROLLER_NAME, "conditions": []}
    env.api.put_status({**route("tools"), "status": {"parents": [foreign_parent(), stale_ours]}})
    env.submit()
    env.writer.set_leading(True)
    await env.writer.flush()
    parents = env.status("HTTPRoute", "web")["parents"]
    assert parents[0] == foreign_parent()
    assert [p["parentRef"]["name"] for p in parents] == ["theirs", "gw"]

    # The route moves to the other controller's Gateway only: our entry goes, theirs stays.
    env.api.put(route("tools", parents=[{"name": "theirs"}]))
    env.submit()
    await env.writer.flush()
    assert env.status("HTTPRoute", "web")["parents"] == [foreign_parent()]
    env.submit()
    assert env.writer.pending == 0  # nothing more to clean up


class RacingClient(KubeJson):
    """Another controller writes the HTTPRoute's status right after each of our reads."""

    def __init__(self, inner: KubeJson, api: FakeKubeApi, races: int) -> None:
        super().__init__(inner.api_client)
        self.api, self.races = api, races

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = await super().get(kind, namespace, name)
        if kind == "HTTPRoute" and self.races > 0:
            self.races -= 1
            entry = foreign_parent()
            entry["conditions"][0]["message"] = f"theirs, {self.races} races left"
            self.api.put_status({**route("tools"), "status": {"parents": [entry]}})
        return found


async def test_conflicts_are_read_again_and_retried_boundedly(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    racing = RacingClient(env.client, env.api, races=1)
    writer = StatusWriter(racing, identity="replica-a", now=env.clock)
    env.writer = writer
    env.submit()
    writer.set_leading(True)
    assert await writer.flush() == 0
    assert writer.conflicts == 1
    parents = env.status("HTTPRoute", "web")["parents"]
    assert [p["controllerName"] for p in parents] == [FOREIGN, CONTROLLER_NAME]
    assert parents[0]["conditions"][0]["message"] == "theirs, 0 races left"  # what they wrote meanwhile

    # Conflicts on every attempt: after conflict_retries the object waits for the next round.
    racing.races = 100
    env.api.put(route("missing"))
    env.submit()
    assert await writer.flush() > 0
    assert writer.conflicts == 1 + writer.settings.conflict_retries + 1
    assert writer.pending == 1
    racing.races = 0
    assert await writer.flush() == 0
    (_, ours) = env.status("HTTPRoute", "web")["parents"]
    assert condition(ours, "ResolvedRefs")["reason"] == "BackendNotFound"


async def test_server_errors_are_retried_and_missing_objects_skipped(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.set_leading(True)
    env.api.fail_next(1)
    assert await env.writer.flush() > 0
    assert env.writer.pending == 3
    assert await env.writer.flush() == 0
    assert env.status("Gateway", "gw")["conditions"]

    env.api.put(route("missing"))
    env.submit()
    env.api.remove(GATEWAY_API, "HTTPRoute", "web", "default")  # deleted before the write
    assert await env.writer.flush() == 0


async def test_proxy_rejections_turn_programmed_false_until_they_clear(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.set_leading(True)
    await env.writer.flush()
    env.clock.now += timedelta(minutes=1)
    env.writer.set_rejections({"default/gw": "Proxies reject the current config: proxy p1 rejected Listener"})
    assert env.writer.pending == 1
    await env.writer.flush()
    programmed = condition(env.status("Gateway", "gw"), "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "Invalid")
    assert "proxy p1 rejected Listener" in programmed["message"]
    assert programmed["lastTransitionTime"] == "2030-01-01T00:01:00Z"

    env.submit()  # a new translation keeps the rejection
    assert env.writer.pending == 0
    env.writer.set_rejections({})
    await env.writer.flush()
    programmed = condition(env.status("Gateway", "gw"), "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("True", "Programmed")


def rejection(node: str, message: str, nonce: str) -> Rejection:
    nack = NackRecord(node, "default/gw", LISTENER_TYPE, "v7", nonce, 3, message, 1_900_000_000.0)
    return Rejection(nack, ("default/gw/extra",))


def events(api: FakeKubeApi) -> list[Mapping[str, Any]]:
    return [obj for (rtype, _, _), obj in api.store.objects.items() if rtype.kind == "Event"]


async def test_nacks_become_aggregated_warning_events(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.writer.set_leading(True)
    env.writer.record_nack(rejection("p1", "Listener default/gw/extra: port 9 in use", "1"))
    env.writer.record_nack(rejection("p1", "Listener default/gw/extra: port 9 in use", "2"))
    await env.writer.flush()
    (event,) = events(env.api)
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "ConfigRejected", 2)
    gateway_uid = env.api.get(GATEWAY_API, "Gateway", "gw", "default")["metadata"]["uid"]
    assert event["involvedObject"] == {"apiVersion": GATEWAY_API, "kind": "Gateway", "namespace": "default",
                                       "name": "gw", "uid": gateway_uid}
    for part in ("proxy p1", LISTENER_TYPE, "default/gw/extra", "port 9 in use", "version v7"):
        assert part in event["message"], event["message"]

    env.writer.record_nack(rejection("p1", "Listener default/gw/extra: port 9 in use", "3"))
    await env.writer.flush()
    (event,) = events(env.api)
    assert event["count"] == 3

    # Another replica takes over: the same rejection counts on the same Event.
    successor = StatusWriter(env.client, identity="replica-b", now=env.clock)
    successor.set_leading(True)
    successor.record_nack(rejection("p1", "Listener default/gw/extra: port 9 in use", "4"))
    await successor.flush()
    (event,) = events(env.api)
    assert event["count"] == 4

    # Another proxy or another error is another Event.
    successor.record_nack(rejection("p2", "Listener default/gw/extra: port 9 in use", "1"))
    await successor.flush()
    assert sorted(e["count"] for e in events(env.api)) == [1, 4]


async def test_nothing_is_written_while_not_leading_and_everything_on_takeover(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.record_nack(rejection("p1", "boom", "1"))  # dropped: another replica leads
    assert await env.writer.flush() == 0
    assert env.status_puts() == [] and events(env.api) == []

    env.writer.set_leading(True)
    await env.writer.flush()
    assert len(env.status_puts()) == 3
    env.writer.set_leading(False)
    env.api.put_status({**manifests()[1], "status": {}})  # someone wipes the Gateway's status meanwhile
    env.submit()
    assert await env.writer.flush() == 0
    assert env.status("Gateway", "gw") == {}

    env.writer.set_leading(True)  # taking over: every object is checked, what differs is written
    assert env.writer.pending == 3
    await env.writer.flush()
    assert condition(env.status("Gateway", "gw"), "Programmed")["status"] == "True"
    assert len(env.status_puts()) == 4


async def test_refused_writes_are_not_retried_until_the_status_changes(env: Env) -> None:
    for manifest in manifests():
        env.api.put(manifest)
    env.submit()
    env.writer.set_leading(True)
    env.api.fail_next(1, code=403, reason="Forbidden")
    assert await env.writer.flush() == 0  # logged, not retried
    assert env.writer.pending == 0
    env.submit()
    assert env.writer.pending == 0


async def test_token_bucket_paces_writes() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(10.0, 2, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        await bucket.take()
    assert slept == pytest.approx([0.1, 0.1])
    now[0] += 10
    await bucket.take()
    await bucket.take()
    assert len(slept) == 2  # the burst refilled


def test_kube_api_error_kinds() -> None:
    checks: list[tuple[KubeApiError, Callable[[KubeApiError], bool]]] = [
        (KubeApiError(0, "Unavailable", "down"), lambda e: e.retryable),
        (KubeApiError(503, "ServiceUnavailable", "x"), lambda e: e.retryable),
        (KubeApiError(429, "TooManyRequests", "x"), lambda e: e.retryable),
        (KubeApiError(409, "Conflict", "x"), lambda e: e.conflict and not e.retryable),
        (KubeApiError(403, "Forbidden", "x"), lambda e: not e.retryable and not e.conflict),
    ]
    for error, check in checks:
        assert check(error), error
