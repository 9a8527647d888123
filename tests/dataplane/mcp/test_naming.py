"""Target prefixes and URI rewrites: round trips, refused target names, prefix modes."""

from __future__ import annotations

import pytest

from dataplane.mcp.naming import SEPARATOR, Naming, PrefixMode, TargetNameError, check_target_name

TARGETS = ("git-hub", "my_fs", "a", "x1-y_2", "Z")
TRICKY_NAMES = (
    "create_issue",
    "read.file",
    "kebab-case-tool",
    "a__b",  # the separator inside the tool name
    "__leading",
    "trailing__",
    "_",
    "-",
    "...",
    "git-hub__create_issue",  # looks like an exposed name already
)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_prefixed_names_round_trip_whatever_the_tool_name_contains(target: str, name: str) -> None:
    naming = Naming(TARGETS, PrefixMode.ALWAYS)
    exposed = naming.expose(target, name)
    assert exposed == f"{target}{SEPARATOR}{name}"
    assert naming.split(exposed) == (target, name)


@pytest.mark.parametrize(
    "name",
    ["a__b", "a___b", "a.b", "_a", "a_", "-a", "a-", "", "a/b", "a b", "a:b", "ä", "a" * 64, None],
)
def test_target_names_that_would_break_the_prefix_are_refused(name: str | None) -> None:
    with pytest.raises(TargetNameError):
        check_target_name(name)  # type: ignore[arg-type]
    with pytest.raises(TargetNameError):
        Naming(["ok", name])  # type: ignore[list-item]


@pytest.mark.parametrize("name", ["a", "a_b", "a-b", "a_b-c_d", "A1", "1", "x" * 63, "a-_-b"])
def test_target_names_may_contain_underscore_and_hyphen(name: str) -> None:
    assert check_target_name(name) == name


@pytest.mark.parametrize(
    ("mode", "targets", "prefixed"),
    [
        (PrefixMode.CONDITIONAL, ["a"], False),
        (PrefixMode.CONDITIONAL, ["a", "b"], True),
        (PrefixMode.ALWAYS, ["a"], True),
        (PrefixMode.ALWAYS, ["a", "b", "c"], True),
        (PrefixMode.NEVER, ["a"], False),
        (PrefixMode.NEVER, ["a", "b", "c"], False),
    ],
)
def test_prefix_mode_decides_whether_names_and_uris_carry_the_target(
    mode: PrefixMode, targets: list[str], prefixed: bool
) -> None:
    naming = Naming(targets, mode)
    assert naming.prefixed is prefixed
    if prefixed:
        assert naming.expose("a", "t") == "a__t"
        assert naming.expose_uri("a", "file:///x") == "mcp-target://a/file:///x"
    else:
        assert naming.expose("a", "t") == "t"
        assert naming.expose_uri("a", "file:///x") == "file:///x"
        assert naming.split("a__t") is None  # unprefixed: routing goes through the list index instead
        assert naming.split_uri("mcp-target://a/file:///x") is None


@pytest.mark.parametrize(
    "exposed",
    ["nope__tool", "git-hub", "git-hub__", "__tool", "", "git-hub_tool", "GIT-HUB__tool"],
)
def test_exposed_names_without_a_configured_target_do_not_split(exposed: str) -> None:
    assert Naming(TARGETS, PrefixMode.ALWAYS).split(exposed) is None


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/hosts",
        "db://{table}/rows{?limit}",
        "https://example.com/a/b?q=1&r=%2F#frag",
        "mcp-target://a/file:///nested",  # our own scheme inside: still verbatim
        "urn:isbn:0451450523",
        "memo://ümlaut/ä b",
    ],
)
def test_resource_uris_round_trip_and_keep_the_original_verbatim(uri: str) -> None:
    naming = Naming(TARGETS)
    for target in TARGETS:
        exposed = naming.expose_uri(target, uri)
        assert exposed.startswith(f"mcp-target://{target}/")
        assert exposed.endswith(uri)
        assert naming.split_uri(exposed) == (target, uri)


@pytest.mark.parametrize(
    "exposed",
    ["file:///etc/hosts", "mcp-target://nope/file:///x", "mcp-target://a", "mcp-target://a/", "mcp-target:///x"],
)
def test_uris_that_are_not_ours_do_not_split(exposed: str) -> None:
    assert Naming(TARGETS).split_uri(exposed) is None


def test_duplicate_or_missing_targets_are_refused_at_config_time() -> None:
    with pytest.raises(TargetNameError, match="duplicate"):
        Naming(["a", "b", "a"])
    with pytest.raises(TargetNameError, match="at least one"):
        Naming([])
