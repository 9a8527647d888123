"""Translator pieces the golden files do not pin down one by one."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.model import KubeObject, SourceRef, object_from_manifest
from controlplane.translate import CONTROLLER_NAME, translate
from controlplane.translate.hostnames import effective_hostnames, intersect
from controlplane.translate.index import ObjectIndex, selector_matches
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import LISTENER, ROUTE, TYPE_ORDER


@pytest.mark.parametrize(
    ("listener", "route", "expected"),
    [
        ("", "a.example.com", "a.example.com"),
        ("a.example.com", "a.example.com", "a.example.com"),
        ("a.example.com", "b.example.com", None),
        ("*.example.com", "a.example.com", "a.example.com"),
        ("*.example.com", "a.b.example.com", "a.b.example.com"),
        ("*.example.com", "example.com", None),
        ("a.example.com", "*.example.com", "a.example.com"),
        ("example.com", "*.example.com", None),
        ("*.example.com", "*.a.example.com", "*.a.example.com"),
        ("*.a.example.com", "*.example.com", "*.a.example.com"),
        ("*.example.com", "*.example.org", None),
        ("*.example.com", "badexample.com", None),
    ],
)
def test_hostname_intersection(listener: str, route: str, expected: str | None) -> None:
    assert intersect(listener, route) == expected


def test_effective_hostnames() -> None:
    assert effective_hostnames("", []) == []  # any host
    assert effective_hostnames("*.example.com", []) == ["*.example.com"]
    assert effective_hostnames("*.example.com", ["a.example.com", "other.org"]) == ["a.example.com"]
    assert effective_hostnames("a.example.com", ["other.org"]) is None


def test_label_selector_semantics() -> None:
    labels = {"env": "prod", "team": "a"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"env": "prod"}}, labels)
    assert not selector_matches({"matchLabels": {"env": "dev"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)


def objects(*docs: dict[str, Any]) -> list[KubeObject]:
    result = []
    for index, doc in enumerate(docs):
        obj, errors = object_from_manifest(doc, SourceRef("test.yaml", index))
        assert obj is not None and not errors
        result.append(obj)
    return result


GATEWAY_CLASS = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GatewayClass",
    "metadata": {"name": "agentgate"},
    "spec": {"controllerName": CONTROLLER_NAME},
}
GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "gw", "namespace": "default"},
    "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]},
}


def test_nothing_in_nothing_out() -> None:
    result = translate([])
    assert result.snapshots == {}
    assert result.statuses == ()


def test_controller_name_selects_the_classes_we_own() -> None:
    input_objects = objects(GATEWAY_CLASS, GATEWAY)
    assert set(translate(input_objects).snapshots) == {"default/gw"}
    other = translate(input_objects, controller_name="example.com/someone-else")
    assert other.snapshots == {}
    assert other.statuses == ()


def test_gateway_without_routes_gets_a_snapshot_with_its_listener_only() -> None:
    result = translate(objects(GATEWAY_CLASS, GATEWAY))
    resources = result.snapshots["default/gw"]
    assert list(resources) == list(TYPE_ORDER)
    assert list(resources[LISTENER]) == ["default/gw/http"]
    assert resources[ROUTE] == {}


def test_route_without_rules_gets_the_default_rule_and_answers_500() -> None:
    http_route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "default", "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"parentRefs": [{"name": "gw"}]},
    }
    result = translate(objects(GATEWAY_CLASS, GATEWAY, http_route))
    route = result.snapshots["default/gw"][ROUTE]["default/r/0"]
    assert isinstance(route, pb.Route)
    assert route.direct_response_status == 500
    assert route.creation_unix_seconds == 1704067200
    assert route.route_key == "default/r"
    assert list(route.listeners) == ["default/gw/http"]
    [status] = [s for s in result.statuses if s.kind == "HTTPRoute"]
    accepted = status.status["parents"][0]["conditions"][0]
    assert (accepted["type"], accepted["status"]) == ("Accepted", "True")


def test_duplicate_input_objects_keep_the_first() -> None:
    first, second = objects(GATEWAY, {**GATEWAY, "spec": {**GATEWAY["spec"], "gatewayClassName": "other"}})
    index = ObjectIndex([first, second])
    assert index.get("Gateway", "default", "gw") is first


def test_status_lists_conditions_with_observed_generation_and_no_timestamps() -> None:
    gateway = {**GATEWAY, "metadata": {**GATEWAY["metadata"], "generation": 7}}
    result = translate(objects(GATEWAY_CLASS, gateway))
    [status] = [s for s in result.statuses if s.kind == "Gateway"]
    conditions = status.status["conditions"] + status.status["listeners"][0]["conditions"]
    assert {c["observedGeneration"] for c in conditions} == {7}
    assert all("lastTransitionTime" not in c for c in conditions)
