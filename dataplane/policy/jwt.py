"""JWT bearer tokens (RFC 7519) and Kubernetes service-account tokens, verified against keys parsed
once, when the config is compiled.

The request path does one pass: split, decode header and payload (strict base64url, JSON objects,
no NaN or Infinity), pick the provider by ``iss``, pick the key by ``kid``, check that the header's
``alg`` is one this provider allows *and* one the key's type and curve define, verify the signature,
then the time and audience claims. Only asymmetric algorithms exist here: ``none`` and every HMAC
algorithm are refused before any key is looked at, so a token "signed" with a public key as an HMAC
secret (the classic confusion) has nowhere to go. Keys a token carries itself (``jwk``, ``jku``,
``x5u``, ``x5c``) are never used.

Remote JWKS URLs are the control plane's business (controlplane/jwks.py): it fetches them and ships
the keys inline. A token whose ``kid`` is unknown asks, through a `JwksRefreshGate`, for one refresh
of its provider's URL; the gate lets at most one request per URL through per interval.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

from dataplane.policy.credentials import AuthnConfigError, Rejection
from dataplane.policy.identity import Identity

ProviderKind = Literal["jwt", "kubernetes"]

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")
ALLOWED_ALGORITHMS: tuple[str, ...] = (*RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
_EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1024 * 1024
MAX_KEYS = 100
DEFAULT_MAX_TOKEN_BYTES = 8192
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

_IMPLEMENTATIONS: dict[str, Algorithm] = {
    name: impl for name, impl in get_default_algorithms().items() if name in ALLOWED_ALGORITHMS
}


@dataclass(frozen=True, slots=True)
class JwtProviderSpec:
    """One token issuer.

    Keys come from exactly one of ``jwks_inline`` (a JWKS as JSON text or a dict) or ``jwks_file``
    (read at compile time). ``jwks_url`` records where the control plane fetched ``jwks_inline``
    from: an unknown ``kid`` asks for a refresh of that URL, and an empty key set is then allowed
    (the first fetch may not have succeeded yet). ``kind="kubernetes"`` makes a service-account token
    provider: ``issuer`` is the cluster's, ``audiences`` must be set (projected tokens are
    audience-bound), and the principal is ``system:serviceaccount:NS:SA``.
    """

    name: str
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_inline: str | Mapping[str, Any] | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ALLOWED_ALGORITHMS
    leeway_seconds: int = 60
    required_claims: tuple[str, ...] = ()
    # Refuse tokens without ``exp``: a token that never expires cannot be contained once leaked.
    require_expiry: bool = True
    principal_claim: str = "sub"
    kind: ProviderKind = "jwt"


class TokenReviewer(Protocol):
    """Validation by the Kubernetes API (TokenReview) instead of the cluster's OIDC keys.

    The control plane holds the API credentials; a worker reaches it over gRPC
    (`dataplane.policy.token_review.TokenReviewClient`). Returns the identity, or the `Rejection`
    (401) when the API server says the token is not authenticated for ``audiences``; raises
    `dataplane.policy.token_review.TokenReviewUnavailable` (503) when no answer can be had.
    """

    async def review(self, token: str, audiences: tuple[str, ...]) -> Identity | Rejection: ...


class JwksRefreshGate:
    """Turns "this kid is unknown" into at most one refresh request per JWKS URL per interval.

    Long-lived (one per worker, kept across config updates), so a flood of tokens with an unknown
    ``kid`` costs the identity provider one fetch, not one per request or per snapshot. The control
    plane throttles again on its side (`JwksFetcher.refresh_now`), across every worker.
    """

    __slots__ = ("_clock", "_last", "_min_interval", "_needs_refresh")

    def __init__(
        self,
        needs_refresh: Callable[[str], None],
        *,
        min_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._needs_refresh = needs_refresh
        self._min_interval = min_interval
        self._clock = clock
        self._last: dict[str, float] = {}

    def request(self, url: str) -> bool:
        """Ask for a refresh of ``url`` unless one was asked for within the interval."""
        now = self._clock()
        last = self._last.get(url)
        if last is not None and now - last < self._min_interval:
            return False
        if len(self._last) >= 64:  # URLs of configs long gone
            self._last = {u: t for u, t in self._last.items() if now - t < self._min_interval}
        self._last[url] = now
        self._needs_refresh(url)
        return True


# ------------------------------------------------------------------------------------------------ keys


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key parsed once into a cryptography object, with the algorithms it may verify."""

    kid: str | None
    key: Any
    algorithms: frozenset[str]


def _key_algorithms(jwk: Mapping[str, Any]) -> tuple[Any, frozenset[str]] | None:
    """The cryptography key and its algorithms, or None for a key this verifier does not use."""
    kty = jwk.get("kty")
    if kty == "RSA":
        key = RSAAlgorithm.from_jwk(dict(jwk))
        if not isinstance(key, rsa.RSAPublicKey):
            return None
        if key.key_size < MIN_RSA_BITS:
            raise InvalidKeyError(f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} required)")
        return key, frozenset(RSA_ALGORITHMS)
    if kty == "EC":
        algorithm = _EC_ALGORITHM_BY_CURVE.get(jwk.get("crv"))  # type: ignore[arg-type]
        if algorithm is None:
            return None
        key = ECAlgorithm.from_jwk(dict(jwk))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        return key, frozenset({algorithm})
    if kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES:
            return None
        key = OKPAlgorithm.from_jwk(dict(jwk))
        if not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return None
        return key, frozenset({"EdDSA"})
    return None  # "oct" (shared secrets) and anything unknown


def parse_jwks(document: str | bytes | Mapping[str, Any], field: str = "jwks") -> tuple[VerificationKey, ...]:
    """Parse a JWKS into verification keys.

    Keys not meant for signatures (``use`` other than ``sig``, ``key_ops`` without ``verify``), of a
    type or curve with no allowed algorithm, or whose ``alg`` is not one of ours are skipped: a
    provider's set may carry encryption keys. A key with private members is an error: whoever
    pasted it has leaked a signing key into config.
    """
    if isinstance(document, str | bytes):
        if len(document) > MAX_JWKS_BYTES:
            raise AuthnConfigError(field, f"JWKS larger than {MAX_JWKS_BYTES} bytes")
        try:
            document = json.loads(document)
        except ValueError as exc:
            raise AuthnConfigError(field, f"JWKS is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise AuthnConfigError(field, 'a JWKS is a JSON object with a "keys" array')
    jwks: list[Any] = document["keys"]
    if len(jwks) > MAX_KEYS:
        raise AuthnConfigError(field, f"more than {MAX_KEYS} keys")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(jwks):
        where = f"{field}.keys[{index}]"
        if not isinstance(jwk, Mapping):
            raise AuthnConfigError(where, "a key is a JSON object")
        if any(member in jwk for member in _PRIVATE_MEMBERS):
            raise AuthnConfigError(where, "contains private or secret key material; publish only public keys")
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthnConfigError(f"{where}.kid", "must be a string")
        if jwk.get("use", "sig") != "sig":
            continue
        key_ops = jwk.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            continue
        try:
            parsed = _key_algorithms(jwk)
        except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            raise AuthnConfigError(where, f"invalid {jwk.get('kty')} key: {exc}") from None
        if parsed is None:
            continue
        key, algorithms = parsed
        declared = jwk.get("alg")
        if declared is not None:
            if declared not in algorithms:
                continue
            algorithms = frozenset({declared})
        keys.append(VerificationKey(kid, key, algorithms))
    return tuple(keys)


# ---------------------------------------------------------------------------------------- verification


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64url(segment: bytes) -> bytes:
    if segment.translate(None, _B64URL_ALPHABET):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _json_object(segment: bytes) -> dict[str, Any]:
    value = _JSON.decode(_b64url(segment).decode())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


TOO_LARGE = Rejection("token_too_large", "The access token is too large")
MALFORMED = Rejection("token_malformed", "The access token is malformed")
ALG_REFUSED = Rejection("alg_not_allowed", "The token signing algorithm is not accepted")
CRIT_UNSUPPORTED = Rejection("crit_unsupported", "The token has critical header parameters")
ISSUER_UNKNOWN = Rejection("issuer_unknown", "The token issuer is not accepted")
KID_UNKNOWN = Rejection("kid_unknown", "The token signing key is unknown")
KEY_MISMATCH = Rejection("key_mismatch", "The token algorithm does not match its key")
BAD_SIGNATURE = Rejection("signature_invalid", "The token signature is invalid")
EXPIRED = Rejection("token_expired", "The access token expired")
NOT_YET_VALID = Rejection("token_not_yet_valid", "The access token is not yet valid")
ISSUED_IN_FUTURE = Rejection("token_issued_in_future", "The access token was issued in the future")
EXPIRY_MISSING = Rejection("claim_missing", "The access token has no 'exp' claim")
CLAIM_INVALID = Rejection("claim_invalid", "The access token has a claim of the wrong type")
AUDIENCE_MISMATCH = Rejection("audience_mismatch", "The access token is not meant for this audience")
PRINCIPAL_MISSING = Rejection("principal_missing", "The access token does not name its subject")
NOT_SERVICE_ACCOUNT = Rejection("serviceaccount_invalid", "The token does not name a Kubernetes service account")


class _Provider:
    """One compiled issuer: key indexes and claim rules."""

    __slots__ = (
        "algorithms",
        "audiences",
        "by_alg",
        "by_kid",
        "issuer",
        "jwks_url",
        "kind",
        "leeway",
        "name",
        "principal_claim",
        "require_expiry",
        "required",
    )

    def __init__(self, spec: JwtProviderSpec, field: str) -> None:
        self.name = spec.name
        self.issuer = spec.issuer
        self.kind = spec.kind
        self.audiences = frozenset(spec.audiences)
        self.leeway = float(spec.leeway_seconds)
        self.require_expiry = spec.require_expiry
        self.principal_claim = spec.principal_claim
        self.jwks_url = spec.jwks_url
        self.algorithms = frozenset(spec.algorithms)
        self.required = tuple(
            (claim, Rejection("claim_missing", f"The access token has no '{claim}' claim"))
            for claim in spec.required_claims
        )
        keys = _load_keys(spec, field)
        self.by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        self.by_alg: dict[str, tuple[VerificationKey, ...]] = {}
        for key in keys:
            if not key.algorithms & self.algorithms:
                continue
            if key.kid is not None:
                self.by_kid[key.kid] = (*self.by_kid.get(key.kid, ()), key)
            for algorithm in key.algorithms & self.algorithms:
                self.by_alg[algorithm] = (*self.by_alg.get(algorithm, ()), key)
        if not self.by_alg and spec.jwks_url is None:
            raise AuthnConfigError(f"{field}.jwks", "no key usable with the configured algorithms")


def _load_keys(spec: JwtProviderSpec, field: str) -> tuple[VerificationKey, ...]:
    if (spec.jwks_inline is None) == (spec.jwks_file is None):
        if spec.jwks_inline is None and spec.jwks_url is not None:
            raise AuthnConfigError(
                f"{field}.jwks_inline", "jwks_url must be resolved into inline keys by the control plane"
            )
        raise AuthnConfigError(f"{field}.jwks_inline", "set exactly one of jwks_inline and jwks_file")
    if spec.jwks_file is not None:
        path = Path(spec.jwks_file)
        try:
            if path.stat().st_size > MAX_JWKS_BYTES:
                raise AuthnConfigError(f"{field}.jwks_file", f"larger than {MAX_JWKS_BYTES} bytes")
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthnConfigError(f"{field}.jwks_file", f"cannot read: {exc}") from None
        return parse_jwks(text, f"{field}.jwks_file")
    assert spec.jwks_inline is not None
    return parse_jwks(spec.jwks_inline, f"{field}.jwks_inline")


def _safe_text(value: str) -> bool:
    """Printable ASCII without quote or backslash: fits an RFC 6750 quoted error_description."""
    return all(0x20 <= ord(char) < 0x7F and char not in '"\\' for char in value)


def _check_spec(spec: JwtProviderSpec, field: str) -> None:
    if not spec.name:
        raise AuthnConfigError(f"{field}.name", "must not be empty")
    if not spec.issuer:
        raise AuthnConfigError(f"{field}.issuer", "must not be empty")
    if spec.kind not in ("jwt", "kubernetes"):
        raise AuthnConfigError(f"{field}.kind", "must be jwt or kubernetes")
    if spec.kind == "kubernetes" and not spec.audiences:
        raise AuthnConfigError(f"{field}.audiences", "service-account tokens are audience-bound: name the audience")
    if any(not isinstance(audience, str) or not audience for audience in spec.audiences):
        raise AuthnConfigError(f"{field}.audiences", "audiences are non-empty strings")
    if not spec.algorithms:
        raise AuthnConfigError(f"{field}.algorithms", "at least one algorithm is required")
    for algorithm in spec.algorithms:
        if algorithm == "none" or algorithm.upper().startswith("HS"):
            raise AuthnConfigError(
                f"{field}.algorithms",
                f"{algorithm} refused: only public-key algorithms are accepted (no unsigned or shared-secret tokens)",
            )
        if algorithm not in ALLOWED_ALGORITHMS:
            raise AuthnConfigError(f"{field}.algorithms", f"unknown algorithm {algorithm!r}")
    if not 0 <= spec.leeway_seconds <= 600:
        raise AuthnConfigError(f"{field}.leeway_seconds", "must be between 0 and 600")
    for claim in spec.required_claims:
        if not claim or not _safe_text(claim):
            raise AuthnConfigError(f"{field}.required_claims", f"invalid claim name {claim!r}")
    if not spec.principal_claim:
        raise AuthnConfigError(f"{field}.principal_claim", "must not be empty")


VERIFIED_CACHE_SIZE = 1024


class JwtVerifier:
    """Every configured issuer, compiled.

    Agents reuse one token for many requests, so a verified token is remembered (bounded, per
    compiled verifier, so a key removed from config is forgotten with it) until its ``exp`` plus
    leeway: a repeat costs a dict probe instead of a signature check. Only tokens that passed every
    check are remembered, and only until they would expire.
    """

    __slots__ = ("_by_issuer", "_clock", "_max_bytes", "_refresh_gate", "_verified")

    def __init__(
        self,
        providers: tuple[JwtProviderSpec, ...],
        *,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        refresh_gate: JwksRefreshGate | None = None,
        clock: Callable[[], float] = time.time,
        field: str = "jwt_providers",
    ) -> None:
        by_issuer: dict[str, _Provider] = {}
        for index, spec in enumerate(providers):
            where = f"{field}[{index}]"
            _check_spec(spec, where)
            if spec.issuer in by_issuer:
                raise AuthnConfigError(
                    f"{where}.issuer",
                    f"issuer {spec.issuer!r} is already used by provider {by_issuer[spec.issuer].name!r}",
                )
            by_issuer[spec.issuer] = _Provider(spec, where)
        if not by_issuer:
            raise AuthnConfigError(field, "at least one provider is required")
        self._by_issuer = by_issuer
        self._max_bytes = max_token_bytes
        self._refresh_gate = refresh_gate
        self._clock = clock
        self._verified: dict[bytes, tuple[Identity, float]] = {}

    def verify(self, token: bytes) -> Identity | Rejection:
        """The identity a compact JWS token proves, or why it proves none."""
        if len(token) > self._max_bytes:
            return TOO_LARGE
        remembered = self._verified.get(token)
        if remembered is not None:
            if self._clock() < remembered[1]:
                return remembered[0]
            del self._verified[token]
        result = self._verify(token)
        if isinstance(result, Identity):
            expiry = result.claims.get("exp")
            if expiry is not None:
                verified = self._verified
                if len(verified) >= VERIFIED_CACHE_SIZE:
                    del verified[next(iter(verified))]
                verified[token] = (result, expiry + self._by_issuer[result.issuer].leeway)  # type: ignore[index]
        return result

    def _verify(self, token: bytes) -> Identity | Rejection:
        parts = token.split(b".")
        if len(parts) != 3:
            return MALFORMED
        try:
            header = _json_object(parts[0])
            claims = _json_object(parts[1])
            signature = _b64url(parts[2])
        except (ValueError, RecursionError):  # binascii, Unicode and JSON errors are ValueErrors; deep nesting
            return MALFORMED
        algorithm = header.get("alg")
        if type(algorithm) is not str or algorithm not in _IMPLEMENTATIONS:
            return ALG_REFUSED
        if "crit" in header:  # RFC 7515 4.1.11: we understand no extension, so none may be critical
            return CRIT_UNSUPPORTED
        issuer = claims.get("iss")
        provider = self._by_issuer.get(issuer) if type(issuer) is str else None
        if provider is None:
            return ISSUER_UNKNOWN
        if algorithm not in provider.algorithms:
            return ALG_REFUSED
        kid = header.get("kid")
        if kid is None:
            candidates = provider.by_alg.get(algorithm, ())
        elif type(kid) is not str:
            return MALFORMED
        else:
            candidates = provider.by_kid.get(kid)  # type: ignore[assignment]
            if candidates is None:
                if provider.jwks_url is not None and self._refresh_gate is not None:
                    self._refresh_gate.request(provider.jwks_url)
                return KID_UNKNOWN
        signing_input = token[: len(parts[0]) + 1 + len(parts[1])]
        implementation = _IMPLEMENTATIONS[algorithm]
        matched = False
        for key in candidates:
            if algorithm in key.algorithms:
                matched = True
                if implementation.verify(signing_input, key.key, signature):
                    return self._check_claims(provider, claims)
        if matched:
            return BAD_SIGNATURE
        if kid is not None:
            return KEY_MISMATCH
        # No kid and no key for this algorithm: the set may not have been fetched yet.
        if provider.jwks_url is not None and self._refresh_gate is not None:
            self._refresh_gate.request(provider.jwks_url)
        return KID_UNKNOWN

    def _check_claims(self, provider: _Provider, claims: dict[str, Any]) -> Identity | Rejection:
        now = self._clock()
        leeway = provider.leeway
        expiry = claims.get("exp")
        if expiry is None:
            if provider.require_expiry:
                return EXPIRY_MISSING
        elif not _number(expiry):
            return CLAIM_INVALID
        elif now >= expiry + leeway:
            return EXPIRED
        not_before = claims.get("nbf")
        if not_before is not None:
            if not _number(not_before):
                return CLAIM_INVALID
            if now + leeway < not_before:
                return NOT_YET_VALID
        issued_at = claims.get("iat")
        if issued_at is not None:
            if not _number(issued_at):
                return CLAIM_INVALID
            if now + leeway < issued_at:
                return ISSUED_IN_FUTURE
        if provider.audiences:
            audience = claims.get("aud")
            if type(audience) is str:
                if audience not in provider.audiences:
                    return AUDIENCE_MISMATCH
            elif type(audience) is list:
                if not any(type(item) is str and item in provider.audiences for item in audience):
                    return AUDIENCE_MISMATCH
            else:
                return AUDIENCE_MISMATCH
        for claim, missing in provider.required:
            if claim not in claims:
                return missing
        if provider.kind == "kubernetes":
            return _service_account(provider.issuer, claims)
        principal = claims.get(provider.principal_claim)
        if type(principal) is not str or not principal:
            return PRINCIPAL_MISSING
        return Identity(principal=principal, method="jwt", issuer=provider.issuer, claims=MappingProxyType(claims))


def _service_account(issuer: str, claims: dict[str, Any]) -> Identity | Rejection:
    """``system:serviceaccount:NS:SA`` from the ``kubernetes.io`` claim, else from ``sub``; when both
    are present they must agree."""
    namespace = name = None
    kubernetes = claims.get("kubernetes.io")
    if isinstance(kubernetes, dict):
        account = kubernetes.get("serviceaccount")
        namespace = kubernetes.get("namespace")
        name = account.get("name") if isinstance(account, dict) else None
    subject = claims.get("sub")
    from_subject: tuple[str, str] | None = None
    if type(subject) is str and subject.startswith(SERVICE_ACCOUNT_PREFIX):
        rest = subject[len(SERVICE_ACCOUNT_PREFIX) :].split(":")
        if len(rest) == 2:
            from_subject = (rest[0], rest[1])
    if namespace is None and name is None and from_subject is not None:
        namespace, name = from_subject
    if type(namespace) is not str or type(name) is not str or not _dns_name(namespace) or not _dns_name(name):
        return NOT_SERVICE_ACCOUNT
    if from_subject is not None and from_subject != (namespace, name):
        return NOT_SERVICE_ACCOUNT
    return Identity(
        principal=f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}",
        method="serviceaccount",
        issuer=issuer,
        claims=MappingProxyType(claims),
        namespace=namespace,
        service_account=name,
    )


_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _dns_name(value: str) -> bool:
    """Namespace and service-account names are DNS subdomains (lower case, digits, '-', '.')."""
    return 0 < len(value) <= 253 and set(value) <= _DNS_CHARS


__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "JwksRefreshGate",
    "JwtProviderSpec",
    "JwtVerifier",
    "ProviderKind",
    "TokenReviewer",
    "VerificationKey",
    "parse_jwks",
]
