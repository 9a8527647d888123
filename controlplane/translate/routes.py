"""HTTPRoutes: rules to Route resources, attachment to listeners, and the per-parent status.

A rule is compiled once per route (matches, filters, resolved backends); the per-gateway
parts (listeners, effective hostnames) are added when a snapshot is assembled.

Invalid backendRefs (Gateway API: the requests they would get are answered 500):
- no usable backend in a rule: the Route carries `direct_response_status = 500` and no backends;
- some usable: the invalid refs' summed weight goes to one BackendRef with
  `direct_response_status = 500` and no backend, so that share fails instead of silently
  moving to the healthy backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.model import GATEWAY, GATEWAY_GROUP, KubeObject, parse_duration
from controlplane.translate.backends import BackendResolver, RefProblem, ResolvedBackend, duration_message
from controlplane.translate.conditions import (
    ACCEPTED,
    PARTIALLY_INVALID,
    REASON_ACCEPTED,
    REASON_NO_MATCHING_LISTENER_HOSTNAME,
    REASON_NO_MATCHING_PARENT,
    REASON_NOT_ALLOWED_BY_LISTENERS,
    REASON_RESOLVED_REFS,
    REASON_UNSUPPORTED_VALUE,
    RESOLVED_REFS,
    condition,
)
from controlplane.translate.gateways import GatewayState, ListenerState
from controlplane.translate.hostnames import effective_hostnames
from controlplane.translate.index import ObjectIndex
from shared.api.agentgate.config.v1 import resources_pb2 as pb

# A Backend with no Targets standing for the share of traffic of invalid backendRefs. The
# parentheses make it impossible as a Kubernetes name, so it never collides with a real one.
DIRECT_RESPONSE_INVALID_BACKEND = 500

_SUPPORTED_FILTERS = frozenset({"RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestRedirect"})
_PATH_KINDS = {
    "Exact": pb.PathMatch.KIND_EXACT,
    "PathPrefix": pb.PathMatch.KIND_PREFIX,
    "RegularExpression": pb.PathMatch.KIND_REGEX,
}
_STRING_KINDS = {"Exact": pb.STRING_MATCH_KIND_EXACT, "RegularExpression": pb.STRING_MATCH_KIND_REGEX}
_DEFAULT_RULES: Sequence[Mapping[str, Any]] = ({},)


@dataclass
class CompiledRule:
    route: pb.Route  # without listeners and hostnames
    backends: list[ResolvedBackend]


@dataclass
class CompiledRoute:
    obj: KubeObject
    rules: list[CompiledRule] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    ref_problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def fully_invalid(self) -> bool:
        return not self.rules and bool(self.dropped)

    def resolved_refs_condition(self) -> dict[str, Any]:
        g = self.obj.generation
        if not self.ref_problems:
            return condition(RESOLVED_REFS, True, REASON_RESOLVED_REFS, "All references are resolved", g)
        message = "; ".join(message for _, message in self.ref_problems)
        return condition(RESOLVED_REFS, False, self.ref_problems[0][0], message, g)


def compile_route(obj: KubeObject, resolver: BackendResolver) -> CompiledRoute:
    compiled = CompiledRoute(obj)
    rules = obj.spec.get("rules", _DEFAULT_RULES)
    created = int(obj.creation_timestamp.timestamp()) if obj.creation_timestamp else 0
    for index, rule in enumerate(rules):
        unsupported = _unsupported_filters(rule)
        if unsupported:
            compiled.dropped.append(f"rules[{index}]: unsupported filter type {', '.join(unsupported)}")
            continue
        message = pb.Route(
            name=f"{obj.namespace}/{obj.name}/{index}",
            route_key=obj.ref,
            rule_index=index,
            creation_unix_seconds=created,
        )
        message.matches.extend(_match(m) for m in rule.get("matches") or ())
        filters = rule.get("filters") or ()
        message.filters.extend(_filter(f) for f in filters)
        timeouts = rule.get("timeouts") or {}
        if "request" in timeouts:
            message.timeouts.request.CopyFrom(duration_message(parse_duration(timeouts["request"])))
        if "backendRequest" in timeouts:
            message.timeouts.backend_request.CopyFrom(duration_message(parse_duration(timeouts["backendRequest"])))
        compiled.rules.append(_rule_backends(compiled, message, rule, index, resolver, filters))
    return compiled


def _unsupported_filters(rule: Mapping[str, Any]) -> list[str]:
    """Filter types of a rule (its own and its backendRefs') that this implementation lacks."""
    filters = list(rule.get("filters") or ())
    for ref in rule.get("backendRefs") or ():
        filters.extend(ref.get("filters") or ())
    return sorted({f["type"] for f in filters if f["type"] not in _SUPPORTED_FILTERS})


def _rule_backends(
    compiled: CompiledRoute,
    message: pb.Route,
    rule: Mapping[str, Any],
    index: int,
    resolver: BackendResolver,
    filters: Sequence[Mapping[str, Any]],
) -> CompiledRule:
    resolved: list[ResolvedBackend] = []
    refs: list[pb.BackendRef] = []
    valid_weight = invalid_weight = 0
    for position, ref in enumerate(rule.get("backendRefs") or ()):
        weight = ref.get("weight", 1)
        result = resolver.resolve(compiled.obj, ref)
        if isinstance(result, RefProblem):
            compiled.ref_problems.append((result.reason, f"rules[{index}].backendRefs[{position}]: {result.message}"))
            invalid_weight += weight
            continue
        valid_weight += weight
        resolved.append(result)
        backend_ref = pb.BackendRef(backend=result.key, weight=weight)
        backend_ref.filters.extend(_filter(f) for f in ref.get("filters") or ())
        refs.append(backend_ref)
    redirects = any(f["type"] == "RequestRedirect" for f in filters)
    if redirects:
        return CompiledRule(message, [])
    if valid_weight == 0:
        message.direct_response_status = DIRECT_RESPONSE_INVALID_BACKEND
        return CompiledRule(message, [])
    message.backends.extend(refs)
    if invalid_weight:
        message.backends.append(
            pb.BackendRef(weight=invalid_weight, direct_response_status=DIRECT_RESPONSE_INVALID_BACKEND)
        )
    return CompiledRule(message, resolved)


def _match(match: Mapping[str, Any]) -> pb.RouteMatch:
    path = match.get("path") or {}
    message = pb.RouteMatch(
        path=pb.PathMatch(kind=_PATH_KINDS[path.get("type", "PathPrefix")], value=path.get("value", "/")),
        method=match.get("method", ""),
    )
    # Header names compare case-insensitively: lower them here, once.
    message.headers.extend(
        pb.HeaderMatch(kind=_STRING_KINDS[h.get("type", "Exact")], name=h["name"].lower(), value=h["value"])
        for h in match.get("headers") or ()
    )
    message.query_params.extend(
        pb.QueryParamMatch(kind=_STRING_KINDS[q.get("type", "Exact")], name=q["name"], value=q["value"])
        for q in match.get("queryParams") or ()
    )
    return message


def _filter(spec: Mapping[str, Any]) -> pb.RouteFilter:
    kind = spec["type"]
    if kind == "RequestHeaderModifier":
        return pb.RouteFilter(request_header_modifier=_header_modifier(spec["requestHeaderModifier"]))
    if kind == "ResponseHeaderModifier":
        return pb.RouteFilter(response_header_modifier=_header_modifier(spec["responseHeaderModifier"]))
    if kind == "URLRewrite":
        config = spec["urlRewrite"]
        rewrite = pb.UrlRewrite(hostname=config.get("hostname", ""))
        if "path" in config:
            rewrite.path.CopyFrom(_path_modifier(config["path"]))
        return pb.RouteFilter(url_rewrite=rewrite)
    config = spec["requestRedirect"]
    redirect = pb.RequestRedirect(
        scheme=config.get("scheme", ""),
        hostname=config.get("hostname", ""),
        port=config.get("port", 0),
        status_code=config.get("statusCode", 302),
    )
    if "path" in config:
        redirect.path.CopyFrom(_path_modifier(config["path"]))
    return pb.RouteFilter(request_redirect=redirect)


def _header_modifier(config: Mapping[str, Any]) -> pb.HeaderModifier:
    return pb.HeaderModifier(
        set=[pb.HeaderModifier.Header(name=h["name"], value=h["value"]) for h in config.get("set") or ()],
        add=[pb.HeaderModifier.Header(name=h["name"], value=h["value"]) for h in config.get("add") or ()],
        remove=list(config.get("remove") or ()),
    )


def _path_modifier(config: Mapping[str, Any]) -> pb.PathModifier:
    if config["type"] == "ReplaceFullPath":
        return pb.PathModifier(replace_full_path=config["replaceFullPath"])
    return pb.PathModifier(replace_prefix_match=config["replacePrefixMatch"])


# --- attachment ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """A route attached to one listener, with the hostnames it serves there ([] = any)."""

    listener: ListenerState
    hostnames: tuple[str, ...]


@dataclass
class ParentVerdict:
    accepted: bool
    reason: str
    message: str
    attachments: list[Attachment] = field(default_factory=list)


def parent_gateway_key(route: KubeObject, parent: Mapping[str, Any]) -> str | None:
    """'namespace/name' of the Gateway a parentRef names, or None for another kind of parent."""
    if parent.get("group", GATEWAY_GROUP) != GATEWAY_GROUP or parent.get("kind", GATEWAY) != GATEWAY:
        return None
    return f"{parent.get('namespace', route.namespace)}/{parent['name']}"


def status_parent_ref(parent: Mapping[str, Any]) -> dict[str, Any]:
    """The parentRef echoed in status, with group and kind defaulted as the API server would."""
    echoed: dict[str, Any] = {"group": parent.get("group", GATEWAY_GROUP), "kind": parent.get("kind", GATEWAY)}
    for key in ("namespace", "name", "sectionName", "port"):
        if key in parent:
            echoed[key] = parent[key]
    return echoed


def attach(route: KubeObject, parent: Mapping[str, Any], gateway: GatewayState, index: ObjectIndex) -> ParentVerdict:
    """Gateway API attachment: parentRef section/port, then allowedRoutes, then hostnames."""
    section, port = parent.get("sectionName"), parent.get("port")
    candidates = [
        listener
        for listener in gateway.listeners
        if (section is None or listener.name == section) and (port is None or listener.port == port)
    ]
    if not candidates:
        wanted = " and ".join(
            part for part in (f"named {section!r}" if section else "", f"on port {port}" if port else "") if part
        )
        return ParentVerdict(False, REASON_NO_MATCHING_PARENT, f"Gateway {gateway.key} has no listener {wanted}")
    refusals = {listener.name: listener.refusal(route, gateway.obj.namespace, index) for listener in candidates}
    allowed = [listener for listener in candidates if refusals[listener.name] is None]
    if not allowed:
        return ParentVerdict(False, REASON_NOT_ALLOWED_BY_LISTENERS, "; ".join(filter(None, refusals.values())))
    route_hostnames = route.spec.get("hostnames") or ()
    attachments = []
    for listener in allowed:
        hostnames = effective_hostnames(listener.hostname, route_hostnames)
        if hostnames is not None:
            attachments.append(Attachment(listener, tuple(hostnames)))
    if not attachments:
        names = ", ".join(f"{listener.name} ({listener.hostname or 'any'})" for listener in allowed)
        return ParentVerdict(
            False,
            REASON_NO_MATCHING_LISTENER_HOSTNAME,
            f"no route hostname ({', '.join(route_hostnames)}) matches listener(s) {names}",
        )
    return ParentVerdict(True, REASON_ACCEPTED, "Route is accepted", attachments)


def parent_conditions(compiled: CompiledRoute, verdict: ParentVerdict) -> list[dict[str, Any]]:
    g = compiled.obj.generation
    conditions = [condition(ACCEPTED, verdict.accepted, verdict.reason, verdict.message, g)]
    conditions.append(compiled.resolved_refs_condition())
    if verdict.accepted and compiled.dropped:
        message = "Dropped Rule(s): " + "; ".join(compiled.dropped)
        conditions.append(condition(PARTIALLY_INVALID, True, REASON_UNSUPPORTED_VALUE, message, g))
    return conditions
