"""Policy objects to Policy discovery resources, one per Gateway snapshot it reaches, and Policy status.

Targets resolve against what each snapshot holds: a Gateway (the snapshot's own), a listener, an
HTTPRoute (any of its rules), one rule (by `name` or index), a Backend. A Policy goes into every
snapshot holding at least one of its targets, listing only those. The proxy applies precedence
(dataplane/config/policy.py); see protos/README.md.

Secrets are resolved here: API keys become SHA-256 digests (never shipped raw), basic-auth
hashes, Redis passwords and upstream credentials are copied in. Remote JWKS URLs stay URLs: the
translator is pure, and the JWKS fetcher fills `Jwks.inline` before a snapshot is published.

Fail closed: a Policy that is invalid (schema, CEL, missing Secret) is still shipped to the
targets it names, with `invalid_reason` set and no sections, so the proxy answers 500 on that
traffic instead of serving it without, say, its authentication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.model import (
    BACKEND,
    GATEWAY,
    HTTP_ROUTE,
    POLICY,
    SECRET,
    KubeObject,
    parse_duration,
    secret_line,
)
from controlplane.model.policy import TARGET_KINDS, rule_index, scrypt_hash_problem
from controlplane.translate.backends import duration_message
from controlplane.translate.conditions import (
    ACCEPTED,
    ATTACHED,
    REASON_ACCEPTED,
    REASON_ATTACHED,
    REASON_INVALID,
    REASON_TARGET_NOT_FOUND,
    condition,
)
from controlplane.translate.index import ObjectIndex, describe_errors
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND as BACKEND_TYPE
from shared.resources import LISTENER, ROUTE, ResourceMap

Kind = pb.PolicyTargetRef

_MODES = {
    "Strict": pb.Authentication.MODE_STRICT,
    "Optional": pb.Authentication.MODE_OPTIONAL,
    "Permissive": pb.Authentication.MODE_PERMISSIVE,
}
_UNITS = {"Requests": pb.RateLimit.UNIT_REQUESTS, "Tokens": pb.RateLimit.UNIT_TOKENS}
_SCOPES = {"Local": pb.LIMIT_SCOPE_LOCAL, "Global": pb.LIMIT_SCOPE_GLOBAL}
_STORE_DOWN = {"FailOpen": pb.STORE_DOWN_POLICY_FAIL_OPEN, "FailClosed": pb.STORE_DOWN_POLICY_FAIL_CLOSED}
_PERIODS = {
    "Minute": pb.TokenBudget.PERIOD_MINUTE,
    "Hour": pb.TokenBudget.PERIOD_HOUR,
    "Day": pb.TokenBudget.PERIOD_DAY,
    "Week": pb.TokenBudget.PERIOD_WEEK,
    "Month": pb.TokenBudget.PERIOD_MONTH,
}
_RETRY_ON = {"5xx": pb.Retry.ON_5XX, "reset": pb.Retry.ON_RESET, "connect-failure": pb.Retry.ON_CONNECT_FAILURE}
DEFAULT_API_KEY_HEADER = "x-api-key"
DEFAULT_CREDENTIALS_HEADER = "authorization"


class PolicyProblem(Exception):
    """A Policy that passed schema checks but cannot be built (a Secret is missing or unusable)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, slots=True)
class _Target:
    """One targetRef resolved to a snapshot key, or why it cannot be."""

    kind: int
    key: str
    gateway: str  # for gateway and listener targets: the Gateway whose snapshot may hold it
    shown: str  # "Gateway default/web listener http", for status messages
    problem: str = ""


@dataclass(frozen=True, slots=True)
class PolicyTranslation:
    # Gateway key -> Policy key -> message.
    policies: Mapping[str, Mapping[str, pb.Policy]]
    # (Policy object, status body).
    statuses: tuple[tuple[KubeObject, dict[str, Any]], ...]


def translate_policies(index: ObjectIndex, snapshots: Mapping[str, ResourceMap]) -> PolicyTranslation:
    """Attach every Policy to the snapshots holding its targets; say in its status where it attached."""
    present = {gateway: _SnapshotKeys.of(gateway, resources) for gateway, resources in snapshots.items()}
    by_gateway: dict[str, dict[str, pb.Policy]] = {gateway: {} for gateway in snapshots}
    statuses: list[tuple[KubeObject, dict[str, Any]]] = []
    candidates: list[tuple[KubeObject, list[Mapping[str, Any]], pb.Policy | str]] = []
    for obj in index.of_kind(POLICY):
        try:
            built: pb.Policy | str = build_policy(obj, index)
        except PolicyProblem as exc:
            built = str(exc)
        candidates.append((obj, list(obj.spec["targetRefs"]), built))
    for obj, errors in index.invalid_of_kind(POLICY):
        candidates.append((obj, _usable_target_refs(obj), describe_errors(errors)))

    for obj, refs, built in candidates:
        targets = [_resolve(obj, ref, index) for ref in refs]
        attached: list[str] = []
        missing: list[str] = []
        for position, target in enumerate(targets):
            holders = [gateway for gateway, keys in present.items() if keys.holds(target)]
            if holders:
                attached.append(target.shown)
            else:
                missing.append(f"targetRefs[{position}]: {target.problem or _why_absent(target, present)}")
            for gateway in holders:
                message = by_gateway[gateway].get(obj.ref)
                if message is None:
                    message = _message(obj, built)
                    by_gateway[gateway][obj.ref] = message
                ref = pb.PolicyTargetRef(kind=target.kind, name=target.key)  # type: ignore[arg-type]
                if ref not in message.targets:
                    message.targets.append(ref)
        statuses.append((obj, {"conditions": [_accepted(obj, built, attached, missing), _attached(obj, attached)]}))
    for named in by_gateway.values():
        for message in named.values():
            ordered = sorted(message.targets, key=lambda t: (t.kind, t.name))
            del message.targets[:]
            message.targets.extend(ordered)
    policies = {gateway: dict(sorted(named.items())) for gateway, named in by_gateway.items()}
    return PolicyTranslation(policies, tuple(statuses))


def _message(obj: KubeObject, built: pb.Policy | str) -> pb.Policy:
    message = pb.Policy()
    if isinstance(built, str):
        message.invalid_reason = built
    else:
        message.CopyFrom(built)
    message.name = obj.ref
    message.creation_unix_seconds = int(obj.creation_timestamp.timestamp()) if obj.creation_timestamp else 0
    return message


def _accepted(obj: KubeObject, built: pb.Policy | str, attached: list[str], missing: list[str]) -> dict[str, Any]:
    g = obj.generation
    if isinstance(built, str):
        where = f" (attached fail-closed to {', '.join(attached)}: its traffic is answered 500)" if attached else ""
        return condition(ACCEPTED, False, REASON_INVALID, built + where, g)
    if not attached:
        return condition(ACCEPTED, False, REASON_TARGET_NOT_FOUND, "; ".join(missing), g)
    message = f"Policy is attached to {', '.join(attached)}"
    if missing:
        message += f"; not attached: {'; '.join(missing)}"
    return condition(ACCEPTED, True, REASON_ACCEPTED, message, g)


def _attached(obj: KubeObject, attached: list[str]) -> dict[str, Any]:
    """Attached: whether any snapshot holds the policy (an invalid one too: fail-closed)."""
    if not attached:
        return condition(ATTACHED, False, REASON_TARGET_NOT_FOUND, "Policy is attached to no target", obj.generation)
    return condition(ATTACHED, True, REASON_ATTACHED, f"Policy is attached to {', '.join(attached)}", obj.generation)


# --- targets --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SnapshotKeys:
    gateway: str
    listeners: frozenset[str]
    rules: frozenset[str]
    routes: frozenset[str]
    backends: frozenset[str]

    @classmethod
    def of(cls, gateway: str, resources: ResourceMap) -> _SnapshotKeys:
        routes = resources.get(ROUTE, {})
        return cls(
            gateway,
            frozenset(resources.get(LISTENER, {})),
            frozenset(routes),
            frozenset(route.route_key for route in routes.values()),  # type: ignore[attr-defined]
            frozenset(resources.get(BACKEND_TYPE, {})),
        )

    def holds(self, target: _Target) -> bool:
        if target.problem:
            return False
        if target.kind == Kind.KIND_GATEWAY:
            return target.key == self.gateway
        if target.kind == Kind.KIND_LISTENER:
            return target.key in self.listeners
        if target.kind == Kind.KIND_ROUTE:
            return target.key in self.routes
        if target.kind == Kind.KIND_ROUTE_RULE:
            return target.key in self.rules
        return target.key in self.backends


def _resolve(obj: KubeObject, ref: Mapping[str, Any], index: ObjectIndex) -> _Target:
    kind, name, section = ref["kind"], ref["name"], ref.get("sectionName")
    namespace = obj.namespace
    if kind == GATEWAY:
        gateway = f"{namespace}/{name}"
        if section is None:
            return _Target(Kind.KIND_GATEWAY, gateway, gateway, f"Gateway {gateway}")
        shown = f"Gateway {gateway} listener {section}"
        return _Target(Kind.KIND_LISTENER, f"{gateway}/{section}", gateway, shown)
    if kind == HTTP_ROUTE:
        route_key = f"{namespace}/{name}"
        if section is None:
            return _Target(Kind.KIND_ROUTE, route_key, "", f"HTTPRoute {route_key}")
        route = index.get(HTTP_ROUTE, namespace, name)
        shown = f"HTTPRoute {route_key} rule {section}"
        if route is None:
            return _Target(Kind.KIND_ROUTE_RULE, "", "", shown, index.problem(HTTP_ROUTE, namespace, name))
        position = rule_index(route, section)
        if position is None:
            problem = f"HTTPRoute {route_key} has no rule named {section!r} (nor a rule of that index)"
            return _Target(Kind.KIND_ROUTE_RULE, "", "", shown, problem)
        return _Target(Kind.KIND_ROUTE_RULE, f"{route_key}/{position}", "", shown)
    key = f"{namespace}/{name}"
    return _Target(Kind.KIND_BACKEND, key, "", f"Backend {key}")


def _why_absent(target: _Target, present: Mapping[str, _SnapshotKeys]) -> str:
    """Why a well-formed target is in no snapshot, in the words an operator needs."""
    if target.kind in (Kind.KIND_GATEWAY, Kind.KIND_LISTENER):
        if target.gateway not in present:
            return f"Gateway {target.gateway} not found (or not managed by this controller)"
        listener = target.key.rsplit("/", 1)[-1]
        return f"Gateway {target.gateway} has no programmed listener {listener!r}"
    if target.kind == Kind.KIND_ROUTE:
        return f"HTTPRoute {target.key} not found, or attached to no Gateway of this controller"
    if target.kind == Kind.KIND_ROUTE_RULE:
        route, _, position = target.key.rpartition("/")
        return f"rule {position} of HTTPRoute {route} is not served (route not attached, or the rule was dropped)"
    return f"Backend {target.key} not found, or used by no route of this controller's Gateways"


def _usable_target_refs(obj: KubeObject) -> list[Mapping[str, Any]]:
    """targetRefs of a Policy that failed validation: the entries that still say where it belongs."""
    refs = obj.spec.get("targetRefs")
    if not isinstance(refs, list):
        return []
    usable = []
    for ref in refs:
        if not isinstance(ref, Mapping) or ref.get("kind") not in TARGET_KINDS or not isinstance(ref.get("name"), str):
            continue
        if ref.get("namespace", obj.namespace) != obj.namespace:
            continue
        section = ref.get("sectionName")
        if section is not None and (not isinstance(section, str) or ref["kind"] == BACKEND):
            continue
        usable.append(ref)
    return usable


# --- sections -------------------------------------------------------------------------------


def build_policy(obj: KubeObject, index: ObjectIndex) -> pb.Policy:
    """The sections of a validated Policy; raises PolicyProblem when a Secret cannot be used."""
    spec = obj.spec
    secrets = _Secrets(obj, index)
    policy = pb.Policy()
    if "authentication" in spec:
        _authentication(spec["authentication"], policy.authentication, secrets)
    if "authorization" in spec:
        authz = spec["authorization"] or {}
        policy.authorization.SetInParent()
        for kind in ("allow", "deny", "require"):
            getattr(policy.authorization, kind).extend(authz.get(kind) or ())
    if "rateLimits" in spec:
        policy.rate_limits.SetInParent()
        for position, limit in enumerate(spec["rateLimits"] or ()):
            policy.rate_limits.limits.append(_rate_limit(limit, f"spec.rateLimits[{position}]", secrets))
    if "tokenBudgets" in spec:
        policy.token_budgets.SetInParent()
        for position, budget in enumerate(spec["tokenBudgets"] or ()):
            policy.token_budgets.budgets.append(_budget(budget, f"spec.tokenBudgets[{position}]", secrets))
    if "resilience" in spec:
        _resilience(spec["resilience"] or {}, policy.resilience)
    if "cors" in spec:
        _cors(spec["cors"] or {}, policy.cors)
    for field, target in (("requestHeaders", policy.request_headers), ("responseHeaders", policy.response_headers)):
        if field in spec:
            _header_modifier(spec[field] or {}, target)
    if "upstreamCredentials" in spec:
        credentials = spec["upstreamCredentials"]
        ref = credentials["secretRef"]
        value = secrets.text(ref["name"], ref["key"], "spec.upstreamCredentials.secretRef")
        policy.upstream_credentials.header = credentials.get("header", DEFAULT_CREDENTIALS_HEADER).lower()
        policy.upstream_credentials.value = credentials.get("prefix", "") + value
    return policy


class _Secrets:
    """Secret values of the Policy's namespace, each problem naming the field that refers to it."""

    def __init__(self, obj: KubeObject, index: ObjectIndex) -> None:
        self._obj = obj
        self._index = index

    def secret(self, name: str, field: str) -> KubeObject:
        secret = self._index.get(SECRET, self._obj.namespace, name)
        if secret is None:
            raise PolicyProblem(field, self._index.problem(SECRET, self._obj.namespace, name))
        return secret

    def entries(self, name: str, field: str) -> list[tuple[str, str]]:
        """(data key, value) of every entry of a Secret, in key order."""
        secret = self.secret(name, field)
        entries = []
        for key in sorted({*secret.data, *secret.string_data}):
            entries.append((key, self._decoded(secret, key, field)))
        if not entries:
            raise PolicyProblem(field, f"Secret {secret.ref} has no entries")
        return entries

    def text(self, name: str, key: str, field: str) -> str:
        secret = self.secret(name, field)
        if secret.data_value(key) is None:
            raise PolicyProblem(field, f"Secret {secret.ref} has no key {key!r}")
        return self._decoded(secret, key, field)

    @staticmethod
    def _decoded(secret: KubeObject, key: str, field: str) -> str:
        raw = secret.data_value(key)
        text = secret_line(raw) if raw is not None else None
        if text is None:
            raise PolicyProblem(field, f"Secret {secret.ref} key {key!r} must hold one line of ASCII text")
        return text


def _duration(text: str) -> Any:
    return duration_message(parse_duration(text))


def _authentication(spec: Mapping[str, Any], out: pb.Authentication, secrets: _Secrets) -> None:
    out.mode = _MODES[spec.get("mode", "Strict")]
    for position, provider in enumerate(spec.get("jwt") or ()):
        message = out.jwt_providers.add(
            name=provider.get("name", f"jwt-{position}"),
            issuer=provider["issuer"],
            audiences=provider.get("audiences") or (),
            algorithms=provider.get("algorithms") or (),
            required_claims=provider.get("requiredClaims") or (),
            principal_claim=provider.get("principalClaim", "sub"),
            allow_missing_expiry=bool(provider.get("allowMissingExpiry", False)),
        )
        _jwks(provider["jwks"], message.jwks)
        if "leeway" in provider:
            message.leeway.CopyFrom(_duration(provider["leeway"]))
        _claims(provider, message.claims_to_headers)
    account = spec.get("serviceAccount")
    if account is not None:
        message = out.service_account_providers.add(
            name="serviceaccount",
            issuer=account["issuer"],
            audiences=account["audiences"],
            token_review=bool(account.get("tokenReview", False)),
        )
        if "jwks" in account:
            _jwks(account["jwks"], message.jwks)
        if "leeway" in account:
            message.leeway.CopyFrom(_duration(account["leeway"]))
        _claims(account, message.claims_to_headers)
    if "apiKeys" in spec:
        config = spec["apiKeys"]
        field = "spec.authentication.apiKeys.secretRef"
        out.api_keys.header = config.get("header", DEFAULT_API_KEY_HEADER).lower()
        digests: dict[str, str] = {}
        for name, key in secrets.entries(config["secretRef"]["name"], field):
            digest = hashlib.sha256(key.encode()).hexdigest()
            if digest in digests:
                raise PolicyProblem(field, f"keys {digests[digest]!r} and {name!r} hold the same API key")
            digests[digest] = name
            out.api_keys.keys.add(name=name, sha256=digest)
    if "basicAuth" in spec:
        config = spec["basicAuth"]
        field = "spec.authentication.basicAuth.secretRef"
        out.basic.realm = config.get("realm", "agentgate")
        for user, password_hash in secrets.entries(config["secretRef"]["name"], field):
            problem = scrypt_hash_problem(password_hash)
            if problem is not None:
                raise PolicyProblem(field, f"user {user!r}: {problem}")
            out.basic.users.add(name=user, password_hash=password_hash)
    out.forward_credentials = bool(spec.get("forwardCredentials", False))
    metadata = spec.get("protectedResource")
    if metadata is not None:
        out.protected_resource.resource = metadata["resource"]
        out.protected_resource.authorization_servers.extend(metadata.get("authorizationServers") or ())
        out.protected_resource.scopes_supported.extend(metadata.get("scopesSupported") or ())
        out.protected_resource.bearer_methods_supported.extend(metadata.get("bearerMethodsSupported") or ())
        out.protected_resource.resource_name = metadata.get("resourceName", "")
        out.protected_resource.resource_documentation = metadata.get("resourceDocumentation", "")


def _jwks(spec: Mapping[str, Any], out: pb.Jwks) -> None:
    if "inline" in spec:
        out.inline = spec["inline"]
    elif "file" in spec:
        out.file = spec["file"]
    else:
        remote = spec["remote"]
        out.url = remote["url"]
        if "refreshInterval" in remote:
            out.refresh_interval.CopyFrom(_duration(remote["refreshInterval"]))


def _claims(spec: Mapping[str, Any], out: Any) -> None:
    for entry in spec.get("claimsToHeaders") or ():
        out.add(claim=entry["claim"], header=entry["header"].lower())


def _store(spec: Mapping[str, Any], field: str, secrets: _Secrets, out: pb.RedisStore) -> None:
    redis = spec["redis"]
    out.url = redis["url"]
    out.username = redis.get("username", "")
    ref = redis.get("passwordSecretRef")
    if ref is not None:
        out.password = secrets.text(ref["name"], ref["key"], f"{field}.redis.passwordSecretRef")


def _rate_limit(spec: Mapping[str, Any], field: str, secrets: _Secrets) -> pb.RateLimit:
    limit = pb.RateLimit(
        name=spec["name"],
        key=spec.get("key", ""),
        unit=_UNITS[spec.get("unit", "Requests")],  # type: ignore[arg-type]
        capacity=spec["capacity"],
        refill=spec.get("refill", spec["capacity"]),
        scope=_SCOPES[spec.get("scope", "Local")],  # type: ignore[arg-type]
    )
    limit.per.CopyFrom(_duration(spec["per"]))
    if limit.scope == pb.LIMIT_SCOPE_GLOBAL:
        _store(spec, field, secrets, limit.store)
        limit.on_store_down = _STORE_DOWN[spec.get("onStoreDown", "FailOpen")]  # type: ignore[assignment]
    return limit


def _budget(spec: Mapping[str, Any], field: str, secrets: _Secrets) -> pb.TokenBudget:
    budget = pb.TokenBudget(
        name=spec["name"],
        key=spec.get("key", ""),
        tokens=spec["tokens"],
        scope=_SCOPES[spec.get("scope", "Local")],  # type: ignore[arg-type]
    )
    if "window" in spec:
        budget.window.CopyFrom(_duration(spec["window"]))
    else:
        budget.period = _PERIODS[spec.get("period", "Day")]  # type: ignore[assignment]
    if budget.scope == pb.LIMIT_SCOPE_GLOBAL:
        _store(spec, field, secrets, budget.store)
        budget.on_store_down = _STORE_DOWN[spec.get("onStoreDown", "FailOpen")]  # type: ignore[assignment]
    return budget


_RESILIENCE_DURATIONS: tuple[tuple[str, str], ...] = (
    ("requestTimeout", "request_timeout"),
    ("perTryTimeout", "per_try_timeout"),
    ("streamIdleTimeout", "stream_idle_timeout"),
)


def _resilience(spec: Mapping[str, Any], out: pb.Resilience) -> None:
    out.SetInParent()
    for yaml_field, proto_field in _RESILIENCE_DURATIONS:
        if yaml_field in spec:
            getattr(out, proto_field).CopyFrom(_duration(spec[yaml_field]))
    retry = spec.get("retry")
    if retry is None:
        return
    out.retry.attempts = retry["attempts"]
    backoff = retry.get("backoff") or {}
    if "baseInterval" in backoff:
        out.retry.backoff_base.CopyFrom(_duration(backoff["baseInterval"]))
    if "maxInterval" in backoff:
        out.retry.backoff_max.CopyFrom(_duration(backoff["maxInterval"]))
    out.retry.on.extend(_RETRY_ON[name] for name in dict.fromkeys(retry.get("retryOn") or ()))
    out.retry.status_codes.extend(sorted(set(retry.get("statusCodes") or ())))
    out.retry.retry_non_idempotent_mcp = bool(retry.get("retryNonIdempotentMcp", False))


def _cors(spec: Mapping[str, Any], out: pb.Cors) -> None:
    out.SetInParent()
    out.allow_origins.extend(spec.get("allowOrigins") or ())
    out.allow_methods.extend(spec.get("allowMethods") or ())
    out.allow_headers.extend(name.lower() for name in spec.get("allowHeaders") or ())
    out.expose_headers.extend(name.lower() for name in spec.get("exposeHeaders") or ())
    out.allow_credentials = bool(spec.get("allowCredentials", False))
    if "maxAge" in spec:
        out.max_age.CopyFrom(_duration(spec["maxAge"]))


def _header_modifier(spec: Mapping[str, Any], out: pb.HeaderModifier) -> None:
    out.SetInParent()
    out.set.extend(_header(h) for h in spec.get("set") or ())
    out.add.extend(_header(h) for h in spec.get("add") or ())
    out.remove.extend(name.lower() for name in spec.get("remove") or ())


def _header(spec: Mapping[str, Any]) -> pb.HeaderModifier.Header:
    return pb.HeaderModifier.Header(name=spec["name"].lower(), value=spec["value"])
