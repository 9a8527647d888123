"""Gateway API HTTPRoute filters: header modifiers, URLRewrite and RequestRedirect."""

from __future__ import annotations

import pytest

from dataplane.routing.filters import (
    CompiledRedirect,
    CompiledUrlRewrite,
    HeaderOps,
    replace_prefix,
    split_host_port,
)

# --- RequestHeaderModifier / ResponseHeaderModifier ------------------------------------------


def test_set_replaces_every_value_case_insensitively() -> None:
    ops = HeaderOps.from_strings(set=[("X-Env", "prod")])
    headers = [(b"x-env", b"a"), (b"Host", b"h"), (b"X-ENV", b"b")]
    assert ops.apply(headers) == [(b"Host", b"h"), (b"x-env", b"prod")]


def test_add_appends_and_keeps_existing_values() -> None:
    ops = HeaderOps.from_strings(add=[("X-Tag", "two")])
    assert ops.apply([(b"x-tag", b"one")]) == [(b"x-tag", b"one"), (b"x-tag", b"two")]


def test_remove_drops_all_values_case_insensitively() -> None:
    ops = HeaderOps.from_strings(remove=["X-Secret"])
    assert ops.apply([(b"X-SECRET", b"1"), (b"accept", b"*/*"), (b"x-secret", b"2")]) == [(b"accept", b"*/*")]


def test_set_add_remove_together() -> None:
    ops = HeaderOps.from_strings(set=[("a", "1")], add=[("b", "2")], remove=["c"])
    headers = [(b"A", b"old"), (b"b", b"kept"), (b"C", b"gone"), (b"d", b"x")]
    assert ops.apply(headers) == [(b"b", b"kept"), (b"d", b"x"), (b"a", b"1"), (b"b", b"2")]


def test_apply_edits_in_place_and_returns_the_same_list() -> None:
    ops = HeaderOps.from_strings(remove=["x"])
    headers = [(b"x", b"1"), (b"y", b"2")]
    assert ops.apply(headers) is headers
    assert headers == [(b"y", b"2")]


def test_first_set_of_a_name_wins() -> None:
    ops = HeaderOps.from_strings(set=[("A", "1"), ("a", "2")])
    assert ops.apply([]) == [(b"a", b"1")]


# --- URLRewrite -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matched_prefix", "path", "replacement", "expected"),
    [
        ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo", "/foo/", "/xyz", "/xyz/"),
        ("/foo", "/foo/bar", "/", "/bar"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "/foo/", "/", "/"),
        ("/", "/bar", "/xyz", "/xyz/bar"),
        ("/prefix/one", "/prefix/one/two", "/one", "/one/two"),
    ],
)
def test_replace_prefix_match_keeps_element_boundaries(
    matched_prefix: str, path: str, replacement: str, expected: str
) -> None:
    rewrite = CompiledUrlRewrite(replace_prefix_match=replacement)
    assert rewrite.rewrite_path(path, matched_prefix) == expected
    assert replace_prefix(path, matched_prefix, replacement) == expected


def test_replace_full_path_ignores_the_request_path() -> None:
    rewrite = CompiledUrlRewrite(replace_full_path="/new")
    assert rewrite.rewrite_path("/old/deep/path", "/old") == "/new"
    assert rewrite.rewrite_path("/other", None) == "/new"


def test_rewrite_without_path_modifier_keeps_path() -> None:
    rewrite = CompiledUrlRewrite(hostname="internal.svc")
    assert rewrite.rewrite_path("/a/b", "/a") == "/a/b"
    assert rewrite.hostname == "internal.svc"


def test_prefix_rewrite_without_a_matched_prefix_keeps_path() -> None:
    assert CompiledUrlRewrite(replace_prefix_match="/x").rewrite_path("/a/b", None) == "/a/b"


# --- RequestRedirect --------------------------------------------------------------------------

REQUEST = {"scheme": "http", "host": "example.com", "port": 80, "path": "/a/b", "query": "", "matched_prefix": "/a"}

REDIRECTS = [
    pytest.param(CompiledRedirect(), {}, "http://example.com/a/b", id="nothing-set-keeps-request"),
    pytest.param(CompiledRedirect(scheme="https"), {}, "https://example.com/a/b", id="scheme-https-implies-443"),
    pytest.param(
        CompiledRedirect(scheme="https"), {"port": 8080}, "https://example.com/a/b", id="scheme-sets-well-known-port"
    ),
    pytest.param(
        CompiledRedirect(scheme="http"),
        {"scheme": "https", "port": 443},
        "http://example.com/a/b",
        id="https-to-http-omits-80",
    ),
    pytest.param(
        CompiledRedirect(hostname="new.example.com"),
        {"port": 8080, "host": "example.com:8080"},
        "http://new.example.com:8080/a/b",
        id="hostname-keeps-listener-port",
    ),
    pytest.param(
        CompiledRedirect(scheme="https", port=8443), {}, "https://example.com:8443/a/b", id="explicit-port-kept"
    ),
    pytest.param(CompiledRedirect(port=80), {"port": 8080}, "http://example.com/a/b", id="default-port-omitted"),
    pytest.param(
        CompiledRedirect(), {"scheme": "https", "port": 8443}, "https://example.com:8443/a/b", id="listener-port-kept"
    ),
    pytest.param(CompiledRedirect(), {"port": None}, "http://example.com/a/b", id="unknown-port-omitted"),
    pytest.param(
        CompiledRedirect(), {"host": "Example.com:80"}, "http://Example.com/a/b", id="request-host-port-dropped"
    ),
    pytest.param(CompiledRedirect(), {"query": "x=1&y=2"}, "http://example.com/a/b?x=1&y=2", id="query-kept"),
    pytest.param(CompiledRedirect(replace_full_path="/moved"), {}, "http://example.com/moved", id="full-path"),
    pytest.param(CompiledRedirect(replace_prefix_match="/z"), {}, "http://example.com/z/b", id="prefix-replaced"),
    pytest.param(
        CompiledRedirect(),
        {"host": "[2001:db8::1]:8080", "port": 8080},
        "http://[2001:db8::1]:8080/a/b",
        id="ipv6-host-bracketed",
    ),
]


@pytest.mark.parametrize(("redirect", "overrides", "expected"), REDIRECTS)
def test_request_redirect_location(redirect: CompiledRedirect, overrides: dict, expected: str) -> None:
    assert redirect.location(**{**REQUEST, **overrides}) == expected


def test_redirect_status_defaults_to_302() -> None:
    assert CompiledRedirect().status == 302


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("example.com:8080", ("example.com", 8080)),
        ("[::1]:443", ("::1", 443)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("example.com:bad", ("example.com", None)),
    ],
)
def test_split_host_port(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(authority) == expected
