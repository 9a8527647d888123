"""KubernetesSource against the fake Kubernetes API (tests/peers/kube_api/) with the real
kubernetes-asyncio client: objects reach the state, watches resume without losing events, 410
relists, errors back off, invalid objects keep their last good version; and the control plane
pushes only the Gateways whose inputs changed."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.model import ObjectKey
from controlplane.sources.folder import FolderState
from controlplane.sources.kubernetes import WATCHED_KINDS, Backoff, KubernetesSource, KubernetesSourceSettings
from controlplane.token_review import KubeApiConfig
from tests.peers.kube_api import FakeKubeApi, kube_api

pytestmark = pytest.mark.anyio

WAIT = 10.0
GATEWAY_API = "gateway.networking.k8s.io/v1"
FAST = KubernetesSourceSettings(debounce=0.02, watch_timeout=30, backoff_initial=0.01, backoff_max=0.05)


def gateway_class() -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": "agentgate"},
            "spec": {"controllerName": "agentgate.dev/gateway-controller"}}


def gateway(name: str, port: int = 8080) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": {"name": name, "namespace": "default"},
            "spec": {"gatewayClassName": "agentgate",
                     "listeners": [{"name": "http", "protocol": "HTTP", "port": port}]}}


def route(name: str, gateway_name: str, backend: str, path: str = "/") -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [{"name": gateway_name}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                                "backendRefs": [{"name": backend, "port": 80}]}]}}


def service(name: str, app_protocol: str | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"port": 80}
    if app_protocol:
        port["appProtocol"] = app_protocol
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [port]}}


def secret(name: str, **data: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "data": {key: base64.b64encode(value).decode() for key, value in data.items()}}


def keys(state: FolderState) -> set[ObjectKey]:
    return {obj.key for obj in state.objects}


@dataclass
class Running:
    api: FakeKubeApi
    source: KubernetesSource
    states: MemoryObjectReceiveStream[FolderState]
    state: FolderState | None = None

    async def until(self, predicate: Callable[[FolderState], bool]) -> FolderState:
        """The first state (the current one included) that satisfies ``predicate``."""
        while self.state is None or not predicate(self.state):
            self.state = await self.states.receive()
        return self.state


@asynccontextmanager
async def running(
    tmp_path: Path, settings: KubernetesSourceSettings = FAST, *, before: Callable[[FakeKubeApi], None] | None = None
) -> AsyncIterator[Running]:
    async with kube_api() as api:
        if before is not None:
            before(api)
        client = await KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig")).api_client()
        try:
            source = KubernetesSource(client, settings)
            async with source.watch() as states:
                yield Running(api, source, states)
        finally:
            await client.close()


async def test_objects_appear_update_and_go(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with running(tmp_path) as run:
            first = await run.until(lambda s: True)
            assert first.objects == () and first.errors == ()
            api = run.api
            api.put(gateway_class())
            api.put(gateway("gw"))
            api.put(route("web", "gw", "mcp"))
            api.put(service("mcp", "kgateway.dev/mcp"))
            api.put(service("unrelated"))  # plain, referenced by nothing: not handed over
            api.put(secret("agentgate-mcp-session-key", current=bytes(32)))  # an MCP Service's key Secret
            api.put(secret("unrelated", token=b"x"))
            wanted = {ObjectKey("GatewayClass", "", "agentgate"), ObjectKey("Gateway", "default", "gw"),
                      ObjectKey("HTTPRoute", "default", "web"), ObjectKey("Service", "default", "mcp"),
                      ObjectKey("Secret", "default", "agentgate-mcp-session-key")}
            state = await run.until(lambda s: keys(s) == wanted)
            assert state.errors == ()
            web = next(o for o in state.objects if o.name == "web")
            assert web.generation == 1 and web.spec["rules"][0]["backendRefs"][0]["name"] == "mcp"

            # A route now naming the plain Service brings it in; a status write changes nothing.
            api.put(route("web", "gw", "unrelated", path="/v2"))
            state = await run.until(lambda s: ObjectKey("Service", "default", "unrelated") in keys(s))
            web = next(o for o in state.objects if o.name == "web")
            assert web.generation == 2 and web.spec["rules"][0]["matches"][0]["path"]["value"] == "/v2"
            # A status write is no change: the next state is the one a later edit makes (same watch,
            # so the status event was seen first).
            api.put_status({**route("web", "gw", "unrelated"), "status": {"parents": []}})
            api.put(route("marker", "gw", "mcp"))
            assert "marker" in {o.name for o in (await run.states.receive()).objects}

            api.remove(GATEWAY_API, "HTTPRoute", "web", "default")
            state = await run.until(lambda s: ObjectKey("HTTPRoute", "default", "web") not in keys(s))
            assert ObjectKey("Service", "default", "unrelated") not in keys(state)
            assert ObjectKey("Service", "default", "mcp") in keys(state)  # appProtocol kgateway.dev/mcp


async def test_changes_within_the_debounce_coalesce(tmp_path: Path) -> None:
    settings = KubernetesSourceSettings(debounce=0.3, backoff_initial=0.01)
    with anyio.fail_after(WAIT):
        async with running(tmp_path, settings) as run:
            await run.until(lambda s: True)
            for index in range(5):
                run.api.put(route(f"r{index}", "gw", "svc"))
            state = await run.states.receive()
            assert {o.name for o in state.objects} == {f"r{index}" for index in range(5)}


async def test_dropped_watches_resume_without_losing_events(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with running(tmp_path, before=lambda api: api.put(route("kept", "gw", "svc"))) as run:
            await run.until(lambda s: {o.name for o in s.objects} == {"kept"})
            api = run.api
            await api.wait_for_watches(len(WATCHED_KINDS))
            api.stall()  # reconnections wait until the objects below exist
            assert api.drop_watches() == len(WATCHED_KINDS)
            while api.open_watches():
                await api.stalled()  # a reconnection is held: wait for every watch to be gone
                await anyio.lowlevel.checkpoint()
            api.put(route("added", "gw", "svc"))
            api.put(route("kept", "gw", "svc", path="/changed"))
            api.remove(GATEWAY_API, "HTTPRoute", "kept", "default")
            api.put(route("again", "gw", "svc"))
            api.release()
            state = await run.until(lambda s: {o.name for o in s.objects} == {"added", "again"})
            assert state.errors == ()
            # Resumed from the resourceVersion it had, not listed again.
            assert all(reflector.lists == 1 for reflector in run.source.reflectors)
            resumed = [path for method, path in api.requests if "httproutes" in path and "watch=" in path]
            assert len(resumed) >= 2 and "resourceVersion=" in resumed[-1]


async def test_gone_relists_and_converges(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with running(tmp_path, before=lambda api: api.put(route("old", "gw", "svc"))) as run:
            await run.until(lambda s: {o.name for o in s.objects} == {"old"})
            api = run.api
            await api.wait_for_watches(len(WATCHED_KINDS))
            api.stall()
            api.drop_watches()
            while api.open_watches():
                await api.stalled()
                await anyio.lowlevel.checkpoint()
            api.remove(GATEWAY_API, "HTTPRoute", "old", "default")
            api.put(route("new", "gw", "svc"))
            api.compact()  # the deletion above is no longer in the history
            api.release()
            state = await run.until(lambda s: {o.name for o in s.objects} == {"new"})
            assert state.errors == ()
            assert run.source.reflector("HTTPRoute").lists == 2


async def test_api_errors_back_off_and_recover(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        # Every first list fails (and their retries): the source syncs once the API answers.
        async with running(tmp_path, before=lambda api: (api.fail_next(25), api.put(gateway_class()))) as run:
            state = await run.until(lambda s: True)
            assert keys(state) == {ObjectKey("GatewayClass", "", "agentgate")} and state.errors == ()
            assert run.api.failures_pending == 0
            assert sum(1 for method, path in run.api.requests if "watch" not in path) >= 25 + len(WATCHED_KINDS)

            # A stalled API: watches are cut, reconnections fail for a while, then it is back.
            api = run.api
            await api.wait_for_watches(len(WATCHED_KINDS))
            api.stall()
            api.drop_watches()
            while api.open_watches():
                await api.stalled()
                await anyio.lowlevel.checkpoint()
            api.fail_next(30)
            api.put(gateway("gw"))
            api.release()
            state = await run.until(lambda s: ObjectKey("Gateway", "default", "gw") in keys(s) and not s.errors)
            assert api.failures_pending == 0


async def test_api_refusals_are_reported_until_fixed(tmp_path: Path) -> None:
    settings = KubernetesSourceSettings(debounce=0.02, backoff_initial=0.01, backoff_max=0.02)
    with anyio.fail_after(WAIT):
        async with running(tmp_path, settings) as run:
            await run.until(lambda s: True)
            await run.api.wait_for_watches(len(WATCHED_KINDS))
            run.api.stall()
            run.api.drop_watches()
            while run.api.open_watches():
                await run.api.stalled()
                await anyio.lowlevel.checkpoint()
            run.api.fail_next(1000, 403, "Forbidden")
            run.api.release()
            state = await run.until(lambda s: bool(s.errors))  # not the dropped watches: the refusal
            assert "403 Forbidden" in str(state.errors[0]) and "RBAC" in str(state.errors[0])
            run.api.heal()  # RBAC fixed
            await run.until(lambda s: not s.errors)


async def test_invalid_objects_reported_and_last_good_kept(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with running(tmp_path) as run:
            await run.until(lambda s: True)
            api = run.api
            api.put(gateway_class())
            api.put(gateway("gw", 8080))
            good = await run.until(lambda s: ObjectKey("Gateway", "default", "gw") in keys(s))
            api.put(gateway("gw", 70000))
            state = await run.until(lambda s: bool(s.errors))
            kept = next(o for o in state.objects if o.kind == "Gateway")
            assert kept == next(o for o in good.objects if o.kind == "Gateway")
            assert kept.spec["listeners"][0]["port"] == 8080
            error = state.errors[0]
            assert (error.kind, error.namespace, error.name) == ("Gateway", "default", "gw")
            assert error.field == "spec.listeners[0].port"
            assert str(error) == "Gateway default/gw: spec.listeners[0].port: 70000 is out of range 1..65535"
            api.put(gateway("gw", 8082))
            state = await run.until(lambda s: not s.errors)
            assert next(o for o in state.objects if o.kind == "Gateway").spec["listeners"][0]["port"] == 8082
            # An object invalid from the start is reported and not used.
            api.put({**route("bad", "gw", "svc"), "spec": {"parentRefs": "gw"}})
            state = await run.until(lambda s: bool(s.errors))
            assert state.errors[0].name == "bad" and ObjectKey("HTTPRoute", "default", "bad") not in keys(state)
            api.remove(GATEWAY_API, "HTTPRoute", "bad", "default")
            await run.until(lambda s: not s.errors)


async def test_one_namespace(tmp_path: Path) -> None:
    settings = KubernetesSourceSettings(namespace="team-a", debounce=0.02, backoff_initial=0.01)

    def objects(api: FakeKubeApi) -> None:
        api.put({**route("mine", "gw", "svc"), "metadata": {"name": "mine", "namespace": "team-a"}})
        api.put(route("theirs", "gw", "svc"))
        api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "labels": {"t": "a"}}})
        api.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        api.put(gateway_class())

    with anyio.fail_after(WAIT):
        async with running(tmp_path, settings, before=objects) as run:
            state = await run.until(lambda s: True)
            assert keys(state) == {ObjectKey("HTTPRoute", "team-a", "mine"), ObjectKey("Namespace", "", "team-a"),
                                   ObjectKey("GatewayClass", "", "agentgate")}
            assert any("/namespaces/team-a/httproutes" in path for _, path in run.api.requests)


def test_backoff_is_capped_and_jittered() -> None:
    high = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [high.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]
    low.reset()
    assert low.next_delay() == 0.5


async def test_only_gateways_whose_inputs_changed_are_pushed(tmp_path: Path) -> None:
    """Every state is translated whole; the snapshot cache keeps the same snapshot for a Gateway
    whose content did not change, so its proxies are not woken."""

    def objects(api: FakeKubeApi) -> None:
        api.put(gateway_class())
        for name, port in (("one", 8081), ("two", 8082)):
            api.put(gateway(name, port))
            api.put(route(f"route-{name}", name, f"svc-{name}"))
            api.put(service(f"svc-{name}"))

    with anyio.fail_after(WAIT):
        async with running(tmp_path, before=objects) as run:
            plane = ControlPlane(ControlPlaneSettings(metrics_port=-1))
            report = plane.reconcile(await run.until(lambda s: len(s.objects) == 7))
            assert report.gateways == ("default/one", "default/two")
            one, two = plane.cache.get_snapshot("default/one"), plane.cache.get_snapshot("default/two")
            assert one is not None and two is not None
            run.api.put(route("route-one", "one", "svc-one", path="/moved"))
            plane.reconcile(await run.until(lambda s: any(o.generation == 2 for o in s.objects)))
            assert plane.cache.get_snapshot("default/two") is two  # same object: nobody woken
            changed = plane.cache.get_snapshot("default/one")
            assert changed is not None and changed.version != one.version
            with anyio.move_on_after(0.05) as waited:
                await plane.cache.wait_for_change("default/two", two)
            assert waited.cancel_called


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--config", "x", "--kubernetes", "--kubeconfig", "k"], "exactly one of --config DIR and --kubernetes"),
        ([], "exactly one of --config DIR and --kubernetes"),
        (["--config", "x", "--namespace", "a"], "--namespace and --secret-selector need --kubernetes"),
        (["--kubernetes"], "--kubernetes needs --kubeconfig PATH, or running in a pod"),
    ],
)
def test_cli_source_flags(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.cli import build_parser

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    args = build_parser().parse_args(["controlplane", *argv])
    assert args.func(args) == 2
    assert complaint in capsys.readouterr().err
