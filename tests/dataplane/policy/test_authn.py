"""The authenticator as the proxy sees it: request headers in; identity, anonymity or a refusal
(401/403 with WWW-Authenticate) out; identity headers stripped and set; credentials not forwarded."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from dataplane.policy.authn import (
    Anonymous,
    AuthnConfigError,
    AuthnSpec,
    BackendCredential,
    BackendCredentialSpec,
    IdentityHeaderSpec,
    Refusal,
    compile_authn,
)
from dataplane.policy.credentials import ApiKeyEntry, ApiKeySpec, BasicAuthSpec, BasicUser, hash_api_key, hash_password
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import JwksRefreshGate
from dataplane.policy.protected_resource import (
    ProtectedResourceSpec,
    compile_protected_resource,
    well_known_path,
)
from tests.dataplane.policy.test_jwt import (
    b64,
    claims,
    cluster,
    ec_key,
    hmac_confusion_token,
    provider,
    raw_token,
    rsa_key,
    service_account_claims,
    sign,
)

pytestmark = pytest.mark.anyio

KEY = ec_key("gw-key")
METADATA = "https://gw.example.com/.well-known/oauth-protected-resource/mcp"


def spec(**overrides: Any) -> AuthnSpec:
    values: dict[str, Any] = {
        "jwt_providers": (provider(KEY),),
        "realm": "agentgate",
        "identity_headers": (
            IdentityHeaderSpec("x-agent-identity", "principal"),
            IdentityHeaderSpec("x-tenant", "claim:tenant"),
        ),
    }
    values.update(overrides)
    return AuthnSpec(**values)


def bearer(token: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"gw"), (b"authorization", b"Bearer " + token), *extra]


async def test_valid_token_yields_identity() -> None:
    outcome = await compile_authn(spec()).authenticate(bearer(sign(KEY, claims(tenant="acme"))))
    assert isinstance(outcome, Identity)
    assert outcome.principal == "alice" and outcome.claims["tenant"] == "acme"


async def test_scheme_name_is_case_insensitive() -> None:
    headers = [(b"authorization", b"bEaReR " + sign(KEY, claims()))]
    assert isinstance(await compile_authn(spec()).authenticate(headers), Identity)


async def test_strict_without_credential_is_401_with_a_bare_challenge() -> None:
    outcome = await compile_authn(spec(resource_metadata_url=METADATA)).authenticate([(b"host", b"gw")])
    assert isinstance(outcome, Refusal)
    assert outcome.status == 401 and outcome.reason == "credential_missing"
    # RFC 6750 3.1: no error code when the request carried no credential; RFC 9728 5.1 for MCP.
    assert outcome.www_authenticate == f'Bearer realm="agentgate", resource_metadata="{METADATA}"'
    assert outcome.headers() == [(b"www-authenticate", outcome.www_authenticate.encode())]


async def test_optional_mode() -> None:
    authenticator = compile_authn(spec(mode="optional"))
    assert await authenticator.authenticate([]) == Anonymous()
    outcome = await authenticator.authenticate(bearer(sign(KEY, claims(exp=int(time.time()) - 3600))))
    assert isinstance(outcome, Refusal) and outcome.status == 401


async def test_permissive_mode_turns_bad_tokens_into_anonymous_with_the_reason() -> None:
    authenticator = compile_authn(spec(mode="permissive"))
    assert await authenticator.authenticate([]) == Anonymous()
    outcome = await authenticator.authenticate(bearer(sign(KEY, claims(iss="https://evil"))))
    assert outcome == Anonymous("issuer_unknown")
    assert isinstance(await authenticator.authenticate(bearer(sign(KEY, claims()))), Identity)


def _refusal_cases() -> list[tuple[str, bytes, str]]:
    now = int(time.time())
    rsa_signing = rsa_key("gw-rsa")
    return [
        ("expired", sign(KEY, claims(exp=now - 3600)), "token_expired"),
        ("not yet valid", sign(KEY, claims(nbf=now + 3600)), "token_not_yet_valid"),
        ("wrong issuer", sign(KEY, claims(iss="https://evil")), "issuer_unknown"),
        ("wrong audience", sign(KEY, claims(aud="other")), "audience_mismatch"),
        ("alg none", raw_token({"alg": "none", "kid": KEY.kid}, claims()), "alg_not_allowed"),
        ("hs256 confusion", hmac_confusion_token(rsa_signing), "alg_not_allowed"),
        ("unknown kid", sign(ec_key("rotated"), claims()), "kid_unknown"),
        ("oversized", sign(KEY, claims(blob="x" * 9000)), "credential_too_large"),
        ("bad base64", b"%%%." + b64(b"{}") + b".sig", "token_malformed"),
        ("bad json", b64(b'{"alg":') + b"." + b64(b"{}") + b".", "token_malformed"),
        ("dots missing", b"eyJhbGciOiJFUzI1NiJ9", "token_malformed"),
        ("missing claim", sign(KEY, claims(exp=None)), "claim_missing"),
        ("bad signature", sign(KEY, claims())[:-4] + b"AAAA", "signature_invalid"),
    ]


@pytest.mark.parametrize(("case", "token", "reason"), _refusal_cases(), ids=[case[0] for case in _refusal_cases()])
async def test_every_bad_token_is_a_clear_401(case: str, token: bytes, reason: str) -> None:
    authenticator = compile_authn(
        spec(resource_metadata_url=METADATA, jwt_providers=(provider(KEY, rsa_key("gw-rsa")),))
    )
    outcome = await authenticator.authenticate(bearer(token))
    assert isinstance(outcome, Refusal), case
    assert (outcome.status, outcome.reason) == (401, reason)
    challenge = outcome.www_authenticate
    assert challenge.startswith('Bearer realm="agentgate", ')
    assert f'resource_metadata="{METADATA}"' in challenge
    assert 'error="invalid_token"' in challenge
    assert f'error_description="{outcome.description}"' in challenge
    assert outcome.description and '"' not in outcome.description


async def test_two_authorization_headers_are_refused() -> None:
    token = sign(KEY, claims())
    outcome = await compile_authn(spec()).authenticate(bearer(token, (b"authorization", b"Bearer " + token)))
    assert isinstance(outcome, Refusal)
    assert outcome.status == 401 and 'error="invalid_request"' in outcome.www_authenticate


async def test_unknown_kid_reaches_the_refresh_gate_once() -> None:
    asked: list[str] = []
    gate = JwksRefreshGate(asked.append)
    url = "https://issuer.test/jwks"
    authenticator = compile_authn(spec(jwt_providers=(provider(KEY, jwks_url=url),)), refresh_gate=gate)
    for _ in range(20):
        outcome = await authenticator.authenticate(bearer(sign(ec_key("next"), claims())))
        assert isinstance(outcome, Refusal) and outcome.reason == "kid_unknown"
    # A recompiled authenticator with the same gate does not ask again within the interval.
    again = compile_authn(spec(jwt_providers=(provider(KEY, jwks_url=url),)), refresh_gate=gate)
    await again.authenticate(bearer(sign(ec_key("next"), claims())))
    assert asked == [url]


async def test_forbidden_is_403_insufficient_scope() -> None:
    refusal = compile_authn(spec(resource_metadata_url=METADATA)).forbidden("tool_denied", scope="tools:call")
    assert refusal.status == 403
    assert 'error="insufficient_scope"' in refusal.www_authenticate
    assert 'scope="tools:call"' in refusal.www_authenticate and METADATA in refusal.www_authenticate


# ----------------------------------------------------------------------------------------- headers


async def test_spoofed_identity_headers_are_stripped_and_set_from_the_token() -> None:
    authenticator = compile_authn(spec())
    headers = bearer(
        sign(KEY, claims(sub="alice", tenant="acme")),
        (b"x-agent-identity", b"admin"),
        (b"x-tenant", b"evil-corp"),
        (b"x-other", b"kept"),
    )
    outcome = await authenticator.authenticate(headers)
    upstream = authenticator.strip_and_set_headers(headers, outcome)
    assert (b"x-agent-identity", b"admin") not in upstream and (b"x-tenant", b"evil-corp") not in upstream
    assert [value for name, value in upstream if name == b"x-agent-identity"] == [b"alice"]
    assert [value for name, value in upstream if name == b"x-tenant"] == [b"acme"]
    assert (b"x-other", b"kept") in upstream and (b"host", b"gw") in upstream
    assert all(name != b"authorization" for name, _ in upstream)  # not forwarded by default


async def test_anonymous_requests_lose_spoofed_identity_headers_too() -> None:
    authenticator = compile_authn(spec(mode="permissive"))
    headers = [(b"x-agent-identity", b"admin"), (b"authorization", b"Bearer garbage")]
    outcome = await authenticator.authenticate(headers)
    assert isinstance(outcome, Anonymous)
    assert authenticator.strip_and_set_headers(headers, outcome) == []


async def test_claim_values_that_could_split_headers_are_dropped() -> None:
    authenticator = compile_authn(spec())
    headers = bearer(sign(KEY, claims(tenant="acme\r\nx-admin: 1")))
    outcome = await authenticator.authenticate(headers)
    assert isinstance(outcome, Identity)
    upstream = authenticator.strip_and_set_headers(headers, outcome)
    assert all(name != b"x-tenant" for name, _ in upstream)
    assert all(b"\n" not in value for _, value in upstream)


async def test_pass_through_keeps_the_callers_authorization() -> None:
    authenticator = compile_authn(spec(pass_through_credentials=True))
    headers = bearer(sign(KEY, claims()))
    upstream = authenticator.strip_and_set_headers(headers, await authenticator.authenticate(headers))
    assert headers[1] in upstream


def test_backend_credential_replaces_any_authorization() -> None:
    inject = BackendCredential(BackendCredentialSpec("Authorization", "Bearer sk-backend"))
    assert inject.apply([(b"authorization", b"Bearer caller"), (b"x", b"1")]) == [
        (b"x", b"1"),
        (b"authorization", b"Bearer sk-backend"),
    ]
    with pytest.raises(AuthnConfigError) as caught:
        BackendCredential(BackendCredentialSpec("x-key", "a\r\nb"))
    assert caught.value.field == "backend_credential.value"


async def test_service_account_token_identity_and_headers() -> None:
    key = rsa_key("cluster-key")
    authenticator = compile_authn(
        spec(
            jwt_providers=(cluster(key),),
            identity_headers=(
                IdentityHeaderSpec("x-agent-identity", "principal"),
                IdentityHeaderSpec("x-agent-namespace", "namespace"),
                IdentityHeaderSpec("x-pod", "claim:kubernetes.io.pod.name"),
            ),
        )
    )
    headers = bearer(sign(key, service_account_claims(namespace="team-b", name="planner")))
    outcome = await authenticator.authenticate(headers)
    assert isinstance(outcome, Identity)
    assert (outcome.principal, outcome.namespace, outcome.service_account) == (
        "system:serviceaccount:team-b:planner",
        "team-b",
        "planner",
    )
    upstream = dict(authenticator.strip_and_set_headers(headers, outcome))
    assert upstream[b"x-agent-identity"] == b"system:serviceaccount:team-b:planner"
    assert upstream[b"x-agent-namespace"] == b"team-b"
    assert upstream[b"x-pod"] == b"agent-7d9"


# --------------------------------------------------------------------------------- API keys, basic


async def test_api_key_in_its_own_header() -> None:
    authenticator = compile_authn(
        spec(jwt_providers=(), api_keys=ApiKeySpec(keys=(ApiKeyEntry("ci-bot", hash_api_key("k-123")),)))
    )
    good = [(b"x-api-key", b"k-123")]
    outcome = await authenticator.authenticate(good)
    assert outcome == Identity(principal="ci-bot", method="apikey")
    assert authenticator.strip_and_set_headers(good, outcome) == [(b"x-agent-identity", b"ci-bot")]
    bad = await authenticator.authenticate([(b"x-api-key", b"k-124")])
    assert isinstance(bad, Refusal) and bad.status == 401 and bad.reason == "apikey_unknown"
    assert bad.www_authenticate == 'ApiKey realm="agentgate", header="x-api-key"'
    missing = await authenticator.authenticate([])
    assert isinstance(missing, Refusal) and missing.www_authenticate == bad.www_authenticate
    twice = await authenticator.authenticate([(b"x-api-key", b"k-123"), (b"x-api-key", b"k-123")])
    assert isinstance(twice, Refusal) and twice.reason == "credential_ambiguous"
    assert twice.www_authenticate == bad.www_authenticate


async def test_api_key_as_bearer_next_to_jwt() -> None:
    authenticator = compile_authn(
        spec(api_keys=ApiKeySpec(keys=(ApiKeyEntry("ci-bot", hash_api_key("k-123")),), header="authorization"))
    )
    assert (await authenticator.authenticate(bearer(b"k-123"))) == Identity(principal="ci-bot", method="apikey")
    assert isinstance(await authenticator.authenticate(bearer(sign(KEY, claims()))), Identity)
    bad = await authenticator.authenticate(bearer(b"k-999"))
    assert isinstance(bad, Refusal) and 'error="invalid_token"' in bad.www_authenticate


def basic(user: str, password: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]


async def test_basic_auth_good_bad_and_remembered() -> None:
    stored = hash_password("s3cret", log2_n=10)
    authenticator = compile_authn(spec(jwt_providers=(), basic=BasicAuthSpec(users=(BasicUser("ops", stored),))))
    outcome = await authenticator.authenticate(basic("ops", "s3cret"))
    assert outcome == Identity(principal="ops", method="basic")
    assert await authenticator.authenticate(basic("ops", "s3cret")) == outcome  # served from the remembered set
    for user, password in [("ops", "wrong"), ("nobody", "s3cret")]:
        refused = await authenticator.authenticate(basic(user, password))
        assert isinstance(refused, Refusal) and refused.status == 401
        assert refused.www_authenticate == 'Basic realm="agentgate", charset="UTF-8"'
    malformed = await authenticator.authenticate([(b"authorization", b"Basic !!!")])
    assert isinstance(malformed, Refusal) and malformed.reason == "basic_malformed"


async def test_bearer_and_basic_challenges_are_listed_when_nothing_is_presented() -> None:
    stored = hash_password("pw", log2_n=10)
    authenticator = compile_authn(spec(basic=BasicAuthSpec(users=(BasicUser("ops", stored),))))
    outcome = await authenticator.authenticate([(b"authorization", b"Negotiate abc")])
    assert isinstance(outcome, Refusal)
    assert outcome.www_authenticate == 'Bearer realm="agentgate", Basic realm="agentgate", charset="UTF-8"'


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mode": "lenient"}, "mode"),
        ({"jwt_providers": ()}, "jwt_providers"),
        ({"realm": 'a"b'}, "realm"),
        ({"identity_headers": (IdentityHeaderSpec("authorization", "principal"),)}, "identity_headers[0].header"),
        ({"identity_headers": (IdentityHeaderSpec("x-id", "password"),)}, "identity_headers[0].value"),
        ({"identity_headers": (IdentityHeaderSpec("x-id", "claim:"),)}, "identity_headers[0].value"),
        (
            {"identity_headers": (IdentityHeaderSpec("x-a", "principal"), IdentityHeaderSpec("X-A", "issuer"))},
            "identity_headers[1].header",
        ),
        ({"resource_metadata_url": "/relative"}, "resource_metadata_url"),
        ({"max_credential_bytes": 10}, "max_credential_bytes"),
        ({"api_keys": ApiKeySpec(keys=(ApiKeyEntry("a", hash_api_key("k")),), header="host")}, "api_keys.header"),
        ({"jwt_providers": (provider(KEY, algorithms=("HS256",)),)}, "jwt_providers[0].algorithms"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(AuthnConfigError) as caught:
        compile_authn(spec(**overrides))
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ": ")


# ------------------------------------------------------------------------------ RFC 9728 metadata


def test_protected_resource_metadata_document() -> None:
    metadata = compile_protected_resource(
        ProtectedResourceSpec(
            resource="https://gw.example.com/mcp",
            authorization_servers=("https://issuer.test",),
            scopes_supported=("tools:call",),
            resource_name="Tools",
        )
    )
    assert metadata.path == "/.well-known/oauth-protected-resource/mcp"
    assert metadata.url == METADATA
    assert json.loads(metadata.body) == {
        "resource": "https://gw.example.com/mcp",
        "authorization_servers": ["https://issuer.test"],
        "scopes_supported": ["tools:call"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Tools",
    }
    assert (b"content-type", b"application/json") in metadata.headers
    assert (b"content-length", str(len(metadata.body)).encode()) in metadata.headers
    assert metadata.matches(b"GET", b"/.well-known/oauth-protected-resource/mcp?x=1")
    assert not metadata.matches(b"POST", b"/.well-known/oauth-protected-resource/mcp")
    assert not metadata.matches(b"GET", b"/.well-known/oauth-protected-resource")


def test_well_known_path_for_a_resource_at_the_root() -> None:
    assert well_known_path("https://gw.example.com/") == "/.well-known/oauth-protected-resource"
    assert well_known_path("https://gw.example.com") == "/.well-known/oauth-protected-resource"
    assert well_known_path("https://gw.example.com/a/b") == "/.well-known/oauth-protected-resource/a/b"


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        ("http://gw.example.com/mcp", "protected_resource.resource"),  # https only off loopback
        ("https://gw.example.com/mcp#frag", "protected_resource.resource"),
        ("https://gw.example.com/mcp?q=1", "protected_resource.resource"),
        ("gw.example.com/mcp", "protected_resource.resource"),
    ],
)
def test_protected_resource_config_errors(resource: str, field: str) -> None:
    with pytest.raises(AuthnConfigError) as caught:
        compile_protected_resource(ProtectedResourceSpec(resource=resource))
    assert caught.value.field == field
    assert compile_protected_resource(ProtectedResourceSpec(resource="http://127.0.0.1:8080/mcp")).url == (
        "http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp"
    )
