"""compile_config for Policy resources: NACKs naming the Policy and field, precedence, fail-closed policies,
and the whole path from the policy-attachment golden YAML to the effective policy of each rule."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from controlplane.model import SourceRef, object_from_manifest
from controlplane.translate import translate
from dataplane.config.compile import ConfigRejected, compile_config
from dataplane.config.policy import (
    EMPTY_POLICY,
    PolicyIndex,
    RateLimitsSection,
    RedisStoreSettings,
    ResilienceSettings,
    RetrySettings,
    TokenBudgetSettings,
)
from dataplane.policy.authorize import Rule, RuleKind, RuleSet, activation, mcp_variables
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET

Kind = pb.PolicyTargetRef
GOLDEN = Path(__file__).parent.parent / "controlplane" / "golden" / "policy-attachment" / "input.yaml"
GW = "ns/gw"
L1, L2 = "ns/gw/a", "ns/gw/b"
RULE = "ns/r/0"


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def base(*policies: pb.Policy, backends: Iterable[str] = ("ns/b",)) -> dict[str, dict[str, object]]:
    """Two listeners of one Gateway, one rule on both, forwarding to the given backends."""
    route = pb.Route(name=RULE, listeners=[L1, L2], route_key="ns/r", rule_index=0)
    route.backends.extend(pb.BackendRef(backend=name, weight=1) for name in backends)
    return {
        LISTENER: {
            name: pb.Listener(name=name, gateway=GW, port=8080 + i, protocol=pb.LISTENER_PROTOCOL_HTTP)
            for i, name in enumerate((L1, L2))
        },
        ROUTE: {RULE: route},
        BACKEND: {name: pb.Backend(name=name, http=pb.HttpBackend()) for name in backends},
        TARGET: {
            f"{name}/t": pb.Target(name=f"{name}/t", backend=name, address=pb.SocketAddress(host="10.0.0.1", port=80))
            for name in backends
        },
        POLICY: {p.name: p for p in policies},
    }


def target(kind: int, name: str) -> pb.PolicyTargetRef:
    return pb.PolicyTargetRef(kind=kind, name=name)  # type: ignore[arg-type]


def policy(name: str, *targets: pb.PolicyTargetRef, created: int = 0, **sections: object) -> pb.Policy:
    return pb.Policy(name=name, targets=targets, creation_unix_seconds=created, **sections)  # type: ignore[arg-type]


def compiled(*policies: pb.Policy, **kwargs: Iterable[str]) -> PolicyIndex:
    return compile_config(base(*policies, **kwargs), version="v").policies


def rejected(*policies: pb.Policy) -> dict[tuple[str, str], str]:
    with pytest.raises(ConfigRejected) as caught:
        compile_config(base(*policies), version="v")
    return {(e.name, e.field): e.message for e in caught.value.errors if e.type_url == POLICY}


TIMEOUT = pb.Resilience(request_timeout=seconds(10))


# --- precedence -------------------------------------------------------------------------------


def test_more_specific_wins_per_section_and_sections_from_several_levels_combine() -> None:
    index = compiled(
        policy("ns/gw-p", target(Kind.KIND_GATEWAY, GW), resilience=TIMEOUT, authorization=pb.Authorization()),
        policy("ns/l-p", target(Kind.KIND_LISTENER, L1), resilience=pb.Resilience(request_timeout=seconds(20))),
        policy("ns/route-p", target(Kind.KIND_ROUTE, "ns/r"), cors=pb.Cors(allow_origins=["*"])),
        policy("ns/rule-p", target(Kind.KIND_ROUTE_RULE, RULE), resilience=pb.Resilience(request_timeout=seconds(30))),
    )
    on_a, on_b = index.for_rule(L1, RULE), index.for_rule(L2, RULE)
    assert on_a.policies == ("ns/rule-p", "ns/route-p", "ns/l-p", "ns/gw-p")
    assert on_b.policies == ("ns/rule-p", "ns/route-p", "ns/gw-p")  # the listener policy is L1's only
    for effective in (on_a, on_b):
        assert effective.sections.resilience == ResilienceSettings("ns/rule-p", request_timeout=30.0)
        assert effective.sections.cors is not None and effective.sections.cors.policy == "ns/route-p"
        assert effective.sections.authorization is not None and effective.sections.authorization.policy == "ns/gw-p"
        assert effective.sections.authentication is None
    # The gateway's section is one object for every rule it reaches: cores compile it once.
    assert on_a.sections.authorization is on_b.sections.authorization


def test_ties_go_to_the_older_policy_then_the_smaller_name() -> None:
    rule = target(Kind.KIND_ROUTE_RULE, RULE)
    index = compiled(
        policy("ns/b", rule, created=100, resilience=pb.Resilience(request_timeout=seconds(1))),
        policy("ns/a", rule, created=200, resilience=pb.Resilience(request_timeout=seconds(2))),
        policy("ns/d", rule, created=50, cors=pb.Cors(allow_origins=["*"])),
        policy("ns/c", rule, created=50, cors=pb.Cors(allow_origins=["null"])),
    )
    effective = index.for_rule(L1, RULE)
    assert effective.policies == ("ns/c", "ns/d", "ns/b", "ns/a")
    assert effective.sections.resilience is not None and effective.sections.resilience.policy == "ns/b"
    assert effective.sections.cors is not None and effective.sections.cors.policy == "ns/c"


def test_backend_sections_override_the_rule_for_traffic_to_that_backend() -> None:
    index = compiled(
        policy("ns/rule", target(Kind.KIND_ROUTE_RULE, RULE), resilience=TIMEOUT, cors=pb.Cors(allow_origins=["*"])),
        policy(
            "ns/backend",
            target(Kind.KIND_BACKEND, "ns/b1"),
            resilience=pb.Resilience(request_timeout=seconds(300)),
            upstream_credentials=pb.UpstreamCredentials(value="Bearer sk"),
        ),
        backends=("ns/b1", "ns/b2"),
    )
    to_b1, to_b2 = index.for_request(L1, RULE, "ns/b1"), index.for_request(L1, RULE, "ns/b2")
    assert to_b1.sections.resilience is not None and to_b1.sections.resilience.request_timeout == 300.0
    assert to_b1.sections.cors is not None and to_b1.sections.cors.policy == "ns/rule"
    credentials = to_b1.sections.upstream_credentials
    assert credentials is not None and (credentials.header, credentials.value) == ("authorization", "Bearer sk")
    assert "sk" not in repr(credentials)
    assert to_b1.policies == ("ns/backend", "ns/rule")
    assert to_b2 == index.for_rule(L1, RULE) and to_b2.sections.upstream_credentials is None
    assert index.for_backend("ns/b1").policies == ("ns/backend",)
    # Pairs the config never routes still answer (computed), and nothing applies to unknown ones.
    assert index.for_request(L2, RULE, "ns/b1").sections.resilience == to_b1.sections.resilience
    assert index.for_request("ns/gw/x", "ns/r/9", "ns/none") is EMPTY_POLICY


def test_an_empty_list_section_overrides_a_less_specific_one() -> None:
    limit = pb.RateLimit(name="rpm", capacity=10, per=seconds(60))
    index = compiled(
        policy("ns/gw", target(Kind.KIND_GATEWAY, GW), rate_limits=pb.RateLimits(limits=[limit])),
        policy("ns/rule", target(Kind.KIND_ROUTE_RULE, RULE), rate_limits=pb.RateLimits()),
    )
    assert index.for_rule(L1, RULE).sections.rate_limits == RateLimitsSection("ns/rule", ())


def test_policies_targeting_what_is_not_in_the_snapshot_are_ignored() -> None:
    index = compiled(policy("ns/p", target(Kind.KIND_ROUTE, "ns/gone"), resilience=TIMEOUT))
    assert "ns/p" in index.policies
    assert index.rules == {} and index.requests == {}


def test_a_policy_refused_by_the_control_plane_fails_closed() -> None:
    index = compiled(
        policy("ns/ok", target(Kind.KIND_GATEWAY, GW), resilience=TIMEOUT),
        pb.Policy(name="ns/bad", targets=[target(Kind.KIND_ROUTE, "ns/r")], invalid_reason="spec.x: bad"),
    )
    effective = index.for_request(L1, RULE, "ns/b")
    assert effective.invalid == ("ns/bad",)
    assert effective.sections.resilience is not None and effective.sections.resilience.policy == "ns/ok"
    assert index.policies["ns/bad"].invalid_reason == "spec.x: bad"


# --- sections ---------------------------------------------------------------------------------


def test_sections_compile_to_plain_settings() -> None:
    authn = pb.Authentication(
        mode=pb.Authentication.MODE_PERMISSIVE,
        jwt_providers=[
            pb.JwtProvider(
                name="corp",
                issuer="https://idp",
                audiences=["gw"],
                jwks=pb.Jwks(url="https://idp/jwks"),
                leeway=seconds(5),
                claims_to_headers=[pb.ClaimToHeader(claim="sub", header="x-agent-identity")],
            )
        ],
        service_account_providers=[
            pb.ServiceAccountProvider(name="sa", issuer="https://k8s", audiences=["gw"], token_review=True)
        ],
        api_keys=pb.ApiKeyAuthentication(keys=[pb.ApiKeyAuthentication.Key(name="k", sha256="ab" * 32)]),
        protected_resource=pb.ProtectedResourceMetadata(resource="https://mcp.example.com/mcp"),
    )
    budget = pb.TokenBudget(
        name="ns",
        key="source.namespace",
        tokens=1_000_000,
        period=pb.TokenBudget.PERIOD_DAY,
        scope=pb.LIMIT_SCOPE_GLOBAL,
        store=pb.RedisStore(url="redis://r:6379/0", password="pw"),
        on_store_down=pb.STORE_DOWN_POLICY_FAIL_CLOSED,
    )
    retry = pb.Retry(attempts=3, on=[pb.Retry.ON_5XX], status_codes=[503], backoff_base=seconds(1))
    index = compiled(
        policy(
            "ns/p",
            target(Kind.KIND_GATEWAY, GW),
            authentication=authn,
            token_budgets=pb.TokenBudgets(budgets=[budget]),
            resilience=pb.Resilience(per_try_timeout=seconds(30), retry=retry),
        )
    )
    sections = index.policies["ns/p"].sections
    assert sections.authentication is not None
    jwt, service_account = sections.authentication.providers
    assert (jwt.kind, jwt.jwks_url, jwt.jwks_inline, jwt.leeway_seconds, jwt.principal_claim) == (
        "jwt",
        "https://idp/jwks",
        None,
        5.0,
        "sub",
    )
    assert (service_account.kind, service_account.token_review) == ("kubernetes", True)
    assert sections.authentication.mode == "permissive"
    assert sections.authentication.identity_headers == frozenset({"x-agent-identity"})
    assert sections.authentication.protected_resource is not None
    assert b'"bearer_methods_supported":["header"]' in sections.authentication.protected_resource.document
    assert sections.token_budgets is not None
    (compiled_budget,) = sections.token_budgets.budgets
    assert compiled_budget == TokenBudgetSettings(
        name="ns",
        tokens=1_000_000,
        period="day",
        key=compiled_budget.key,
        scope="global",
        store=RedisStoreSettings("redis://r:6379/0", None, "pw"),
        on_store_down="fail_closed",
    )
    assert compiled_budget.key is not None and compiled_budget.key.source == "source.namespace"
    assert "pw" not in repr(compiled_budget.store)
    assert sections.resilience == ResilienceSettings(
        "ns/p",
        per_try_timeout=30.0,
        retry=RetrySettings(
            attempts=3, backoff_base=1.0, backoff_max=1.0, on=frozenset({"5xx"}), status_codes=frozenset({503})
        ),
    )


def test_compiled_authorization_builds_a_rule_set_without_recompiling() -> None:
    authz = pb.Authorization(allow=["mcp.tool.name in ['search']"], deny=["mcp.tool.name == 'rm'"])
    index = compiled(policy("ns/p", target(Kind.KIND_GATEWAY, GW), authorization=authz))
    settings = index.for_rule(L1, RULE).sections.authorization
    assert settings is not None
    rules = RuleSet(
        [Rule(settings.policy, RuleKind.ALLOW, i, e) for i, e in enumerate(settings.allow)]
        + [Rule(settings.policy, RuleKind.DENY, i, e) for i, e in enumerate(settings.deny)]
    )
    assert rules.decide(activation(mcp=mcp_variables("tools/call", tool="search"))).allowed
    assert not rules.decide(activation(mcp=mcp_variables("tools/call", tool="rm"))).allowed
    assert settings.allow[0].field == "authorization.allow[0]"


# --- NACKs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "field", "message"),
    [
        ({"authorization": pb.Authorization(allow=["jwt.sub =="])}, "authorization.allow[0]", "at 1:"),
        ({"authorization": pb.Authorization(deny=["nosuch(jwt)"])}, "authorization.deny[0]", "unknown function"),
        (
            {"authorization": pb.Authorization(require=["request.headers['X-Tenant'] == 'a'"])},
            "authorization.require[0]",
            "lower-case",
        ),
        ({"authentication": pb.Authentication()}, "authentication", "no method"),
        ({"authentication": pb.Authentication(mode=9)}, "authentication.mode", "unknown Mode value 9"),  # type: ignore[arg-type]
        (
            {"authentication": pb.Authentication(jwt_providers=[pb.JwtProvider(name="a", issuer="i")])},
            "authentication.jwt_providers[0].jwks",
            "required",
        ),
        (
            {
                "authentication": pb.Authentication(
                    jwt_providers=[pb.JwtProvider(name="a", issuer="i", jwks=pb.Jwks(inline="{"))]
                )
            },
            "authentication.jwt_providers[0].jwks.inline",
            "is not JSON",
        ),
        (
            {
                "authentication": pb.Authentication(
                    jwt_providers=[pb.JwtProvider(name="a", issuer="i", jwks=pb.Jwks(file="/j"), algorithms=["HS256"])]
                )
            },
            "authentication.jwt_providers[0].algorithms",
            "unsupported 'HS256'",
        ),
        (
            {
                "authentication": pb.Authentication(
                    service_account_providers=[pb.ServiceAccountProvider(name="s", issuer="i", token_review=True)]
                )
            },
            "authentication.service_account_providers[0].audiences",
            "bound to an audience",
        ),
        (
            {
                "authentication": pb.Authentication(
                    api_keys=pb.ApiKeyAuthentication(keys=[pb.ApiKeyAuthentication.Key(name="k", sha256="raw-key")])
                )
            },
            "authentication.api_keys.keys[0].sha256",
            "64 lower-case hex",
        ),
        (
            {
                "authentication": pb.Authentication(
                    basic=pb.BasicAuthentication(users=[pb.BasicAuthentication.User(name="u", password_hash="pw")])
                )
            },
            "authentication.basic.users[0].password_hash",
            "$scrypt$",
        ),
        (
            {"rate_limits": pb.RateLimits(limits=[pb.RateLimit(name="a", capacity=1)])},
            "rate_limits.limits[0].per",
            "required",
        ),
        (
            {
                "rate_limits": pb.RateLimits(
                    limits=[pb.RateLimit(name="a", capacity=1, per=seconds(1), scope=pb.LIMIT_SCOPE_GLOBAL)]
                )
            },
            "rate_limits.limits[0].store",
            "required for a global limit",
        ),
        (
            {
                "rate_limits": pb.RateLimits(
                    limits=[
                        pb.RateLimit(
                            name="a",
                            capacity=1,
                            per=seconds(1),
                            scope=pb.LIMIT_SCOPE_GLOBAL,
                            store=pb.RedisStore(url="http://r"),
                        )
                    ]
                )
            },
            "rate_limits.limits[0].store.url",
            "redis://",
        ),
        (
            {"rate_limits": pb.RateLimits(limits=[pb.RateLimit(name="a", capacity=0, per=seconds(1))])},
            "rate_limits.limits[0].capacity",
            "at least 1",
        ),
        (
            {"token_budgets": pb.TokenBudgets(budgets=[pb.TokenBudget(name="b", tokens=5, key="jwt.")])},
            "token_budgets.budgets[0].key",
            "",
        ),
        (
            {"resilience": pb.Resilience(request_timeout=Duration(seconds=-1))},
            "resilience.request_timeout",
            "non-negative",
        ),
        (
            {"resilience": pb.Resilience(request_timeout=seconds(1), per_try_timeout=seconds(2))},
            "resilience.per_try_timeout",
            "longer than request_timeout",
        ),
        ({"resilience": pb.Resilience(retry=pb.Retry(attempts=50))}, "resilience.retry.attempts", "at most 10"),
        ({"cors": pb.Cors(allow_origins=["nope"])}, "cors.allow_origins[0]", "not an origin"),
        (
            {"request_headers": pb.HeaderModifier(set=[pb.HeaderModifier.Header(name="Host", value="x")])},
            "request_headers.set[0].name",
            "lower-case",
        ),
        (
            {"upstream_credentials": pb.UpstreamCredentials(value="Bearer a\r\nx-injected: 1")},
            "upstream_credentials.value",
            "value not shown",
        ),
    ],
)
def test_invalid_fields_are_nacked_naming_policy_and_field(
    sections: dict[str, object], field: str, message: str
) -> None:
    errors = rejected(policy("ns/p", target(Kind.KIND_GATEWAY, GW), **sections))
    assert ("ns/p", field) in errors, errors
    assert message in errors[("ns/p", field)]
    assert "x-injected" not in str(errors)


def test_targets_are_checked() -> None:
    errors = rejected(
        pb.Policy(name="ns/p", targets=[pb.PolicyTargetRef(name="x"), target(Kind.KIND_ROUTE, ""), target(7, "y")]),
    )
    assert errors == {
        ("ns/p", "targets[0].kind"): "must be set",
        ("ns/p", "targets[1].name"): "must not be empty",
        ("ns/p", "targets[2].kind"): "unknown Kind value 7",
    }


def test_the_resource_key_names_the_policy_in_errors() -> None:
    resources = base()
    resources[POLICY] = {"ns/key": pb.Policy(name="ns/declared", resilience=pb.Resilience(retry=pb.Retry(attempts=99)))}
    with pytest.raises(ConfigRejected) as caught:
        compile_config(resources, version="v")
    text = str(caught.value)
    assert "Policy ns/key: name: 'ns/declared' differs from the resource name" in text
    assert "Policy ns/key: resilience.retry.attempts: must be at most 10" in text


# --- from YAML ----------------------------------------------------------------------------------


def golden_index() -> dict[str, PolicyIndex]:
    objects = []
    with GOLDEN.open() as stream:
        for position, doc in enumerate(yaml.safe_load_all(stream)):
            obj, errors = object_from_manifest(doc, SourceRef(GOLDEN.name, position))
            assert not errors
            if obj is not None:
                objects.append(obj)
    result = translate(objects)
    return {gateway: compile_config(resources, version="v").policies for gateway, resources in result.snapshots.items()}


def test_golden_yaml_to_effective_policy_per_rule() -> None:
    web = golden_index()["default/web"]
    search = web.for_request("default/web/http", "default/tools/0", "default/mcp")
    sections = search.sections
    assert sections.authentication is not None and sections.authentication.policy == "default/gateway-defaults"
    assert sections.resilience is not None and sections.resilience.policy == "default/slow-search"
    assert sections.resilience.request_timeout == 300.0 and sections.resilience.retry is not None
    assert sections.resilience.retry.on == frozenset({"5xx", "reset", "connect-failure"})
    # The backend's authorization overrides the routes' for traffic to the MCP backend.
    assert sections.authorization is not None and sections.authorization.policy == "default/mcp-backend"
    assert sections.token_budgets is not None and sections.token_budgets.policy == "default/tools-budget"
    assert sections.upstream_credentials is not None and sections.upstream_credentials.value == "Bearer sk-upstream"
    assert sections.rate_limits is not None and [limit.name for limit in sections.rate_limits.limits] == [
        "per-agent",
        "shared",
    ]
    # Rule 1 turned limits off; rule 2 goes to a Service, so the older route policy's authorization applies.
    browse = web.for_request("default/web/http", "default/tools/1", "default/mcp").sections
    assert browse.rate_limits == RateLimitsSection("default/browse-unlimited", ())
    plain = web.for_request("default/web/http", "default/tools/2", "default/plain:80").sections
    assert plain.authorization is not None and plain.authorization.policy == "default/tools-tenants"
    # The admin listener authenticates with API keys and basic auth instead of JWTs.
    admin = web.for_rule("default/web/admin", "default/tools/2").sections.authentication
    assert admin is not None and admin.policy == "default/admin-listener" and admin.mode == "optional"
    assert admin.api_keys is not None and [key.name for key in admin.api_keys.keys] == ["planner", "researcher"]
    # The internal Gateway sees the backend policy and its own route's, never the web Gateway's.
    internal = golden_index()["default/internal"].for_request(
        "default/internal/http", "default/internal/0", "default/mcp"
    )
    assert internal.policies == ("default/mcp-backend", "default/internal-agents")
    assert internal.sections.authentication is not None
    assert internal.sections.authentication.providers[0].kind == "kubernetes"
