"""Schema-level checks of one object, the ones a Kubernetes API server (OpenAPI + CEL) would make.

`validate(obj)` never raises: it returns every problem it finds, each naming the field. Checks
that need other objects (does the Secret exist, is the reference permitted) belong to the
translator, which reports them as status conditions.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from controlplane.model.duration import parse_duration
from controlplane.model.errors import ConfigError
from controlplane.model.formats import (
    CONTROLLER_NAME,
    DATA_KEY,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    GROUP,
    HEADER_NAME,
    KIND,
    LABEL_KEY,
    LABEL_VALUE,
    hostname_problem,
    is_ip_address,
)
from controlplane.model.objects import (
    BACKEND,
    CONFIG_MAP,
    GATEWAY,
    GATEWAY_CLASS,
    HTTP_ROUTE,
    NAMESPACE,
    POLICY,
    REFERENCE_GRANT,
    SECRET,
    SECRET_TYPE_TLS,
    SERVICE,
    KubeObject,
)
from controlplane.model.policy import check_policy
from shared.config_rules import (
    A2A_AGENT_NAME,
    A2A_AGENT_NAME_MAX_LENGTH,
    A2A_AGENT_NAME_RULE,
    HEADER_VALUE_RULE,
    LLM_AZURE_API_VERSION,
    LLM_MANAGED_HEADERS,
    LLM_MODEL_NAME,
    LLM_PROVIDER_NAME,
    is_header_value,
    path_problem,
)
from shared.mcp_names import target_name_problem
from shared.origins import origin_problem
from shared.regex import compile_regex

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
PATH_MATCH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
STRING_MATCH_TYPES = ("Exact", "RegularExpression")
# Every filter type the Gateway API defines; the translator decides which it supports.
FILTER_TYPES = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
    "CORS",
    "ExternalAuth",
)
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
_SINGLE_USE_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")
REDIRECT_STATUS_CODES = (301, 302, 303, 307, 308)
TLS_MODES = ("Terminate", "Passthrough")
FROM_NAMESPACES = ("All", "Same", "Selector")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
UPSTREAM_PROTOCOLS = ("HTTP1", "HTTP2")
# Backend variants: exactly one key of spec names the kind of upstream.
BACKEND_VARIANTS = ("static", "mcp", "a2a", "llm")
MCP_PREFIX_MODES = ("Conditional", "Always", "Never")
MCP_FAILURE_MODES = ("FailClosed", "FailOpen")
MCP_TARGET_PROTOCOLS = ("StreamableHTTP", "SSE")
MCP_MAX_TARGETS = 64
MCP_MAX_BODY_BYTES = 1 << 30
A2A_SIGNED_CARDS = ("Strip", "Preserve")
A2A_MAX_REQUEST_BYTES = 1 << 30
# "namespace/name" or one name; each part letters, digits, '.', '_', '-', starting and ending
# with a letter or digit. At most one '/', so a rule can split namespace from name. The proxy's
# config compiler applies the same rule (dataplane/config/a2a.py AGENT_NAME).
LLM_PROVIDER_TYPES = ("openai", "anthropic", "azure", "openaiCompatible")
LLM_MAX_PROVIDERS = 32
LLM_MAX_MODELS = 256
LLM_MAX_REQUEST_BYTES = 1 << 30
# Provider names: what logs, metrics and failover state call a provider. The proxy's config
# compiler applies the same rule (dataplane/config/llm.py PROVIDER_NAME).
# Model names as clients and providers write them ("gpt-4o", "claude-sonnet-4-5",
# "meta-llama/Llama-3.1-8B-Instruct", "llama3:8b"): printable ASCII without spaces or quotes.
# The proxy's config compiler applies the same rule (dataplane/config/llm.py MODEL_NAME).
# Headers the gateway sets itself on provider requests (framing, credentials from apiKeyRef).


def validate(obj: KubeObject) -> list[ConfigError]:
    """Every schema-level problem of `obj`, each naming file, object and field."""
    check = _KIND_CHECKS.get(obj.kind)
    if check is None:
        return []
    checker = _Checker(obj)
    check(checker, obj)
    return checker.errors


class _Checker:
    """Collects errors for one object; typed accessors report wrong types once, at their path."""

    def __init__(self, obj: KubeObject) -> None:
        self.obj = obj
        self.errors: list[ConfigError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(self.obj.error(path, message))

    def mapping(self, value: Any, path: str, *, required: bool = False) -> Mapping[str, Any] | None:
        if value is None:
            if required:
                self.error(path, "required field is missing")
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, got {_type_name(value)}")
            return None
        return value

    def items(self, value: Any, path: str, *, required: bool = False, max_items: int = 0) -> Sequence[Any]:
        if value is None:
            if required:
                self.error(path, "required field is missing")
            return ()
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_type_name(value)}")
            return ()
        if required and not value:
            self.error(path, "must not be empty")
        if max_items and len(value) > max_items:
            self.error(path, f"at most {max_items} entries are allowed, got {len(value)}")
        return value

    def mappings(self, value: Any, path: str, **kwargs: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """(path, mapping) for each list entry that is a mapping; others are reported."""
        for index, item in enumerate(self.items(value, path, **kwargs)):
            entry = self.mapping(item, f"{path}[{index}]", required=True)
            if entry is not None:
                yield f"{path}[{index}]", entry

    def string(
        self,
        value: Any,
        path: str,
        *,
        required: bool = False,
        enum: Sequence[str] = (),
        pattern: re.Pattern[str] | None = None,
        max_length: int = 0,
        min_length: int = 0,
    ) -> str | None:
        if value is None:
            if required:
                self.error(path, "required field is missing")
            return None
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {_type_name(value)}")
            return None
        if enum and value not in enum:
            self.error(path, f"unsupported value {value!r}: must be one of {', '.join(enum)}")
            return None
        if min_length and len(value) < min_length:
            self.error(path, "must not be empty" if min_length == 1 else f"must be at least {min_length} characters")
            return None
        if max_length and len(value) > max_length:
            self.error(path, f"must be at most {max_length} characters")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.error(path, f"invalid value {value!r}")
            return None
        return value

    def integer(
        self, value: Any, path: str, *, required: bool = False, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        if value is None:
            if required:
                self.error(path, "required field is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {_type_name(value)}")
            return None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.error(path, f"{value} is out of range {minimum}..{maximum}")
            return None
        return value

    def boolean(self, value: Any, path: str) -> bool | None:
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_type_name(value)}")
            return None
        return value

    def port(self, value: Any, path: str, *, required: bool = False) -> int | None:
        return self.integer(value, path, required=required, minimum=1, maximum=65535)

    def hostname(self, value: Any, path: str, *, required: bool = False, wildcard: bool = True) -> str | None:
        text = self.string(value, path, required=required)
        if text is None:
            return None
        problem = hostname_problem(text, wildcard=wildcard)
        if problem:
            self.error(path, problem)
            return None
        return text

    def duration(self, value: Any, path: str) -> timedelta | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(path, str(exc))
            return None

    def regex(self, value: str, path: str) -> None:
        try:
            compile_regex(value)
        except ValueError as exc:
            self.error(path, f"invalid regular expression: {exc}")

    def header_name(self, value: Any, path: str) -> str | None:
        return self.string(value, path, required=True, pattern=HEADER_NAME, max_length=256)

    def unknown_keys(self, mapping: Mapping[str, Any], path: str, known: Sequence[str]) -> None:
        """Our own kind is strict about field names: a typo must not silently mean "unset"."""
        for key in mapping:
            if key not in known:
                self.error(f"{path}.{key}", f"unknown field (known fields: {', '.join(known)})")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


# --- Gateway API -----------------------------------------------------------------------------


def _gateway_class(c: _Checker, obj: KubeObject) -> None:
    c.string(
        obj.spec.get("controllerName"), "spec.controllerName", required=True, pattern=CONTROLLER_NAME, max_length=253
    )


def _gateway(c: _Checker, obj: KubeObject) -> None:
    spec = obj.spec
    c.string(
        spec.get("gatewayClassName"), "spec.gatewayClassName", required=True, pattern=DNS_SUBDOMAIN, max_length=253
    )
    names: dict[str, str] = {}
    for path, listener in c.mappings(spec.get("listeners"), "spec.listeners", required=True, max_items=64):
        name = c.string(listener.get("name"), f"{path}.name", required=True, pattern=DNS_SUBDOMAIN, max_length=253)
        if name is not None:
            if name in names:
                c.error(f"{path}.name", f"listener name {name!r} is already used by {names[name]}")
            names.setdefault(name, path)
        # Listeners sharing port, protocol and hostname are left to the translator, which marks
        # them Conflicted in the Gateway status (more telling than rejecting the whole Gateway).
        c.port(listener.get("port"), f"{path}.port", required=True)
        protocol = c.string(listener.get("protocol"), f"{path}.protocol", required=True, min_length=1, max_length=255)
        hostname = c.hostname(listener.get("hostname"), f"{path}.hostname")
        if protocol in ("TCP", "UDP") and hostname:
            c.error(f"{path}.hostname", f"must not be set for protocol {protocol}")
        _listener_tls(c, listener.get("tls"), f"{path}.tls", protocol)
        _allowed_routes(c, listener.get("allowedRoutes"), f"{path}.allowedRoutes")
    seen_addresses: set[tuple[str, str]] = set()
    for path, address in c.mappings(spec.get("addresses"), "spec.addresses", max_items=16):
        kind = c.string(address.get("type", "IPAddress"), f"{path}.type", min_length=1, max_length=253)
        value = c.string(address.get("value"), f"{path}.value", required=True, min_length=1, max_length=253)
        if kind == "IPAddress" and value is not None and not is_ip_address(value):
            c.error(f"{path}.value", f"{value!r} is not an IP address")
        if kind == "Hostname" and value is not None:
            c.hostname(value, f"{path}.value", wildcard=False)
        if kind is not None and value is not None:
            if (kind, value) in seen_addresses:
                c.error(f"{path}.value", f"{kind} {value!r} is listed twice")
            seen_addresses.add((kind, value))


def _listener_tls(c: _Checker, value: Any, path: str, protocol: str | None) -> None:
    tls = c.mapping(value, path)
    if tls is None:
        if protocol == "HTTPS":
            c.error(path, "required for protocol HTTPS (mode Terminate with certificateRefs)")
        return
    if protocol in ("HTTP", "TCP", "UDP"):
        c.error(path, f"must not be set for protocol {protocol}")
    mode = c.string(tls.get("mode", "Terminate"), f"{path}.mode", enum=TLS_MODES)
    if protocol == "HTTPS" and mode == "Passthrough":
        c.error(f"{path}.mode", "must be Terminate for protocol HTTPS")
    refs = list(c.mappings(tls.get("certificateRefs"), f"{path}.certificateRefs", max_items=64))
    if mode == "Terminate" and not refs and "options" not in tls:
        c.error(f"{path}.certificateRefs", "required when mode is Terminate")
    for ref_path, ref in refs:
        _object_reference(c, ref, ref_path, namespace_allowed=True)


def _allowed_routes(c: _Checker, value: Any, path: str) -> None:
    allowed = c.mapping(value, path)
    if allowed is None:
        return
    namespaces = c.mapping(allowed.get("namespaces"), f"{path}.namespaces")
    if namespaces is not None:
        source = c.string(namespaces.get("from", "Same"), f"{path}.namespaces.from", enum=FROM_NAMESPACES)
        if source == "Selector":
            selector = c.mapping(namespaces.get("selector"), f"{path}.namespaces.selector", required=True)
            if selector is not None:
                label_selector(c, selector, f"{path}.namespaces.selector")
    for kind_path, kind in c.mappings(allowed.get("kinds"), f"{path}.kinds", max_items=8):
        c.string(kind.get("group"), f"{kind_path}.group", pattern=GROUP, max_length=253)
        c.string(kind.get("kind"), f"{kind_path}.kind", required=True, pattern=KIND, max_length=63)


def label_selector(c: _Checker, selector: Mapping[str, Any], path: str) -> None:
    labels = c.mapping(selector.get("matchLabels"), f"{path}.matchLabels")
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            c.error(f"{path}.matchLabels", f"invalid label key {key!r}")
        if not isinstance(value, str) or not LABEL_VALUE.fullmatch(value) or len(value) > 63:
            c.error(f"{path}.matchLabels.{key}", f"invalid label value {value!r} (quote numbers and booleans)")
    for expr_path, expr in c.mappings(selector.get("matchExpressions"), f"{path}.matchExpressions"):
        c.string(expr.get("key"), f"{expr_path}.key", required=True, pattern=LABEL_KEY)
        operator = c.string(expr.get("operator"), f"{expr_path}.operator", required=True, enum=SELECTOR_OPERATORS)
        values = c.items(expr.get("values"), f"{expr_path}.values")
        for index, item in enumerate(values):
            c.string(item, f"{expr_path}.values[{index}]", required=True)
        if operator in ("In", "NotIn") and not values:
            c.error(f"{expr_path}.values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            c.error(f"{expr_path}.values", f"must be empty for operator {operator}")


def _object_reference(c: _Checker, ref: Mapping[str, Any], path: str, *, namespace_allowed: bool) -> None:
    c.string(ref.get("group"), f"{path}.group", pattern=GROUP, max_length=253)
    c.string(ref.get("kind"), f"{path}.kind", pattern=KIND, max_length=63)
    c.string(ref.get("name"), f"{path}.name", required=True, min_length=1, max_length=253)
    if "namespace" in ref:
        if namespace_allowed:
            c.string(ref.get("namespace"), f"{path}.namespace", pattern=_NAMESPACE, max_length=63)
        else:
            c.error(f"{path}.namespace", "cross-namespace references are not allowed here")


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _http_route(c: _Checker, obj: KubeObject) -> None:
    spec = obj.spec
    for path, ref in c.mappings(spec.get("parentRefs"), "spec.parentRefs", max_items=32):
        _object_reference(c, ref, path, namespace_allowed=True)
        c.string(ref.get("sectionName"), f"{path}.sectionName", pattern=DNS_SUBDOMAIN, max_length=253)
        c.port(ref.get("port"), f"{path}.port")
    for index, host in enumerate(c.items(spec.get("hostnames"), "spec.hostnames", max_items=16)):
        c.hostname(host, f"spec.hostnames[{index}]", required=True)
    if "rules" in spec:
        rules = list(c.mappings(spec.get("rules"), "spec.rules", required=True, max_items=16))
        total_matches = 0
        for path, rule in rules:
            total_matches += _route_rule(c, rule, path)
        if total_matches > 128:
            c.error("spec.rules", f"at most 128 matches in all rules together, got {total_matches}")


def _route_rule(c: _Checker, rule: Mapping[str, Any], path: str) -> int:
    matches = list(c.mappings(rule.get("matches"), f"{path}.matches", max_items=64))
    for match_path, match in matches:
        _route_match(c, match, match_path)
    filters = list(c.mappings(rule.get("filters"), f"{path}.filters", max_items=16))
    _route_filters(c, filters, f"{path}.filters", matches)
    refs = list(c.mappings(rule.get("backendRefs"), f"{path}.backendRefs", max_items=16))
    for ref_path, ref in refs:
        _backend_ref(c, ref, ref_path, matches)
    if refs and any(f.get("type") == "RequestRedirect" for _, f in filters):
        c.error(f"{path}.filters", "RequestRedirect filter must not be used together with backendRefs")
    timeouts = c.mapping(rule.get("timeouts"), f"{path}.timeouts")
    if timeouts is not None:
        request = c.duration(timeouts.get("request"), f"{path}.timeouts.request")
        backend = c.duration(timeouts.get("backendRequest"), f"{path}.timeouts.backendRequest")
        if request and backend and backend > request:
            c.error(f"{path}.timeouts.backendRequest", "must not be longer than the request timeout")
    return len(matches)


def _route_match(c: _Checker, match: Mapping[str, Any], path: str) -> None:
    path_match = c.mapping(match.get("path"), f"{path}.path")
    if path_match is not None:
        kind = c.string(path_match.get("type", "PathPrefix"), f"{path}.path.type", enum=PATH_MATCH_TYPES)
        value = c.string(path_match.get("value", "/"), f"{path}.path.value", max_length=1024)
        if value is not None and kind == "RegularExpression":
            c.regex(value, f"{path}.path.value")
        elif value is not None and kind is not None:
            problem = path_problem(value)
            if problem:
                c.error(f"{path}.path.value", problem)
    names: set[str] = set()
    for header_path, header in c.mappings(match.get("headers"), f"{path}.headers", max_items=16):
        name = c.header_name(header.get("name"), f"{header_path}.name")
        if name is not None:
            if name.lower() in names:
                c.error(f"{header_path}.name", f"header {name!r} is matched twice")
            names.add(name.lower())
        kind = c.string(header.get("type", "Exact"), f"{header_path}.type", enum=STRING_MATCH_TYPES)
        value = c.string(header.get("value"), f"{header_path}.value", required=True, min_length=1, max_length=4096)
        if value is not None and kind == "RegularExpression":
            c.regex(value, f"{header_path}.value")
    params: set[str] = set()
    for param_path, param in c.mappings(match.get("queryParams"), f"{path}.queryParams", max_items=16):
        name = c.header_name(param.get("name"), f"{param_path}.name")
        if name is not None:
            if name in params:
                c.error(f"{param_path}.name", f"query parameter {name!r} is matched twice")
            params.add(name)
        kind = c.string(param.get("type", "Exact"), f"{param_path}.type", enum=STRING_MATCH_TYPES)
        value = c.string(param.get("value"), f"{param_path}.value", required=True, min_length=1, max_length=1024)
        if value is not None and kind == "RegularExpression":
            c.regex(value, f"{param_path}.value")
    c.string(match.get("method"), f"{path}.method", enum=sorted(HTTP_METHODS))


def _route_filters(
    c: _Checker,
    filters: list[tuple[str, Mapping[str, Any]]],
    path: str,
    matches: list[tuple[str, Mapping[str, Any]]],
) -> None:
    types: list[str] = []
    for filter_path, flt in filters:
        kind = c.string(flt.get("type"), f"{filter_path}.type", required=True, enum=FILTER_TYPES)
        for other_type, other_field in _FILTER_FIELDS.items():
            if other_field in flt and other_type != kind:
                c.error(f"{filter_path}.{other_field}", f"must not be set when type is {kind}")
        if kind is None:
            continue
        types.append(kind)
        config_field = _FILTER_FIELDS[kind]
        config = c.mapping(flt.get(config_field), f"{filter_path}.{config_field}", required=True)
        if config is None:
            continue
        if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            _header_modifier(c, config, f"{filter_path}.{config_field}")
        elif kind == "RequestRedirect":
            _redirect(c, config, f"{filter_path}.{config_field}", matches)
        elif kind == "URLRewrite":
            c.hostname(config.get("hostname"), f"{filter_path}.{config_field}.hostname", wildcard=False)
            _path_modifier(c, config.get("path"), f"{filter_path}.{config_field}.path", matches)
        elif kind == "ExtensionRef":
            c.string(config.get("group"), f"{filter_path}.{config_field}.group", pattern=GROUP)
            c.string(config.get("kind"), f"{filter_path}.{config_field}.kind", required=True, pattern=KIND)
            c.string(config.get("name"), f"{filter_path}.{config_field}.name", required=True, min_length=1)
    for kind in _SINGLE_USE_FILTERS:
        if types.count(kind) > 1:
            c.error(path, f"{kind} filter cannot be repeated")
    if "RequestRedirect" in types and "URLRewrite" in types:
        c.error(path, "RequestRedirect and URLRewrite filters cannot be combined")


def _header_modifier(c: _Checker, config: Mapping[str, Any], path: str) -> None:
    for action in ("set", "add"):
        names: set[str] = set()
        for header_path, header in c.mappings(config.get(action), f"{path}.{action}", max_items=16):
            name = c.header_name(header.get("name"), f"{header_path}.name")
            if name is not None:
                if name.lower() in names:
                    c.error(f"{header_path}.name", f"header {name!r} appears twice")
                names.add(name.lower())
            c.string(header.get("value"), f"{header_path}.value", required=True, max_length=4096)
    for index, name in enumerate(c.items(config.get("remove"), f"{path}.remove", max_items=16)):
        c.header_name(name, f"{path}.remove[{index}]")


def _redirect(c: _Checker, config: Mapping[str, Any], path: str, matches: list[tuple[str, Mapping[str, Any]]]) -> None:
    c.string(config.get("scheme"), f"{path}.scheme", enum=("http", "https"))
    c.hostname(config.get("hostname"), f"{path}.hostname", wildcard=False)
    c.port(config.get("port"), f"{path}.port")
    status = c.integer(config.get("statusCode"), f"{path}.statusCode")
    if status is not None and status not in REDIRECT_STATUS_CODES:
        c.error(
            f"{path}.statusCode",
            f"unsupported value {status}: must be one of {', '.join(map(str, REDIRECT_STATUS_CODES))}",
        )
    _path_modifier(c, config.get("path"), f"{path}.path", matches)


def _path_modifier(c: _Checker, value: Any, path: str, matches: list[tuple[str, Mapping[str, Any]]]) -> None:
    modifier = c.mapping(value, path)
    if modifier is None:
        return
    kind = c.string(modifier.get("type"), f"{path}.type", required=True, enum=("ReplaceFullPath", "ReplacePrefixMatch"))
    if kind == "ReplaceFullPath":
        c.string(modifier.get("replaceFullPath"), f"{path}.replaceFullPath", required=True, max_length=1024)
        if "replacePrefixMatch" in modifier:
            c.error(f"{path}.replacePrefixMatch", "must not be set when type is ReplaceFullPath")
    elif kind == "ReplacePrefixMatch":
        c.string(modifier.get("replacePrefixMatch"), f"{path}.replacePrefixMatch", required=True, max_length=1024)
        if "replaceFullPath" in modifier:
            c.error(f"{path}.replaceFullPath", "must not be set when type is ReplacePrefixMatch")
        prefix_match = (
            len(matches) == 1
            and isinstance(matches[0][1].get("path"), Mapping)
            and (matches[0][1]["path"].get("type", "PathPrefix") == "PathPrefix")
        )
        if not prefix_match:
            c.error(path, "ReplacePrefixMatch needs exactly one match with a PathPrefix path")


def _backend_ref(c: _Checker, ref: Mapping[str, Any], path: str, matches: list[tuple[str, Mapping[str, Any]]]) -> None:
    _object_reference(c, ref, path, namespace_allowed=True)
    group = ref.get("group", "")
    kind = ref.get("kind", "Service")
    port = c.port(ref.get("port"), f"{path}.port")
    if group == "" and kind == "Service" and port is None and "port" not in ref:
        c.error(f"{path}.port", "required for a Service reference")
    c.integer(ref.get("weight"), f"{path}.weight", minimum=0, maximum=1_000_000)
    filters = list(c.mappings(ref.get("filters"), f"{path}.filters", max_items=16))
    _route_filters(c, filters, f"{path}.filters", matches)


def _reference_grant(c: _Checker, obj: KubeObject) -> None:
    for path, source in c.mappings(obj.spec.get("from"), "spec.from", required=True, max_items=16):
        c.string(source.get("group"), f"{path}.group", required=True, pattern=GROUP, max_length=253)
        c.string(source.get("kind"), f"{path}.kind", required=True, pattern=KIND, max_length=63)
        c.string(source.get("namespace"), f"{path}.namespace", required=True, pattern=_NAMESPACE, max_length=63)
    for path, target in c.mappings(obj.spec.get("to"), "spec.to", required=True, max_items=16):
        c.string(target.get("group"), f"{path}.group", pattern=GROUP, max_length=253)
        c.string(target.get("kind"), f"{path}.kind", required=True, pattern=KIND, max_length=63)
        c.string(target.get("name"), f"{path}.name", min_length=1, max_length=253)


# --- core kinds -----------------------------------------------------------------------------


def _namespace(c: _Checker, obj: KubeObject) -> None:
    for key, value in obj.labels.items():
        if not LABEL_KEY.fullmatch(key):
            c.error("metadata.labels", f"invalid label key {key!r}")
        if not LABEL_VALUE.fullmatch(value) or len(value) > 63:
            c.error(f"metadata.labels.{key}", f"invalid label value {value!r}")


def _secret(c: _Checker, obj: KubeObject) -> None:
    for key, value in obj.data.items():
        if not DATA_KEY.fullmatch(key):
            c.error(f"data.{key}", "invalid key (letters, digits, '-', '_', '.')")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            c.error(f"data.{key}", "is not valid base64 (use stringData for plain text)")
    for key in obj.string_data:
        if not DATA_KEY.fullmatch(key):
            c.error(f"stringData.{key}", "invalid key (letters, digits, '-', '_', '.')")
    if obj.secret_type == SECRET_TYPE_TLS:
        for key in ("tls.crt", "tls.key"):
            if key not in obj.data and key not in obj.string_data:
                c.error(f"data.{key}", f"required for a Secret of type {SECRET_TYPE_TLS}")


def _config_map(c: _Checker, obj: KubeObject) -> None:
    for key in obj.data:
        if not DATA_KEY.fullmatch(key):
            c.error(f"data.{key}", "invalid key (letters, digits, '-', '_', '.')")


def _service(c: _Checker, obj: KubeObject) -> None:
    spec = obj.spec
    kind = c.string(spec.get("type", "ClusterIP"), "spec.type", enum=SERVICE_TYPES)
    external = c.hostname(spec.get("externalName"), "spec.externalName", wildcard=False)
    if kind == "ExternalName" and external is None and "externalName" not in spec:
        c.error("spec.externalName", "required for type ExternalName")
    seen: dict[tuple[int, str], str] = {}
    for path, port in c.mappings(spec.get("ports"), "spec.ports"):
        number = c.port(port.get("port"), f"{path}.port", required=True)
        protocol = c.string(port.get("protocol", "TCP"), f"{path}.protocol", enum=("TCP", "UDP", "SCTP"))
        c.string(port.get("name"), f"{path}.name", pattern=DNS_SUBDOMAIN, max_length=63)
        c.string(port.get("appProtocol"), f"{path}.appProtocol", min_length=1)
        target = port.get("targetPort")
        if target is not None and not isinstance(target, str):
            c.port(target, f"{path}.targetPort")
        if number is not None and protocol is not None:
            if (number, protocol) in seen:
                c.error(f"{path}.port", f"port {number}/{protocol} repeats {seen[(number, protocol)]}")
            seen.setdefault((number, protocol), path)


# --- agentgate.dev Backend ------------------------------------------------------------------


_BACKEND_FIELDS = (*BACKEND_VARIANTS, "protocol", "tls", "connectTimeout", "idleTimeout", "maxConnections")


def _backend(c: _Checker, obj: KubeObject) -> None:
    spec = obj.spec
    c.unknown_keys(spec, "spec", _BACKEND_FIELDS)
    variants = [name for name in BACKEND_VARIANTS if name in spec]
    if not variants:
        c.error("spec", f"one of {', '.join(BACKEND_VARIANTS)} is required")
    elif len(variants) > 1:
        c.error("spec", f"only one of {', '.join(variants)} may be set")
    else:
        _BACKEND_VARIANT_CHECKS[variants[0]](c, spec[variants[0]], f"spec.{variants[0]}")
    c.string(spec.get("protocol"), "spec.protocol", enum=UPSTREAM_PROTOCOLS)
    tls = c.mapping(spec.get("tls"), "spec.tls")
    if tls is not None:
        _upstream_tls(c, tls, "spec.tls")
        if "mcp" in spec:
            c.error("spec.tls", "not used by MCP backends: set it per target (spec.mcp.targets[].static.tls)")
        if "llm" in spec:
            c.error("spec.tls", "not used by LLM backends: set it per provider (spec.llm.providers[].tls)")
    c.duration(spec.get("connectTimeout"), "spec.connectTimeout")
    c.duration(spec.get("idleTimeout"), "spec.idleTimeout")
    c.integer(spec.get("maxConnections"), "spec.maxConnections", minimum=0, maximum=1_000_000)


def _static_backend(c: _Checker, value: Any, path: str) -> None:
    static = c.mapping(value, path, required=True)
    if static is None:
        return
    if "hosts" in static:
        c.unknown_keys(static, path, ("hosts",))
        seen: dict[tuple[str, int], str] = {}
        for host_path, host in c.mappings(static.get("hosts"), f"{path}.hosts", required=True, max_items=256):
            c.unknown_keys(host, host_path, ("host", "port", "weight"))
            address = _static_host(c, host, host_path)
            c.integer(host.get("weight"), f"{host_path}.weight", minimum=1, maximum=1_000_000)
            if address is not None:
                if address in seen:
                    c.error(host_path, f"{address[0]}:{address[1]} repeats {seen[address]}")
                seen.setdefault(address, host_path)
    else:
        c.unknown_keys(static, path, ("host", "port"))
        _static_host(c, static, path)


def _static_host(c: _Checker, host: Mapping[str, Any], path: str) -> tuple[str, int] | None:
    name = c.string(host.get("host"), f"{path}.host", required=True, min_length=1, max_length=253)
    if name is not None and not is_ip_address(name) and not DNS_SUBDOMAIN.fullmatch(name.lower()):
        c.error(f"{path}.host", f"{name!r} is neither an IP address nor a hostname")
        name = None
    port = c.port(host.get("port"), f"{path}.port", required=True)
    return (name, port) if name is not None and port is not None else None


def _upstream_tls(c: _Checker, tls: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(tls, path, ("sni", "insecureSkipVerify", "caCertificateRefs", "caCertificates"))
    c.hostname(tls.get("sni"), f"{path}.sni", wildcard=False)
    skip = c.boolean(tls.get("insecureSkipVerify"), f"{path}.insecureSkipVerify")
    for ref_path, ref in c.mappings(tls.get("caCertificateRefs"), f"{path}.caCertificateRefs", max_items=8):
        c.unknown_keys(ref, ref_path, ("group", "kind", "name", "key"))
        c.string(ref.get("group"), f"{ref_path}.group", enum=("",))
        c.string(ref.get("kind"), f"{ref_path}.kind", enum=(CONFIG_MAP, SECRET))
        c.string(ref.get("name"), f"{ref_path}.name", required=True, pattern=DNS_SUBDOMAIN, max_length=253)
        c.string(ref.get("key"), f"{ref_path}.key", pattern=DATA_KEY, max_length=253)
    inline = c.string(tls.get("caCertificates"), f"{path}.caCertificates", min_length=1)
    if inline is not None and "-----BEGIN CERTIFICATE-----" not in inline:
        c.error(f"{path}.caCertificates", "must hold PEM certificates (-----BEGIN CERTIFICATE-----)")
    if skip and (inline is not None or tls.get("caCertificateRefs")):
        c.error(f"{path}.insecureSkipVerify", "cannot be combined with CA certificates")


_MCP_FIELDS = (
    "targets",
    "prefixMode",
    "failureMode",
    "sessionKeyRef",
    "previousSessionKeyRefs",
    "maxBodyBytes",
    "sessionIdleTimeout",
    "allowedOrigins",
)


def _mcp_backend(c: _Checker, value: Any, path: str) -> None:
    mcp = c.mapping(value, path, required=True)
    if mcp is None:
        return
    c.unknown_keys(mcp, path, _MCP_FIELDS)
    names: dict[str, str] = {}
    targets = c.mappings(mcp.get("targets"), f"{path}.targets", required=True, max_items=MCP_MAX_TARGETS)
    for target_path, target in targets:
        name = _mcp_target(c, target, target_path)
        if name is not None:
            if name in names:
                c.error(f"{target_path}.name", f"target name {name!r} is already used by {names[name]}")
            names.setdefault(name, target_path)
    c.string(mcp.get("prefixMode"), f"{path}.prefixMode", enum=MCP_PREFIX_MODES)
    c.string(mcp.get("failureMode"), f"{path}.failureMode", enum=MCP_FAILURE_MODES)
    # No default key: a key everyone knows would let anyone forge session ids (see protos/README.md).
    key_ref = c.mapping(mcp.get("sessionKeyRef"), f"{path}.sessionKeyRef", required=True)
    if key_ref is not None:
        _session_key_ref(c, key_ref, f"{path}.sessionKeyRef")
    for ref_path, ref in c.mappings(mcp.get("previousSessionKeyRefs"), f"{path}.previousSessionKeyRefs", max_items=8):
        _session_key_ref(c, ref, ref_path)
    c.integer(mcp.get("maxBodyBytes"), f"{path}.maxBodyBytes", minimum=1, maximum=MCP_MAX_BODY_BYTES)
    idle = c.duration(mcp.get("sessionIdleTimeout"), f"{path}.sessionIdleTimeout")
    if idle is not None and idle.total_seconds() <= 0:
        c.error(f"{path}.sessionIdleTimeout", "must be greater than zero")
    for index, item in enumerate(c.items(mcp.get("allowedOrigins"), f"{path}.allowedOrigins", max_items=64)):
        origin = c.string(item, f"{path}.allowedOrigins[{index}]", required=True)
        problem = None if origin is None else origin_problem(origin)
        if problem is not None:
            c.error(f"{path}.allowedOrigins[{index}]", problem)


def _mcp_target(c: _Checker, target: Mapping[str, Any], path: str) -> str | None:
    """Checks one entry of spec.mcp.targets; returns its name when valid."""
    c.unknown_keys(target, path, ("name", "static", "stdio", "protocol"))
    name = c.string(target.get("name"), f"{path}.name", required=True, max_length=63)
    problem = None if name is None else target_name_problem(name)
    if problem is not None:
        c.error(f"{path}.name", problem)
        name = None
    kinds = [kind for kind in ("static", "stdio") if kind in target]
    if len(kinds) != 1:
        c.error(path, "only one of static, stdio may be set" if kinds else "exactly one of static, stdio is required")
        return name
    if kinds[0] == "static":
        c.string(target.get("protocol"), f"{path}.protocol", enum=MCP_TARGET_PROTOCOLS)
        static = c.mapping(target.get("static"), f"{path}.static", required=True)
        if static is not None:
            _mcp_static(c, static, f"{path}.static")
    else:
        if "protocol" in target:
            c.error(f"{path}.protocol", "only applies to static targets")
        stdio = c.mapping(target.get("stdio"), f"{path}.stdio", required=True)
        if stdio is not None:
            _mcp_stdio(c, stdio, f"{path}.stdio")
    return name


def _mcp_static(c: _Checker, static: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(static, path, ("host", "port", "path", "tls", "headers"))
    _static_host(c, static, path)
    target_path = c.string(static.get("path"), f"{path}.path", min_length=1, max_length=1024)
    if target_path is not None:
        problem = path_problem(target_path)
        if problem is not None:
            c.error(f"{path}.path", problem)
    tls = c.mapping(static.get("tls"), f"{path}.tls")
    if tls is not None:
        _upstream_tls(c, tls, f"{path}.tls")
    names: set[str] = set()
    for header_path, header in c.mappings(static.get("headers"), f"{path}.headers", max_items=32):
        c.unknown_keys(header, header_path, ("name", "value"))
        name = c.header_name(header.get("name"), f"{header_path}.name")
        if name is not None:
            if name.lower() in names:
                c.error(f"{header_path}.name", f"header {name!r} appears twice")
            names.add(name.lower())
        value = c.string(header.get("value"), f"{header_path}.value", required=True, max_length=4096)
        if value is not None and not is_header_value(value):
            c.error(f"{header_path}.value", HEADER_VALUE_RULE)


def _mcp_stdio(c: _Checker, stdio: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(stdio, path, ("command", "args", "env", "workingDir"))
    command = c.string(stdio.get("command"), f"{path}.command", required=True, min_length=1, max_length=4096)
    if command is not None and "\0" in command:
        c.error(f"{path}.command", "must not contain NUL")
    for index, arg in enumerate(c.items(stdio.get("args"), f"{path}.args", max_items=256)):
        text = c.string(arg, f"{path}.args[{index}]", required=True, max_length=32768)
        if text is not None and "\0" in text:
            c.error(f"{path}.args[{index}]", "must not contain NUL")
    env = c.mapping(stdio.get("env"), f"{path}.env")
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            c.error(f"{path}.env", f"invalid variable name {key!r} (letters, digits, '_'; not starting with a digit)")
            continue
        text = c.string(value, f"{path}.env.{key}", required=True, max_length=32768)
        if text is not None and "\0" in text:
            c.error(f"{path}.env.{key}", "must not contain NUL")
    working_dir = c.string(stdio.get("workingDir"), f"{path}.workingDir", min_length=1, max_length=4096)
    if working_dir is not None and not working_dir.startswith("/"):
        c.error(f"{path}.workingDir", "must be an absolute path")


_A2A_FIELDS = ("static", "serviceRef", "basePath", "agentName", "maxRequestBytes", "signedCards")


def _a2a_backend(c: _Checker, value: Any, path: str) -> None:
    """One agent: its address (static hosts or a Service of the Backend's namespace) and settings."""
    a2a = c.mapping(value, path, required=True)
    if a2a is None:
        return
    c.unknown_keys(a2a, path, _A2A_FIELDS)
    kinds = [kind for kind in ("static", "serviceRef") if kind in a2a]
    if len(kinds) > 1:
        c.error(path, "only one of static, serviceRef may be set")
    elif not kinds:
        c.error(path, "exactly one of static, serviceRef is required (the agent's address)")
    elif kinds[0] == "static":
        _static_backend(c, a2a.get("static"), f"{path}.static")
    else:
        ref = c.mapping(a2a.get("serviceRef"), f"{path}.serviceRef", required=True)
        if ref is not None:
            c.unknown_keys(ref, f"{path}.serviceRef", ("name", "port"))
            c.string(ref.get("name"), f"{path}.serviceRef.name", required=True, pattern=DNS_LABEL, max_length=63)
            c.port(ref.get("port"), f"{path}.serviceRef.port", required=True)
    base_path = c.string(a2a.get("basePath"), f"{path}.basePath", min_length=1, max_length=1024)
    if base_path is not None:
        problem = path_problem(base_path)
        if problem is not None:
            c.error(f"{path}.basePath", problem)
    agent_name = c.string(a2a.get("agentName"), f"{path}.agentName", min_length=1, max_length=A2A_AGENT_NAME_MAX_LENGTH)
    if agent_name is not None and not A2A_AGENT_NAME.fullmatch(agent_name):
        c.error(f"{path}.agentName", f"invalid agent name {agent_name!r}: {A2A_AGENT_NAME_RULE}")
    c.integer(a2a.get("maxRequestBytes"), f"{path}.maxRequestBytes", minimum=1, maximum=A2A_MAX_REQUEST_BYTES)
    c.string(a2a.get("signedCards"), f"{path}.signedCards", enum=A2A_SIGNED_CARDS)


def _session_key_ref(c: _Checker, ref: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(ref, path, ("name", "key"))
    c.string(ref.get("name"), f"{path}.name", required=True, pattern=DNS_SUBDOMAIN, max_length=253)
    c.string(ref.get("key"), f"{path}.key", required=True, pattern=DATA_KEY, max_length=253)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# --- spec.llm ---------------------------------------------------------------------------------

_LLM_FIELDS = ("providers", "aliases", "failover", "maxRequestBytes", "streamUsage")
_LLM_PROVIDER_FIELDS = (
    "name",
    "type",
    "baseUrl",
    "host",
    "port",
    "path",
    "tls",
    "apiKeyRef",
    "priority",
    "models",
    "headers",
    "azure",
)


def _llm_backend(c: _Checker, value: Any, path: str) -> None:
    """Providers (address, credential, models, priority), aliases and failover of an LLM backend."""
    llm = c.mapping(value, path, required=True)
    if llm is None:
        return
    c.unknown_keys(llm, path, _LLM_FIELDS)
    names: dict[str, str] = {}
    providers = c.mappings(llm.get("providers"), f"{path}.providers", required=True, max_items=LLM_MAX_PROVIDERS)
    for provider_path, provider in providers:
        name = _llm_provider(c, provider, provider_path)
        if name is not None:
            if name in names:
                c.error(f"{provider_path}.name", f"provider name {name!r} is already used by {names[name]}")
            names.setdefault(name, provider_path)
    aliases = c.mapping(llm.get("aliases"), f"{path}.aliases")
    for alias, models in (aliases or {}).items():
        alias_path = f"{path}.aliases.{alias}"
        if not isinstance(alias, str) or not LLM_MODEL_NAME.fullmatch(alias):
            c.error(f"{path}.aliases", f"invalid alias {alias!r}: {_LLM_MODEL_RULE}")
            continue
        if isinstance(models, str):
            _llm_model(c, models, alias_path)
            continue
        for index, model in enumerate(c.items(models, alias_path, required=True, max_items=LLM_MAX_MODELS)):
            _llm_model(c, model, f"{alias_path}[{index}]")
    failover = c.mapping(llm.get("failover"), f"{path}.failover")
    if failover is not None:
        c.unknown_keys(failover, f"{path}.failover", ("consecutiveFailures", "ejectFor"))
        c.integer(failover.get("consecutiveFailures"), f"{path}.failover.consecutiveFailures", minimum=1, maximum=1000)
        eject = c.duration(failover.get("ejectFor"), f"{path}.failover.ejectFor")
        if eject is not None and not 0 < eject.total_seconds() <= 3600:
            c.error(f"{path}.failover.ejectFor", "must be greater than zero and at most 1h")
    c.integer(llm.get("maxRequestBytes"), f"{path}.maxRequestBytes", minimum=1, maximum=LLM_MAX_REQUEST_BYTES)
    c.boolean(llm.get("streamUsage"), f"{path}.streamUsage")


_LLM_MODEL_RULE = "use 1-256 of letters, digits and . _ : / @ + -"


def _llm_model(c: _Checker, value: Any, path: str, *, wildcard: bool = False) -> str | None:
    model = c.string(value, path, required=True)
    if model is None or (wildcard and model == "*"):
        return model
    if not LLM_MODEL_NAME.fullmatch(model):
        c.error(path, f"invalid model name {model!r}: {_LLM_MODEL_RULE}")
        return None
    return model


def _llm_provider(c: _Checker, provider: Mapping[str, Any], path: str) -> str | None:
    """Checks one entry of spec.llm.providers; returns its name when valid."""
    c.unknown_keys(provider, path, _LLM_PROVIDER_FIELDS)
    name = c.string(provider.get("name"), f"{path}.name", required=True, max_length=63)
    if name is not None and not LLM_PROVIDER_NAME.fullmatch(name):
        c.error(f"{path}.name", f"invalid provider name {name!r}: use 1-63 of [A-Za-z0-9_-], starting and ending "
                "with a letter or digit")  # fmt: skip
        name = None
    kind = c.string(provider.get("type"), f"{path}.type", required=True, enum=LLM_PROVIDER_TYPES)
    # Where it is: a base URL as the provider's SDK takes it, or host/port/path (+ tls); the
    # public providers have a default.
    if "baseUrl" in provider:
        for field in ("host", "port", "path"):
            if field in provider:
                c.error(f"{path}.{field}", "cannot be combined with baseUrl")
        url = c.string(provider.get("baseUrl"), f"{path}.baseUrl", required=True, max_length=2048)
        problem = None if url is None else base_url_problem(url)
        if problem is not None:
            c.error(f"{path}.baseUrl", problem)
        elif url is not None and urlsplit(url).scheme == "http" and "tls" in provider:
            c.error(f"{path}.tls", "an http:// baseUrl is cleartext: use https:// for TLS")
    elif "host" in provider:
        _static_host(c, provider, path)
        provider_path = c.string(provider.get("path"), f"{path}.path", max_length=1024)
        if provider_path:
            problem = path_problem(provider_path)
            if problem is not None:
                c.error(f"{path}.path", problem)
    else:
        for field in ("port", "path"):
            if field in provider:
                c.error(f"{path}.{field}", "only applies together with host")
        if kind in ("azure", "openaiCompatible"):
            c.error(path, f"baseUrl (or host and port) is required for type {kind}")
    tls = c.mapping(provider.get("tls"), f"{path}.tls")
    if tls is not None:
        _upstream_tls(c, tls, f"{path}.tls")
    key_ref = c.mapping(provider.get("apiKeyRef"), f"{path}.apiKeyRef")
    if key_ref is not None:
        _session_key_ref(c, key_ref, f"{path}.apiKeyRef")
    elif kind is not None and kind != "openaiCompatible":
        c.error(f"{path}.apiKeyRef", f"required for type {kind} (a Secret holding the provider's API key)")
    c.integer(provider.get("priority"), f"{path}.priority", minimum=0, maximum=1_000_000)
    seen: set[str] = set()
    for index, model in enumerate(c.items(provider.get("models"), f"{path}.models", max_items=LLM_MAX_MODELS)):
        checked = _llm_model(c, model, f"{path}.models[{index}]", wildcard=True)
        if checked is not None:
            if checked in seen:
                c.error(f"{path}.models[{index}]", f"model {checked!r} is listed twice")
            seen.add(checked)
    header_names: set[str] = set()
    for header_path, header in c.mappings(provider.get("headers"), f"{path}.headers", max_items=32):
        c.unknown_keys(header, header_path, ("name", "value"))
        header_name = c.header_name(header.get("name"), f"{header_path}.name")
        if header_name is not None:
            lowered = header_name.lower()
            if lowered in LLM_MANAGED_HEADERS:
                c.error(f"{header_path}.name", f"header {header_name!r} is set by the gateway (the API key comes "
                        "from apiKeyRef)")  # fmt: skip
            elif lowered in header_names:
                c.error(f"{header_path}.name", f"header {header_name!r} appears twice")
            header_names.add(lowered)
        header_value = c.string(header.get("value"), f"{header_path}.value", required=True, max_length=4096)
        if header_value is not None and not is_header_value(header_value):
            c.error(f"{header_path}.value", HEADER_VALUE_RULE)
    azure = c.mapping(provider.get("azure"), f"{path}.azure")
    if azure is None:
        if kind == "azure":
            c.error(f"{path}.azure", "required for type azure (apiVersion, optional deployments)")
        return name
    if kind is not None and kind != "azure":
        c.error(f"{path}.azure", f"only applies to type azure, not {kind}")
    c.unknown_keys(azure, f"{path}.azure", ("apiVersion", "deployments"))
    version = c.string(azure.get("apiVersion"), f"{path}.azure.apiVersion", required=True)
    if version is not None and not LLM_AZURE_API_VERSION.fullmatch(version):
        c.error(f"{path}.azure.apiVersion", f"invalid api-version {version!r} (like 2024-10-21)")
    deployments = c.mapping(azure.get("deployments"), f"{path}.azure.deployments")
    for model, deployment in (deployments or {}).items():
        if not isinstance(model, str) or not LLM_MODEL_NAME.fullmatch(model):
            c.error(f"{path}.azure.deployments", f"invalid model name {model!r}: {_LLM_MODEL_RULE}")
            continue
        text = c.string(deployment, f"{path}.azure.deployments.{model}", required=True, max_length=64)
        if text is not None and not _AZURE_DEPLOYMENT.fullmatch(text):
            c.error(f"{path}.azure.deployments.{model}", f"invalid deployment name {text!r} (letters, digits, "
                    "'.', '_' and '-')")  # fmt: skip
    return name


_AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def base_url_problem(url: str) -> str | None:
    """None if `url` can be a provider's base URL (http or https, a host, optional port and path)."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        return f"invalid base URL {url!r}: must start with http:// or https://"
    if parsed.username is not None or parsed.password is not None:
        return f"invalid base URL {url!r}: must not carry credentials (use apiKeyRef)"
    if parsed.query or parsed.fragment or url.endswith(("?", "#")):
        return f"invalid base URL {url!r}: must not have a query or fragment"
    try:
        port = parsed.port
    except ValueError:
        return f"invalid base URL {url!r}: bad port"
    host = parsed.hostname or ""
    if not host or not (is_ip_address(host) or DNS_SUBDOMAIN.fullmatch(host)):
        return f"invalid base URL {url!r}: needs a hostname or IP address"
    if port == 0:
        return f"invalid base URL {url!r}: port 0"
    if parsed.path and parsed.path != "/":
        problem = path_problem(parsed.path)
        if problem is not None:
            return f"invalid base URL path {parsed.path!r}: {problem}"
    return None


_BACKEND_VARIANT_CHECKS: Mapping[str, Callable[[_Checker, Any, str], None]] = {
    "static": _static_backend,
    "mcp": _mcp_backend,
    "a2a": _a2a_backend,
    "llm": _llm_backend,
}

_KIND_CHECKS: Mapping[str, Callable[[_Checker, KubeObject], None]] = {
    GATEWAY_CLASS: _gateway_class,
    GATEWAY: _gateway,
    HTTP_ROUTE: _http_route,
    REFERENCE_GRANT: _reference_grant,
    NAMESPACE: _namespace,
    SECRET: _secret,
    CONFIG_MAP: _config_map,
    SERVICE: _service,
    BACKEND: _backend,
    POLICY: check_policy,
}
