"""Config regexes are RE2: linear-time matching, and one syntax on both planes."""

from __future__ import annotations

import pytest

from controlplane.model import object_from_manifest, validate
from dataplane.config.compile import ConfigRejected, compile_config
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.regex import compile_regex
from shared.resources import LISTENER, ROUTE


def test_catastrophic_backtracking_pattern_matches_in_linear_time() -> None:
    # With Python's re this takes exponential time (2**40 steps); RE2 answers at once.
    pattern = compile_regex(r"/(a+)+$")
    assert pattern.fullmatch("/" + "a" * 40 + "b") is None
    assert pattern.fullmatch("/aaa") is not None


def test_backreferences_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"invalid escape sequence.*RE2 syntax"):
        compile_regex(r"/(a)\1")


def test_both_planes_refuse_what_re2_refuses() -> None:
    manifest = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": r"/(a)\1"}}]}],
        },
    }
    obj, errors = object_from_manifest(manifest, None)
    assert obj is not None and not errors
    problems = [str(e) for e in validate(obj)]
    assert any("spec.rules[0].matches[0].path.value: invalid regular expression" in p for p in problems), problems

    route = pb.Route(
        name="default/web/0",
        listeners=["default/gw/http"],
        route_key="default/web",
        matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_REGEX, value=r"/(a)\1"))],
        direct_response_status=500,
    )
    listener = pb.Listener(name="default/gw/http", gateway="default/gw", port=8080, protocol=pb.LISTENER_PROTOCOL_HTTP)
    with pytest.raises(ConfigRejected, match=r"matches\[0\]\.path\.value: invalid regular expression"):
        compile_config({LISTENER: {listener.name: listener}, ROUTE: {route.name: route}}, version="v1")
