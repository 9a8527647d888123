"""Route resources -> `RouteRule`s: matches, filters, backend choices and timeouts, validated.

Backends are resolved here, once per update: a backendRef naming a Backend that is not
in the config becomes a choice with `cluster=None`, which the proxy answers with 503.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dataplane.config.errors import ErrorReporter
from dataplane.config.model import UpstreamCluster
from dataplane.config.validate import (
    MAX_WEIGHT_TOTAL,
    check_enum,
    check_header_name,
    check_header_value,
    check_hostname,
    check_path,
    compile_regex,
    duration_seconds,
)
from dataplane.routing.filters import REDIRECT_STATUSES, CompiledRedirect, CompiledUrlRewrite, HeaderOps
from dataplane.routing.match import (
    BackendChoice,
    CompiledMatch,
    CompiledRoute,
    PathKind,
    RouteRule,
    StringCondition,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb

_PATH_KINDS: dict[int, PathKind] = {
    pb.PathMatch.KIND_UNSPECIFIED: "prefix",  # the Gateway API default
    pb.PathMatch.KIND_EXACT: "exact",
    pb.PathMatch.KIND_PREFIX: "prefix",
    pb.PathMatch.KIND_REGEX: "regex",
}
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(slots=True)
class _Filters:
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    url_rewrite: CompiledUrlRewrite | None = None
    redirect: CompiledRedirect | None = None


def compile_route(
    report: ErrorReporter, name: str, route: pb.Route, backends: Mapping[str, UpstreamCluster]
) -> RouteRule:
    """One Route resource as a rule ready for a RouteTable. Problems go to `report`."""
    if route.name and route.name != name:
        report("name", f"{route.name!r} differs from the resource name")
    if route.direct_response_status and not 100 <= route.direct_response_status <= 599:
        report("direct_response_status", f"{route.direct_response_status} is not an HTTP status (100..599)")
    hostnames = tuple(
        dict.fromkeys(
            hostname.lower().rstrip(".")
            for index, hostname in enumerate(route.hostnames)
            if check_hostname(report, f"hostnames[{index}]", hostname, wildcard=True)
        )
    )
    matches = tuple(_compile_match(report, f"matches[{index}]", match) for index, match in enumerate(route.matches))
    all_prefix = all(match.path_kind == "prefix" for match in matches)
    filters = _compile_filters(report, "filters", route.filters, backend_level=False, all_prefix=all_prefix)
    request_timeout = duration_seconds(report, "timeouts.request", route.timeouts, "request") or None
    backend_timeout = duration_seconds(report, "timeouts.backend_request", route.timeouts, "backend_request") or None
    if request_timeout is not None and backend_timeout is not None and backend_timeout > request_timeout:
        report("timeouts.backend_request", f"{backend_timeout}s exceeds the request timeout {request_timeout}s")
    compiled = CompiledRoute(
        name=name,
        route_key=route.route_key or name.rsplit("/", 1)[0],
        direct_response_status=route.direct_response_status,
        request_timeout=request_timeout,
        backend_timeout=backend_timeout,
        redirect=filters.redirect,
        request_headers=filters.request_headers,
        response_headers=filters.response_headers,
        url_rewrite=filters.url_rewrite,
        backends=_compile_backend_refs(report, route.backends, backends),
    )
    return RouteRule(
        route=compiled,
        hostnames=hostnames,
        matches=matches,
        creation_unix_seconds=route.creation_unix_seconds,
        rule_index=route.rule_index,
    )


def _compile_match(report: ErrorReporter, field: str, match: pb.RouteMatch) -> CompiledMatch:
    path_kind: PathKind = "prefix"
    path = "/"
    path_regex = None
    if match.HasField("path"):
        if check_enum(report, f"{field}.path.kind", match.path, "kind"):
            path_kind = _PATH_KINDS[match.path.kind]
        value = match.path.value
        if path_kind == "regex":
            path = value
            if not value:
                report(f"{field}.path.value", "a RegularExpression path needs a pattern")
            path_regex = compile_regex(report, f"{field}.path.value", value)
        elif (value or path_kind == "exact") and check_path(report, f"{field}.path.value", value):
            path = value
    method = match.method or None
    if method is not None and not _METHOD.fullmatch(method):
        report(f"{field}.method", f"invalid method {method!r}")
    headers: dict[str, StringCondition] = {}
    for index, header in enumerate(match.headers):
        where = f"{field}.headers[{index}]"
        if check_header_name(report, f"{where}.name", header.name):
            condition = _condition(report, where, header, header.name.lower())
            if condition is not None:
                # Gateway API: only the first entry of a name counts.
                headers.setdefault(condition.name, condition)
    params: dict[str, StringCondition] = {}
    for index, param in enumerate(match.query_params):
        where = f"{field}.query_params[{index}]"
        if not param.name:
            report(f"{where}.name", "a query parameter name is required")
            continue
        condition = _condition(report, where, param, param.name)
        if condition is not None:
            params.setdefault(condition.name, condition)
    return CompiledMatch(
        path_kind=path_kind,
        path=path,
        path_regex=path_regex,
        method=method,
        headers=tuple(headers.values()),
        query_params=tuple(params.values()),
    )


def _condition(
    report: ErrorReporter, field: str, match: pb.HeaderMatch | pb.QueryParamMatch, name: str
) -> StringCondition | None:
    if not check_enum(report, f"{field}.kind", match, "kind"):
        return None
    if match.kind == pb.STRING_MATCH_KIND_REGEX:
        regex = compile_regex(report, f"{field}.value", match.value)
        return StringCondition(name, match.value, regex) if regex is not None else None
    return StringCondition(name, match.value)  # UNSPECIFIED is Exact, the Gateway API default


def _compile_filters(
    report: ErrorReporter,
    field: str,
    filters: Sequence[pb.RouteFilter],
    *,
    backend_level: bool,
    all_prefix: bool,
) -> _Filters:
    compiled = _Filters()
    seen: set[str] = set()
    for index, route_filter in enumerate(filters):
        kind = route_filter.WhichOneof("kind")
        where = f"{field}[{index}]"
        if kind is None:
            report(where, "filter has no kind (unknown to this proxy?)")
            continue
        if kind in seen:
            report(f"{where}.{kind}", "appears more than once")
            continue
        seen.add(kind)
        if kind == "request_header_modifier":
            compiled.request_headers = _header_ops(report, f"{where}.{kind}", route_filter.request_header_modifier)
        elif kind == "response_header_modifier":
            compiled.response_headers = _header_ops(report, f"{where}.{kind}", route_filter.response_header_modifier)
        elif backend_level:
            report(f"{where}.{kind}", "not supported on a backend reference; put it on the rule")
        elif kind == "url_rewrite":
            compiled.url_rewrite = _url_rewrite(report, f"{where}.{kind}", route_filter.url_rewrite, all_prefix)
        elif kind == "request_redirect":
            compiled.redirect = _redirect(report, f"{where}.{kind}", route_filter.request_redirect, all_prefix)
    if "url_rewrite" in seen and "request_redirect" in seen:
        report(field, "url_rewrite and request_redirect cannot be used together")
    return compiled


def _header_ops(report: ErrorReporter, field: str, modifier: pb.HeaderModifier) -> HeaderOps | None:
    def valid(where: str, header: pb.HeaderModifier.Header) -> bool:
        name_ok = check_header_name(report, f"{where}.name", header.name)
        return check_header_value(report, f"{where}.value", header.value) and name_ok

    set_headers = [(h.name, h.value) for i, h in enumerate(modifier.set) if valid(f"{field}.set[{i}]", h)]
    add_headers = [(h.name, h.value) for i, h in enumerate(modifier.add) if valid(f"{field}.add[{i}]", h)]
    remove = [name for i, name in enumerate(modifier.remove) if check_header_name(report, f"{field}.remove[{i}]", name)]
    if not (set_headers or add_headers or remove):
        return None
    return HeaderOps.from_strings(set=set_headers, add=add_headers, remove=remove)


def _path_modifier(
    report: ErrorReporter, field: str, modifier: pb.PathModifier, all_prefix: bool
) -> tuple[str | None, str | None]:
    """(replace_full_path, replace_prefix_match); both None when no path change is asked for."""
    kind = modifier.WhichOneof("kind")
    if kind == "replace_full_path":
        if check_path(report, f"{field}.replace_full_path", modifier.replace_full_path):
            return modifier.replace_full_path, None
    elif kind == "replace_prefix_match":
        value = modifier.replace_prefix_match
        if not all_prefix:
            report(f"{field}.replace_prefix_match", "only allowed when every match of the rule is a PathPrefix")
        elif check_path(report, f"{field}.replace_prefix_match", value):
            return None, value
    return None, None


def _url_rewrite(report: ErrorReporter, field: str, rewrite: pb.UrlRewrite, all_prefix: bool) -> CompiledUrlRewrite:
    hostname = rewrite.hostname or None
    if hostname is not None and not check_hostname(report, f"{field}.hostname", hostname, wildcard=False):
        hostname = None
    full, prefix = _path_modifier(report, f"{field}.path", rewrite.path, all_prefix)
    return CompiledUrlRewrite(hostname=hostname, replace_full_path=full, replace_prefix_match=prefix)


def _redirect(report: ErrorReporter, field: str, redirect: pb.RequestRedirect, all_prefix: bool) -> CompiledRedirect:
    scheme = redirect.scheme or None
    if scheme is not None and scheme not in ("http", "https"):
        report(f"{field}.scheme", f"{scheme!r} is not http or https")
        scheme = None
    hostname = redirect.hostname or None
    if hostname is not None and not check_hostname(report, f"{field}.hostname", hostname, wildcard=False):
        hostname = None
    port = redirect.port or None
    if port is not None and port > 65535:
        report(f"{field}.port", f"{port} is not a port (1..65535)")
        port = None
    status = redirect.status_code or 302
    if status not in REDIRECT_STATUSES:
        report(
            f"{field}.status_code",
            f"{status} is not a redirect status ({', '.join(map(str, sorted(REDIRECT_STATUSES)))})",
        )
        status = 302
    full, prefix = _path_modifier(report, f"{field}.path", redirect.path, all_prefix)
    return CompiledRedirect(
        scheme=scheme,
        hostname=hostname,
        port=port,
        replace_full_path=full,
        replace_prefix_match=prefix,
        status=status,
    )


def _compile_backend_refs(
    report: ErrorReporter, refs: Sequence[pb.BackendRef], backends: Mapping[str, UpstreamCluster]
) -> tuple[BackendChoice, ...]:
    choices: list[BackendChoice] = []
    total = 0
    for index, ref in enumerate(refs):
        where = f"backends[{index}]"
        if ref.direct_response_status:
            if not 100 <= ref.direct_response_status <= 599:
                report(f"{where}.direct_response_status", f"{ref.direct_response_status} is not an HTTP status")
                continue
            if ref.backend or ref.filters:
                report(f"{where}", "a direct-response share names no backend and has no filters")
                continue
            total += ref.weight
            choices.append(BackendChoice(name="", cluster=None, weight=ref.weight,
                                         direct_response_status=ref.direct_response_status))
            continue
        if not ref.backend:
            report(f"{where}.backend", "a backend name is required")
            continue
        filters = _compile_filters(report, f"{where}.filters", ref.filters, backend_level=True, all_prefix=False)
        total += ref.weight
        choices.append(
            BackendChoice(
                name=ref.backend,
                cluster=backends.get(ref.backend),
                request_headers=filters.request_headers,
                response_headers=filters.response_headers,
                weight=ref.weight,
            )
        )
    if total > MAX_WEIGHT_TOTAL:
        report("backends", f"total weight {total} exceeds {MAX_WEIGHT_TOTAL}")
    return tuple(choices)
