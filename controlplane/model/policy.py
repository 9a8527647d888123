"""Schema checks of our `Policy` kind (agentgate.dev/v1alpha1), and the CEL syntax check they use.

`check_policy` runs inside `validate()` with its `_Checker`; like every schema check it looks at
one object only. Whether targets and Secrets exist is the translator's question
(controlplane/translate/policies.py). The spec layout is documented in protos/README.md.

CEL: the control plane cannot import the proxy's compiler (dataplane.policy.cel), so it checks
what the engine itself reports: the expression parses, and every variable it reads is one a
request defines (names bound by macros such as `exists(t, ...)` aside). The proxy compiles
again, with its stricter checks (unknown functions, mixed-case header keys), and NACKs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import cel

from controlplane.model.formats import DATA_KEY, DNS_SUBDOMAIN
from controlplane.model.objects import AGENTGATE_GROUP, BACKEND, GATEWAY, GATEWAY_GROUP, HTTP_ROUTE, KubeObject
from shared.config_rules import HEADER_VALUE_RULE, POLICY_RESERVED_HEADERS, is_header_value
from shared.origins import origin_problem

if TYPE_CHECKING:
    from controlplane.model.validation import _Checker

# What a request exposes to policy expressions (dataplane.policy.cel.VARIABLES).
CEL_VARIABLES = frozenset({"jwt", "request", "source", "mcp", "a2a", "llm"})
_CEL_BUILTINS = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "optional"}
)
# `list.exists(x, ...)` and friends bind `x`; the engine lists it among the variables.
_MACRO_BINDING = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_PARSE_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*([^\n|]*)")
MAX_CEL_LENGTH = 4096

# targetRefs kinds: (default group, what sectionName selects).
TARGET_KINDS: Mapping[str, str] = {GATEWAY: GATEWAY_GROUP, HTTP_ROUTE: GATEWAY_GROUP, BACKEND: AGENTGATE_GROUP}
POLICY_SECTIONS = (
    "authentication",
    "authorization",
    "rateLimits",
    "tokenBudgets",
    "resilience",
    "cors",
    "requestHeaders",
    "responseHeaders",
    "upstreamCredentials",
)
AUTHN_MODES = ("Strict", "Optional", "Permissive")
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
BEARER_METHODS = ("header", "body", "query")
LIMIT_UNITS = ("Requests", "Tokens")
LIMIT_SCOPES = ("Local", "Global")
STORE_DOWN_POLICIES = ("FailOpen", "FailClosed")
BUDGET_PERIODS = ("Minute", "Hour", "Day", "Week", "Month")
RETRY_ON = ("5xx", "reset", "connect-failure")
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "*")
MAX_RETRY_ATTEMPTS = 10
MAX_LIMITS = 16
MAX_RULES = 64
# Headers the proxy manages itself: claims and credentials must not overwrite them.
RESERVED_HEADERS = POLICY_RESERVED_HEADERS
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_RULE_INDEX = re.compile(r"0|[1-9][0-9]?")
_SCRYPT_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}")


def cel_problem(source: str) -> str | None:
    """Why `source` is not a usable policy expression, or None."""
    if not source.strip():
        return "empty expression"
    if len(source) > MAX_CEL_LENGTH:
        return f"expression longer than {MAX_CEL_LENGTH} characters"
    try:
        program = cel.compile(source)
    except Exception as exc:  # the engine raises ValueError for syntax; treat anything as "does not parse"
        match = _PARSE_POSITION.search(str(exc))
        if match is None:
            return f"invalid CEL: {exc}"
        # The parser lists every token it expected; the position says more to a person.
        reason = match.group(3).split(" expecting ", 1)[0].strip()
        return f"invalid CEL at {match.group(1)}:{match.group(2)}: {reason}"
    bound = set(_MACRO_BINDING.findall(source))
    unknown = sorted(set(program.variables()) - CEL_VARIABLES - _CEL_BUILTINS - bound)
    if unknown:
        return f"unknown variable {unknown[0]!r} (known: {', '.join(sorted(CEL_VARIABLES))})"
    return None


def scrypt_hash_problem(text: str) -> str | None:
    """Why `text` is not a password hash the proxy accepts, or None (bounds as the proxy's)."""
    match = _SCRYPT_HASH.fullmatch(text.strip())
    if match is None:
        return "must be a password hash $scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash> (never the password itself)"
    log2_n, r, p = (int(group) for group in match.groups())
    if not 10 <= log2_n <= 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * (1 << log2_n) > 256 << 20:
        return "scrypt parameters out of bounds (ln 10..20, r 1..32, p 1..16, at most 256 MiB)"
    return None


def rule_index(route: KubeObject, section: str) -> int | None:
    """The index of the rule an HTTPRoute sectionName selects: a rule `name`, else a decimal index."""
    rules = route.spec.get("rules")
    if not isinstance(rules, list):
        rules = [{}]
    for index, rule in enumerate(rules):
        if isinstance(rule, Mapping) and rule.get("name") == section:
            return index
    if _RULE_INDEX.fullmatch(section) and int(section) < len(rules):
        return int(section)
    return None


# --- the Policy kind ------------------------------------------------------------------------


def check_policy(c: _Checker, obj: KubeObject) -> None:
    spec = obj.spec
    c.unknown_keys(spec, "spec", ("targetRefs", *POLICY_SECTIONS))
    _target_refs(c, obj)
    if not any(section in spec for section in POLICY_SECTIONS):
        c.error("spec", f"at least one of {', '.join(POLICY_SECTIONS)} is required")
    sections = {
        "authentication": _authentication,
        "authorization": _authorization,
        "resilience": _resilience,
        "cors": _cors,
        "requestHeaders": _header_modifier,
        "responseHeaders": _header_modifier,
        "upstreamCredentials": _upstream_credentials,
    }
    for name, check in sections.items():
        section = c.mapping(spec.get(name), f"spec.{name}")
        if section is not None:
            check(c, section, f"spec.{name}")
    if "rateLimits" in spec:
        _limits(c, spec["rateLimits"], "spec.rateLimits", budget=False)
    if "tokenBudgets" in spec:
        _limits(c, spec["tokenBudgets"], "spec.tokenBudgets", budget=True)


def _target_refs(c: _Checker, obj: KubeObject) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    for path, ref in c.mappings(obj.spec.get("targetRefs"), "spec.targetRefs", required=True, max_items=16):
        c.unknown_keys(ref, path, ("group", "kind", "name", "namespace", "sectionName"))
        kind = c.string(ref.get("kind"), f"{path}.kind", required=True, enum=tuple(TARGET_KINDS))
        name = c.string(ref.get("name"), f"{path}.name", required=True, pattern=DNS_SUBDOMAIN, max_length=253)
        if kind is not None:
            c.string(ref.get("group", TARGET_KINDS[kind]), f"{path}.group", enum=(TARGET_KINDS[kind],))
        namespace = c.string(ref.get("namespace"), f"{path}.namespace")
        if namespace is not None and namespace != obj.namespace:
            c.error(
                f"{path}.namespace",
                f"cross-namespace target {namespace!r} refused: a Policy targets only its own namespace "
                f"({obj.namespace})",
            )
        section = c.string(ref.get("sectionName"), f"{path}.sectionName", min_length=1, max_length=253)
        if section is not None and kind == BACKEND:
            c.error(f"{path}.sectionName", "not supported for Backend targets")
        elif section is not None and kind == GATEWAY and not DNS_SUBDOMAIN.fullmatch(section):
            c.error(f"{path}.sectionName", f"{section!r} is not a listener name")
        if kind is not None and name is not None:
            identity = (kind, name, section or "")
            if identity in seen:
                c.error(path, f"repeats {seen[identity]}")
            seen.setdefault(identity, path)


def _cel(c: _Checker, value: Any, path: str, *, required: bool = True) -> None:
    source = c.string(value, path, required=required)
    if source is not None:
        problem = cel_problem(source)
        if problem is not None:
            c.error(path, problem)


def _strings(
    c: _Checker, value: Any, path: str, *, required: bool = False, max_items: int = 64, max_length: int = 1024
) -> list[str]:
    found = []
    for index, item in enumerate(c.items(value, path, required=required, max_items=max_items)):
        text = c.string(item, f"{path}[{index}]", required=True, min_length=1, max_length=max_length)
        if text is not None:
            found.append(text)
    return found


def _url(c: _Checker, value: Any, path: str, *, required: bool = False, schemes: Sequence[str] = ("https",)) -> None:
    text = c.string(value, path, required=required, max_length=2048)
    if text is None:
        return
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in schemes or not rest or rest.startswith("/") or any(ch.isspace() for ch in text):
        c.error(path, f"must be an absolute {' or '.join(schemes)} URL, got {text!r}")


def _positive_duration(c: _Checker, value: Any, path: str) -> timedelta | None:
    duration = c.duration(value, path)
    if duration is not None and duration.total_seconds() <= 0:
        c.error(path, "must be greater than zero")
        return None
    return duration


def _secret_ref(c: _Checker, value: Any, path: str, *, key: bool) -> None:
    ref = c.mapping(value, path, required=True)
    if ref is None:
        return
    c.unknown_keys(ref, path, ("name", "key") if key else ("name",))
    c.string(ref.get("name"), f"{path}.name", required=True, pattern=DNS_SUBDOMAIN, max_length=253)
    if key:
        c.string(ref.get("key"), f"{path}.key", required=True, pattern=DATA_KEY, max_length=253)


def _header(c: _Checker, value: Any, path: str, *, reserved: bool = True) -> str | None:
    name = c.header_name(value, path)
    if name is not None and reserved and name.lower() in RESERVED_HEADERS:
        c.error(path, f"{name!r} is managed by the proxy and cannot be set here")
        return None
    return name.lower() if name is not None else None


def _header_value(c: _Checker, value: Any, path: str, *, required: bool = True) -> None:
    text = c.string(value, path, required=required, max_length=4096)
    if text is not None and not is_header_value(text):
        c.error(path, HEADER_VALUE_RULE)


# --- authentication -------------------------------------------------------------------------

_AUTHN_FIELDS = ("mode", "jwt", "serviceAccount", "apiKeys", "basicAuth", "forwardCredentials", "protectedResource")
_AUTHN_METHODS = ("jwt", "serviceAccount", "apiKeys", "basicAuth")


def _authentication(c: _Checker, authn: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(authn, path, _AUTHN_FIELDS)
    c.string(authn.get("mode"), f"{path}.mode", enum=AUTHN_MODES)
    if not any(method in authn for method in _AUTHN_METHODS):
        c.error(path, f"at least one of {', '.join(_AUTHN_METHODS)} is required")
    names: dict[str, str] = {}
    issuers: dict[str, str] = {}
    providers = list(c.mappings(authn.get("jwt"), f"{path}.jwt", max_items=16))
    for index, (provider_path, provider) in enumerate(providers):
        _jwt_provider(c, provider, provider_path)
        _unique(c, names, provider.get("name", f"jwt-{index}"), f"{provider_path}.name", "provider name")
        _unique(c, issuers, provider.get("issuer"), f"{provider_path}.issuer", "issuer")
    account = c.mapping(authn.get("serviceAccount"), f"{path}.serviceAccount")
    if account is not None:
        _service_account(c, account, f"{path}.serviceAccount")
        _unique(c, issuers, account.get("issuer"), f"{path}.serviceAccount.issuer", "issuer")
    api_keys = c.mapping(authn.get("apiKeys"), f"{path}.apiKeys")
    if api_keys is not None:
        c.unknown_keys(api_keys, f"{path}.apiKeys", ("secretRef", "header"))
        _secret_ref(c, api_keys.get("secretRef"), f"{path}.apiKeys.secretRef", key=False)
        if "header" in api_keys:
            _header(c, api_keys.get("header"), f"{path}.apiKeys.header")
    basic = c.mapping(authn.get("basicAuth"), f"{path}.basicAuth")
    if basic is not None:
        c.unknown_keys(basic, f"{path}.basicAuth", ("secretRef", "realm"))
        _secret_ref(c, basic.get("secretRef"), f"{path}.basicAuth.secretRef", key=False)
        realm = c.string(basic.get("realm"), f"{path}.basicAuth.realm", min_length=1, max_length=256)
        if realm is not None and any(ch in realm for ch in '"\\\r\n\0'):
            c.error(f"{path}.basicAuth.realm", "must not contain quotes, backslashes or control characters")
    c.boolean(authn.get("forwardCredentials"), f"{path}.forwardCredentials")
    metadata = c.mapping(authn.get("protectedResource"), f"{path}.protectedResource")
    if metadata is not None:
        _protected_resource(c, metadata, f"{path}.protectedResource")


def _unique(c: _Checker, seen: dict[str, str], value: Any, path: str, what: str) -> None:
    if not isinstance(value, str):
        return
    if value in seen:
        c.error(path, f"{what} {value!r} is already used by {seen[value]}")
    seen.setdefault(value, path)


def _jwt_provider(c: _Checker, provider: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(
        provider,
        path,
        (
            "name",
            "issuer",
            "audiences",
            "jwks",
            "algorithms",
            "leeway",
            "requiredClaims",
            "principalClaim",
            "claimsToHeaders",
            "allowMissingExpiry",
        ),
    )
    c.string(provider.get("name"), f"{path}.name", pattern=_NAME, max_length=63)
    c.string(provider.get("issuer"), f"{path}.issuer", required=True, min_length=1, max_length=1024)
    _strings(c, provider.get("audiences"), f"{path}.audiences")
    _jwks(c, provider.get("jwks"), f"{path}.jwks", required=True)
    for index, algorithm in enumerate(c.items(provider.get("algorithms"), f"{path}.algorithms", max_items=10)):
        c.string(algorithm, f"{path}.algorithms[{index}]", required=True, enum=JWT_ALGORITHMS)
    _leeway(c, provider.get("leeway"), f"{path}.leeway")
    _strings(c, provider.get("requiredClaims"), f"{path}.requiredClaims", max_length=256)
    c.string(provider.get("principalClaim"), f"{path}.principalClaim", min_length=1, max_length=256)
    _claims_to_headers(c, provider.get("claimsToHeaders"), f"{path}.claimsToHeaders")
    c.boolean(provider.get("allowMissingExpiry"), f"{path}.allowMissingExpiry")


def _service_account(c: _Checker, account: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(account, path, ("issuer", "audiences", "jwks", "tokenReview", "leeway", "claimsToHeaders"))
    c.string(account.get("issuer"), f"{path}.issuer", required=True, min_length=1, max_length=1024)
    # Projected tokens are audience-bound: without an audience any token of the cluster would do.
    _strings(c, account.get("audiences"), f"{path}.audiences", required=True)
    review = c.boolean(account.get("tokenReview"), f"{path}.tokenReview")
    if "jwks" in account:
        _jwks(c, account.get("jwks"), f"{path}.jwks", required=True)
        if review:
            c.error(f"{path}.tokenReview", "cannot be combined with jwks")
    elif not review:
        c.error(f"{path}.jwks", "required unless tokenReview is true")
    _leeway(c, account.get("leeway"), f"{path}.leeway")
    _claims_to_headers(c, account.get("claimsToHeaders"), f"{path}.claimsToHeaders")


def _jwks(c: _Checker, value: Any, path: str, *, required: bool) -> None:
    jwks = c.mapping(value, path, required=required)
    if jwks is None:
        return
    c.unknown_keys(jwks, path, ("inline", "file", "remote"))
    sources = [name for name in ("inline", "file", "remote") if name in jwks]
    if len(sources) != 1:
        c.error(path, f"only one of {', '.join(sources)} may be set" if sources else "one of inline, file, remote")
        return
    if sources[0] == "inline":
        text = c.string(jwks.get("inline"), f"{path}.inline", required=True, min_length=1, max_length=1 << 20)
        if text is not None:
            problem = _jwks_document_problem(text)
            if problem is not None:
                c.error(f"{path}.inline", problem)
    elif sources[0] == "file":
        text = c.string(jwks.get("file"), f"{path}.file", required=True, min_length=1, max_length=4096)
        if text is not None and not text.startswith("/"):
            c.error(f"{path}.file", "must be an absolute path")
    else:
        remote = c.mapping(jwks.get("remote"), f"{path}.remote", required=True)
        if remote is not None:
            c.unknown_keys(remote, f"{path}.remote", ("url", "refreshInterval"))
            _url(c, remote.get("url"), f"{path}.remote.url", required=True)
            _positive_duration(c, remote.get("refreshInterval"), f"{path}.remote.refreshInterval")


def _jwks_document_problem(text: str) -> str | None:
    try:
        document = json.loads(text)
    except ValueError as exc:
        return f"is not JSON: {exc}"
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return 'must be a JWKS document: a JSON object with a "keys" list'
    for index, key in enumerate(document["keys"]):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            return f'keys[{index}] is not a JWK (an object with "kty")'
        if any(member in key for member in ("d", "p", "q", "dp", "dq", "qi", "k")):
            return f"keys[{index}] holds private or symmetric key material; publish public keys only"
    return None


def _leeway(c: _Checker, value: Any, path: str) -> None:
    leeway = c.duration(value, path)
    if leeway is not None and leeway.total_seconds() > 600:
        c.error(path, "must be at most 10m")


def _claims_to_headers(c: _Checker, value: Any, path: str) -> None:
    headers: dict[str, str] = {}
    for entry_path, entry in c.mappings(value, path, max_items=32):
        c.unknown_keys(entry, entry_path, ("claim", "header"))
        c.string(entry.get("claim"), f"{entry_path}.claim", required=True, min_length=1, max_length=256)
        header = _header(c, entry.get("header"), f"{entry_path}.header")
        if header == "authorization":
            c.error(f"{entry_path}.header", "'authorization' carries credentials and cannot be set from a claim")
        elif header is not None:
            _unique(c, headers, header, f"{entry_path}.header", "header")


def _protected_resource(c: _Checker, metadata: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(
        metadata,
        path,
        (
            "resource",
            "authorizationServers",
            "scopesSupported",
            "bearerMethodsSupported",
            "resourceName",
            "resourceDocumentation",
        ),
    )
    _url(c, metadata.get("resource"), f"{path}.resource", required=True, schemes=("https", "http"))
    for index, server in enumerate(c.items(metadata.get("authorizationServers"), f"{path}.authorizationServers")):
        _url(c, server, f"{path}.authorizationServers[{index}]", required=True)
    _strings(c, metadata.get("scopesSupported"), f"{path}.scopesSupported", max_length=256)
    for index, method in enumerate(c.items(metadata.get("bearerMethodsSupported"), f"{path}.bearerMethodsSupported")):
        c.string(method, f"{path}.bearerMethodsSupported[{index}]", required=True, enum=BEARER_METHODS)
    c.string(metadata.get("resourceName"), f"{path}.resourceName", min_length=1, max_length=256)
    _url(c, metadata.get("resourceDocumentation"), f"{path}.resourceDocumentation", schemes=("https", "http"))


# --- authorization, limits ------------------------------------------------------------------


def _authorization(c: _Checker, authz: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(authz, path, ("allow", "deny", "require"))
    for kind in ("allow", "deny", "require"):
        for index, source in enumerate(c.items(authz.get(kind), f"{path}.{kind}", max_items=MAX_RULES)):
            _cel(c, source, f"{path}.{kind}[{index}]")


_LIMIT_FIELDS = ("name", "key", "unit", "capacity", "refill", "per", "scope", "redis", "onStoreDown")
_BUDGET_FIELDS = ("name", "key", "tokens", "period", "window", "scope", "redis", "onStoreDown")


def _limits(c: _Checker, value: Any, path: str, *, budget: bool) -> None:
    names: dict[str, str] = {}
    for entry_path, entry in c.mappings(value, path, max_items=MAX_LIMITS):
        c.unknown_keys(entry, entry_path, _BUDGET_FIELDS if budget else _LIMIT_FIELDS)
        name = c.string(entry.get("name"), f"{entry_path}.name", required=True, pattern=_NAME, max_length=63)
        _unique(c, names, name, f"{entry_path}.name", "name")
        if "key" in entry:
            _cel(c, entry.get("key"), f"{entry_path}.key")
        if budget:
            c.integer(entry.get("tokens"), f"{entry_path}.tokens", required=True, minimum=1, maximum=10**15)
            c.string(entry.get("period"), f"{entry_path}.period", enum=BUDGET_PERIODS)
            _positive_duration(c, entry.get("window"), f"{entry_path}.window")
            if "period" in entry and "window" in entry:
                c.error(f"{entry_path}.window", "cannot be combined with period")
        else:
            c.string(entry.get("unit"), f"{entry_path}.unit", enum=LIMIT_UNITS)
            c.integer(entry.get("capacity"), f"{entry_path}.capacity", required=True, minimum=1, maximum=10**12)
            c.integer(entry.get("refill"), f"{entry_path}.refill", minimum=1, maximum=10**12)
            if "per" not in entry:
                c.error(f"{entry_path}.per", "required field is missing")
            _positive_duration(c, entry.get("per"), f"{entry_path}.per")
        scope = c.string(entry.get("scope"), f"{entry_path}.scope", enum=LIMIT_SCOPES)
        c.string(entry.get("onStoreDown"), f"{entry_path}.onStoreDown", enum=STORE_DOWN_POLICIES)
        redis = c.mapping(entry.get("redis"), f"{entry_path}.redis")
        if scope == "Global" and redis is None and "redis" not in entry:
            c.error(f"{entry_path}.redis", "required for scope Global")
        if scope != "Global":
            for field in ("redis", "onStoreDown"):
                if field in entry:
                    c.error(f"{entry_path}.{field}", "only applies to scope Global")
        if redis is not None:
            c.unknown_keys(redis, f"{entry_path}.redis", ("url", "username", "passwordSecretRef"))
            _url(c, redis.get("url"), f"{entry_path}.redis.url", required=True, schemes=("redis", "rediss"))
            url = redis.get("url")
            if isinstance(url, str) and "@" in url:
                c.error(f"{entry_path}.redis.url", "must not carry credentials: use username and passwordSecretRef")
            c.string(redis.get("username"), f"{entry_path}.redis.username", min_length=1, max_length=256)
            if "passwordSecretRef" in redis:
                _secret_ref(c, redis.get("passwordSecretRef"), f"{entry_path}.redis.passwordSecretRef", key=True)


# --- resilience, CORS, headers, credentials -------------------------------------------------


def _resilience(c: _Checker, resilience: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(resilience, path, ("requestTimeout", "perTryTimeout", "streamIdleTimeout", "retry"))
    request = _positive_duration(c, resilience.get("requestTimeout"), f"{path}.requestTimeout")
    per_try = _positive_duration(c, resilience.get("perTryTimeout"), f"{path}.perTryTimeout")
    _positive_duration(c, resilience.get("streamIdleTimeout"), f"{path}.streamIdleTimeout")
    if request and per_try and per_try > request:
        c.error(f"{path}.perTryTimeout", "must not be longer than requestTimeout")
    retry = c.mapping(resilience.get("retry"), f"{path}.retry")
    if retry is None:
        return
    where = f"{path}.retry"
    c.unknown_keys(retry, where, ("attempts", "backoff", "retryOn", "statusCodes", "retryNonIdempotentMcp"))
    c.integer(retry.get("attempts"), f"{where}.attempts", required=True, minimum=0, maximum=MAX_RETRY_ATTEMPTS)
    backoff = c.mapping(retry.get("backoff"), f"{where}.backoff")
    if backoff is not None:
        c.unknown_keys(backoff, f"{where}.backoff", ("baseInterval", "maxInterval"))
        base = c.duration(backoff.get("baseInterval"), f"{where}.backoff.baseInterval")
        ceiling = c.duration(backoff.get("maxInterval"), f"{where}.backoff.maxInterval")
        if base is not None and ceiling is not None and base > ceiling:
            c.error(f"{where}.backoff.maxInterval", "must not be shorter than baseInterval")
    conditions = []
    for index, item in enumerate(c.items(retry.get("retryOn"), f"{where}.retryOn", max_items=3)):
        conditions.append(c.string(item, f"{where}.retryOn[{index}]", required=True, enum=RETRY_ON))
    codes = c.items(retry.get("statusCodes"), f"{where}.statusCodes", max_items=100)
    for index, code in enumerate(codes):
        c.integer(code, f"{where}.statusCodes[{index}]", required=True, minimum=500, maximum=599)
    if codes and "5xx" not in conditions:
        c.error(f"{where}.statusCodes", "needs 5xx in retryOn")
    c.boolean(retry.get("retryNonIdempotentMcp"), f"{where}.retryNonIdempotentMcp")


def _cors(c: _Checker, cors: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(
        cors, path, ("allowOrigins", "allowMethods", "allowHeaders", "exposeHeaders", "allowCredentials", "maxAge")
    )
    origins = _strings(c, cors.get("allowOrigins"), f"{path}.allowOrigins", required=True)
    for index, origin in enumerate(origins):
        problem = origin_problem(origin)
        if problem is not None:
            c.error(f"{path}.allowOrigins[{index}]", problem)
    for index, method in enumerate(c.items(cors.get("allowMethods"), f"{path}.allowMethods", max_items=16)):
        c.string(method, f"{path}.allowMethods[{index}]", required=True, enum=CORS_METHODS)
    for field in ("allowHeaders", "exposeHeaders"):
        for index, name in enumerate(c.items(cors.get(field), f"{path}.{field}", max_items=64)):
            if name != "*":
                c.header_name(name, f"{path}.{field}[{index}]")
    credentials = c.boolean(cors.get("allowCredentials"), f"{path}.allowCredentials")
    if credentials and "*" in origins:
        c.error(f"{path}.allowCredentials", "cannot be true when allowOrigins has '*' (browsers refuse it)")
    max_age = c.duration(cors.get("maxAge"), f"{path}.maxAge")
    if max_age is not None and max_age.total_seconds() > 86400:
        c.error(f"{path}.maxAge", "must be at most 24h")


def _header_modifier(c: _Checker, modifier: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(modifier, path, ("set", "add", "remove"))
    for action in ("set", "add"):
        names: dict[str, str] = {}
        for header_path, header in c.mappings(modifier.get(action), f"{path}.{action}", max_items=16):
            c.unknown_keys(header, header_path, ("name", "value"))
            name = _header(c, header.get("name"), f"{header_path}.name")
            _unique(c, names, name, f"{header_path}.name", "header")
            _header_value(c, header.get("value"), f"{header_path}.value")
    for index, name in enumerate(c.items(modifier.get("remove"), f"{path}.remove", max_items=16)):
        _header(c, name, f"{path}.remove[{index}]")


def _upstream_credentials(c: _Checker, credentials: Mapping[str, Any], path: str) -> None:
    c.unknown_keys(credentials, path, ("header", "prefix", "secretRef"))
    if "header" in credentials:
        _header(c, credentials.get("header"), f"{path}.header")
    _header_value(c, credentials.get("prefix"), f"{path}.prefix", required=False)
    _secret_ref(c, credentials.get("secretRef"), f"{path}.secretRef", key=True)
