"""Golden-file tests of the translator: golden/<case>/input.yaml -> snapshot.json + status.json.

Refresh the expected files after an intended change with
`AGENTGATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/controlplane/test_translate_golden.py`
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from controlplane.model import KubeObject, SourceRef, object_from_manifest
from controlplane.snapshot import SnapshotInconsistent, check_consistency
from controlplane.translate import TranslationResult, translate
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import LISTENER, ROUTE, TARGET, TYPE_ORDER, ResourceMap, short_name

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.name for path in GOLDEN.iterdir() if (path / "input.yaml").is_file())
UPDATE = os.environ.get("AGENTGATE_UPDATE_GOLDEN") == "1"


def load_objects(path: Path) -> list[KubeObject]:
    objects = []
    with path.open() as stream:
        for index, doc in enumerate(yaml.safe_load_all(stream)):
            obj, errors = object_from_manifest(doc, SourceRef(path.name, index))
            assert not errors, [str(e) for e in errors]
            if obj is not None:
                objects.append(obj)
    return objects


def snapshot_json(result: TranslationResult) -> dict[str, Any]:
    return {
        gateway: {
            short_name(type_url): {name: MessageToDict(message) for name, message in named.items()}
            for type_url, named in resources.items()
            if named
        }
        for gateway, resources in result.snapshots.items()
    }


def status_json(result: TranslationResult) -> list[dict[str, Any]]:
    return [{"kind": s.kind, "namespace": s.namespace, "name": s.name, "status": s.status} for s in result.statuses]


def dangling_references(gateway: str, resources: ResourceMap) -> list[str]:
    """Every reference that does not resolve inside the snapshot (the snapshot must be closed)."""
    problems = []
    listeners = resources[LISTENER]
    for name, listener in listeners.items():
        assert isinstance(listener, pb.Listener)
        if listener.gateway != gateway or not name.startswith(gateway + "/"):
            problems.append(f"listener {name} belongs to {listener.gateway}")
    for name, route in resources[ROUTE].items():
        assert isinstance(route, pb.Route)
        problems += [f"route {name} -> listener {key}" for key in route.listeners if key not in listeners]
        if not route.listeners:
            problems.append(f"route {name} has no listener")
        if route.direct_response_status and route.backends:
            problems.append(f"route {name} answers directly but lists backends")
    for name, target in resources[TARGET].items():
        assert isinstance(target, pb.Target)
        if not name.startswith(target.backend + "/"):
            problems.append(f"target {name} is not named under its backend {target.backend}")
    try:
        check_consistency(gateway, resources)  # the rule the snapshot cache enforces
    except SnapshotInconsistent as exc:
        problems.append(str(exc))
    return problems


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    folder = GOLDEN / case
    result = translate(load_objects(folder / "input.yaml"))
    snapshot, status = snapshot_json(result), status_json(result)
    snapshot_file, status_file = folder / "snapshot.json", folder / "status.json"
    if UPDATE:
        snapshot_file.write_text(json.dumps(snapshot, indent=2, sort_keys=True) + "\n")
        status_file.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    assert snapshot == json.loads(snapshot_file.read_text()), f"{case}: snapshot differs from snapshot.json"
    assert status == json.loads(status_file.read_text()), f"{case}: status differs from status.json"
    for gateway, resources in result.snapshots.items():
        assert list(resources) == list(TYPE_ORDER)
        assert dangling_references(gateway, resources) == []


@pytest.mark.parametrize("case", CASES)
def test_translation_is_deterministic(case: str) -> None:
    objects = load_objects(GOLDEN / case / "input.yaml")
    first = translate(objects)
    second = translate(reversed(objects))
    assert snapshot_json(first) == snapshot_json(second)
    assert status_json(first) == status_json(second)
    for resources in first.snapshots.values():
        for named in resources.values():
            assert list(named) == sorted(named)


