"""The Policy kind: schema validation (every error names its field), CEL checks, and translation
(Secrets resolved and hashed, targets resolved per snapshot, status, fail-closed invalid policies)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from controlplane.model import KubeObject, SourceRef, object_from_manifest, validate
from controlplane.model.policy import cel_problem, rule_index, scrypt_hash_problem
from controlplane.translate import translate
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import POLICY

FILE = "policies.yaml"
HASH = "$scrypt$ln=10,r=8,p=1$Z29sZGVuLXNhbHQtMDAwMQ$HFIYNFT7uqoCeTSGlvOrZB98C8O+01MpHbVBHxuMnhA"
Kind = pb.PolicyTargetRef


def build(doc: dict[str, Any], index: int = 0) -> KubeObject:
    obj, errors = object_from_manifest(doc, SourceRef(FILE, index))
    assert errors == [] and obj is not None, [str(e) for e in errors]
    return obj


def policy(spec: dict[str, Any], name: str = "p", **metadata: Any) -> dict[str, Any]:
    spec = {"targetRefs": [{"kind": "Gateway", "name": "web"}], **spec}
    return {
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Policy",
        "metadata": {"name": name, "namespace": "default", **metadata},
        "spec": spec,
    }


def errors_of(spec: dict[str, Any]) -> dict[str, str]:
    obj = build(policy(spec))
    found = validate(obj)
    for error in found:
        assert (error.file, error.kind, error.namespace, error.name) == (FILE, "Policy", "default", "p")
    return {error.field: error.message for error in found}


# --- schema ---------------------------------------------------------------------------------


def test_a_complete_policy_is_valid() -> None:
    spec = {
        "targetRefs": [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "web", "sectionName": "http"},
            {"kind": "HTTPRoute", "name": "tools", "sectionName": "search"},
            {"group": "agentgate.dev", "kind": "Backend", "name": "mcp", "namespace": "default"},
        ],
        "authentication": {
            "mode": "Optional",
            "jwt": [
                {
                    "name": "corp",
                    "issuer": "https://idp.example.com",
                    "audiences": ["a"],
                    "jwks": {"remote": {"url": "https://idp.example.com/jwks", "refreshInterval": "5m"}},
                    "algorithms": ["RS256", "EdDSA"],
                    "leeway": "30s",
                    "requiredClaims": ["tenant"],
                    "principalClaim": "email",
                    "claimsToHeaders": [{"claim": "sub", "header": "x-agent-identity"}],
                    "allowMissingExpiry": False,
                }
            ],
            "serviceAccount": {"issuer": "https://k8s", "audiences": ["gw"], "tokenReview": True},
            "apiKeys": {"secretRef": {"name": "keys"}, "header": "x-api-key"},
            "basicAuth": {"secretRef": {"name": "users"}, "realm": "tools"},
            "forwardCredentials": True,
            "protectedResource": {"resource": "https://mcp.example.com/mcp", "authorizationServers": ["https://idp"]},
        },
        "authorization": {"allow": ["jwt.sub == 'a'"], "deny": ["mcp.tool.name == 'rm'"], "require": ["true"]},
        "rateLimits": [
            {"name": "a", "key": "jwt.sub", "capacity": 10, "per": "1s"},
            {
                "name": "b",
                "unit": "Tokens",
                "capacity": 10,
                "refill": 5,
                "per": "1m",
                "scope": "Global",
                "redis": {"url": "redis://r:6379/0", "passwordSecretRef": {"name": "r", "key": "p"}},
                "onStoreDown": "FailClosed",
            },
        ],
        "tokenBudgets": [{"name": "ns", "key": "source.namespace", "tokens": 1000000, "period": "Month"}],
        "resilience": {
            "requestTimeout": "300s",
            "perTryTimeout": "30s",
            "streamIdleTimeout": "1m",
            "retry": {
                "attempts": 3,
                "backoff": {"baseInterval": "1s", "maxInterval": "10s"},
                "retryOn": ["5xx", "reset", "connect-failure"],
                "statusCodes": [503],
                "retryNonIdempotentMcp": True,
            },
        },
        "cors": {"allowOrigins": ["https://a.example.com"], "allowMethods": ["GET"], "maxAge": "1h"},
        "requestHeaders": {"set": [{"name": "X-A", "value": "1"}], "remove": ["x-b"]},
        "responseHeaders": {"add": [{"name": "x-c", "value": "2"}]},
        "upstreamCredentials": {"header": "Authorization", "prefix": "Bearer ", "secretRef": {"name": "u", "key": "t"}},
    }
    assert errors_of(spec) == {}


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"targetRefs": []}, "spec.targetRefs", "must not be empty"),
        ({"targetRefs": [{"kind": "Service", "name": "s"}]}, "spec.targetRefs[0].kind", "must be one of Gateway"),
        (
            {"targetRefs": [{"kind": "Gateway", "name": "web", "namespace": "other"}]},
            "spec.targetRefs[0].namespace",
            "cross-namespace target 'other' refused",
        ),
        (
            {"targetRefs": [{"kind": "Backend", "name": "b", "sectionName": "x"}]},
            "spec.targetRefs[0].sectionName",
            "not supported for Backend",
        ),
        (
            {"targetRefs": [{"kind": "HTTPRoute", "name": "r", "group": "agentgate.dev"}]},
            "spec.targetRefs[0].group",
            "must be one of gateway.networking.k8s.io",
        ),
        (
            {"targetRefs": [{"kind": "HTTPRoute", "name": "r"}, {"kind": "HTTPRoute", "name": "r"}]},
            "spec.targetRefs[1]",
            "repeats spec.targetRefs[0]",
        ),
        ({"authorisation": {}}, "spec.authorisation", "unknown field"),
        ({"authorization": {"allow": ["jwt.sub =="]}}, "spec.authorization.allow[0]", "invalid CEL at 1:11"),
        ({"authorization": {"deny": ["who.am.i"]}}, "spec.authorization.deny[0]", "unknown variable 'who'"),
        ({"authorization": {"require": [""]}}, "spec.authorization.require[0]", "empty expression"),
        ({"authorization": {"allow": [1]}}, "spec.authorization.allow[0]", "must be a string"),
        ({"authentication": {"mode": "Strict"}}, "spec.authentication", "at least one of jwt"),
        ({"authentication": {"mode": "Lax", "apiKeys": {"secretRef": {"name": "k"}}}}, "spec.authentication.mode", ""),
        (
            {"authentication": {"jwt": [{"issuer": "i"}]}},
            "spec.authentication.jwt[0].jwks",
            "required field is missing",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"file": "a", "inline": "{}"}}]}},
            "spec.authentication.jwt[0].jwks",
            "only one of inline, file",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"file": "relative.json"}}]}},
            "spec.authentication.jwt[0].jwks.file",
            "absolute path",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"inline": '{"keys": [{"kty": "oct", "k": "x"}]}'}}]}},
            "spec.authentication.jwt[0].jwks.inline",
            "private or symmetric",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"remote": {"url": "http://idp/jwks"}}}]}},
            "spec.authentication.jwt[0].jwks.remote.url",
            "absolute https URL",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"file": "/j"}, "algorithms": ["HS256"]}]}},
            "spec.authentication.jwt[0].algorithms[0]",
            "unsupported value 'HS256'",
        ),
        (
            {"authentication": {"jwt": [{"issuer": "i", "jwks": {"file": "/j"}, "leeway": "1h"}]}},
            "spec.authentication.jwt[0].leeway",
            "at most 10m",
        ),
        (
            {
                "authentication": {
                    "jwt": [
                        {"issuer": "i", "jwks": {"file": "/j"}},
                        {"issuer": "i", "jwks": {"file": "/k"}},
                    ]
                }
            },
            "spec.authentication.jwt[1].issuer",
            "already used by spec.authentication.jwt[0].issuer",
        ),
        (
            {
                "authentication": {
                    "jwt": [
                        {"issuer": "i", "jwks": {"file": "/j"}, "claimsToHeaders": [{"claim": "s", "header": "Host"}]}
                    ]
                }
            },
            "spec.authentication.jwt[0].claimsToHeaders[0].header",
            "managed by the proxy",
        ),
        (
            {"authentication": {"serviceAccount": {"issuer": "k8s", "jwks": {"file": "/j"}}}},
            "spec.authentication.serviceAccount.audiences",
            "required field is missing",
        ),
        (
            {"authentication": {"serviceAccount": {"issuer": "k8s", "audiences": ["a"]}}},
            "spec.authentication.serviceAccount.jwks",
            "required unless tokenReview",
        ),
        ({"authentication": {"apiKeys": {}}}, "spec.authentication.apiKeys.secretRef", "required field is missing"),
        (
            {"authentication": {"basicAuth": {"secretRef": {"name": "u"}, "realm": 'a"b'}}},
            "spec.authentication.basicAuth.realm",
            "quotes",
        ),
        (
            {"authentication": {"apiKeys": {"secretRef": {"name": "k"}}, "protectedResource": {"resource": "mcp"}}},
            "spec.authentication.protectedResource.resource",
            "absolute https or http URL",
        ),
        ({"rateLimits": [{"name": "a", "capacity": 0, "per": "1s"}]}, "spec.rateLimits[0].capacity", "out of range"),
        ({"rateLimits": [{"name": "a", "capacity": 1}]}, "spec.rateLimits[0].per", "required"),
        ({"rateLimits": [{"name": "a", "capacity": 1, "per": "0s"}]}, "spec.rateLimits[0].per", "greater than zero"),
        ({"rateLimits": [{"name": "a", "capacity": 1, "per": "1 s"}]}, "spec.rateLimits[0].per", "invalid duration"),
        ({"rateLimits": [{"name": "a", "capacity": 1, "per": "1s", "unit": "Bytes"}]}, "spec.rateLimits[0].unit", ""),
        (
            {"rateLimits": [{"name": "a", "capacity": 1, "per": "1s", "key": "jwt.sub +"}]},
            "spec.rateLimits[0].key",
            "invalid CEL",
        ),
        (
            {"rateLimits": [{"name": "a", "capacity": 1, "per": "1s", "scope": "Global"}]},
            "spec.rateLimits[0].redis",
            "required for scope Global",
        ),
        (
            {"rateLimits": [{"name": "a", "capacity": 1, "per": "1s", "onStoreDown": "FailOpen"}]},
            "spec.rateLimits[0].onStoreDown",
            "only applies to scope Global",
        ),
        (
            {
                "rateLimits": [
                    {"name": "a", "capacity": 1, "per": "1s", "scope": "Global", "redis": {"url": "redis://u:p@r"}}
                ]
            },
            "spec.rateLimits[0].redis.url",
            "must not carry credentials",
        ),
        (
            {"rateLimits": [{"name": "a", "capacity": 1, "per": "1s"}, {"name": "a", "capacity": 2, "per": "1s"}]},
            "spec.rateLimits[1].name",
            "already used",
        ),
        ({"tokenBudgets": [{"name": "b"}]}, "spec.tokenBudgets[0].tokens", "required"),
        ({"tokenBudgets": [{"name": "b", "tokens": 1, "period": "Year"}]}, "spec.tokenBudgets[0].period", ""),
        (
            {"tokenBudgets": [{"name": "b", "tokens": 1, "period": "Day", "window": "24h"}]},
            "spec.tokenBudgets[0].window",
            "cannot be combined with period",
        ),
        ({"resilience": {"requestTimeout": "5 minutes"}}, "spec.resilience.requestTimeout", "invalid duration"),
        (
            {"resilience": {"requestTimeout": "10s", "perTryTimeout": "20s"}},
            "spec.resilience.perTryTimeout",
            "must not be longer",
        ),
        ({"resilience": {"retry": {"attempts": 11}}}, "spec.resilience.retry.attempts", "out of range"),
        ({"resilience": {"retry": {"attempts": 1, "retryOn": ["timeout"]}}}, "spec.resilience.retry.retryOn[0]", ""),
        (
            {"resilience": {"retry": {"attempts": 1, "retryOn": ["reset"], "statusCodes": [503]}}},
            "spec.resilience.retry.statusCodes",
            "needs 5xx",
        ),
        (
            {"resilience": {"retry": {"attempts": 1, "backoff": {"baseInterval": "2s", "maxInterval": "1s"}}}},
            "spec.resilience.retry.backoff.maxInterval",
            "shorter than baseInterval",
        ),
        ({"cors": {"allowOrigins": ["example.com"]}}, "spec.cors.allowOrigins[0]", "not an origin"),
        ({"cors": {"allowOrigins": ["*"], "allowCredentials": True}}, "spec.cors.allowCredentials", "browsers"),
        ({"requestHeaders": {"set": [{"name": "bad header", "value": "x"}]}}, "spec.requestHeaders.set[0].name", ""),
        ({"responseHeaders": {"add": [{"name": "x", "value": "a\nb"}]}}, "spec.responseHeaders.add[0].value", "ASCII"),
        ({"upstreamCredentials": {"secretRef": {"name": "s"}}}, "spec.upstreamCredentials.secretRef.key", "required"),
        (
            {"upstreamCredentials": {"header": "Content-Length", "secretRef": {"name": "s", "key": "k"}}},
            "spec.upstreamCredentials.header",
            "managed by the proxy",
        ),
    ],
)
def test_schema_errors_name_their_field(spec: dict[str, Any], field: str, message: str) -> None:
    spec = {"authorization": {}, **spec}
    errors = errors_of(spec)
    assert field in errors, errors
    assert message in errors[field]


def test_a_policy_without_sections_is_refused() -> None:
    assert errors_of({}) == {
        "spec": "at least one of authentication, authorization, rateLimits, tokenBudgets, "
        "resilience, cors, requestHeaders, responseHeaders, upstreamCredentials is required"
    }


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['a', 'b']", None),
        ("['a', 'b'].exists(t, mcp.tool.name == t)", None),
        ("llm.model.startsWith('gpt') || a2a.method == 'message/send' || source.namespace == 'ns'", None),
        ("jwt.sub ==", "invalid CEL at 1:11"),
        ("tenant == 'a'", "unknown variable 'tenant'"),
        ("   ", "empty expression"),
        ("x" * 5000, "longer than 4096"),
    ],
)
def test_cel_problem(source: str, problem: str | None) -> None:
    found = cel_problem(source)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_scrypt_hash_format_and_bounds() -> None:
    assert scrypt_hash_problem(HASH) is None
    assert "never the password" in (scrypt_hash_problem("hunter2") or "")
    assert "out of bounds" in (scrypt_hash_problem(HASH.replace("ln=10", "ln=25")) or "")


def test_rule_index_by_name_then_index() -> None:
    route = build(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r"},
            "spec": {"rules": [{"name": "search"}, {}, {"name": "1"}]},
        }
    )
    assert rule_index(route, "search") == 0
    assert rule_index(route, "1") == 2  # a rule named "1" wins over index 1
    assert rule_index(route, "0") == 0
    assert rule_index(route, "3") is None
    assert rule_index(route, "01") is None
    assert rule_index(route, "nope") is None


# --- translation ----------------------------------------------------------------------------

CLASS = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GatewayClass",
    "metadata": {"name": "agentgate"},
    "spec": {"controllerName": "agentgate.dev/gateway-controller"},
}
GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]},
}
ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "tools", "namespace": "default"},
    "spec": {"parentRefs": [{"name": "web"}], "rules": [{"backendRefs": [{"name": "svc", "port": 80}]}]},
}
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "svc", "namespace": "default"},
    "spec": {"ports": [{"port": 80}]},
}


def secret(name: str, **data: str) -> dict[str, Any]:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"}, "data": encoded}


def run(*docs: dict[str, Any]) -> tuple[dict[str, pb.Policy], dict[str, dict[str, Any]]]:
    objects = [build(doc, index) for index, doc in enumerate((CLASS, GATEWAY, ROUTE, SERVICE, *docs))]
    result = translate(objects)
    policies = dict(result.snapshots["default/web"][POLICY])
    statuses = {s.name: s.status["conditions"][0] for s in result.statuses if s.kind == "Policy"}
    return policies, statuses  # type: ignore[return-value]


def test_api_keys_ship_as_digests_and_never_raw() -> None:
    spec = {"authentication": {"apiKeys": {"secretRef": {"name": "keys"}}}}
    policies, statuses = run(policy(spec), secret("keys", planner="k-planner\n", writer="k-writer"))
    api_keys = policies["default/p"].authentication.api_keys
    assert api_keys.header == "x-api-key"
    assert [(k.name, k.sha256) for k in api_keys.keys] == [
        ("planner", hashlib.sha256(b"k-planner").hexdigest()),
        ("writer", hashlib.sha256(b"k-writer").hexdigest()),
    ]
    assert b"k-planner" not in policies["default/p"].SerializeToString()
    assert statuses["p"]["status"] == "True"


def test_duplicate_api_keys_in_a_secret_are_refused() -> None:
    spec = {"authentication": {"apiKeys": {"secretRef": {"name": "keys"}}}}
    policies, statuses = run(policy(spec), secret("keys", a="same", b="same"))
    assert statuses["p"]["reason"] == "Invalid"
    assert "hold the same API key" in statuses["p"]["message"]
    assert policies["default/p"].invalid_reason.startswith("spec.authentication.apiKeys.secretRef:")


def test_basic_auth_needs_hashes_not_passwords() -> None:
    spec = {"authentication": {"basicAuth": {"secretRef": {"name": "users"}}}}
    policies, statuses = run(policy(spec), secret("users", alice=HASH))
    assert [(u.name, u.password_hash) for u in policies["default/p"].authentication.basic.users] == [("alice", HASH)]
    _, statuses = run(policy(spec), secret("users", alice="hunter2"))
    assert statuses["p"]["reason"] == "Invalid" and "user 'alice'" in statuses["p"]["message"]
    assert "hunter2" not in statuses["p"]["message"]


def test_secret_values_resolve_for_credentials_and_redis() -> None:
    spec = {
        "upstreamCredentials": {"prefix": "Bearer ", "secretRef": {"name": "s", "key": "token"}},
        "rateLimits": [
            {
                "name": "g",
                "capacity": 5,
                "per": "1s",
                "scope": "Global",
                "redis": {"url": "redis://r:6379", "username": "gw", "passwordSecretRef": {"name": "s", "key": "pw"}},
            }
        ],
    }
    policies, _ = run(policy(spec), secret("s", token="sk-1\n", pw="secret"))
    message = policies["default/p"]
    assert (message.upstream_credentials.header, message.upstream_credentials.value) == ("authorization", "Bearer sk-1")
    store = message.rate_limits.limits[0].store
    assert (store.url, store.username, store.password) == ("redis://r:6379", "gw", "secret")
    assert message.rate_limits.limits[0].on_store_down == pb.STORE_DOWN_POLICY_FAIL_OPEN


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "Secret default/s not found"),
        ({"other": "x"}, "has no key 'token'"),
        ({"token": "a\nb"}, "one line of ASCII"),
    ],
)
def test_unusable_secrets_fail_closed(data: dict[str, str] | None, message: str) -> None:
    spec = {"upstreamCredentials": {"secretRef": {"name": "s", "key": "token"}}}
    docs = [policy(spec)] + ([secret("s", **data)] if data is not None else [])
    policies, statuses = run(*docs)
    assert statuses["p"]["status"] == "False" and statuses["p"]["reason"] == "Invalid"
    assert message in statuses["p"]["message"] and "answered 500" in statuses["p"]["message"]
    shipped = policies["default/p"]
    assert message in shipped.invalid_reason
    assert not shipped.HasField("upstream_credentials")
    assert list(shipped.targets) == [pb.PolicyTargetRef(kind=Kind.KIND_GATEWAY, name="default/web")]


def test_targets_resolve_per_kind_and_missing_ones_are_reported() -> None:
    spec = {
        "targetRefs": [
            {"kind": "Gateway", "name": "web"},
            {"kind": "Gateway", "name": "web", "sectionName": "http"},
            {"kind": "HTTPRoute", "name": "tools"},
            {"kind": "HTTPRoute", "name": "tools", "sectionName": "0"},
            {"kind": "HTTPRoute", "name": "tools", "sectionName": "7"},
            {"kind": "Backend", "name": "ghost"},
        ],
        "authorization": {},
    }
    policies, statuses = run(policy(spec))
    assert [(t.kind, t.name) for t in policies["default/p"].targets] == [
        (Kind.KIND_GATEWAY, "default/web"),
        (Kind.KIND_LISTENER, "default/web/http"),
        (Kind.KIND_ROUTE, "default/tools"),
        (Kind.KIND_ROUTE_RULE, "default/tools/0"),
    ]
    status = statuses["p"]
    assert status["status"] == "True" and status["reason"] == "Accepted"
    assert "targetRefs[4]: HTTPRoute default/tools has no rule named '7'" in status["message"]
    assert "targetRefs[5]: Backend default/ghost not found" in status["message"]


def test_policy_without_existing_targets_is_target_not_found_and_not_shipped() -> None:
    spec = {"targetRefs": [{"kind": "Gateway", "name": "elsewhere"}], "authorization": {}}
    policies, statuses = run(policy(spec))
    assert policies == {}
    assert statuses["p"]["reason"] == "TargetNotFound" and statuses["p"]["status"] == "False"
    assert "Gateway default/elsewhere not found" in statuses["p"]["message"]


def test_schema_invalid_policy_attaches_fail_closed_to_its_well_formed_targets() -> None:
    spec = {
        "targetRefs": [
            {"kind": "Gateway", "name": "web", "namespace": "other"},
            {"kind": "HTTPRoute", "name": "tools"},
        ],
        "authorization": {"allow": ["nope =="]},
    }
    policies, statuses = run(policy(spec))
    shipped = policies["default/p"]
    assert [(t.kind, t.name) for t in shipped.targets] == [(Kind.KIND_ROUTE, "default/tools")]
    assert "spec.targetRefs[0].namespace" in shipped.invalid_reason
    assert "spec.authorization.allow[0]" in shipped.invalid_reason
    assert not shipped.HasField("authorization")
    assert statuses["p"]["reason"] == "Invalid"


def test_creation_time_travels_for_tie_breaks() -> None:
    doc = policy({"authorization": {}}, creationTimestamp="2024-05-01T00:00:00Z")
    policies, _ = run(doc)
    assert policies["default/p"].creation_unix_seconds == 1714521600
