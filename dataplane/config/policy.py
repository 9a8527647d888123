"""Policy resources -> validated per-policy sections -> the effective policy of each route rule and backend.

Three steps, all at config time:

1. Each `pb.Policy` is checked field by field (a problem is a `ResourceError` naming the Policy and
   the field, so the update is NACKed) and becomes a `PolicySettings` of frozen plain data. CEL is
   compiled here, once per expression per update (`dataplane.policy.cel`), and kept compiled.
2. Precedence, per section: the most specific attachment wins (gateway < listener < route < rule <
   backend); at one level the older policy wins (`creation_unix_seconds`), then the smaller name.
   Sections never merge: a rule's `rate_limits` replace the gateway's as a whole.
3. `PolicyIndex` holds the result for every (listener, rule) pair and every backend, and the two
   overlaid for every (listener, rule, backend) a rule can forward to: the backend's sections win.

A request therefore does one dict lookup. The cores (authentication, CEL rule sets, limits) are
compiled from these settings by their owners; sections are shared objects, so a gateway-wide
section compiled once (keyed by identity) serves every rule it reaches.

Fail closed: a Policy the control plane could not accept arrives with `invalid_reason` and no
sections; every effective policy it reaches lists it in `invalid`, and the request path answers
500 there instead of serving traffic without the policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from google.protobuf.message import Message

from dataplane.config.errors import ErrorList, ErrorReporter
from dataplane.config.validate import check_enum, check_header_name, check_header_value, duration_seconds
from dataplane.policy.cel import CelCompileError, Expression, compile_expression
from dataplane.routing.filters import HeaderOps
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.config_rules import HEADER_VALUE_RULE, POLICY_RESERVED_HEADERS, is_header_value
from shared.origins import OriginAllowList, origin_problem
from shared.resources import LISTENER, POLICY, ROUTE, ResourceMap

AuthnMode = Literal["strict", "optional", "permissive"]
ProviderKind = Literal["jwt", "kubernetes"]
LimitUnitName = Literal["requests", "tokens"]
LimitScopeName = Literal["local", "global"]
StoreDownName = Literal["fail_open", "fail_closed"]
BudgetPeriodName = Literal["minute", "hour", "day", "week", "month"]
RetryCondition = Literal["5xx", "reset", "connect-failure"]

DEFAULT_LEEWAY = 60.0
MAX_LEEWAY = 600.0
DEFAULT_API_KEY_HEADER = "x-api-key"
DEFAULT_CREDENTIALS_HEADER = "authorization"
DEFAULT_REALM = "agentgate"
DEFAULT_BACKOFF_BASE = 0.025
DEFAULT_BACKOFF_MAX = 0.25
DEFAULT_RETRY_ON: frozenset[RetryCondition] = frozenset({"connect-failure", "reset"})
DEFAULT_CORS_METHODS = ("GET", "HEAD", "POST")
MAX_RETRY_ATTEMPTS = 10
MAX_JWKS_BYTES = 1 << 20
JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
# Headers the proxy manages itself; neither claims nor credentials may write them.
RESERVED_HEADERS = POLICY_RESERVED_HEADERS
_SCRYPT_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")

_MODES: Mapping[int, AuthnMode] = {
    pb.Authentication.MODE_UNSPECIFIED: "strict",
    pb.Authentication.MODE_STRICT: "strict",
    pb.Authentication.MODE_OPTIONAL: "optional",
    pb.Authentication.MODE_PERMISSIVE: "permissive",
}
_UNITS: Mapping[int, LimitUnitName] = {
    pb.RateLimit.UNIT_UNSPECIFIED: "requests",
    pb.RateLimit.UNIT_REQUESTS: "requests",
    pb.RateLimit.UNIT_TOKENS: "tokens",
}
_SCOPES: Mapping[int, LimitScopeName] = {
    pb.LIMIT_SCOPE_UNSPECIFIED: "local",
    pb.LIMIT_SCOPE_LOCAL: "local",
    pb.LIMIT_SCOPE_GLOBAL: "global",
}
_STORE_DOWN: Mapping[int, StoreDownName] = {
    pb.STORE_DOWN_POLICY_UNSPECIFIED: "fail_open",
    pb.STORE_DOWN_POLICY_FAIL_OPEN: "fail_open",
    pb.STORE_DOWN_POLICY_FAIL_CLOSED: "fail_closed",
}
_PERIODS: Mapping[int, BudgetPeriodName] = {
    pb.TokenBudget.PERIOD_UNSPECIFIED: "day",
    pb.TokenBudget.PERIOD_MINUTE: "minute",
    pb.TokenBudget.PERIOD_HOUR: "hour",
    pb.TokenBudget.PERIOD_DAY: "day",
    pb.TokenBudget.PERIOD_WEEK: "week",
    pb.TokenBudget.PERIOD_MONTH: "month",
}
_RETRY_ON: Mapping[int, RetryCondition] = {
    pb.Retry.ON_5XX: "5xx",
    pb.Retry.ON_RESET: "reset",
    pb.Retry.ON_CONNECT_FAILURE: "connect-failure",
}
Kind = pb.PolicyTargetRef
# Attachment levels, least to most specific.
LEVELS: Mapping[int, int] = {
    Kind.KIND_GATEWAY: 0,
    Kind.KIND_LISTENER: 1,
    Kind.KIND_ROUTE: 2,
    Kind.KIND_ROUTE_RULE: 3,
    Kind.KIND_BACKEND: 4,
}


# --- sections: frozen plain data --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimHeader:
    """A verified claim copied into a request header (`claim` may be a dotted path)."""

    claim: str
    header: str


@dataclass(frozen=True, slots=True)
class JwtProviderSettings:
    """One token issuer; field names follow `dataplane.policy.jwt.JwtProviderSpec`.

    `kind="kubernetes"` is a service-account provider. With `jwks_url`, `jwks_inline` holds the
    keys the control plane last fetched (None until the first fetch succeeds).
    """

    name: str
    issuer: str
    kind: ProviderKind = "jwt"
    audiences: tuple[str, ...] = ()
    jwks_inline: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    # Empty means every asymmetric algorithm.
    algorithms: tuple[str, ...] = ()
    leeway_seconds: float = DEFAULT_LEEWAY
    required_claims: tuple[str, ...] = ()
    principal_claim: str = "sub"
    require_expiry: bool = True
    token_review: bool = False
    claims_to_headers: tuple[ClaimHeader, ...] = ()


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class ApiKeySettings:
    keys: tuple[ApiKey, ...]
    header: str = DEFAULT_API_KEY_HEADER


@dataclass(frozen=True, slots=True)
class BasicUser:
    name: str
    password_hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class BasicAuthSettings:
    users: tuple[BasicUser, ...]
    realm: str = DEFAULT_REALM


@dataclass(frozen=True, slots=True)
class ProtectedResourceSettings:
    """RFC 9728 metadata; `document` is the JSON body, rendered once."""

    resource: str
    authorization_servers: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    bearer_methods_supported: tuple[str, ...] = ("header",)
    resource_name: str = ""
    resource_documentation: str = ""
    document: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body: dict[str, object] = {"resource": self.resource}
        if self.authorization_servers:
            body["authorization_servers"] = list(self.authorization_servers)
        if self.scopes_supported:
            body["scopes_supported"] = list(self.scopes_supported)
        body["bearer_methods_supported"] = list(self.bearer_methods_supported)
        if self.resource_name:
            body["resource_name"] = self.resource_name
        if self.resource_documentation:
            body["resource_documentation"] = self.resource_documentation
        object.__setattr__(self, "document", json.dumps(body, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class AuthenticationSettings:
    policy: str
    mode: AuthnMode = "strict"
    # JWT and service-account providers, in config order.
    providers: tuple[JwtProviderSettings, ...] = ()
    api_keys: ApiKeySettings | None = None
    basic: BasicAuthSettings | None = None
    forward_credentials: bool = False
    protected_resource: ProtectedResourceSettings | None = None
    # Every header a claim is copied into: stripped from client requests first (anti-spoofing).
    identity_headers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AuthorizationSettings:
    """Compiled rules; `dataplane.policy.authorize.RuleSet` is built from them without recompiling."""

    policy: str
    allow: tuple[Expression, ...] = ()
    deny: tuple[Expression, ...] = ()
    require: tuple[Expression, ...] = ()


@dataclass(frozen=True, slots=True)
class RedisStoreSettings:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Field names and values follow `dataplane.policy.ratelimit.LimitSpec`; `key` None: one bucket."""

    name: str
    capacity: int
    refill: float
    per: float
    key: Expression | None = None
    unit: LimitUnitName = "requests"
    scope: LimitScopeName = "local"
    store: RedisStoreSettings | None = None
    on_store_down: StoreDownName = "fail_open"


@dataclass(frozen=True, slots=True)
class TokenBudgetSettings:
    """Follows `dataplane.policy.budget.BudgetSpec`: `period` is a calendar period or seconds."""

    name: str
    tokens: int
    period: BudgetPeriodName | float = "day"
    key: Expression | None = None
    scope: LimitScopeName = "local"
    store: RedisStoreSettings | None = None
    on_store_down: StoreDownName = "fail_open"


@dataclass(frozen=True, slots=True)
class RateLimitsSection:
    policy: str
    limits: tuple[RateLimitSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenBudgetsSection:
    policy: str
    budgets: tuple[TokenBudgetSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class RetrySettings:
    attempts: int
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX
    on: frozenset[RetryCondition] = DEFAULT_RETRY_ON
    # With "5xx" in `on`: empty means every 5xx, else only these.
    status_codes: frozenset[int] = frozenset()
    retry_non_idempotent_mcp: bool = False


@dataclass(frozen=True, slots=True)
class ResilienceSettings:
    """Seconds; None means unset. A Route's own timeouts (HTTPRoute rule `timeouts`) win over these."""

    policy: str
    request_timeout: float | None = None
    per_try_timeout: float | None = None
    stream_idle_timeout: float | None = None
    retry: RetrySettings | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    policy: str
    allow_origins: OriginAllowList
    allow_methods: tuple[str, ...] = DEFAULT_CORS_METHODS
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class HeadersSection:
    policy: str
    ops: HeaderOps = field(default_factory=HeaderOps)


@dataclass(frozen=True, slots=True)
class UpstreamCredentialSettings:
    policy: str
    header: str
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class PolicySections:
    """The sections one policy sets (None: says nothing) or the whole effective result of several."""

    authentication: AuthenticationSettings | None = None
    authorization: AuthorizationSettings | None = None
    rate_limits: RateLimitsSection | None = None
    token_budgets: TokenBudgetsSection | None = None
    resilience: ResilienceSettings | None = None
    cors: CorsSettings | None = None
    request_headers: HeadersSection | None = None
    response_headers: HeadersSection | None = None
    upstream_credentials: UpstreamCredentialSettings | None = None


SECTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PolicySections))
_NO_SECTIONS = PolicySections()


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    kind: int  # a pb.PolicyTargetRef.Kind
    name: str


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """One Policy resource, validated. `invalid_reason` set: the control plane refused it (fail closed)."""

    name: str
    creation_unix_seconds: int
    targets: tuple[PolicyTarget, ...]
    sections: PolicySections = _NO_SECTIONS
    invalid_reason: str | None = None

    @property
    def precedence(self) -> tuple[int, str]:
        """Sort key within one level: older first, then by name."""
        return (self.creation_unix_seconds, self.name)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """What applies to one request: each section from its winning policy, or None.

    `invalid` names policies that apply but were refused by the control plane: answer 500.
    `policies` names every policy that applies, most specific first (for logs and the config dump).
    """

    sections: PolicySections = _NO_SECTIONS
    invalid: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()

    def overlay(self, specific: EffectivePolicy) -> EffectivePolicy:
        """This policy with `specific`'s sections winning where it sets them (backend over rule)."""
        if not specific.policies:
            return self
        if not self.policies:
            return specific
        merged = {}
        for name in SECTION_NAMES:
            value = getattr(specific.sections, name)
            merged[name] = value if value is not None else getattr(self.sections, name)
        return EffectivePolicy(
            PolicySections(**merged),
            tuple(dict.fromkeys(specific.invalid + self.invalid)),
            tuple(dict.fromkeys(specific.policies + self.policies)),
        )


EMPTY_POLICY = EffectivePolicy()


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    """Effective policies of one config, precomputed; lookups of pairs without policies give EMPTY_POLICY."""

    policies: Mapping[str, PolicySettings] = field(default_factory=lambda: MappingProxyType({}))
    # (listener key, route key) -> effective policy of that rule as reached through that listener.
    rules: Mapping[tuple[str, str], EffectivePolicy] = field(default_factory=lambda: MappingProxyType({}))
    # Backend key -> policies attached to that backend.
    backends: Mapping[str, EffectivePolicy] = field(default_factory=lambda: MappingProxyType({}))
    # (listener key, route key, backend key) -> the rule's policy overlaid with the backend's.
    requests: Mapping[tuple[str, str, str], EffectivePolicy] = field(default_factory=lambda: MappingProxyType({}))

    def for_rule(self, listener: str, route: str) -> EffectivePolicy:
        return self.rules.get((listener, route), EMPTY_POLICY)

    def for_backend(self, backend: str) -> EffectivePolicy:
        return self.backends.get(backend, EMPTY_POLICY)

    def for_request(self, listener: str, route: str, backend: str) -> EffectivePolicy:
        found = self.requests.get((listener, route, backend))
        if found is not None:
            return found
        return self.for_rule(listener, route).overlay(self.for_backend(backend))


EMPTY_POLICY_INDEX = PolicyIndex()


# --- compile ----------------------------------------------------------------------------------


def compile_policies(errors: ErrorList, resources: ResourceMap) -> PolicyIndex:
    """Validate every Policy and compute the effective policy of every rule and backend."""
    settings: dict[str, PolicySettings] = {}
    for name, message in sorted(resources.get(POLICY, {}).items()):
        report = errors.reporter(POLICY, name)
        if not isinstance(message, pb.Policy):
            report("", f"expected {pb.Policy.DESCRIPTOR.full_name}, got {type(message).__name__}")
            continue
        compiled = compile_policy(report, name, message)
        if compiled is not None:
            settings[name] = compiled
    return index_policies(settings, resources)


def index_policies(settings: Mapping[str, PolicySettings], resources: ResourceMap) -> PolicyIndex:
    """Precedence over the rules and backends of `resources` (Routes and Listeners as sent)."""
    attached: dict[tuple[int, str], list[PolicySettings]] = {}
    for policy in settings.values():
        for target in dict.fromkeys(policy.targets):
            attached.setdefault((target.kind, target.name), []).append(policy)
    gateway_of = {
        name: listener.gateway or name.rsplit("/", 1)[0]
        for name, listener in resources.get(LISTENER, {}).items()
        if isinstance(listener, pb.Listener)
    }
    backends: dict[str, EffectivePolicy] = {}
    for (kind, key), policies in attached.items():
        if kind == Kind.KIND_BACKEND:
            backends[key] = _effective([(LEVELS[kind], policy) for policy in policies])
    rules: dict[tuple[str, str], EffectivePolicy] = {}
    requests: dict[tuple[str, str, str], EffectivePolicy] = {}
    for name, route in sorted(resources.get(ROUTE, {}).items()):
        if not isinstance(route, pb.Route):
            continue
        backend_keys = {ref.backend for ref in route.backends if ref.backend and not ref.direct_response_status}
        for listener in dict.fromkeys(route.listeners):
            scopes = (
                (Kind.KIND_GATEWAY, gateway_of.get(listener, listener.rsplit("/", 1)[0])),
                (Kind.KIND_LISTENER, listener),
                (Kind.KIND_ROUTE, route.route_key),
                (Kind.KIND_ROUTE_RULE, name),
            )
            candidates = [(LEVELS[kind], p) for kind, key in scopes for p in attached.get((kind, key), ())]
            rule = _effective(candidates)
            if rule.policies:
                rules[(listener, name)] = rule
            for backend in sorted(backend_keys):
                combined = rule.overlay(backends.get(backend, EMPTY_POLICY))
                if combined.policies:
                    requests[(listener, name, backend)] = combined
    return PolicyIndex(
        policies=MappingProxyType(dict(settings)),
        rules=MappingProxyType(rules),
        backends=MappingProxyType(backends),
        requests=MappingProxyType(requests),
    )


def _effective(candidates: Iterable[tuple[int, PolicySettings]]) -> EffectivePolicy:
    """Per section, the first policy setting it in precedence order (most specific, oldest, name)."""
    ordered: dict[str, PolicySettings] = {}
    for _, policy in sorted(candidates, key=lambda item: (-item[0], item[1].precedence)):
        ordered.setdefault(policy.name, policy)
    if not ordered:
        return EMPTY_POLICY
    winners: dict[str, object] = {}
    for name in SECTION_NAMES:
        for policy in ordered.values():
            value = getattr(policy.sections, name)
            if value is not None:
                winners[name] = value
                break
    invalid = tuple(name for name, policy in ordered.items() if policy.invalid_reason is not None)
    return EffectivePolicy(PolicySections(**winners), invalid, tuple(ordered))  # type: ignore[arg-type]


def compile_policy(report: ErrorReporter, name: str, policy: pb.Policy) -> PolicySettings | None:
    """One Policy resource checked field by field; None when it has errors (all reported)."""
    checker = _Checker(report, name)
    if policy.name and policy.name != name:
        report("name", f"{policy.name!r} differs from the resource name")
    targets = checker.targets(policy.targets)
    sections = _NO_SECTIONS
    invalid_reason = policy.invalid_reason or None
    if invalid_reason is None:
        sections = checker.sections(policy)
    if checker.failed:
        return None
    return PolicySettings(name, policy.creation_unix_seconds, targets, sections, invalid_reason)


class _Checker:
    """Validates one Policy; `failed` turns True on the first error reported through it."""

    def __init__(self, report: ErrorReporter, policy: str) -> None:
        self._report = report
        self.policy = policy
        self.failed = False

    def error(self, where: str, message: str) -> None:
        self.failed = True
        self._report(where, message)

    # --- generic checks -----------------------------------------------------------------------

    def enum(self, where: str, message: Message, name: str) -> bool:
        return check_enum(self.error, where, message, name)

    def duration(self, where: str, parent: Message, name: str, *, positive: bool = True) -> float | None:
        seconds = duration_seconds(self.error, where, parent, name)
        if seconds is not None and positive and seconds <= 0:
            self.error(where, "must be greater than zero")
            return None
        return seconds

    def header(self, where: str, name: str) -> str | None:
        if not check_header_name(self.error, where, name):
            return None
        if name != name.lower():
            self.error(where, f"header names are sent lower-case: use {name.lower()!r}")
            return None
        if name in RESERVED_HEADERS:
            self.error(where, f"{name!r} is managed by the proxy")
            return None
        return name

    def text(self, where: str, value: str, *, max_length: int = 1024) -> str | None:
        if not value:
            self.error(where, "must not be empty")
            return None
        if len(value) > max_length:
            self.error(where, f"must be at most {max_length} characters")
            return None
        return value

    def texts(self, where: str, values: Sequence[str], *, max_length: int = 1024) -> tuple[str, ...]:
        return tuple(
            text
            for index, value in enumerate(values)
            if (text := self.text(f"{where}[{index}]", value, max_length=max_length)) is not None
        )

    def url(self, where: str, value: str, schemes: Sequence[str] = ("https",)) -> str | None:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc or any(ch.isspace() for ch in value):
            self.error(where, f"must be an absolute {' or '.join(schemes)} URL, got {value!r}")
            return None
        return value

    def cel(self, where: str, source: str) -> Expression | None:
        try:
            return compile_expression(source, where, policy=self.policy)
        except CelCompileError as exc:
            position = f" at {exc.line}:{exc.column}" if exc.line is not None else ""
            self.error(where, f"{exc.reason}{position} in CEL expression {source!r}")
            return None

    def unique(self, where: str, seen: dict[str, str], value: str, what: str) -> None:
        if value in seen:
            self.error(where, f"{what} {value!r} repeats {seen[value]}")
        seen.setdefault(value, where)

    # --- targets ------------------------------------------------------------------------------

    def targets(self, refs: Sequence[pb.PolicyTargetRef]) -> tuple[PolicyTarget, ...]:
        targets = []
        for index, ref in enumerate(refs):
            where = f"targets[{index}]"
            if not self.enum(f"{where}.kind", ref, "kind"):
                continue
            if ref.kind == Kind.KIND_UNSPECIFIED:
                self.error(f"{where}.kind", "must be set")
                continue
            if not ref.name:
                self.error(f"{where}.name", "must not be empty")
                continue
            targets.append(PolicyTarget(ref.kind, ref.name))
        return tuple(targets)

    # --- sections -----------------------------------------------------------------------------

    def sections(self, policy: pb.Policy) -> PolicySections:
        name = self.policy
        found: dict[str, object] = {}
        if policy.HasField("authentication"):
            found["authentication"] = self.authentication("authentication", policy.authentication)
        if policy.HasField("authorization"):
            authz = policy.authorization
            rules = {
                kind: tuple(
                    e
                    for i, source in enumerate(getattr(authz, kind))
                    if (e := self.cel(f"authorization.{kind}[{i}]", source)) is not None
                )
                for kind in ("allow", "deny", "require")
            }
            found["authorization"] = AuthorizationSettings(name, **rules)
        if policy.HasField("rate_limits"):
            found["rate_limits"] = self.rate_limits(policy.rate_limits)
        if policy.HasField("token_budgets"):
            found["token_budgets"] = self.token_budgets(policy.token_budgets)
        if policy.HasField("resilience"):
            found["resilience"] = self.resilience("resilience", policy.resilience)
        if policy.HasField("cors"):
            found["cors"] = self.cors("cors", policy.cors)
        for section in ("request_headers", "response_headers"):
            if policy.HasField(section):
                found[section] = HeadersSection(name, self.header_ops(section, getattr(policy, section)))
        if policy.HasField("upstream_credentials"):
            credentials = policy.upstream_credentials
            header = self.header("upstream_credentials.header", credentials.header or DEFAULT_CREDENTIALS_HEADER)
            value = credentials.value
            if not value:
                self.error("upstream_credentials.value", "must not be empty")
            elif not is_header_value(value):
                # Never echo the value: it is a credential.
                self.error("upstream_credentials.value", f"{HEADER_VALUE_RULE} (value not shown)")
            if header is not None:
                found["upstream_credentials"] = UpstreamCredentialSettings(name, header, value)
        return PolicySections(**found)  # type: ignore[arg-type]

    def authentication(self, where: str, authn: pb.Authentication) -> AuthenticationSettings:
        mode: AuthnMode = _MODES[authn.mode] if self.enum(f"{where}.mode", authn, "mode") else "strict"
        providers: list[JwtProviderSettings] = []
        names: dict[str, str] = {}
        issuers: dict[str, str] = {}
        for kind, field_name, items in (
            ("jwt", "jwt_providers", authn.jwt_providers),
            ("kubernetes", "service_account_providers", authn.service_account_providers),
        ):
            for index, provider in enumerate(items):
                path = f"{where}.{field_name}[{index}]"
                settings = self.provider(path, provider, kind)  # type: ignore[arg-type]
                self.unique(f"{path}.name", names, provider.name, "provider name")
                self.unique(f"{path}.issuer", issuers, provider.issuer, "issuer")
                if settings is not None:
                    providers.append(settings)
        api_keys = self.api_keys(f"{where}.api_keys", authn.api_keys) if authn.HasField("api_keys") else None
        basic = self.basic(f"{where}.basic", authn.basic) if authn.HasField("basic") else None
        has_tables = authn.HasField("api_keys") or authn.HasField("basic")
        if not (authn.jwt_providers or authn.service_account_providers or has_tables):
            self.error(where, "no method: set jwt_providers, service_account_providers, api_keys or basic")
        metadata = None
        if authn.HasField("protected_resource"):
            metadata = self.protected_resource(f"{where}.protected_resource", authn.protected_resource)
        headers = frozenset(claim.header for provider in providers for claim in provider.claims_to_headers)
        if api_keys is not None and api_keys.header in headers:
            self.error(f"{where}.api_keys.header", f"{api_keys.header!r} is also filled from a claim")
        return AuthenticationSettings(
            self.policy,
            mode,
            tuple(providers),
            api_keys,
            basic,
            authn.forward_credentials,
            metadata,
            headers,
        )

    def provider(
        self, where: str, provider: pb.JwtProvider | pb.ServiceAccountProvider, kind: ProviderKind
    ) -> JwtProviderSettings | None:
        name = self.text(f"{where}.name", provider.name, max_length=63)
        issuer = self.text(f"{where}.issuer", provider.issuer)
        audiences = self.texts(f"{where}.audiences", provider.audiences)
        if kind == "kubernetes" and not provider.audiences:
            self.error(f"{where}.audiences", "required: service-account tokens must be bound to an audience")
        leeway = self.duration(f"{where}.leeway", provider, "leeway", positive=False)
        if leeway is not None and leeway > MAX_LEEWAY:
            self.error(f"{where}.leeway", f"must be at most {MAX_LEEWAY:.0f}s")
        claims = self.claims(f"{where}.claims_to_headers", provider.claims_to_headers)
        token_review = isinstance(provider, pb.ServiceAccountProvider) and provider.token_review
        jwks: tuple[str | None, str | None, str | None] = (None, None, None)
        if provider.HasField("jwks"):
            jwks = self.jwks(f"{where}.jwks", provider.jwks)
            if token_review:
                self.error(f"{where}.token_review", "cannot be combined with jwks")
        elif not token_review:
            self.error(f"{where}.jwks", "required" + (" unless token_review is set" if kind == "kubernetes" else ""))
        extra: dict[str, object] = {}
        if isinstance(provider, pb.JwtProvider):
            bad = [a for a in provider.algorithms if a not in JWT_ALGORITHMS]
            if bad:
                allowed = ", ".join(sorted(JWT_ALGORITHMS))
                self.error(f"{where}.algorithms", f"unsupported {bad[0]!r} (allowed: {allowed})")
            extra = {
                "algorithms": tuple(dict.fromkeys(provider.algorithms)),
                "required_claims": self.texts(f"{where}.required_claims", provider.required_claims, max_length=256),
                "principal_claim": provider.principal_claim or "sub",
                "require_expiry": not provider.allow_missing_expiry,
            }
        if name is None or issuer is None:
            return None
        return JwtProviderSettings(
            name=name,
            issuer=issuer,
            kind=kind,
            audiences=audiences,
            jwks_inline=jwks[0],
            jwks_file=jwks[1],
            jwks_url=jwks[2],
            leeway_seconds=DEFAULT_LEEWAY if leeway is None else leeway,
            token_review=token_review,
            claims_to_headers=claims,
            **extra,  # type: ignore[arg-type]
        )

    def jwks(self, where: str, jwks: pb.Jwks) -> tuple[str | None, str | None, str | None]:
        """(inline, file, url): exactly one source; with url, inline holds the fetched keys."""
        if jwks.file:
            if jwks.inline or jwks.url:
                self.error(where, "file cannot be combined with inline or url")
            elif not jwks.file.startswith("/"):
                self.error(f"{where}.file", "must be an absolute path")
            return None, jwks.file, None
        if jwks.url:
            self.url(f"{where}.url", jwks.url)
        elif not jwks.inline:
            self.error(where, "one of inline, file, url is required")
        self.duration(f"{where}.refresh_interval", jwks, "refresh_interval")
        if jwks.inline:
            self.jwks_document(f"{where}.inline", jwks.inline)
        return jwks.inline or None, None, jwks.url or None

    def jwks_document(self, where: str, text: str) -> None:
        if len(text) > MAX_JWKS_BYTES:
            self.error(where, f"larger than {MAX_JWKS_BYTES} bytes")
            return
        try:
            document = json.loads(text)
        except ValueError as exc:
            self.error(where, f"is not JSON: {exc}")
            return
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            self.error(where, 'must be a JWKS document: a JSON object with a "keys" list')
            return
        for index, key in enumerate(document["keys"]):
            if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
                self.error(where, f'keys[{index}] is not a JWK (an object with "kty")')
            elif any(member in key for member in _PRIVATE_JWK_MEMBERS):
                self.error(where, f"keys[{index}] holds private or symmetric key material")

    def claims(self, where: str, entries: Sequence[pb.ClaimToHeader]) -> tuple[ClaimHeader, ...]:
        claims: list[ClaimHeader] = []
        headers: dict[str, str] = {}
        for index, entry in enumerate(entries):
            path = f"{where}[{index}]"
            claim = self.text(f"{path}.claim", entry.claim, max_length=256)
            header = self.header(f"{path}.header", entry.header)
            if header == "authorization":
                self.error(f"{path}.header", "'authorization' carries credentials and cannot come from a claim")
                continue
            if header is not None:
                self.unique(f"{path}.header", headers, header, "header")
            if claim is not None and header is not None:
                claims.append(ClaimHeader(claim, header))
        return tuple(claims)

    def api_keys(self, where: str, config: pb.ApiKeyAuthentication) -> ApiKeySettings | None:
        header = self.header(f"{where}.header", config.header or DEFAULT_API_KEY_HEADER)
        keys: list[ApiKey] = []
        names: dict[str, str] = {}
        digests: dict[str, str] = {}
        for index, key in enumerate(config.keys):
            path = f"{where}.keys[{index}]"
            if self.text(f"{path}.name", key.name, max_length=253) is not None:
                self.unique(f"{path}.name", names, key.name, "key name")
            if not _HEX64.fullmatch(key.sha256):
                self.error(f"{path}.sha256", "must be the 64 lower-case hex digits of the key's SHA-256")
                continue
            self.unique(f"{path}.sha256", digests, key.sha256, "key digest")
            keys.append(ApiKey(key.name, key.sha256))
        if not config.keys:
            self.error(f"{where}.keys", "at least one key is required")
        return ApiKeySettings(tuple(keys), header) if header is not None else None

    def basic(self, where: str, config: pb.BasicAuthentication) -> BasicAuthSettings | None:
        users: list[BasicUser] = []
        names: dict[str, str] = {}
        for index, user in enumerate(config.users):
            path = f"{where}.users[{index}]"
            if not user.name or ":" in user.name:
                self.error(f"{path}.name", "must be non-empty and contain no ':' (RFC 7617)")
                continue
            self.unique(f"{path}.name", names, user.name, "user")
            problem = _scrypt_problem(user.password_hash)
            if problem is not None:
                self.error(f"{path}.password_hash", problem)
                continue
            users.append(BasicUser(user.name, user.password_hash))
        if not config.users:
            self.error(f"{where}.users", "at least one user is required")
        realm = config.realm or DEFAULT_REALM
        if any(ch in realm for ch in '"\\\r\n\0') or not realm.isascii():
            self.error(f"{where}.realm", "must be ASCII without quotes, backslashes or control characters")
        return BasicAuthSettings(tuple(users), realm) if users else None

    def protected_resource(self, where: str, meta: pb.ProtectedResourceMetadata) -> ProtectedResourceSettings | None:
        resource = self.url(f"{where}.resource", meta.resource, ("https", "http"))
        for index, server in enumerate(meta.authorization_servers):
            self.url(f"{where}.authorization_servers[{index}]", server)
        bad = [m for m in meta.bearer_methods_supported if m not in ("header", "body", "query")]
        if bad:
            self.error(f"{where}.bearer_methods_supported", f"unsupported {bad[0]!r} (header, body or query)")
        if meta.resource_documentation:
            self.url(f"{where}.resource_documentation", meta.resource_documentation, ("https", "http"))
        if resource is None:
            return None
        return ProtectedResourceSettings(
            resource=resource,
            authorization_servers=tuple(meta.authorization_servers),
            scopes_supported=tuple(meta.scopes_supported),
            bearer_methods_supported=tuple(meta.bearer_methods_supported) or ("header",),
            resource_name=meta.resource_name,
            resource_documentation=meta.resource_documentation,
        )

    def key(self, where: str, source: str) -> Expression | None:
        return self.cel(where, source) if source else None

    def limit_common(
        self, where: str, message: pb.RateLimit | pb.TokenBudget
    ) -> tuple[LimitScopeName, RedisStoreSettings | None, StoreDownName]:
        scope: LimitScopeName = _SCOPES[message.scope] if self.enum(f"{where}.scope", message, "scope") else "local"
        down: StoreDownName = "fail_open"
        if self.enum(f"{where}.on_store_down", message, "on_store_down"):
            down = _STORE_DOWN[message.on_store_down]
        store = None
        if scope == "global":
            if not message.HasField("store"):
                self.error(f"{where}.store", "required for a global limit")
            else:
                store = self.store(f"{where}.store", message.store)
        elif message.HasField("store"):
            self.error(f"{where}.store", "only global limits use a store")
        return scope, store, down

    def store(self, where: str, store: pb.RedisStore) -> RedisStoreSettings | None:
        try:
            parts = urlsplit(store.url)
            port_ok = parts.port is None or 1 <= parts.port <= 65535
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("redis", "rediss") or not parts.hostname or not port_ok:
            self.error(f"{where}.url", f"must be redis://host[:port][/db] or rediss://..., got {store.url!r}")
            return None
        if parts.username or parts.password:
            self.error(f"{where}.url", "must not carry credentials (use username and password)")
            return None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            self.error(f"{where}.url", f"database must be a number, got {parts.path.strip('/')!r}")
            return None
        return RedisStoreSettings(store.url, store.username or None, store.password or None)

    def rate_limits(self, section: pb.RateLimits) -> RateLimitsSection:
        limits: list[RateLimitSettings] = []
        names: dict[str, str] = {}
        for index, limit in enumerate(section.limits):
            where = f"rate_limits.limits[{index}]"
            name = self.text(f"{where}.name", limit.name, max_length=63)
            if name is not None:
                self.unique(f"{where}.name", names, name, "limit name")
            key = self.key(f"{where}.key", limit.key)
            unit: LimitUnitName = _UNITS[limit.unit] if self.enum(f"{where}.unit", limit, "unit") else "requests"
            if limit.capacity < 1:
                self.error(f"{where}.capacity", "must be at least 1")
            if not limit.HasField("per"):
                self.error(f"{where}.per", "required")
            per = self.duration(f"{where}.per", limit, "per")
            scope, store, down = self.limit_common(where, limit)
            if name is None or per is None or limit.capacity < 1:
                continue
            refill = float(limit.refill or limit.capacity)
            limits.append(RateLimitSettings(name, limit.capacity, refill, per, key, unit, scope, store, down))
        return RateLimitsSection(self.policy, tuple(limits))

    def token_budgets(self, section: pb.TokenBudgets) -> TokenBudgetsSection:
        budgets: list[TokenBudgetSettings] = []
        names: dict[str, str] = {}
        for index, budget in enumerate(section.budgets):
            where = f"token_budgets.budgets[{index}]"
            name = self.text(f"{where}.name", budget.name, max_length=63)
            if name is not None:
                self.unique(f"{where}.name", names, name, "budget name")
            key = self.key(f"{where}.key", budget.key)
            if budget.tokens < 1:
                self.error(f"{where}.tokens", "must be at least 1")
            period: BudgetPeriodName | float | None = None
            if budget.HasField("window"):
                period = self.duration(f"{where}.window", budget, "window")
            elif self.enum(f"{where}.period", budget, "period"):
                period = _PERIODS[budget.period]
            scope, store, down = self.limit_common(where, budget)
            if name is None or period is None or budget.tokens < 1:
                continue
            budgets.append(TokenBudgetSettings(name, budget.tokens, period, key, scope, store, down))
        return TokenBudgetsSection(self.policy, tuple(budgets))

    def resilience(self, where: str, config: pb.Resilience) -> ResilienceSettings:
        request = self.duration(f"{where}.request_timeout", config, "request_timeout")
        per_try = self.duration(f"{where}.per_try_timeout", config, "per_try_timeout")
        idle = self.duration(f"{where}.stream_idle_timeout", config, "stream_idle_timeout")
        if request is not None and per_try is not None and per_try > request:
            self.error(f"{where}.per_try_timeout", "must not be longer than request_timeout")
        retry = self.retry(f"{where}.retry", config.retry) if config.HasField("retry") else None
        return ResilienceSettings(self.policy, request, per_try, idle, retry)

    def retry(self, where: str, retry: pb.Retry) -> RetrySettings | None:
        if retry.attempts > MAX_RETRY_ATTEMPTS:
            self.error(f"{where}.attempts", f"must be at most {MAX_RETRY_ATTEMPTS}")
        base = self.duration(f"{where}.backoff_base", retry, "backoff_base")
        ceiling = self.duration(f"{where}.backoff_max", retry, "backoff_max")
        base = DEFAULT_BACKOFF_BASE if base is None else base
        ceiling = max(DEFAULT_BACKOFF_MAX, base) if ceiling is None else ceiling
        if base > ceiling:
            self.error(f"{where}.backoff_max", "must not be shorter than backoff_base")
        conditions: set[RetryCondition] = set()
        for index, value in enumerate(retry.on):
            if value not in _RETRY_ON:
                self.error(f"{where}.on[{index}]", f"unknown Retry.On value {value}")
            else:
                conditions.add(_RETRY_ON[value])
        for index, code in enumerate(retry.status_codes):
            if not 500 <= code <= 599:
                self.error(f"{where}.status_codes[{index}]", f"{code} is not a 5xx status")
        if retry.status_codes and conditions and "5xx" not in conditions:
            self.error(f"{where}.status_codes", "needs ON_5XX in on")
        return RetrySettings(
            attempts=retry.attempts,
            backoff_base=base,
            backoff_max=ceiling,
            on=frozenset(conditions) or DEFAULT_RETRY_ON,
            status_codes=frozenset(retry.status_codes),
            retry_non_idempotent_mcp=retry.retry_non_idempotent_mcp,
        )

    def cors(self, where: str, cors: pb.Cors) -> CorsSettings | None:
        for index, origin in enumerate(cors.allow_origins):
            problem = origin_problem(origin)
            if problem is not None:
                self.error(f"{where}.allow_origins[{index}]", problem)
                return None
        if not cors.allow_origins:
            self.error(f"{where}.allow_origins", "at least one origin is required")
            return None
        if cors.allow_credentials and "*" in cors.allow_origins:
            self.error(f"{where}.allow_credentials", "cannot be combined with the origin '*'")
        for field_name in ("allow_methods", "allow_headers", "expose_headers"):
            for index, value in enumerate(getattr(cors, field_name)):
                if value != "*":
                    check_header_name(self.error, f"{where}.{field_name}[{index}]", value)
        max_age = self.duration(f"{where}.max_age", cors, "max_age", positive=False)
        return CorsSettings(
            self.policy,
            OriginAllowList.compile(cors.allow_origins),
            tuple(cors.allow_methods) or DEFAULT_CORS_METHODS,
            tuple(name.lower() for name in cors.allow_headers),
            tuple(name.lower() for name in cors.expose_headers),
            cors.allow_credentials,
            max_age,
        )

    def header_ops(self, where: str, modifier: pb.HeaderModifier) -> HeaderOps:
        def valid(path: str, header: pb.HeaderModifier.Header) -> bool:
            name_ok = self.header(f"{path}.name", header.name) is not None
            return check_header_value(self.error, f"{path}.value", header.value) and name_ok

        set_headers = [(h.name, h.value) for i, h in enumerate(modifier.set) if valid(f"{where}.set[{i}]", h)]
        add_headers = [(h.name, h.value) for i, h in enumerate(modifier.add) if valid(f"{where}.add[{i}]", h)]
        remove = [n for i, n in enumerate(modifier.remove) if self.header(f"{where}.remove[{i}]", n) is not None]
        return HeaderOps.from_strings(set=set_headers, add=add_headers, remove=remove)


def _scrypt_problem(text: str) -> str | None:
    match = _SCRYPT_HASH.fullmatch(text)
    if match is None:
        return "must be $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash>"
    log2_n, r, p = (int(group) for group in match.groups())
    if not 10 <= log2_n <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * (1 << log2_n) > 256 << 20:
        return "scrypt parameters out of bounds (ln 10..20, r 1..32, p 1..16, at most 256 MiB)"
    return None


__all__ = [
    "EMPTY_POLICY",
    "EMPTY_POLICY_INDEX",
    "SECTION_NAMES",
    "AuthenticationSettings",
    "AuthorizationSettings",
    "CorsSettings",
    "EffectivePolicy",
    "HeadersSection",
    "JwtProviderSettings",
    "PolicyIndex",
    "PolicySections",
    "PolicySettings",
    "PolicyTarget",
    "RateLimitSettings",
    "RateLimitsSection",
    "ResilienceSettings",
    "RetrySettings",
    "TokenBudgetSettings",
    "TokenBudgetsSection",
    "UpstreamCredentialSettings",
    "compile_policies",
    "compile_policy",
    "index_policies",
]
