"""Gateway API HTTPRoute matching: precedence, hostnames, paths, headers, query params.

Routes go through the real compiler (protos in, RouteTable out), so these tests also
pin how the proto fields map to matching behaviour.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from dataplane.config.compile import compile_config
from dataplane.config.model import UpstreamCluster, UpstreamTarget
from dataplane.routing.match import BackendChoice, CompiledRoute, RouteTable, normalise_host, parse_query
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE

LISTENER_NAME = "ns/gw/http"
EXACT, PREFIX, REGEX = pb.PathMatch.KIND_EXACT, pb.PathMatch.KIND_PREFIX, pb.PathMatch.KIND_REGEX
S_EXACT, S_REGEX = pb.STRING_MATCH_KIND_EXACT, pb.STRING_MATCH_KIND_REGEX


def match(
    kind: int = PREFIX,
    value: str = "/",
    *,
    method: str = "",
    headers: Sequence[tuple[str, str] | tuple[str, str, int]] = (),
    query: Sequence[tuple[str, str] | tuple[str, str, int]] = (),
) -> pb.RouteMatch:
    def conditions(cls: type, items: Sequence[tuple]) -> list:
        return [cls(name=item[0], value=item[1], kind=item[2] if len(item) > 2 else S_EXACT) for item in items]

    return pb.RouteMatch(
        path=pb.PathMatch(kind=kind, value=value),
        method=method,
        headers=conditions(pb.HeaderMatch, headers),
        query_params=conditions(pb.QueryParamMatch, query),
    )


def route(
    name: str,
    *matches: pb.RouteMatch,
    hostnames: Sequence[str] = (),
    created: int = 1_700_000_000,
    route_key: str | None = None,
    rule_index: int | None = None,
) -> pb.Route:
    """A rule named "ns/<route>/<index>"; its route key and rule index follow from the name."""
    key, _, index = name.rpartition("/")
    return pb.Route(
        name=name,
        listeners=[LISTENER_NAME],
        hostnames=list(hostnames),
        matches=list(matches),
        backends=[pb.BackendRef(backend="ns/backend", weight=1)],
        creation_unix_seconds=created,
        route_key=route_key or key,
        rule_index=int(index) if rule_index is None else rule_index,
    )


def table(*routes: pb.Route) -> RouteTable:
    resources = {
        LISTENER: {LISTENER_NAME: pb.Listener(name=LISTENER_NAME, port=8080, protocol=pb.LISTENER_PROTOCOL_HTTP)},
        BACKEND: {"ns/backend": pb.Backend(name="ns/backend")},
        ROUTE: {r.name: r for r in routes},
    }
    return compile_config(resources, version="test").listeners[("0.0.0.0", 8080)].route_table


def winner(
    routes: RouteTable,
    path: str = "/",
    *,
    host: str = "example.com",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    query: str = "",
) -> str | None:
    found = routes.match(host, path, query, method, headers or {})
    return found.route.name if found is not None else None


# --- precedence across routes ---------------------------------------------------------------
# Each case makes the expected winner lose every later tie-breaker (younger, later name,
# higher rule index), so only the rule under test can make it win.

PRECEDENCE = [
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/foo"), created=1), route("ns/z/9", match(EXACT, "/foo"), created=9)],
        {"path": "/foo"},
        "ns/z/9",
        id="exact-path-beats-prefix",
    ),
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/foo"), created=1), route("ns/z/9", match(PREFIX, "/foo/bar"), created=9)],
        {"path": "/foo/bar/baz"},
        "ns/z/9",
        id="longest-prefix-wins",
    ),
    pytest.param(
        [route("ns/a/0", match(REGEX, "/foo/.*"), created=1), route("ns/z/9", match(PREFIX, "/"), created=9)],
        {"path": "/foo/x"},
        "ns/z/9",
        id="prefix-beats-regex",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/foo", method="GET"), created=1),
            route("ns/z/9", match(PREFIX, "/foo/bar"), created=9),
        ],
        {"path": "/foo/bar"},
        "ns/z/9",
        id="prefix-length-beats-method",
    ),
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/"), created=1), route("ns/z/9", match(PREFIX, "/", method="GET"), created=9)],
        {"path": "/x", "method": "GET"},
        "ns/z/9",
        id="method-match-beats-none",
    ),
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/"), created=1), route("ns/z/9", match(PREFIX, "/", method="GET"), created=9)],
        {"path": "/x", "method": "POST"},
        "ns/a/0",
        id="method-mismatch-falls-back",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/", headers=[("a", "1"), ("b", "2")]), created=1),
            route("ns/z/9", match(PREFIX, "/", method="GET"), created=9),
        ],
        {"path": "/", "headers": {"a": "1", "b": "2"}},
        "ns/z/9",
        id="method-beats-header-count",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/", headers=[("a", "1")]), created=1),
            route("ns/z/9", match(PREFIX, "/", headers=[("a", "1"), ("b", "2")]), created=9),
        ],
        {"path": "/", "headers": {"a": "1", "b": "2"}},
        "ns/z/9",
        id="more-header-matches-win",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/", query=[("q", "1"), ("r", "2")]), created=1),
            route("ns/z/9", match(PREFIX, "/", headers=[("a", "1")]), created=9),
        ],
        {"path": "/", "headers": {"a": "1"}, "query": "q=1&r=2"},
        "ns/z/9",
        id="header-count-beats-query-count",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/", query=[("q", "1")]), created=1),
            route("ns/z/9", match(PREFIX, "/", query=[("q", "1"), ("r", "2")]), created=9),
        ],
        {"path": "/", "query": "q=1&r=2"},
        "ns/z/9",
        id="more-query-matches-win",
    ),
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/"), created=200), route("ns/z/9", match(PREFIX, "/"), created=100)],
        {"path": "/"},
        "ns/z/9",
        id="older-route-wins",
    ),
    pytest.param(
        [route("ns/b/0", match(PREFIX, "/"), created=100), route("ns/a/9", match(PREFIX, "/"), created=100)],
        {"path": "/"},
        "ns/a/9",
        id="route-key-alphabetical",
    ),
    pytest.param(
        [route("ns/a/1", match(PREFIX, "/"), created=100), route("ns/a/0", match(PREFIX, "/"), created=100)],
        {"path": "/"},
        "ns/a/0",
        id="lower-rule-index-wins",
    ),
    pytest.param(
        [
            route("ns/a/0", match(PREFIX, "/"), match(EXACT, "/x"), created=9),
            route("ns/b/0", match(PREFIX, "/x"), created=1),
        ],
        {"path": "/x"},
        "ns/a/0",
        id="precedence-is-per-match-not-per-rule",
    ),
    pytest.param(
        [route("ns/a/0", match(PREFIX, "/foo/"), created=9), route("ns/b/0", match(PREFIX, "/foo"), created=1)],
        {"path": "/foo/x"},
        "ns/b/0",
        id="trailing-slash-does-not-lengthen-prefix",
    ),
]


@pytest.mark.parametrize(("routes", "request_", "expected"), PRECEDENCE)
def test_precedence_across_routes(routes: list[pb.Route], request_: dict, expected: str) -> None:
    assert winner(table(*routes), **request_) == expected
    # Declaration order must not matter.
    assert winner(table(*reversed(routes)), **request_) == expected


# --- hostnames -------------------------------------------------------------------------------


@pytest.fixture
def hosted() -> RouteTable:
    return table(
        route("ns/any/0"),
        route("ns/wild/0", hostnames=["*.example.com"]),
        route("ns/deepwild/0", hostnames=["*.foo.example.com"]),
        route("ns/exact/0", hostnames=["api.example.com"]),
        route("ns/exact-api-only/0", match(PREFIX, "/api"), hostnames=["shop.example.com"]),
    )


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.example.com", "/", "ns/exact/0"),
        ("other.example.com", "/", "ns/wild/0"),
        ("a.b.example.com", "/", "ns/wild/0"),  # a wildcard covers one or more labels
        ("x.foo.example.com", "/", "ns/deepwild/0"),  # longest wildcard suffix first
        ("foo.example.com", "/", "ns/wild/0"),  # *.foo.example.com does not match its apex
        ("example.com", "/", "ns/any/0"),  # *.example.com does not match the apex
        ("unrelated.org", "/", "ns/any/0"),
        ("shop.example.com", "/api/cart", "ns/exact-api-only/0"),
        ("shop.example.com", "/home", "ns/wild/0"),  # no rule of the exact bucket matches: fall through
    ],
)
def test_hostname_specificity_and_wildcards(hosted: RouteTable, host: str, path: str, expected: str) -> None:
    assert winner(hosted, path, host=host) == expected


@pytest.mark.parametrize(
    "host",
    ["API.Example.COM", "api.example.com:8443", "api.example.com.", "Api.Example.Com.:80"],
)
def test_host_compare_ignores_case_port_and_trailing_dot(hosted: RouteTable, host: str) -> None:
    assert winner(hosted, host=host) == "ns/exact/0"


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("[2001:db8::1]:8080", "2001:db8::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", ""),
        ("[broken", "broken"),
    ],
)
def test_ipv6_and_ip_literals_normalise(authority: str, host: str) -> None:
    assert normalise_host(authority) == host


def test_ip_literal_host_uses_routes_without_hostname(hosted: RouteTable) -> None:
    assert winner(hosted, host="[2001:db8::1]:8080") == "ns/any/0"


def test_no_rule_for_host_and_no_catch_all_is_no_match() -> None:
    routes = table(route("ns/a/0", hostnames=["a.example.com"]))
    assert winner(routes, host="b.example.com") is None
    assert winner(routes, host="a.example.com") == "ns/a/0"


def test_empty_table_matches_nothing() -> None:
    assert RouteTable().match("example.com", "/", "", "GET", {}) is None


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),
        ("/foo", "/fo", False),
        ("/foo", "/FOO", False),  # paths compare case-sensitively
        ("/foo/", "/foo", True),  # a trailing "/" in the prefix is ignored
        ("/foo/", "/foo/bar", True),
        ("/foo/", "/foobar", False),
        ("/foo/bar", "/foo/bar/baz", True),
        ("/foo/bar", "/foo/barbaz", False),
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        ("/", "*", True),
    ],
)
def test_path_prefix_matches_whole_elements(prefix: str, path: str, matches: bool) -> None:
    routes = table(route("ns/a/0", match(PREFIX, prefix)))
    assert (winner(routes, path) == "ns/a/0") is matches


@pytest.mark.parametrize(
    ("exact", "path", "matches"),
    [("/foo", "/foo", True), ("/foo", "/foo/", False), ("/foo", "/foo/bar", False), ("/foo/", "/foo", False)],
)
def test_exact_path_is_string_equality(exact: str, path: str, matches: bool) -> None:
    routes = table(route("ns/a/0", match(EXACT, exact)))
    assert (winner(routes, path) == "ns/a/0") is matches


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/v[0-9]+", "/v1", True),
        ("/v[0-9]+", "/v12", True),
        ("/v[0-9]+", "/v1/users", False),  # full match, not search
        ("/v[0-9]+", "/api/v1", False),
        ("/users/[^/]+/orders", "/users/42/orders", True),
        ("/users/[^/]+/orders", "/users/42/orders/", False),
    ],
)
def test_regex_path_is_full_match(pattern: str, path: str, matches: bool) -> None:
    routes = table(route("ns/a/0", match(REGEX, pattern)))
    assert (winner(routes, path) == "ns/a/0") is matches


def test_rule_without_matches_is_prefix_slash() -> None:
    routes = table(route("ns/a/0"))
    found = routes.match("example.com", "/any/path", "", "DELETE", {})
    assert found is not None
    assert found.matched_prefix == "/"


def test_matched_prefix_is_the_configured_value_and_none_for_exact() -> None:
    routes = table(route("ns/a/0", match(PREFIX, "/api/"), match(EXACT, "/status")))
    prefixed = routes.match("h", "/api/v1", "", "GET", {})
    exact = routes.match("h", "/status", "", "GET", {})
    assert prefixed is not None and prefixed.matched_prefix == "/api/"
    assert exact is not None and exact.matched_prefix is None


# --- headers, query params, methods ----------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "headers", "matches"),
    [
        (("X-Env", "canary"), {"x-env": "canary"}, True),  # names compare case-insensitively
        (("x-env", "canary"), {"x-env": "Canary"}, False),  # values compare case-sensitively
        (("x-env", "canary"), {}, False),
        (("x-env", "canary"), {"x-env": "canary, stable"}, False),  # exact means the whole joined value
        (("x-env", "can.*", S_REGEX), {"x-env": "canary"}, True),
        (("x-env", "can", S_REGEX), {"x-env": "canary"}, False),  # regex is a full match
        (("x-env", ".*", S_REGEX), {}, False),  # absent header never matches, even .*
    ],
)
def test_header_match(condition: tuple, headers: dict[str, str], matches: bool) -> None:
    routes = table(route("ns/a/0", match(PREFIX, "/", headers=[condition])))
    assert (winner(routes, headers=headers) == "ns/a/0") is matches


@pytest.mark.parametrize(
    ("condition", "query", "matches"),
    [
        (("q", "1"), "q=1", True),
        (("q", "1"), "a=0&q=1&z=2", True),
        (("q", "1"), "Q=1", False),  # names compare case-sensitively
        (("q", "1"), "q=2", False),
        (("q", "1"), "", False),
        (("q", "a b"), "q=a%20b", True),  # values are percent-decoded
        (("q", "a b"), "q=a+b", True),
        (("q", "1"), "q=1&q=2", True),  # the first of repeated params counts
        (("q", "1"), "q=2&q=1", False),
        (("q", "[0-9]+", S_REGEX), "q=123", True),
        (("q", "[0-9]+", S_REGEX), "q=12a", False),
        (("flag", ""), "flag", True),  # a bare name has the empty value
    ],
)
def test_query_param_match(condition: tuple, query: str, matches: bool) -> None:
    routes = table(route("ns/a/0", match(PREFIX, "/", query=[condition])))
    assert (winner(routes, query=query) == "ns/a/0") is matches


def test_conditions_of_one_match_and_together() -> None:
    routes = table(route("ns/a/0", match(EXACT, "/x", method="POST", headers=[("h", "1")], query=[("q", "1")])))
    assert winner(routes, "/x", method="POST", headers={"h": "1"}, query="q=1") == "ns/a/0"
    assert winner(routes, "/x", method="GET", headers={"h": "1"}, query="q=1") is None
    assert winner(routes, "/x", method="POST", headers={}, query="q=1") is None
    assert winner(routes, "/x", method="POST", headers={"h": "1"}, query="") is None
    assert winner(routes, "/y", method="POST", headers={"h": "1"}, query="q=1") is None


def test_matches_of_one_rule_or_together() -> None:
    routes = table(route("ns/a/0", match(EXACT, "/a"), match(PREFIX, "/b", method="PUT")))
    assert winner(routes, "/a") == "ns/a/0"
    assert winner(routes, "/b/c", method="PUT") == "ns/a/0"
    assert winner(routes, "/b/c", method="GET") is None


def test_first_header_condition_of_a_name_counts() -> None:
    routes = table(route("ns/a/0", match(PREFIX, "/", headers=[("h", "1"), ("H", "2")])))
    assert winner(routes, headers={"h": "1"}) == "ns/a/0"
    assert winner(routes, headers={"h": "2"}) is None


def test_parse_query_keeps_first_value_and_decodes() -> None:
    assert parse_query("a=1&b=x%2Fy&a=2&&c") == {"a": "1", "b": "x/y", "c": ""}


# --- weighted backends -----------------------------------------------------------------------


def choice(name: str, weight: int) -> BackendChoice:
    return BackendChoice(name=name, cluster=None, weight=weight)


def test_weighted_backend_distribution_follows_weights() -> None:
    rule = CompiledRoute(name="r", route_key="r", backends=(choice("a", 1), choice("b", 3), choice("off", 0)))
    rand = random.Random(20240601).random
    draws = 40_000
    counts = Counter(pick.name for pick in (rule.pick_backend(rand) for _ in range(draws)) if pick is not None)
    assert counts["off"] == 0
    assert sum(counts.values()) == draws
    assert 0.23 < counts["a"] / draws < 0.27
    assert 0.73 < counts["b"] / draws < 0.77


@pytest.mark.parametrize("rand_value", [0.0, 0.249, 0.25, 0.999999999])
def test_weighted_pick_boundaries_never_pick_zero_weight(rand_value: float) -> None:
    rule = CompiledRoute(name="r", route_key="r", backends=(choice("z", 0), choice("a", 1), choice("b", 3)))
    picked = rule.pick_backend(lambda: rand_value)
    assert picked is not None
    assert picked.name == ("a" if rand_value < 0.25 else "b")


def test_all_zero_weights_pick_nothing() -> None:
    rule = CompiledRoute(name="r", route_key="r", backends=(choice("a", 0), choice("b", 0)))
    assert rule.pick_backend() is None
    assert CompiledRoute(name="r", route_key="r").pick_backend() is None


def test_single_backend_is_always_picked() -> None:
    rule = CompiledRoute(name="r", route_key="r", backends=(choice("only", 7),))
    assert {rule.pick_backend().name for _ in range(10)} == {"only"}  # type: ignore[union-attr]


def test_weighted_target_distribution_follows_weights() -> None:
    cluster = UpstreamCluster(
        name="b",
        targets=(UpstreamTarget("t1", "10.0.0.1", 80, 1), UpstreamTarget("t2", "10.0.0.2", 80, 4)),
    )
    rand = random.Random(7).random
    draws = 25_000
    counts = Counter(cluster.pick_target(rand).name for _ in range(draws))  # type: ignore[union-attr]
    assert 0.17 < counts["t1"] / draws < 0.23
    assert UpstreamCluster(name="empty").pick_target() is None


# --- scale ------------------------------------------------------------------------------------


def test_thousand_route_table_compiles_and_matches() -> None:
    routes = [
        route(
            f"ns/r{i:04d}/0",
            match(PREFIX, f"/svc{i}"),
            match(EXACT, f"/exact/{i}", method="GET"),
            match(REGEX, f"/re{i}/[a-z]+"),
            hostnames=[f"h{i % 10}.example.com"] if i % 2 else [],
        )
        for i in range(1000)
    ]
    routes_table = table(*routes)
    assert routes_table.rule_count == 1000
    assert winner(routes_table, "/svc998/x") == "ns/r0998/0"
    assert winner(routes_table, "/svc999/x", host="h9.example.com") == "ns/r0999/0"
    assert winner(routes_table, "/exact/500") == "ns/r0500/0"
    assert winner(routes_table, "/re42/abc") == "ns/r0042/0"
    assert winner(routes_table, "/nothing") is None
