"""Gateway API HTTPRoute matching with its precedence rules, indexed at config time.

A `RouteTable` serves one listener group (one socket). Rules are bucketed by hostname
(exact names, then wildcards by longest suffix, then rules with no hostname) and within
a bucket by path: a dict for Exact paths, a dict keyed by normalised PathPrefix (looked
up once per path element, longest first), then a list of regexes. Each index slot holds
its entries already sorted by the remaining precedence keys (method, header count, query
count, age, route key, rule index), so the first entry whose conditions hold wins, and
the `RouteMatch` it returns was built at compile time.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal, NamedTuple
from urllib.parse import unquote_plus

from dataplane.config.model import UpstreamCluster
from dataplane.routing.filters import CompiledRedirect, CompiledUrlRewrite, HeaderOps
from shared.regex import Regex

PathKind = Literal["exact", "prefix", "regex"]


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """One backendRef of a rule.

    `direct_response_status` set: the control plane could not resolve this reference and
    its share is answered with that status (500). Otherwise `cluster` None means the
    backend is not in this config (answer 503, naming it).
    """

    name: str
    cluster: UpstreamCluster | None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    weight: int = 1
    direct_response_status: int = 0


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """What a matched rule does: answer directly, redirect, or forward (with filters)."""

    name: str
    route_key: str
    direct_response_status: int = 0
    request_timeout: float | None = None
    backend_timeout: float | None = None
    redirect: CompiledRedirect | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    url_rewrite: CompiledUrlRewrite | None = None
    backends: tuple[BackendChoice, ...] = ()
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _choices: tuple[BackendChoice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weighted = tuple(b for b in self.backends if b.weight > 0)
        object.__setattr__(self, "_choices", weighted)
        object.__setattr__(self, "_cumulative", tuple(accumulate(b.weight for b in weighted)))

    def pick_backend(self, rand: Callable[[], float] = random.random) -> BackendChoice | None:
        """A backendRef chosen by weight; None when no backend has weight (answer 500)."""
        choices = self._choices
        if len(choices) == 1:
            return choices[0]
        if not choices:
            return None
        cumulative = self._cumulative
        return choices[bisect_right(cumulative, int(rand() * cumulative[-1]))]


class RouteMatch(NamedTuple):
    route: CompiledRoute
    # The PathPrefix value that matched (as configured), for ReplacePrefixMatch.
    matched_prefix: str | None


class StringCondition(NamedTuple):
    """One header or query param match: exact value when `regex` is None, else a full regex match."""

    name: str
    value: str
    regex: Regex | None = None


@dataclass(frozen=True, slots=True)
class CompiledMatch:
    """One HTTPRouteMatch; all its conditions must hold. Header names are lower case."""

    path_kind: PathKind = "prefix"
    path: str = "/"
    path_regex: Regex | None = None
    method: str | None = None
    headers: tuple[StringCondition, ...] = ()
    query_params: tuple[StringCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A compiled rule with what its placement needs: hostnames, matches and precedence keys."""

    route: CompiledRoute
    hostnames: tuple[str, ...] = ()
    # No matches means one PathPrefix "/" match.
    matches: tuple[CompiledMatch, ...] = ()
    creation_unix_seconds: int = 0
    rule_index: int = 0


class _Entry:
    """One (rule, match) pair in an index slot, with its result prebuilt."""

    __slots__ = ("headers", "method", "query_params", "regex", "result", "sort_key")

    def __init__(self, rule: RouteRule, match: CompiledMatch, match_index: int) -> None:
        self.method = match.method
        self.headers = match.headers
        self.query_params = match.query_params
        self.regex = match.path_regex
        prefix = match.path if match.path_kind == "prefix" else None
        self.result = RouteMatch(rule.route, prefix)
        kind_rank = {"exact": 0, "prefix": 1, "regex": 2}[match.path_kind]
        prefix_length = len(_normalise_prefix(match.path)) if prefix is not None else 0
        self.sort_key = (
            kind_rank,
            -prefix_length,
            match.method is None,
            -len(match.headers),
            -len(match.query_params),
            rule.creation_unix_seconds,
            rule.route.route_key,
            rule.rule_index,
            match_index,
        )


def _normalise_prefix(prefix: str) -> str:
    """Index key of a PathPrefix: trailing slashes dropped, so "/" becomes ""."""
    return prefix.rstrip("/")


def parse_query(query: str) -> dict[str, str]:
    """Raw query -> {name: first value}, percent-decoded. Only built when a rule needs it."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        params.setdefault(name, value)
    return params


def _conditions_hold(
    entry: _Entry, method: str, headers: Mapping[str, str], query: str, parsed: list[dict[str, str]]
) -> bool:
    """Method, headers and query params of one match. `parsed` caches the query per request."""
    if entry.method is not None and entry.method != method:
        return False
    for name, value, regex in entry.headers:
        actual = headers.get(name)
        if actual is None or (actual != value if regex is None else regex.fullmatch(actual) is None):
            return False
    if entry.query_params:
        if not parsed:
            parsed.append(parse_query(query))
        params = parsed[0]
        for name, value, regex in entry.query_params:
            actual = params.get(name)
            if actual is None or (actual != value if regex is None else regex.fullmatch(actual) is None):
                return False
    return True


class _Bucket:
    """The rules of one hostname slot, indexed by path kind."""

    __slots__ = ("exact", "prefixes", "regexes")

    def __init__(self, entries: Iterable[tuple[CompiledMatch, _Entry]]) -> None:
        exact: dict[str, list[_Entry]] = {}
        prefixes: dict[str, list[_Entry]] = {}
        regexes: list[_Entry] = []
        for match, entry in entries:
            if match.path_kind == "exact":
                exact.setdefault(match.path, []).append(entry)
            elif match.path_kind == "prefix":
                prefixes.setdefault(_normalise_prefix(match.path), []).append(entry)
            else:
                regexes.append(entry)
        self.exact = {path: _sorted(slot) for path, slot in exact.items()}
        self.prefixes = {prefix: _sorted(slot) for prefix, slot in prefixes.items()}
        self.regexes = _sorted(regexes)

    def match(self, path: str, query: str, method: str, headers: Mapping[str, str]) -> RouteMatch | None:
        # The query is parsed at most once, and only if a candidate has query conditions.
        parsed: list[dict[str, str]] = []
        slot = self.exact.get(path)
        if slot is not None:
            for entry in slot:
                if _conditions_hold(entry, method, headers, query, parsed):
                    return entry.result
        prefixes = self.prefixes
        if prefixes:
            # Element-wise prefix: try the whole path, then cut at each "/" from the right.
            end = len(path)
            while True:
                slot = prefixes.get(path[:end])
                if slot is not None:
                    for entry in slot:
                        if _conditions_hold(entry, method, headers, query, parsed):
                            return entry.result
                if end <= 0:
                    break
                end = max(path.rfind("/", 0, end), 0)
        for entry in self.regexes:
            regex = entry.regex
            if (
                regex is not None
                and regex.fullmatch(path) is not None
                and _conditions_hold(entry, method, headers, query, parsed)
            ):
                return entry.result
        return None


def _sorted(entries: list[_Entry]) -> tuple[_Entry, ...]:
    return tuple(sorted(entries, key=lambda entry: entry.sort_key))


def normalise_host(host: str) -> str:
    """Request authority -> lower-case host without port, IPv6 brackets or trailing dot."""
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host[1:]
    else:
        colon = host.find(":")
        if colon >= 0 and host.find(":", colon + 1) < 0:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    return host.lower()


_DEFAULT_MATCH = CompiledMatch()


class RouteTable:
    """The routes of one listener group, matched per Gateway API HTTPRoute precedence."""

    __slots__ = ("_any_host", "_exact_hosts", "_wildcards", "rule_count")

    def __init__(self, rules: Iterable[RouteRule] = ()) -> None:
        by_host: dict[str, list[tuple[CompiledMatch, _Entry]]] = {}
        by_suffix: dict[str, list[tuple[CompiledMatch, _Entry]]] = {}
        any_host: list[tuple[CompiledMatch, _Entry]] = []
        count = 0
        for rule in rules:
            count += 1
            matches = rule.matches or (_DEFAULT_MATCH,)
            entries = [(match, _Entry(rule, match, index)) for index, match in enumerate(matches)]
            if not rule.hostnames:
                any_host.extend(entries)
            for hostname in dict.fromkeys(name.lower().rstrip(".") for name in rule.hostnames):
                if hostname.startswith("*."):
                    by_suffix.setdefault(hostname[1:], []).extend(entries)
                else:
                    by_host.setdefault(hostname, []).extend(entries)
        self._exact_hosts = {host: _Bucket(entries) for host, entries in by_host.items()}
        # Keyed by ".suffix"; a host is looked up at each of its dots, leftmost (longest) first.
        self._wildcards = {suffix: _Bucket(entries) for suffix, entries in by_suffix.items()}
        self._any_host = _Bucket(any_host) if any_host else None
        self.rule_count = count

    def __repr__(self) -> str:
        return f"RouteTable(rules={self.rule_count}, hosts={len(self._exact_hosts)}, wildcards={len(self._wildcards)})"

    def match(self, host: str, path: str, query: str, method: str, headers: Mapping[str, str]) -> RouteMatch | None:
        """The winning rule for a request, or None (answer 404).

        `host` is the request authority as received; `path` excludes the query; `query`
        is raw without "?"; `headers` maps lower-case names to values.
        """
        if self._exact_hosts or self._wildcards:
            name = normalise_host(host)
            bucket = self._exact_hosts.get(name)
            if bucket is not None:
                found = bucket.match(path, query, method, headers)
                if found is not None:
                    return found
            wildcards = self._wildcards
            if wildcards:
                dot = name.find(".")
                while dot > 0:  # a label before the suffix is required: "*.a.b" never matches "a.b"
                    bucket = wildcards.get(name[dot:])
                    if bucket is not None:
                        found = bucket.match(path, query, method, headers)
                        if found is not None:
                            return found
                    dot = name.find(".", dot + 1)
        if self._any_host is not None:
            return self._any_host.match(path, query, method, headers)
        return None
