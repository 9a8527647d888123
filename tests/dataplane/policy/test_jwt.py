"""JWT and service-account token verification with real tokens signed by keys made here.

The helpers at the top (keys, JWKS, signing) are shared with test_authn.py and
tests/controlplane/test_jwks.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from dataplane.policy.credentials import AuthnConfigError, Rejection
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import VERIFIED_CACHE_SIZE, JwksRefreshGate, JwtProviderSpec, JwtVerifier, parse_jwks

ISSUER = "https://issuer.test"
AUDIENCE = "agentgate"
CLUSTER = "https://kubernetes.default.svc.cluster.local"


# ------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@cache
def _rsa(bits: int = 2048, seed: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_key(kid: str = "rsa-1", alg: str = "RS256", seed: int = 0) -> SigningKey:
    """RSA generation is slow, so a few keys are made once per session and reused by kid."""
    return SigningKey(kid, alg, _rsa(2048, seed))


def ec_key(kid: str = "ec-1", alg: str = "ES256") -> SigningKey:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
    return SigningKey(kid, alg, ec.generate_private_key(curve))


def ed_key(kid: str = "ed-1") -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.public_jwk for key in keys]}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(key: SigningKey, payload: dict[str, Any], **header: Any) -> bytes:
    """Sign any header and payload, even ones PyJWT would refuse to make (claims of the wrong type)."""
    headers = {"alg": key.alg, "typ": "JWT", "kid": key.kid, **header}
    signing_input = b64(json.dumps(headers).encode()) + b"." + b64(json.dumps(payload).encode())
    return signing_input + b"." + b64(get_default_algorithms()[key.alg].sign(signing_input, key.private))


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> bytes:
    return b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode()) + b"." + b64(signature)


def hmac_confusion_token(key: SigningKey) -> bytes:
    """The key-confusion attack: HS256 over the token, keyed with the RSA public key's PEM bytes."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(key.public_pem(), header + b"." + payload, hashlib.sha256).digest()
    return header + b"." + payload + b"." + b64(mac)


def provider(*keys: SigningKey, **overrides: Any) -> JwtProviderSpec:
    spec: dict[str, Any] = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "jwks_inline": json.dumps(jwks(*keys)),
    }
    spec.update(overrides)
    return JwtProviderSpec(**spec)


def rejected(result: Identity | Rejection, reason: str) -> bool:
    return isinstance(result, Rejection) and result.reason == reason


# ----------------------------------------------------------------------------------------- accepting


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
def test_rsa_algorithms_verify(alg: str) -> None:
    key = rsa_key(alg=alg)
    verifier = JwtVerifier((provider(key),))
    result = verifier.verify(sign(key, claims(tenant="acme")))
    assert isinstance(result, Identity)
    assert (result.principal, result.method, result.issuer) == ("alice", "jwt", ISSUER)
    assert result.claims["tenant"] == "acme"


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_ec_algorithms_verify_with_their_curve(alg: str) -> None:
    key = ec_key(alg=alg)
    result = JwtVerifier((provider(key),)).verify(sign(key, claims()))
    assert isinstance(result, Identity) and result.principal == "alice"


def test_eddsa_verifies() -> None:
    key = ed_key()
    result = JwtVerifier((provider(key),)).verify(sign(key, claims()))
    assert isinstance(result, Identity)


def test_audience_is_any_of_and_token_audience_may_be_a_list() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key, audiences=("other", AUDIENCE)),))
    assert isinstance(verifier.verify(sign(key, claims(aud=["x", AUDIENCE]))), Identity)
    assert rejected(verifier.verify(sign(key, claims(aud=["x", "y"]))), "audience_mismatch")


def test_token_without_kid_tries_the_keys_of_its_algorithm() -> None:
    first, second = ec_key("a"), ec_key("b")
    verifier = JwtVerifier((provider(first, second),))
    token = pyjwt.encode(claims(), second.private, algorithm="ES256").encode()
    assert isinstance(verifier.verify(token), Identity)


def test_provider_is_picked_by_issuer_before_verifying() -> None:
    one, two = ec_key("k"), ec_key("k")  # same kid in both sets: the issuer decides which applies
    verifier = JwtVerifier(
        (provider(one, name="one", issuer="https://one"), provider(two, name="two", issuer="https://two"))
    )
    assert isinstance(verifier.verify(sign(two, claims(iss="https://two"))), Identity)
    assert rejected(verifier.verify(sign(two, claims(iss="https://one"))), "signature_invalid")


def test_principal_claim_is_configurable() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key, principal_claim="email"),))
    result = verifier.verify(sign(key, claims(email="a@example.com")))
    assert isinstance(result, Identity) and result.principal == "a@example.com"
    assert rejected(verifier.verify(sign(key, claims())), "principal_missing")


def test_leeway_accepts_recent_expiry_and_refuses_past_it() -> None:
    key = ec_key()
    now = time.time()
    verifier = JwtVerifier((provider(key, leeway_seconds=60),), clock=lambda: now)
    assert isinstance(verifier.verify(sign(key, claims(exp=int(now) - 30))), Identity)
    assert rejected(verifier.verify(sign(key, claims(exp=int(now) - 61))), "token_expired")


def test_jwks_file_is_read_at_compile_time(tmp_path: Path) -> None:
    key = ec_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(key)))
    verifier = JwtVerifier((provider(key, jwks_inline=None, jwks_file=str(path)),))
    path.unlink()  # nothing is read per request
    assert isinstance(verifier.verify(sign(key, claims())), Identity)


# ------------------------------------------------------------------------------------------ refusing


def test_expired_token_is_refused() -> None:
    key = rsa_key()
    result = JwtVerifier((provider(key),)).verify(sign(key, claims(exp=int(time.time()) - 3600)))
    assert rejected(result, "token_expired")
    assert isinstance(result, Rejection) and result.description == "The access token expired"


def test_not_yet_valid_token_is_refused() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    assert rejected(verifier.verify(sign(key, claims(nbf=int(time.time()) + 3600))), "token_not_yet_valid")
    assert rejected(verifier.verify(sign(key, claims(iat=int(time.time()) + 3600))), "token_issued_in_future")


def test_wrong_issuer_is_refused() -> None:
    key = ec_key()
    assert rejected(JwtVerifier((provider(key),)).verify(sign(key, claims(iss="https://evil"))), "issuer_unknown")


def test_issuer_of_the_wrong_type_is_refused_not_crashed() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    assert rejected(verifier.verify(sign(key, claims(iss=["https://issuer.test"]))), "issuer_unknown")
    assert rejected(verifier.verify(sign(key, claims(), kid={"x": 1})), "token_malformed")


def test_wrong_or_missing_audience_is_refused() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    assert rejected(verifier.verify(sign(key, claims(aud="someone-else"))), "audience_mismatch")
    assert rejected(verifier.verify(sign(key, claims(aud=None))), "audience_mismatch")


def test_alg_none_is_refused() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    for alg in ("none", "None", "NONE"):
        assert rejected(verifier.verify(raw_token({"alg": alg, "kid": key.kid}, claims())), "alg_not_allowed")


def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    key = rsa_key()
    assert rejected(JwtVerifier((provider(key),)).verify(hmac_confusion_token(key)), "alg_not_allowed")


def test_alg_must_match_the_keys_type_and_curve() -> None:
    rsa_signing, es384 = rsa_key(), ec_key("ec-384", "ES384")
    verifier = JwtVerifier((provider(rsa_signing, es384),))
    # An ES256 token naming the RSA key's kid, and an ES256 token naming a P-384 key.
    assert rejected(verifier.verify(sign(ec_key(rsa_signing.kid), claims())), "key_mismatch")
    assert rejected(verifier.verify(sign(ec_key(es384.kid), claims())), "key_mismatch")


def test_algorithm_outside_the_providers_list_is_refused() -> None:
    key = rsa_key(alg="RS256")
    verifier = JwtVerifier((provider(key, algorithms=("PS256",)),))
    assert rejected(verifier.verify(sign(key, claims())), "alg_not_allowed")


def test_embedded_jwk_header_is_never_trusted() -> None:
    real, attacker = ec_key("real"), ec_key("real")
    token = sign(attacker, claims(), jwk=attacker.public_jwk)
    assert rejected(JwtVerifier((provider(real),)).verify(token), "signature_invalid")


def test_critical_header_is_refused() -> None:
    key = ec_key()
    token = sign(key, claims(), crit=["exp"])
    assert rejected(JwtVerifier((provider(key),)).verify(token), "crit_unsupported")


def test_tampered_payload_fails_the_signature() -> None:
    key = rsa_key()
    header, _, signature = sign(key, claims()).split(b".")
    forged = header + b"." + b64(json.dumps(claims(sub="root")).encode()) + b"." + signature
    assert rejected(JwtVerifier((provider(key),)).verify(forged), "signature_invalid")


def test_unknown_kid_asks_for_one_refresh_per_interval() -> None:
    key = ec_key("old")
    asked: list[str] = []
    now = [1000.0]
    gate = JwksRefreshGate(asked.append, min_interval=30.0, clock=lambda: now[0])
    url = "https://issuer.test/jwks"
    verifier = JwtVerifier((provider(key, jwks_url=url),), refresh_gate=gate)
    rotated = ec_key("new")
    for _ in range(100):
        assert rejected(verifier.verify(sign(rotated, claims())), "kid_unknown")
    assert asked == [url]
    now[0] += 31
    assert rejected(verifier.verify(sign(rotated, claims())), "kid_unknown")
    assert asked == [url, url]


def test_unknown_kid_without_a_url_asks_nothing() -> None:
    asked: list[str] = []
    key = ec_key("old")
    verifier = JwtVerifier((provider(key),), refresh_gate=JwksRefreshGate(asked.append))
    assert rejected(verifier.verify(sign(ec_key("new"), claims())), "kid_unknown")
    assert asked == []


def test_url_provider_with_no_keys_yet_refuses_and_asks_for_keys() -> None:
    asked: list[str] = []
    spec = provider(jwks_inline='{"keys":[]}', jwks_url="https://issuer.test/jwks")
    verifier = JwtVerifier((spec,), refresh_gate=JwksRefreshGate(asked.append))
    token = pyjwt.encode(claims(), ec_key().private, algorithm="ES256").encode()  # no kid
    assert rejected(verifier.verify(token), "kid_unknown")
    assert asked == ["https://issuer.test/jwks"]


def test_oversized_token_is_refused_before_parsing() -> None:
    key = ec_key()
    token = sign(key, claims(padding="x" * 9000))
    assert rejected(JwtVerifier((provider(key),)).verify(token), "token_too_large")
    assert isinstance(JwtVerifier((provider(key),), max_token_bytes=16384).verify(token), Identity)


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"abc",
        b"abc.def",  # two dots missing / one missing
        b"a.b.c.d",
        b"!!!.@@@.###",  # not base64url
        b"eyJhbGciOiJFUzI1NiJ9.e30",
        b64(b"not json") + b"." + b64(b"{}") + b".",
        b64(b'{"alg":"ES256"}') + b"." + b64(b"[1,2]") + b".",  # payload not an object
        b64(b'{"alg":"ES256"}') + b"." + b64(b"\xff\xfe") + b".",  # not UTF-8
        b64(b'{"alg":"ES256"}') + b"." + b64(b"[" * 2500 + b"]" * 2500) + b".",  # nesting bomb
        b64(b'{"alg":"ES256"}') + b"." + b64(b'{"exp": NaN}') + b".",
        b64(b'{"alg":"ES256"}') + b"=." + b64(b"{}") + b".",  # padding is not base64url
        b"a" + b64(b'{"alg":"ES256"}') + b"." + b64(b"{}") + b".",  # length 4n+1
    ],
)
def test_malformed_tokens_are_refused(token: bytes) -> None:
    assert rejected(JwtVerifier((provider(ec_key()),)).verify(token), "token_malformed")


def test_claims_of_the_wrong_type_are_refused() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    assert rejected(verifier.verify(sign(key, claims(exp="tomorrow"))), "claim_invalid")
    assert rejected(verifier.verify(sign(key, claims(exp=True))), "claim_invalid")
    assert rejected(verifier.verify(sign(key, claims(nbf=[1]))), "claim_invalid")


def test_missing_required_claim_and_missing_expiry_are_refused() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key, required_claims=("tenant",)),))
    result = verifier.verify(sign(key, claims()))
    assert rejected(result, "claim_missing")
    assert isinstance(result, Rejection) and "'tenant'" in result.description
    assert rejected(verifier.verify(sign(key, claims(tenant="a", exp=None))), "claim_missing")
    relaxed = JwtVerifier((provider(key, require_expiry=False),))
    assert isinstance(relaxed.verify(sign(key, claims(exp=None))), Identity)


def test_random_garbage_never_raises() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    good = sign(key, claims())
    rng = random.Random(4)
    for _ in range(2000):
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        assert isinstance(verifier.verify(bytes(mutated)), Identity | Rejection)
    for _ in range(200):
        assert isinstance(verifier.verify(os.urandom(rng.randint(0, 300))), Rejection)


# ---------------------------------------------------------------------------------- service accounts


def service_account_claims(namespace: str = "team-a", name: str = "agent", **overrides: Any) -> dict[str, Any]:
    payload = claims(iss=CLUSTER, aud=["https://agentgate.test"], sub=f"system:serviceaccount:{namespace}:{name}")
    payload["kubernetes.io"] = {
        "namespace": namespace,
        "serviceaccount": {"name": name, "uid": "5f0e"},
        "pod": {"name": "agent-7d9", "uid": "a1b2"},
    }
    payload.update(overrides)
    return payload


def cluster(key: SigningKey) -> JwtProviderSpec:
    return provider(key, name="cluster", issuer=CLUSTER, audiences=("https://agentgate.test",), kind="kubernetes")


def test_service_account_token_yields_namespace_and_account() -> None:
    key = rsa_key("cluster-key")
    result = JwtVerifier((cluster(key),)).verify(sign(key, service_account_claims()))
    assert isinstance(result, Identity)
    assert result.principal == "system:serviceaccount:team-a:agent"
    assert (result.method, result.namespace, result.service_account) == ("serviceaccount", "team-a", "agent")
    assert result.claims["kubernetes.io"]["pod"]["name"] == "agent-7d9"


def test_service_account_from_sub_alone() -> None:
    key = ec_key()
    payload = claims(iss=CLUSTER, aud="https://agentgate.test", sub="system:serviceaccount:ns1:sa1")
    result = JwtVerifier((cluster(key),)).verify(sign(key, payload))
    assert isinstance(result, Identity) and (result.namespace, result.service_account) == ("ns1", "sa1")


def test_service_account_token_for_another_audience_is_refused() -> None:
    key = ec_key()
    payload = service_account_claims(aud=["https://kubernetes.default.svc"])
    assert rejected(JwtVerifier((cluster(key),)).verify(sign(key, payload)), "audience_mismatch")


def test_service_account_claims_that_disagree_are_refused() -> None:
    key = ec_key()
    payload = service_account_claims(sub="system:serviceaccount:kube-system:admin")
    assert rejected(JwtVerifier((cluster(key),)).verify(sign(key, payload)), "serviceaccount_invalid")
    assert rejected(
        JwtVerifier((cluster(key),)).verify(sign(key, claims(iss=CLUSTER, aud="https://agentgate.test"))),
        "serviceaccount_invalid",
    )


# ---------------------------------------------------------------------------------------- config


def test_kubernetes_provider_requires_an_audience() -> None:
    with pytest.raises(AuthnConfigError) as caught:
        JwtVerifier((provider(ec_key(), kind="kubernetes", audiences=()),))
    assert caught.value.field == "jwt_providers[0].audiences"


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_config_refuses_unsigned_and_hmac_algorithms(alg: str) -> None:
    with pytest.raises(AuthnConfigError, match="refused") as caught:
        JwtVerifier((provider(ec_key(), algorithms=(alg,)),))
    assert caught.value.field == "jwt_providers[0].algorithms"


def test_config_refuses_private_keys_small_rsa_and_bad_json() -> None:
    key = ec_key()
    private = {**key.public_jwk, "d": "AAAA"}
    with pytest.raises(AuthnConfigError, match="private") as caught:
        parse_jwks({"keys": [private]})
    assert caught.value.field == "jwks.keys[0]"
    small = SigningKey("small", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(AuthnConfigError, match="2048"):
        parse_jwks(jwks(small))
    with pytest.raises(AuthnConfigError, match="JSON"):
        parse_jwks("{not json")
    with pytest.raises(AuthnConfigError, match="keys"):
        parse_jwks({"kty": "RSA"})


def test_jwks_skips_keys_not_for_signing() -> None:
    key = ec_key("sig")
    encryption = {**ec_key("enc").public_jwk, "use": "enc"}
    secret = {"kty": "oct", "kid": "hmac", "alg": "HS256"}
    keys = parse_jwks({"keys": [key.public_jwk, encryption, secret]})
    assert [parsed.kid for parsed in keys] == ["sig"]
    assert keys[0].algorithms == frozenset({"ES256"})


def test_config_errors_name_the_field() -> None:
    key = ec_key()
    cases = [
        ((provider(key), provider(key, name="dup")), "jwt_providers[1].issuer"),
        ((provider(key, jwks_inline=None, jwks_url="https://x/jwks"),), "jwt_providers[0].jwks_inline"),
        ((provider(key, jwks_file="/nonexistent/jwks.json"),), "jwt_providers[0].jwks_inline"),
        ((provider(key, jwks_inline=None, jwks_file="/nonexistent/jwks.json"),), "jwt_providers[0].jwks_file"),
        ((provider(key, leeway_seconds=-1),), "jwt_providers[0].leeway_seconds"),
        ((provider(key, issuer=""),), "jwt_providers[0].issuer"),
        ((provider(jwks_inline='{"keys":[]}'),), "jwt_providers[0].jwks"),
        ((provider(key, required_claims=('a"b',)),), "jwt_providers[0].required_claims"),
    ]
    for providers, field in cases:
        with pytest.raises(AuthnConfigError) as caught:
            JwtVerifier(providers)
        assert caught.value.field == field, providers


# --------------------------------------------------------------------------------- verified tokens


def test_a_remembered_token_still_expires() -> None:
    key = ec_key()
    now = [time.time()]
    verifier = JwtVerifier((provider(key, leeway_seconds=10),), clock=lambda: now[0])
    token = sign(key, claims(exp=int(now[0]) + 60))
    first = verifier.verify(token)
    assert isinstance(first, Identity) and verifier.verify(token) is first  # the repeat is remembered
    now[0] += 69
    assert verifier.verify(token) is first
    now[0] += 2
    assert rejected(verifier.verify(token), "token_expired")


def test_only_good_tokens_are_remembered_and_the_set_is_bounded() -> None:
    key = ec_key()
    verifier = JwtVerifier((provider(key),))
    bad = sign(key, claims(aud="other"))
    assert rejected(verifier.verify(bad), "audience_mismatch")
    assert rejected(verifier.verify(bad), "audience_mismatch")
    tokens = [sign(key, claims(jti=str(index))) for index in range(VERIFIED_CACHE_SIZE + 10)]
    identities = [verifier.verify(token) for token in tokens]
    assert all(isinstance(identity, Identity) for identity in identities)
    assert verifier.verify(tokens[-1]) is identities[-1]
    assert verifier.verify(tokens[0]) is not identities[0]  # evicted, verified again
    assert verifier.verify(tokens[0]) == identities[0]
