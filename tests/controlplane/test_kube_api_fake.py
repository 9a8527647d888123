"""The fake Kubernetes API (tests/peers/kube_api/) behaves like kube-apiserver for what we use,
proven with the real kubernetes-asyncio client: typed core clients, CustomObjectsApi and the
library's own Watch helper."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from controlplane.token_review import KubeApiConfig
from tests.peers.kube_api import FakeKubeApi, kube_api

pytestmark = pytest.mark.anyio

GROUP, VERSION = "gateway.networking.k8s.io", "v1"
WAIT = 10.0
MERGE = "application/merge-patch+json"


def route(name: str, path: str = "/", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"matches": [{"path": {"value": path}}]}]},
    }


@asynccontextmanager
async def connected(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[FakeKubeApi, ApiClient]]:
    async with kube_api(**settings) as api:
        client = await KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig")).api_client()
        try:
            yield api, client
        finally:
            await client.close()


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body) if exc.body else {}
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["code"] == exc.status
    return body


async def test_crud_list_and_conflicts(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (api, client):
            custom = kube_client.CustomObjectsApi(client)
            core = kube_client.CoreV1Api(client)
            created = await custom.create_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", route("a"))
            assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
            await custom.create_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", route("b", labels={"team": "x"})
            )
            with pytest.raises(ApiException) as exists:
                await custom.create_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", route("a"))
            assert exists.value.status == 409 and status_of(exists.value)["reason"] == "AlreadyExists"

            listed = await custom.list_cluster_custom_object(GROUP, VERSION, "httproutes")
            assert [i["metadata"]["name"] for i in listed["items"]] == ["a", "b"]
            assert listed["items"][0]["kind"] == "HTTPRoute"  # custom resources list with kind
            assert int(listed["metadata"]["resourceVersion"]) == api.store.revision == 2
            selected = await custom.list_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", label_selector="team in (x,y)"
            )
            assert [i["metadata"]["name"] for i in selected["items"]] == ["b"]
            others = await custom.list_namespaced_custom_object(GROUP, VERSION, "other", "httproutes")
            assert others["items"] == []

            # Replace with a stale resourceVersion: 409 Conflict; with the current one: accepted.
            stale = dict(created, spec={**created["spec"], "hostnames": ["x.example"]})
            await custom.patch_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", "a", {"metadata": {"labels": {"l": "1"}}},
                _content_type=MERGE,
            )
            with pytest.raises(ApiException) as conflict:
                await custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", "a", stale)
            assert conflict.value.status == 409 and status_of(conflict.value)["reason"] == "Conflict"
            current = await custom.get_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", "a")
            assert current["metadata"]["generation"] == 1  # a label is not the spec
            fresh = dict(current, spec={**current["spec"], "hostnames": ["x.example"]})
            replaced = await custom.replace_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", "a", fresh
            )
            assert replaced["metadata"]["generation"] == 2 and replaced["metadata"]["labels"] == {"l": "1"}

            # A no-op write keeps its resourceVersion.
            same = await custom.replace_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", "a", replaced)
            assert same["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]

            # JSON patch, and a dict sent as a JSON patch refused like kube-apiserver does.
            patched = await custom.patch_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", "a",
                [{"op": "replace", "path": "/spec/hostnames/0", "value": "y.example"}],
            )
            assert patched["spec"]["hostnames"] == ["y.example"]
            with pytest.raises(ApiException) as bad_patch:
                await custom.patch_namespaced_custom_object(
                    GROUP, VERSION, "default", "httproutes", "a", {"spec": {}},
                    _content_type="application/json-patch+json",
                )
            assert bad_patch.value.status == 400

            # Built-in kinds: typed client; items listed without kind; delete with a stale precondition.
            service = kube_client.V1Service(
                metadata=kube_client.V1ObjectMeta(name="svc", labels={"app": "mcp"}),
                spec=kube_client.V1ServiceSpec(ports=[kube_client.V1ServicePort(port=80, app_protocol="x")]),
            )
            made = await core.create_namespaced_service("default", service)
            assert made.spec.ports[0].app_protocol == "x"
            raw = await core.list_service_for_all_namespaces(_preload_content=False)
            items = json.loads(await raw.read())["items"]
            assert "kind" not in items[0] and items[0]["metadata"]["name"] == "svc"
            with pytest.raises(ApiException) as precondition:
                await core.delete_namespaced_service(
                    "svc", "default", body=kube_client.V1DeleteOptions(
                        preconditions=kube_client.V1Preconditions(resource_version="1")
                    )
                )
            assert precondition.value.status == 409
            await core.delete_namespaced_service("svc", "default")
            with pytest.raises(ApiException) as missing:
                await core.read_namespaced_service("svc", "default")
            body = status_of(missing.value)
            assert body["reason"] == "NotFound" and body["message"] == 'services "svc" not found'
            assert body["details"] == {"name": "svc", "group": "", "kind": "services"}


async def test_status_subresource_and_generation(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (_, client):
            custom = kube_client.CustomObjectsApi(client)
            with_status = {**route("r"), "status": {"parents": ["ignored on create"]}}
            created = await custom.create_namespaced_custom_object(GROUP, VERSION, "default", "httproutes", with_status)
            assert "status" not in created
            status = {"parents": [{"controllerName": "agentgate.dev/gateway-controller", "conditions": []}]}
            updated = await custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", "httproutes", "r",
                {"status": status, "spec": {"hostnames": ["ignored.example"]}}, _content_type=MERGE,
            )
            assert updated["status"] == status and "hostnames" not in updated["spec"]
            assert updated["metadata"]["generation"] == 1
            assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
            # The main resource ignores status; its spec change bumps the generation.
            spec_change = {**updated, "spec": {**updated["spec"], "hostnames": ["a.example"]}, "status": {}}
            replaced = await custom.replace_namespaced_custom_object(
                GROUP, VERSION, "default", "httproutes", "r", spec_change
            )
            assert replaced["status"] == status and replaced["metadata"]["generation"] == 2
            # PUT status with a stale resourceVersion conflicts.
            with pytest.raises(ApiException) as conflict:
                await custom.replace_namespaced_custom_object_status(
                    GROUP, VERSION, "default", "httproutes", "r", {**updated, "status": {}}
                )
            assert conflict.value.status == 409
            put = await custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, "default", "httproutes", "r", {**replaced, "status": {"parents": []}}
            )
            assert put["status"] == {"parents": []} and put["spec"] == replaced["spec"]
            # Types without a status subresource do not serve one (Lease); leases work.
            coordination = kube_client.CoordinationV1Api(client)
            lease = kube_client.V1Lease(
                metadata=kube_client.V1ObjectMeta(name="leader"),
                spec=kube_client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15),
            )
            held = await coordination.create_namespaced_lease("default", lease)
            held.spec.holder_identity = "b"
            taken = await coordination.replace_namespaced_lease("leader", "default", held)
            assert taken.spec.holder_identity == "b"
            held.spec.holder_identity = "c"  # the old resourceVersion: someone else won
            with pytest.raises(ApiException) as lost:
                await coordination.replace_namespaced_lease("leader", "default", held)
            assert lost.value.status == 409


async def test_watch_events_bookmarks_and_timeout(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path, bookmark_interval=0.05) as (api, client):
            custom = kube_client.CustomObjectsApi(client)
            api.put(route("before"))
            listed = await custom.list_namespaced_custom_object(GROUP, VERSION, "default", "httproutes")
            since = listed["metadata"]["resourceVersion"]
            api.put(route("added"))  # while no watch is open: replayed from history
            seen: list[tuple[str, str]] = []
            async with Watch() as watch:
                stream = watch.stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, "default", "httproutes",
                    resource_version=since, allow_watch_bookmarks=True, timeout_seconds=2,
                )
                async for event in stream:
                    name = event["raw_object"]["metadata"].get("name", "")
                    seen.append((event["type"], name))
                    if event["type"] == "ADDED" and name == "added":
                        api.put(route("added", path="/v2"))
                        api.remove(f"{GROUP}/{VERSION}", "HTTPRoute", "before", "default")
                    if event["type"] == "BOOKMARK":
                        bookmark_version = event["raw_object"]["metadata"]["resourceVersion"]
                        assert bookmark_version == str(api.store.revision)
                        watch.stop()
            assert seen[:3] == [("ADDED", "added"), ("MODIFIED", "added"), ("DELETED", "before")]
            assert seen[-1] == ("BOOKMARK", "")

            # timeoutSeconds ends the stream cleanly; a watch from "now" starts with every object.
            async with Watch() as watch:
                events = [
                    event["type"] async for event in watch.stream(
                        custom.list_namespaced_custom_object, GROUP, VERSION, "default", "httproutes",
                        timeout_seconds=1,
                    )
                ]
            assert events == ["ADDED"]


async def test_label_selector_watch_sees_objects_move_in_and_out(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (api, client):
            custom = kube_client.CustomObjectsApi(client)
            api.put(route("r", labels={"team": "a"}))
            seen: list[tuple[str, str]] = []
            async with Watch() as watch:
                async for event in watch.stream(
                    custom.list_cluster_custom_object, GROUP, VERSION, "httproutes", label_selector="team=a",
                    resource_version="0", timeout_seconds=5,
                ):
                    seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if len(seen) == 1:
                        api.put(route("r", labels={"team": "b"}))  # leaves the selection: DELETED
                        api.put(route("s", labels={"team": "a"}))
                    if len(seen) == 3:
                        break
            assert seen == [("ADDED", "r"), ("DELETED", "r"), ("ADDED", "s")]


@pytest.fixture
def labelled_route() -> dict[str, Any]:
    return route("r", labels={"team": "a"})


async def test_label_selector_watch_initial_state(tmp_path: Path, labelled_route: dict[str, Any]) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (api, client):
            api.put(labelled_route)
            api.put(route("other", labels={"team": "b"}))
            custom = kube_client.CustomObjectsApi(client)
            async with Watch() as watch:
                names = [
                    event["object"]["metadata"]["name"] async for event in watch.stream(
                        custom.list_cluster_custom_object, GROUP, VERSION, "httproutes", label_selector="team=a",
                        timeout_seconds=1,
                    )
                ]
            assert names == ["r"]


async def test_compacted_history_is_410_gone(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (api, client):
            custom = kube_client.CustomObjectsApi(client)
            api.put(route("a"))
            old = str(api.store.revision)
            api.put(route("b"))
            assert api.compact() == 2
            async with Watch() as watch:
                with pytest.raises(ApiException) as gone:
                    async for _ in watch.stream(
                        custom.list_namespaced_custom_object, GROUP, VERSION, "default", "httproutes",
                        resource_version=old, timeout_seconds=2,
                    ):
                        pass
            assert gone.value.status == 410 and "too old resource version" in str(gone.value.reason)
            with pytest.raises(ApiException) as exact:
                await custom.list_namespaced_custom_object(
                    GROUP, VERSION, "default", "httproutes", resource_version=old, resource_version_match="Exact"
                )
            assert exact.value.status == 410 and status_of(exact.value)["reason"] == "Expired"
            # From the compacted revision itself, the watch works (nothing was lost after it).
            async with Watch() as watch:
                events = [e["type"] async for e in watch.stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, "default", "httproutes",
                    resource_version="2", timeout_seconds=1,
                )]
            assert events == []


async def test_test_controls_drop_fail_and_stall(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with connected(tmp_path) as (api, client):
            core = kube_client.CoreV1Api(client)
            api.fail_next(2)
            for _ in range(2):
                with pytest.raises(ApiException) as failed:
                    await core.list_namespaced_config_map("default")
                assert failed.value.status == 500 and status_of(failed.value)["reason"] == "InternalError"
            assert (await core.list_namespaced_config_map("default")).items == []

            response = await core.list_namespaced_config_map(
                "default", watch=True, timeout_seconds=30, _preload_content=False
            )
            await api.wait_for_watches(1, "configmaps")
            assert api.drop_watches() == 1
            with pytest.raises(aiohttp.ClientPayloadError):  # cut mid-stream, not a clean end
                await response.content.read()
            response.release()

            api.stall()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(core.list_namespaced_config_map, "default")
                await api.stalled()
                assert api.requests[-1][1].startswith("/api/v1/namespaces/default/configmaps")
                api.release()
