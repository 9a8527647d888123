"""The policy chain without sockets: Policy resources compiled through compile_config, then the chain
compiled once per config and evaluated per request (authentication, identity headers, CEL
authorization, limits, budgets, fail-closed) and the MCP caller policy (visibility, item limits).

The helpers at the top (configs, tokens, requests) are shared with tests/dataplane/test_proxy_policy.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from dataplane.config.compile import ConfigRejected, compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.http.messages import Headers, ProxyRequest
from dataplane.http.proxy import ProxyHandler
from dataplane.mcp.federation import FederationConfig, Kind, McpFederation, allow_all
from dataplane.policy.authorize import RuleSet, a2a_variables, source_variables
from dataplane.policy.chain import Admitted, McpCaller, PolicyTable, Refused, RequestPolicy, WorkerPolicies
from dataplane.policy.identity import Identity
from dataplane.upstream.pool import UpstreamPools
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET
from tests.dataplane.peers.config import GATEWAY, backend, listener, route, target
from tests.dataplane.policy.test_jwt import AUDIENCE, ISSUER, SigningKey, claims, ec_key, jwks, raw_token, sign

pytestmark = pytest.mark.anyio

Kind_ = pb.PolicyTargetRef
LISTENER_NAME = f"{GATEWAY}/http"
RULE = "default/r/0"
APP = "default/app"
MCP = "default/mcp"
KEY = ec_key("gw-1")
MCP_SESSION_KEY = pb.McpSessionKey(id="k1", key=b"k" * 32)
JWKS_URL = "https://issuer.test/jwks"


# --- helpers (shared with test_proxy_policy.py) ---------------------------------------------------


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def policy(
    name: str = "default/p", *, on: Iterable[pb.PolicyTargetRef] = (), created: int = 0, **sections: Any
) -> pb.Policy:
    refs = list(on) or [pb.PolicyTargetRef(kind=Kind_.KIND_ROUTE_RULE, name=RULE)]
    return pb.Policy(name=name, targets=refs, creation_unix_seconds=created, **sections)


def jwt_authentication(
    *keys: SigningKey,
    mode: int = pb.Authentication.MODE_STRICT,
    jwks_url: str = "",
    resource: str = "",
    claim_headers: Iterable[tuple[str, str]] = (("sub", "x-agent-identity"),),
) -> pb.Authentication:
    jwks_message = pb.Jwks(url=jwks_url) if jwks_url else pb.Jwks(inline=json.dumps(jwks(*(keys or (KEY,)))))
    if jwks_url and keys:
        jwks_message.inline = json.dumps(jwks(*keys))
    provider = pb.JwtProvider(
        name="idp",
        issuer=ISSUER,
        audiences=[AUDIENCE],
        jwks=jwks_message,
        claims_to_headers=[pb.ClaimToHeader(claim=c, header=h) for c, h in claim_headers],
    )
    authn = pb.Authentication(mode=mode, jwt_providers=[provider])
    if resource:
        authn.protected_resource.CopyFrom(
            pb.ProtectedResourceMetadata(resource=resource, authorization_servers=[ISSUER])
        )
    return authn


def rate_limit(
    name: str = "per-user",
    capacity: int = 2,
    *,
    key: str = "jwt.sub",
    per: float = 3600.0,
    store: str = "",
    on_store_down: int = pb.STORE_DOWN_POLICY_FAIL_OPEN,
) -> pb.RateLimit:
    limit = pb.RateLimit(name=name, key=key, capacity=capacity, per=seconds(per), on_store_down=on_store_down)
    if store:
        limit.scope = pb.LIMIT_SCOPE_GLOBAL
        limit.store.CopyFrom(pb.RedisStore(url=store))
    return limit


def mcp_backend(http_port: int = 9, targets: Iterable[str] = ("web", "docs")) -> list[Any]:
    """An MCP backend with streamable-HTTP targets (never contacted by the pure tests)."""
    messages: list[Any] = [pb.Backend(name=MCP, mcp=pb.McpBackend(session_keys=[MCP_SESSION_KEY]))]
    for name in targets:
        transport = pb.McpHttpTransport(address=pb.SocketAddress(host="127.0.0.1", port=http_port))
        messages.append(
            pb.Target(name=f"{MCP}/{name}", backend=MCP, mcp=pb.McpServer(name=name, streamable_http=transport))
        )
    return messages


def build(
    port: int,
    *policies: pb.Policy,
    upstream_port: int = 9,
    mcp_port: int | None = None,
    mcp_targets: Iterable[str] = ("web", "docs"),
    listeners: Iterable[pb.Listener] = (),
    version: str = "v1",
) -> RuntimeConfig:
    """One listener (or those given), rule RULE for "/" to the HTTP backend APP, or to the MCP backend
    (``mcp_port``: its targets' port), and the policies, through compile_config."""
    listener_messages = list(listeners) or [listener(port)]
    messages: list[Any] = [*listener_messages]
    if mcp_port is None:
        messages += [backend(APP), target(APP, upstream_port)]
        backends = [(APP, 1)]
    else:
        messages += mcp_backend(mcp_port, mcp_targets)
        backends = [(MCP, 1)]
    messages.append(route(RULE, backends=backends, listeners=[m.name for m in listener_messages]))
    messages += policies
    kinds = {pb.Listener: LISTENER, pb.Backend: BACKEND, pb.Target: TARGET, pb.Route: ROUTE, pb.Policy: POLICY}
    resources: dict[str, dict[str, Any]] = {kind: {} for kind in kinds.values()}
    for message in messages:
        resources[kinds[type(message)]][message.name] = message
    return compile_config(resources, version=version)


def token(key: SigningKey = KEY, **overrides: Any) -> bytes:
    return sign(key, claims(**overrides))


def bearer(value: bytes) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + value)


def request(
    port: int, *headers: tuple[bytes, bytes], method: bytes = b"GET", target_: bytes = b"/", host: bytes = b"gw.test"
) -> ProxyRequest:
    return ProxyRequest(
        method, target_, host, b"http", list(headers), None, None, b"10.1.2.3", ("127.0.0.1", port), port, b"1.1"
    )


def header(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def chain(table: PolicyTable, backend_name: str = APP, listener_name: str = LISTENER_NAME) -> RequestPolicy:
    found = table.for_request(listener_name, RULE, backend_name)
    assert found is not None
    return found


async def admitted(policy_: RequestPolicy, req: ProxyRequest) -> Admitted:
    outcome = await policy_.evaluate(req)
    assert isinstance(outcome, Admitted), outcome
    return outcome


async def refused(policy_: RequestPolicy, req: ProxyRequest) -> Refused:
    outcome = await policy_.evaluate(req)
    assert isinstance(outcome, Refused), outcome
    return outcome


PORT = 18080


# --- authentication and identity headers ----------------------------------------------------------


async def test_a_good_jwt_is_admitted_with_identity_headers_set_and_spoofed_copies_stripped() -> None:
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication())))
    req = request(PORT, bearer(token(sub="alice")), (b"x-agent-identity", b"mallory"), (b"accept", b"*/*"))
    outcome = await admitted(chain(table), req)
    assert isinstance(outcome.identity, Identity) and outcome.identity.principal == "alice"
    assert header(outcome.headers, b"x-agent-identity") == [b"alice"]
    assert header(outcome.headers, b"authorization") == []  # not forwarded by default
    assert header(outcome.headers, b"accept") == [b"*/*"]


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        (token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), "token_expired"),
        (token(aud="someone-else"), "audience_mismatch"),
        (raw_token({"alg": "none", "typ": "JWT"}, claims()), "alg_not_allowed"),
        (token(ec_key("unknown-kid")), "kid_unknown"),
        (b"not.a.token", "token_malformed"),
        (b"x" * 9000, "credential_too_large"),
    ],
)
async def test_bad_tokens_get_401_with_a_challenge_never_500(credential: bytes, reason: str) -> None:
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication())))
    outcome = await refused(chain(table), request(PORT, bearer(credential)))
    assert (outcome.status, outcome.reason) == (401, reason)
    [challenge] = header(outcome.headers, b"www-authenticate")
    assert challenge.startswith(b'Bearer realm="agentgate"') and b'error="invalid_token"' in challenge


async def test_a_missing_credential_is_401_in_strict_mode_and_anonymous_in_optional_mode() -> None:
    strict = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication())))
    assert (await refused(chain(strict), request(PORT))).reason == "credential_missing"
    optional = jwt_authentication(mode=pb.Authentication.MODE_OPTIONAL)
    table = WorkerPolicies().compile(build(PORT, policy(authentication=optional)))
    outcome = await admitted(chain(table), request(PORT, (b"x-agent-identity", b"mallory")))
    assert outcome.identity is None and header(outcome.headers, b"x-agent-identity") == []


async def test_an_unknown_kid_asks_the_control_plane_seam_for_one_jwks_refresh() -> None:
    asked: list[str] = []
    policies = WorkerPolicies(on_jwks_refresh=asked.append)
    table = policies.compile(build(PORT, policy(authentication=jwt_authentication(KEY, jwks_url=JWKS_URL))))
    stranger = ec_key("rotated-in")
    for _ in range(3):
        assert (await refused(chain(table), request(PORT, bearer(token(stranger))))).status == 401
    assert asked == [JWKS_URL]  # throttled per worker


async def test_keys_not_fetched_yet_refuse_with_401_and_ask_for_a_refresh() -> None:
    asked: list[str] = []
    table = WorkerPolicies(on_jwks_refresh=asked.append).compile(
        build(PORT, policy(authentication=jwt_authentication(jwks_url=JWKS_URL)))
    )
    assert table.problems == ()
    assert (await refused(chain(table), request(PORT, bearer(token())))).reason == "kid_unknown"
    assert asked == [JWKS_URL]


# --- authorization --------------------------------------------------------------------------------


async def test_cel_rules_read_claims_headers_and_source_and_a_deny_is_403_with_insufficient_scope() -> None:
    authz = pb.Authorization(allow=["jwt.tenant == request.headers['x-tenant']"], deny=["source.address == '10.9.9.9'"])
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication(), authorization=authz)))
    good = bearer(token(tenant="acme"))
    await admitted(chain(table), request(PORT, good, (b"x-tenant", b"acme")))
    outcome = await refused(chain(table), request(PORT, good, (b"x-tenant", b"other")))
    assert (outcome.status, outcome.reason) == (403, "authorization_denied")
    assert b'error="insufficient_scope"' in header(outcome.headers, b"www-authenticate")[0]


async def test_rules_see_the_verified_identity_header_not_the_spoofed_one() -> None:
    authz = pb.Authorization(allow=["request.headers['x-agent-identity'] == 'admin'"])
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication(), authorization=authz)))
    spoofed = request(PORT, bearer(token(sub="alice")), (b"x-agent-identity", b"admin"))
    assert (await refused(chain(table), spoofed)).status == 403
    await admitted(chain(table), request(PORT, bearer(token(sub="admin"))))


async def test_claims_the_engine_cannot_take_are_a_deny_not_an_error() -> None:
    authz = pb.Authorization(allow=["jwt.tenant == 'acme'"])
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication(), authorization=authz)))
    lone_surrogate = token(tenant="\ud800")  # valid JSON, signed, but no string the engine can hold
    outcome = await refused(chain(table), request(PORT, bearer(lone_surrogate)))
    assert (outcome.status, outcome.reason) == (403, "authorization_denied")
    await admitted(chain(table), request(PORT, bearer(token(tenant="acme"))))  # the shared context recovers


async def test_a_rule_set_without_authentication_denies_with_a_plain_403() -> None:
    table = WorkerPolicies().compile(build(PORT, policy(authorization=pb.Authorization(require=["false"]))))
    outcome = await refused(chain(table), request(PORT))
    assert outcome.status == 403 and outcome.headers == []


# --- fail closed ----------------------------------------------------------------------------------


async def test_a_policy_refused_by_the_control_plane_fails_closed_with_500() -> None:
    broken = pb.Policy(
        name="default/broken",
        targets=[pb.PolicyTargetRef(kind=Kind_.KIND_ROUTE_RULE, name=RULE)],
        invalid_reason="authentication.jwt_providers[0].jwks: Secret not found",
    )
    table = WorkerPolicies().compile(build(PORT, broken))
    outcome = await refused(chain(table), request(PORT, bearer(token())))
    assert (outcome.status, outcome.reason) == (500, "policy_invalid") and "default/broken" in outcome.message


async def test_a_section_the_cores_refuse_fails_closed_and_is_listed_for_a_nack() -> None:
    budget = pb.TokenBudget(name="tiny", tokens=10, window=seconds(0.5))  # under a second: refused by budget.py
    config = build(PORT, policy(token_budgets=pb.TokenBudgets(budgets=[budget])))
    table = WorkerPolicies().compile(config)
    [problem] = table.problems
    assert (problem.name, problem.field) == ("default/p", "token_budgets.budgets[0].period")
    assert (await refused(chain(table), request(PORT))).status == 500
    with pytest.raises(ConfigRejected, match=r"token_budgets\.budgets\[0\]"):
        ProxyHandler(UpstreamPools()).prepare(config)


# --- limits and budgets ---------------------------------------------------------------------------


async def test_a_local_limit_keyed_by_principal_answers_429_with_retry_after_and_quota_headers() -> None:
    limits = pb.RateLimits(limits=[rate_limit(capacity=2)])
    table = WorkerPolicies().compile(build(PORT, policy(authentication=jwt_authentication(), rate_limits=limits)))
    alice, bob = bearer(token(sub="alice")), bearer(token(sub="bob"))
    first = await admitted(chain(table), request(PORT, alice))
    assert header(first.response_headers, b"x-ratelimit-limit") == [b"2"]
    assert header(first.response_headers, b"x-ratelimit-remaining") == [b"1"]
    await admitted(chain(table), request(PORT, alice))
    outcome = await refused(chain(table), request(PORT, alice))
    assert (outcome.status, outcome.reason) == (429, "rate_limited")
    assert int(header(outcome.headers, b"retry-after")[0]) >= 1
    assert header(outcome.headers, b"x-ratelimit-remaining") == [b"0"]
    await admitted(chain(table), request(PORT, bob))  # another key, another bucket


async def test_a_token_budget_is_checked_before_and_charged_after() -> None:
    budget = pb.TokenBudget(name="daily", tokens=1000, key="jwt.sub", period=pb.TokenBudget.PERIOD_DAY)
    sections = {"authentication": jwt_authentication(), "token_budgets": pb.TokenBudgets(budgets=[budget])}
    table = WorkerPolicies().compile(build(PORT, policy(**sections)))
    alice = bearer(token(sub="alice"))
    outcome = await admitted(chain(table), request(PORT, alice))
    await outcome.charge(1200)  # the real usage, after the response: may overshoot
    spent = await refused(chain(table), request(PORT, alice))
    assert (spent.status, spent.reason) == (429, "budget_exhausted")
    assert int(header(spent.headers, b"retry-after")[0]) >= 1
    await admitted(chain(table), request(PORT, bearer(token(sub="bob"))))


# --- compiled once, kept across updates -----------------------------------------------------------


async def test_sections_compile_once_and_unchanged_ones_survive_an_unrelated_update() -> None:
    policies = WorkerPolicies()
    limits = pb.RateLimits(limits=[rate_limit(capacity=2)])
    first = policies.compile(build(PORT, policy(authentication=jwt_authentication(), rate_limits=limits)))
    alice = bearer(token(sub="alice"))
    await admitted(chain(first), request(PORT, alice))
    await admitted(chain(first), request(PORT, alice))
    limiter = chain(first).limits[0].limiter
    # The same Policy recompiled (a new snapshot version) beside an unrelated one.
    other = policy("default/other", on=[pb.PolicyTargetRef(kind=Kind_.KIND_BACKEND, name="default/nothing")])
    second = policies.compile(
        build(PORT, policy(authentication=jwt_authentication(), rate_limits=limits), other, version="v2")
    )
    assert second is not first
    assert chain(second).authenticator is chain(first).authenticator  # verified-token cache kept
    assert chain(second).limits[0].limiter is limiter
    assert (await refused(chain(second), request(PORT, alice))).status == 429  # the bucket remembers


async def test_a_changed_section_is_recompiled() -> None:
    policies = WorkerPolicies()
    first = policies.compile(build(PORT, policy(rate_limits=pb.RateLimits(limits=[rate_limit(capacity=2)]))))
    second = policies.compile(build(PORT, policy(rate_limits=pb.RateLimits(limits=[rate_limit(capacity=3)]))))
    assert chain(second).limits[0].limiter is not chain(first).limits[0].limiter


# --- listeners sharing a port ---------------------------------------------------------------------


async def test_listeners_on_one_port_are_told_apart_by_host() -> None:
    secured = listener(PORT, name="secured", hostname="api.example.com")
    public = listener(PORT, name="public", hostname="*.example.org")
    catch_all = listener(PORT, name="other")
    on = {m.name: [pb.PolicyTargetRef(kind=Kind_.KIND_LISTENER, name=m.name)] for m in (secured, public)}
    config = build(
        PORT,
        policy("default/secured", on=on[secured.name], authentication=jwt_authentication()),
        policy("default/public", on=on[public.name], rate_limits=pb.RateLimits(limits=[rate_limit(key="")])),
        listeners=[secured, public, catch_all],
    )
    table = WorkerPolicies().compile(config)
    via_secured = table.lookup(request(PORT, host=b"API.example.com:8080"), RULE, APP)
    assert via_secured is not None and via_secured.policies == ("default/secured",)
    via_public = table.lookup(request(PORT, host=b"www.example.org."), RULE, APP)
    assert via_public is not None and via_public.policies == ("default/public",)
    assert table.lookup(request(PORT, host=b"elsewhere.test"), RULE, APP) is None


# --- MCP ------------------------------------------------------------------------------------------


SEED_RULE = "jwt.tenant == request.headers['x-tenant'] && mcp.tool.name in ['add', 'search']"


def federation(config: RuntimeConfig) -> McpFederation:
    settings = config.backends[MCP].mcp
    assert settings is not None
    return McpFederation(FederationConfig.from_settings(settings))


async def test_mcp_rules_go_to_visibility_and_use_the_current_requests_variables() -> None:
    config = build(
        PORT,
        policy(authentication=jwt_authentication(), authorization=pb.Authorization(allow=[SEED_RULE])),
        mcp_port=9,
    )
    policy_ = chain(WorkerPolicies().compile(config), MCP)
    assert policy_.rules is None and policy_.mcp is not None  # not an HTTP-level rule set
    acme = bearer(token(tenant="acme"))
    session = federation(config)
    first = await admitted(policy_, request(PORT, acme, (b"x-tenant", b"acme"), method=b"POST"))
    assert isinstance(first.mcp, McpCaller)
    first.mcp.attach(session)
    visible = session.visibility
    assert visible(Kind.TOOL, "web", "add") and visible(Kind.TOOL, "docs", "search")
    assert not visible(Kind.TOOL, "web", "delete")
    # The next request of the session names another tenant: the same visibility, updated.
    second = await admitted(policy_, request(PORT, acme, (b"x-tenant", b"globex"), method=b"POST"))
    assert second.mcp is not None
    second.mcp.attach(session)
    assert session.visibility is visible and not visible(Kind.TOOL, "web", "add")


async def test_a_per_principal_allow_list_of_tools() -> None:
    allowed = "mcp.tool.name in {'alice': ['add'], 'bob': ['add', 'delete']}[source.identity]"
    config = build(
        PORT, policy(authentication=jwt_authentication(), authorization=pb.Authorization(allow=[allowed])), mcp_port=9
    )
    policy_ = chain(WorkerPolicies().compile(config), MCP)
    for principal, tools in (("alice", {"add"}), ("bob", {"add", "delete"}), ("carol", set())):
        outcome = await admitted(policy_, request(PORT, bearer(token(sub=principal)), method=b"POST"))
        assert outcome.mcp is not None
        visibility = outcome.mcp.visibility()
        assert {tool for tool in ("add", "delete") if visibility(Kind.TOOL, "web", tool)} == tools


async def test_mcp_limits_count_item_uses_keyed_by_tool_and_skip_other_messages() -> None:
    limits = pb.RateLimits(limits=[rate_limit("per-tool", 1, key="mcp.tool.name")])
    config = build(PORT, policy(rate_limits=limits), mcp_port=9)
    policy_ = chain(WorkerPolicies().compile(config), MCP)
    assert policy_.limits == () and policy_.mcp is not None
    caller = (await admitted(policy_, request(PORT, method=b"POST"))).mcp
    assert caller is not None
    assert await caller.admit("tools/list", "", "", None) is None
    assert await caller.admit("tools/call", "web", "add", {"a": 1}) is None
    assert await caller.admit("tools/call", "web", "search", {}) is None
    refusal = await caller.admit("tools/call", "web", "add", {"a": 2})
    assert refusal is not None and refusal.status == 429 and refusal.retry_after > 0
    assert header(refusal.headers, b"x-ratelimit-limit") == [b"1"]


async def test_without_mcp_rules_a_session_sees_everything_again() -> None:
    config = build(PORT, policy(rate_limits=pb.RateLimits(limits=[rate_limit(key="mcp.tool.name")])), mcp_port=9)
    caller = (await admitted(chain(WorkerPolicies().compile(config), MCP), request(PORT))).mcp
    assert caller is not None
    session = federation(config)
    session.visibility = lambda kind, target, name: False
    caller.attach(session)
    assert session.visibility is allow_all


async def test_rules_on_a_protocol_variable_wait_for_its_handler_on_other_backends_too() -> None:
    # On an HTTP backend an mcp rule is an HTTP rule: with mcp empty it denies (fail closed).
    config = build(PORT, policy(authorization=pb.Authorization(allow=["mcp.tool.name == 'add'"])))
    assert (await refused(chain(WorkerPolicies().compile(config)), request(PORT))).status == 403
    # Deferred rules (A2A-ready): the protocol handler fills its variable and asks, per message.
    deferred = RuleSet.compile("default/p", allow=["a2a.operation == 'SendMessage' && source.identity == 'alice'"])
    activation = {"source": source_variables(b"10.0.0.1", Identity("alice", "jwt"))}
    outcome = Admitted(None, activation, [], [], None, deferred, None)
    assert outcome.authorize("a2a", a2a_variables("message/send")).allowed
    assert not outcome.authorize("a2a", a2a_variables("tasks/cancel")).allowed


# --- RFC 9728 -------------------------------------------------------------------------------------


async def test_protected_resource_metadata_is_served_and_named_in_the_challenge() -> None:
    resource = f"http://127.0.0.1:{PORT}/mcp"
    config = build(PORT, policy(authentication=jwt_authentication(resource=resource)), mcp_port=9)
    table = WorkerPolicies().compile(config)
    document = table.document(("127.0.0.1", PORT), "/.well-known/oauth-protected-resource/mcp")
    assert document is not None
    assert json.loads(document.body) == {
        "resource": resource,
        "authorization_servers": [ISSUER],
        "bearer_methods_supported": ["header"],
    }
    outcome = await refused(chain(table, MCP), request(PORT, method=b"POST"))
    metadata = f'resource_metadata="http://127.0.0.1:{PORT}/.well-known/oauth-protected-resource/mcp"'
    assert metadata.encode() in header(outcome.headers, b"www-authenticate")[0]
