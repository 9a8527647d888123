"""The folder source: last good version kept per object, and a watcher that sees every edit."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

from controlplane.model import ObjectKey
from controlplane.sources.folder import FolderSource, FolderState, may_change_state

GATEWAY_CLASS = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: agentgate
spec:
  controllerName: agentgate.dev/gateway-controller
"""


def http_route(name: str = "web", path: str = "/api", path_type: str = "PathPrefix") -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: default
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: {path_type}
        value: "{path}"
"""


def keys(state: FolderState) -> set[ObjectKey]:
    return {obj.key for obj in state.objects}


def route_path(state: FolderState, name: str = "web") -> str:
    [obj] = [o for o in state.objects if o.key == ObjectKey("HTTPRoute", "default", name)]
    return obj.spec["rules"][0]["matches"][0]["path"]["value"]


WEB = ObjectKey("HTTPRoute", "default", "web")
CLASS = ObjectKey("GatewayClass", "", "agentgate")


def test_reads_yaml_recursively_and_ignores_everything_else(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GATEWAY_CLASS + "---\n" + http_route() + "---\n")
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "b.yml").write_text(http_route("other"))
    (tmp_path / "notes.txt").write_text(http_route("txt"))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.yaml").write_text(http_route("hidden"))
    (tmp_path / "deploy.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    (tmp_path / "values.yaml").write_text("replicas: 3\n")
    state = FolderSource(tmp_path).load()
    assert state.errors == ()
    assert keys(state) == {CLASS, WEB, ObjectKey("HTTPRoute", "default", "other")}
    assert [obj.key for obj in state.objects] == sorted(keys(state))
    by_key = {obj.key: obj for obj in state.objects}
    assert by_key[WEB].source is not None
    assert (by_key[WEB].source.path, by_key[WEB].source.document) == (str(tmp_path / "a.yaml"), 1)


def test_invalid_object_is_reported_and_its_last_good_version_stays(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    config = tmp_path / "routes.yaml"
    config.write_text(http_route(path="/v1"))
    assert route_path(source.load()) == "/v1"

    config.write_text(http_route(path="/items/(unclosed", path_type="RegularExpression"))
    state = source.load()
    assert route_path(state) == "/v1"
    [error] = state.errors
    assert str(error).startswith(
        f"{config}: HTTPRoute default/web: spec.rules[0].matches[0].path.value: invalid regular expression:"
    )

    config.write_text(http_route(path="/v2"))
    state = source.load()
    assert (route_path(state), state.errors) == ("/v2", ())


def test_invalid_object_never_seen_valid_is_reported_and_absent(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(http_route(path="relative"))
    state = FolderSource(tmp_path).load()
    assert state.objects == ()
    assert [e.field for e in state.errors] == ["spec.rules[0].matches[0].path.value"]


def test_broken_metadata_keeps_last_good_version(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    config = tmp_path / "r.yaml"
    config.write_text(http_route())
    source.load()
    config.write_text(http_route().replace("namespace: default", "namespace: default\n  labels: {tier: 1}"))
    state = source.load()
    assert keys(state) == {WEB}
    assert [e.field for e in state.errors] == ["metadata.labels.tier"]


def test_yaml_syntax_error_keeps_every_object_of_the_file(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    config = tmp_path / "all.yaml"
    config.write_text(GATEWAY_CLASS + "---\n" + http_route())
    (tmp_path / "more.yaml").write_text(http_route("other"))
    assert keys(source.load()) == {CLASS, WEB, ObjectKey("HTTPRoute", "default", "other")}

    config.write_text(GATEWAY_CLASS + "---\n" + http_route() + "  - broken: [unclosed\n")
    (tmp_path / "more.yaml").unlink()
    state = source.load()
    assert keys(state) == {CLASS, WEB}
    [error] = state.errors
    assert error.file == str(config)
    assert error.line > 6
    assert str(error).startswith(f"{config}:{error.line}:")
    assert "invalid YAML" in error.message

    # Still broken on the next pass: the objects stay.
    assert keys(source.load()) == {CLASS, WEB}


def test_yaml_syntax_error_in_a_new_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    state = FolderSource(tmp_path).load()
    assert state.objects == ()
    assert {Path(e.file).name for e in state.errors} == {"bad.yaml", "bin.yaml"}


def test_deleted_file_removes_its_objects(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    (tmp_path / "a.yaml").write_text(GATEWAY_CLASS)
    (tmp_path / "b.yaml").write_text(http_route())
    assert keys(source.load()) == {CLASS, WEB}
    (tmp_path / "b.yaml").unlink()
    assert keys(source.load()) == {CLASS}


def test_object_defined_twice_is_reported_naming_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(http_route(path="/from-a"))
    (tmp_path / "b.yaml").write_text(http_route(path="/from-b"))
    state = FolderSource(tmp_path).load()
    assert route_path(state) == "/from-a"
    [error] = state.errors
    message = str(error)
    assert message.startswith(f"{tmp_path / 'b.yaml'}: HTTPRoute default/web: metadata.name:")
    assert str(tmp_path / "a.yaml") in message


def test_generation_moves_when_the_spec_changes(tmp_path: Path) -> None:
    source = FolderSource(tmp_path)
    config = tmp_path / "r.yaml"
    config.write_text(http_route(path="/a"))
    assert source.load().objects[0].generation == 1
    config.write_text(http_route(path="/a").replace("namespace: default", "namespace: default\n  labels: {x: y}"))
    assert source.load().objects[0].generation == 1
    config.write_text(http_route(path="/b"))
    assert source.load().objects[0].generation == 2


def test_missing_folder_is_an_error_and_keeps_the_objects(tmp_path: Path) -> None:
    root = tmp_path / "config"
    root.mkdir()
    (root / "r.yaml").write_text(http_route())
    source = FolderSource(root)
    source.load()
    (root / "r.yaml").unlink()
    root.rmdir()
    state = source.load()
    assert keys(state) == {WEB}
    assert "does not exist" in state.errors[0].message


# --- watch ----------------------------------------------------------------------------------


async def next_state(states: AsyncIterator[FolderState], done: Callable[[FolderState], bool]) -> FolderState:
    """The first state satisfying `done`; an editor's write may show up as several states."""
    with anyio.fail_after(10):
        while True:
            state = await anext(states)
            if done(state):
                return state


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.mark.anyio
async def test_watch_sees_create_modify_and_delete(tmp_path: Path) -> None:
    (tmp_path / "class.yaml").write_text(GATEWAY_CLASS)
    async with aclosing(FolderSource(tmp_path).watch()) as states:
        with anyio.fail_after(10):
            first = await anext(states)
        assert keys(first) == {CLASS}

        (tmp_path / "route.yaml").write_text(http_route(path="/one"))
        created = await next_state(states, lambda s: WEB in keys(s))
        assert route_path(created) == "/one"

        write_atomically(tmp_path / "route.yaml", http_route(path="/two"))
        modified = await next_state(states, lambda s: WEB in keys(s) and route_path(s) == "/two")
        assert modified.errors == ()

        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "nested.yml").write_text(http_route("nested"))
        nested = await next_state(states, lambda s: ObjectKey("HTTPRoute", "default", "nested") in keys(s))
        assert WEB in keys(nested)

        (tmp_path / "route.yaml").unlink()
        deleted = await next_state(states, lambda s: WEB not in keys(s))
        assert CLASS in keys(deleted)


@pytest.mark.anyio
async def test_watch_reports_a_bad_edit_and_keeps_serving_the_last_good(tmp_path: Path) -> None:
    (tmp_path / "route.yaml").write_text(http_route(path="/good"))
    async with aclosing(FolderSource(tmp_path).watch()) as states:
        with anyio.fail_after(10):
            await anext(states)
        write_atomically(tmp_path / "route.yaml", "this: is: not: yaml\n")
        broken = await next_state(states, lambda s: bool(s.errors))
        assert route_path(broken) == "/good"
        assert "invalid YAML" in broken.errors[0].message


@pytest.mark.parametrize(
    ("path", "relevant"),
    [
        ("/c/route.yaml", True),
        ("/c/route.YML", True),
        ("/c/team", True),  # a directory: may hold YAML
        ("/c/..data", True),  # Kubernetes ConfigMap volume swap
        ("/c/notes.txt", False),
        ("/c/route.yaml.swp", False),
        ("/c/.route.yaml.tmp", False),
    ],
)
def test_only_changes_that_can_alter_the_state_trigger_a_reload(path: str, relevant: bool) -> None:
    assert may_change_state(path) is relevant


@pytest.mark.anyio
async def test_watch_sees_an_edit_after_unrelated_noise(tmp_path: Path) -> None:
    (tmp_path / "route.yaml").write_text(http_route(path="/a"))
    async with aclosing(FolderSource(tmp_path).watch()) as states:
        with anyio.fail_after(10):
            await anext(states)
        (tmp_path / "notes.txt").write_text("not config")
        (tmp_path / "route.yaml.swp").write_text("editor swap")
        write_atomically(tmp_path / "route.yaml", http_route(path="/b"))
        # Noise never yields a state of its own: the first new state is the edit's.
        state = await next_state(states, lambda s: True)
        assert route_path(state) == "/b"


def native_threads() -> int:
    """Threads of this process that Python did not start (the file watcher's)."""
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())


@pytest.mark.anyio
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
async def test_closing_or_cancelling_the_watch_stops_the_watcher(tmp_path: Path) -> None:
    baseline = native_threads()
    source = FolderSource(tmp_path)
    for _ in range(5):
        states = source.watch()
        with anyio.fail_after(10):
            await anext(states)
        await states.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(states)

    # A consumer cancelled while waiting for a change stops within the watcher's wake interval.
    for _ in range(3):
        states = source.watch()
        with anyio.fail_after(10):
            await anext(states)
        with anyio.fail_after(5), anyio.move_on_after(0.1) as waiting:
            await anext(states)
        assert waiting.cancelled_caught
        with anyio.fail_after(5):
            await states.aclose()
    # Each closed watcher's thread ends on its own shortly after; eight of them never pile up.
    assert native_threads() <= baseline + 2


@pytest.mark.anyio
async def test_watch_of_a_missing_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        await anext(FolderSource(tmp_path / "missing").watch())


def _publish_like_kubelet(root: Path, version: int, content: str) -> None:
    """A ConfigMap volume update: a new hidden data folder, then an atomic swap of `..data`."""
    data = root / f"..2026_11_22_v{version}"
    data.mkdir()
    (data / "route.yaml").write_text(content)
    os.symlink(data.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    if not (root / "route.yaml").is_symlink():
        os.symlink("..data/route.yaml", root / "route.yaml")


@pytest.mark.anyio
async def test_watch_sees_a_configmap_volume_update(tmp_path: Path) -> None:
    _publish_like_kubelet(tmp_path, 1, http_route(path="/v1"))
    async with aclosing(FolderSource(tmp_path).watch()) as states:
        with anyio.fail_after(10):
            first = await anext(states)
        assert route_path(first) == "/v1" and len(first.objects) == 1, "hidden data folders are not read twice"
        _publish_like_kubelet(tmp_path, 2, http_route(path="/v2"))
        updated = await next_state(states, lambda s: WEB in keys(s) and route_path(s) == "/v2")
        assert updated.errors == ()
