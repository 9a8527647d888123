"""Who is calling: the compiled authenticator a route's policy runs first.

`compile_authn` turns an `AuthnSpec` into an `Authenticator` once per snapshot; every config mistake
is an `AuthnConfigError` naming the field. Per request, `Authenticator.authenticate` reads the
request headers and returns one outcome:

- an `Identity` (verified JWT, service-account token, API key or basic-auth user),
- `Anonymous` (no credential in optional or permissive mode, or a bad one in permissive mode, whose
  reason is logged and kept on the outcome),
- a `Refusal`: status 401 with a ``WWW-Authenticate`` challenge (RFC 6750 ``error="invalid_token"``
  and ``error_description``, ``realm``, and for MCP routes RFC 9728 ``resource_metadata``), and a
  stable reason label for logs and metrics. `Authenticator.forbidden` makes the 403
  (``insufficient_scope``) that authorization returns with the same challenge parameters. A
  service-account token whose TokenReview cannot be had (control plane or Kubernetes API down, or too
  slow) is a 503 without a challenge: the token may be good, so asking for another would mislead.

Then `strip_and_set_headers` prepares the upstream request: client-sent copies of the identity
headers are always removed (a caller cannot claim ``x-agent-identity`` itself), identity headers are
set from the verified identity, and the caller's credential is removed unless the spec passes it
through. A backend may then inject its own credential (`BackendCredential`).

`authenticate` is async only because a password check (scrypt, tens of milliseconds) must leave the
event loop, and a TokenReview (jwt.TokenReviewer) is a network call; a JWT or API key never suspends.
Bearer tokens whose ``iss`` (unverified, only to choose) is a TokenReview provider's issuer go to
`token_review.ReviewedIssuer`; all others to the JWT verifier or the API keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from dataplane.policy.credentials import (
    ApiKeySpec,
    ApiKeyTable,
    AuthnConfigError,
    BasicAuthSpec,
    PasswordTable,
    Rejection,
    parse_basic,
)
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import (
    DEFAULT_MAX_TOKEN_BYTES,
    ISSUER_UNKNOWN,
    MALFORMED,
    JwksRefreshGate,
    JwtProviderSpec,
    JwtVerifier,
    TokenReviewer,
)
from dataplane.policy.token_review import ReviewedIssuer, TokenReviewSpec, TokenReviewUnavailable, unverified_claims
from shared.logging import get_logger

log = get_logger("dataplane.policy.authn")

Headers = list[tuple[bytes, bytes]]
Mode = Literal["strict", "optional", "permissive"]
MODES: tuple[str, ...] = ("strict", "optional", "permissive")

# What an identity header can carry: an Identity field, or "claim:<name>" (a dotted path reaches into
# nested claims; a key that itself contains dots, such as "kubernetes.io", is matched whole first).
IDENTITY_FIELDS = ("principal", "namespace", "service_account", "issuer", "method")
MAX_HEADER_VALUE = 4096


@dataclass(frozen=True, slots=True)
class IdentityHeaderSpec:
    """Set ``header`` on the upstream request from ``value``: one of `IDENTITY_FIELDS` or ``claim:<path>``."""

    header: str
    value: str


@dataclass(frozen=True, slots=True)
class AuthnSpec:
    """Authentication for one route (or listener): the methods accepted and what a miss means.

    ``mode``: strict (a credential is required), optional (none -> anonymous, a bad one -> 401),
    permissive (none or bad -> anonymous, the bad one logged). ``resource_metadata_url`` is set on MCP
    routes (the URL `protected_resource.compile_protected_resource` serves). ``pass_through_credentials``
    forwards the caller's Authorization (or API-key header) upstream; by default it is removed.
    ``token_review``: service-account tokens of that issuer are validated by the Kubernetes API.
    """

    mode: Mode = "strict"
    jwt_providers: tuple[JwtProviderSpec, ...] = ()
    token_review: TokenReviewSpec | None = None
    api_keys: ApiKeySpec | None = None
    basic: BasicAuthSpec | None = None
    realm: str = "agentgate"
    resource_metadata_url: str | None = None
    identity_headers: tuple[IdentityHeaderSpec, ...] = ()
    pass_through_credentials: bool = False
    max_credential_bytes: int = DEFAULT_MAX_TOKEN_BYTES


@dataclass(frozen=True, slots=True)
class Anonymous:
    """No identity. ``reason`` is empty when no credential was presented, else why one was ignored."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer the request with ``status`` and this challenge; ``reason`` is the log and metric label."""

    status: int
    www_authenticate: str
    reason: str
    description: str = ""

    def headers(self) -> Headers:
        if not self.www_authenticate:
            return []
        return [(b"www-authenticate", self.www_authenticate.encode("latin-1"))]


AuthnOutcome = Identity | Anonymous | Refusal
NO_CREDENTIAL = Anonymous()

_MULTIPLE = Rejection("credential_ambiguous", "More than one credential was presented")
_TOO_LARGE = Rejection("credential_too_large", "The credential is too large")
_EMPTY = Rejection("credential_malformed", "The credential is empty")
_REVIEW_UNAVAILABLE = Refusal(
    503, "", "token_review_unavailable", "Service-account tokens cannot be checked right now; retry later"
)

# Names a config may not claim as identity headers: the proxy or HTTP itself owns them.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "cookie",
        "x-forwarded-for",
        "x-request-id",
        "mcp-session-id",
    }
)
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")


def _quoted_safe(value: str) -> bool:
    return all(0x20 <= ord(char) < 0x7F and char not in '"\\' for char in value)


@dataclass(frozen=True, slots=True)
class _IdentityHeader:
    name: bytes
    field: str | None  # an Identity attribute, or None for a claim path
    path: tuple[str, ...]


def _claim(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Resolve a dotted claim path, preferring the longest key at each level ("kubernetes.io")."""
    value: Any = claims
    index = 0
    while index < len(path):
        if not isinstance(value, Mapping):
            return None
        for end in range(len(path), index, -1):
            key = ".".join(path[index:end])
            if key in value:
                value = value[key]
                index = end
                break
        else:
            return None
    return value


def _header_value(value: Any) -> bytes | None:
    """A claim as a header value; None (header omitted) for objects, empties, or anything that could
    split or smuggle a header (CR, LF, NUL and other controls)."""
    if type(value) is str:
        text = value
    elif type(value) is bool:
        text = "true" if value else "false"
    elif type(value) in (int, float):
        text = str(value)
    elif type(value) is list and all(type(item) is str for item in value):
        text = ",".join(value)
    else:
        return None
    if (
        not text
        or len(text) > MAX_HEADER_VALUE
        or any((ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F for char in text)
    ):
        return None
    return text.encode()


@dataclass(frozen=True, slots=True)
class BackendCredentialSpec:
    """A credential a backend needs from the gateway (its own API key), set on every upstream request."""

    header: str
    value: str


class BackendCredential:
    """Compiled `BackendCredentialSpec`: replaces any copy of the header with the configured value."""

    __slots__ = ("_header",)

    def __init__(self, spec: BackendCredentialSpec, field: str = "backend_credential") -> None:
        name = spec.header.lower()
        if not name or not set(name) <= _TOKEN_CHARS:
            raise AuthnConfigError(f"{field}.header", "not a valid header name")
        if not spec.value or any(ord(char) < 0x20 or ord(char) == 0x7F for char in spec.value):
            raise AuthnConfigError(f"{field}.value", "must be non-empty without control characters")
        self._header = (name.encode(), spec.value.encode())

    def apply(self, headers: Headers) -> Headers:
        name = self._header[0]
        out = [header for header in headers if header[0] != name]
        out.append(self._header)
        return out


class Authenticator:
    """A compiled `AuthnSpec`. Build with `compile_authn`."""

    __slots__ = (
        "_api_header",
        "_api_key_challenge",
        "_api_keys",
        "_basic_challenge",
        "_bearer_api_keys",
        "_challenge",
        "_identity_headers",
        "_jwt",
        "_max_bytes",
        "_mode",
        "_password_limiter",
        "_passwords",
        "_primary_scheme",
        "_realm_params",
        "_review",
        "_strip",
    )

    def __init__(
        self,
        spec: AuthnSpec,
        *,
        refresh_gate: JwksRefreshGate | None = None,
        token_reviewer: TokenReviewer | None = None,
    ) -> None:
        if spec.mode not in MODES:
            raise AuthnConfigError("mode", f"must be one of {', '.join(MODES)}")
        if not spec.realm or not _quoted_safe(spec.realm):
            raise AuthnConfigError("realm", "must be non-empty printable ASCII without quotes or backslashes")
        if not 256 <= spec.max_credential_bytes <= 65536:
            raise AuthnConfigError("max_credential_bytes", "must be between 256 and 65536")
        url = spec.resource_metadata_url
        if url is not None and (not url.startswith(("https://", "http://")) or not _quoted_safe(url)):
            raise AuthnConfigError("resource_metadata_url", "must be an absolute http(s) URL")
        if not spec.jwt_providers and spec.token_review is None and spec.api_keys is None and spec.basic is None:
            raise AuthnConfigError(
                "jwt_providers", "configure at least one of jwt_providers, token_review, api_keys, basic"
            )
        self._mode = spec.mode
        self._max_bytes = spec.max_credential_bytes
        self._jwt = (
            JwtVerifier(spec.jwt_providers, max_token_bytes=spec.max_credential_bytes, refresh_gate=refresh_gate)
            if spec.jwt_providers
            else None
        )
        self._review = (
            ReviewedIssuer(spec.token_review, token_reviewer) if spec.token_review is not None else None
        )
        if self._review is not None and any(p.issuer == self._review.issuer for p in spec.jwt_providers):
            raise AuthnConfigError("token_review.issuer", "also the issuer of a JWT provider")
        self._api_keys = ApiKeyTable(spec.api_keys) if spec.api_keys is not None else None
        api_header = spec.api_keys.header.lower() if spec.api_keys is not None else ""
        if spec.api_keys is not None and (
            not api_header or not set(api_header) <= _TOKEN_CHARS or api_header in _RESERVED_HEADERS - {"authorization"}
        ):
            raise AuthnConfigError("api_keys.header", f"{spec.api_keys.header!r} cannot carry an API key")
        self._bearer_api_keys = api_header == "authorization"
        self._api_header = api_header.encode() if api_header and not self._bearer_api_keys else None
        self._passwords = PasswordTable(spec.basic) if spec.basic is not None else None
        # One scrypt at a time per worker: bounds memory (32 MiB each) and keeps a flood of wrong
        # passwords from taking every thread; they queue instead.
        self._password_limiter = anyio.CapacityLimiter(1) if spec.basic is not None else None

        params = f'realm="{spec.realm}"'
        if url is not None:
            params += f', resource_metadata="{url}"'
        self._realm_params = params
        # RFC 7617 for Basic; API keys in their own header have no registered scheme, so their
        # challenge names the header to use.
        self._basic_challenge = f'Basic realm="{spec.realm}", charset="UTF-8"'
        self._api_key_challenge = f'ApiKey realm="{spec.realm}", header="{api_header}"'
        challenges = []
        bearer = self._jwt is not None or self._review is not None or self._bearer_api_keys
        if bearer:
            challenges.append(f"Bearer {params}")
        if self._passwords is not None:
            challenges.append(self._basic_challenge)
        if self._api_header is not None:
            challenges.append(self._api_key_challenge)
        self._primary_scheme = "Bearer" if bearer else "Basic" if self._passwords else "ApiKey"
        # RFC 9110 11.6.1: one field may list several challenges.
        self._challenge = ", ".join(challenges)

        headers: list[_IdentityHeader] = []
        names: set[bytes] = set()
        for index, item in enumerate(spec.identity_headers):
            where = f"identity_headers[{index}]"
            name = item.header.lower()
            if not name or not set(name) <= _TOKEN_CHARS or name in _RESERVED_HEADERS or name == api_header:
                raise AuthnConfigError(f"{where}.header", f"{item.header!r} cannot be an identity header")
            if item.value in IDENTITY_FIELDS:
                header = _IdentityHeader(name.encode(), item.value, ())
            elif item.value.startswith("claim:") and all(item.value[6:].split(".")):
                header = _IdentityHeader(name.encode(), None, tuple(item.value[6:].split(".")))
            else:
                raise AuthnConfigError(f"{where}.value", f"must be one of {', '.join(IDENTITY_FIELDS)} or claim:<name>")
            if header.name in names:
                raise AuthnConfigError(f"{where}.header", f"{name!r} is set twice")
            names.add(header.name)
            headers.append(header)
        self._identity_headers = tuple(headers)
        strip = set(names)
        if not spec.pass_through_credentials:
            if bearer or self._passwords is not None:
                strip.add(b"authorization")
            if self._api_header is not None:
                strip.add(self._api_header)
        self._strip = frozenset(strip)

    # ------------------------------------------------------------------------------------- request path

    async def authenticate(self, headers: Headers) -> AuthnOutcome:
        """The caller's identity, anonymity, or the refusal to send. Never raises for client input."""
        authorization: bytes | None = None
        api_key: bytes | None = None
        count_authorization = count_api_key = 0
        api_header = self._api_header
        for name, value in headers:
            if name == b"authorization":
                authorization = value
                count_authorization += 1
            elif name == api_header:
                api_key = value
                count_api_key += 1
        if count_authorization > 1 or count_api_key > 1:
            return self._refuse(_MULTIPLE, "invalid_request", scheme=self._primary_scheme)

        if authorization is not None:
            scheme, _, credential = authorization.partition(b" ")
            scheme = scheme.lower()
            credential = credential.strip()
            review = self._review
            if scheme == b"bearer" and (self._jwt is not None or review is not None or self._bearer_api_keys):
                if api_key is not None:
                    return self._refuse(_MULTIPLE, "invalid_request")
                if review is not None and len(credential) <= self._max_bytes:
                    claims = unverified_claims(credential)
                    if claims is not None and review.owns(claims):
                        return await self._reviewed(review, credential, claims)
                return self._bearer(credential)
            if scheme == b"basic" and self._passwords is not None:
                if api_key is not None:
                    return self._refuse(_MULTIPLE, "invalid_request")
                return await self._basic(credential)
            # A scheme none of our methods reads: not a credential for this gateway.
        if api_key is not None and self._api_keys is not None:
            return self._api_key(api_key.strip(), bearer=False)
        if self._mode == "strict":
            return Refusal(401, self._challenge, "credential_missing", "")
        return NO_CREDENTIAL

    def _bearer(self, token: bytes) -> AuthnOutcome:
        if len(token) > self._max_bytes:
            return self._refuse(_TOO_LARGE)
        if not token:
            return self._refuse(_EMPTY)
        if self._jwt is not None and (not self._bearer_api_keys or token.count(b".") == 2):
            result = self._jwt.verify(token)
        elif self._bearer_api_keys:
            return self._api_key(token, bearer=True)
        else:  # only TokenReview, and the token is not of its issuer
            result = ISSUER_UNKNOWN if token.count(b".") == 2 else MALFORMED
        return result if isinstance(result, Identity) else self._refuse(result)

    async def _reviewed(self, review: ReviewedIssuer, token: bytes, claims: dict[str, Any]) -> AuthnOutcome:
        try:
            result = await review.review(token, claims)
        except TokenReviewUnavailable as exc:
            log.warning("service-account token not reviewed", error=str(exc), mode=self._mode)
            if self._mode == "permissive":
                return Anonymous(_REVIEW_UNAVAILABLE.reason)
            return _REVIEW_UNAVAILABLE
        return result if isinstance(result, Identity) else self._refuse(result)

    def _api_key(self, key: bytes, *, bearer: bool) -> AuthnOutcome:
        if len(key) > self._max_bytes:
            return self._refuse(_TOO_LARGE, scheme="Bearer" if bearer else "ApiKey")
        assert self._api_keys is not None
        result = self._api_keys.lookup(key)
        return result if isinstance(result, Identity) else self._refuse(result, scheme="Bearer" if bearer else "ApiKey")

    async def _basic(self, credential: bytes) -> AuthnOutcome:
        if len(credential) > self._max_bytes:
            return self._refuse(_TOO_LARGE, scheme="Basic")
        parsed = parse_basic(credential)
        if isinstance(parsed, Rejection):
            return self._refuse(parsed, scheme="Basic")
        user, password = parsed
        passwords = self._passwords
        assert passwords is not None
        identity = passwords.remembered(user, password)
        if identity is None:
            result = await anyio.to_thread.run_sync(passwords.check, user, password, limiter=self._password_limiter)
            if not isinstance(result, Identity):
                return self._refuse(result, scheme="Basic")
            passwords.remember(user, password, result)
            identity = result
        return identity

    def _refuse(self, rejection: Rejection, error: str = "invalid_token", *, scheme: str = "Bearer") -> AuthnOutcome:
        if self._mode == "permissive":
            log.info("bad credential ignored (permissive)", reason=rejection.reason)
            return Anonymous(rejection.reason)
        if scheme == "Bearer":
            challenge = f'Bearer {self._realm_params}, error="{error}", error_description="{rejection.description}"'
        elif scheme == "Basic":
            challenge = self._basic_challenge
        else:
            challenge = self._api_key_challenge
        return Refusal(401, challenge, rejection.reason, rejection.description)

    def forbidden(self, reason: str, description: str = "Access denied", scope: str | None = None) -> Refusal:
        """A 403 for a caller who authenticated but may not do this (RFC 6750 ``insufficient_scope``)."""
        if not _quoted_safe(description):
            description = "Access denied"
        challenge = f'Bearer {self._realm_params}, error="insufficient_scope", error_description="{description}"'
        if scope is not None and _quoted_safe(scope):
            challenge += f', scope="{scope}"'
        return Refusal(403, challenge, reason, description)

    def strip_and_set_headers(self, headers: Headers, outcome: AuthnOutcome) -> Headers:
        """The request headers for upstream: client copies of identity headers and (unless passed
        through) the caller's credential removed, identity headers set from a verified identity."""
        strip = self._strip
        out = [header for header in headers if header[0] not in strip]
        if isinstance(outcome, Identity):
            for header in self._identity_headers:
                if header.field is not None:
                    value = _header_value(getattr(outcome, header.field))
                else:
                    value = _header_value(_claim(outcome.claims, header.path))
                if value is not None:
                    out.append((header.name, value))
        return out

    @property
    def mode(self) -> str:
        return self._mode


def compile_authn(
    spec: AuthnSpec,
    *,
    refresh_gate: JwksRefreshGate | None = None,
    token_reviewer: TokenReviewer | None = None,
) -> Authenticator:
    """Compile once per snapshot. Raises `AuthnConfigError(field, message)` for any invalid setting.

    ``refresh_gate`` and ``token_reviewer`` should be long-lived objects, one per worker: the gate
    throttles "unknown kid" refresh requests and the reviewer caches reviews across recompiles. A
    spec with ``token_review`` needs a reviewer.
    """
    return Authenticator(spec, refresh_gate=refresh_gate, token_reviewer=token_reviewer)


__all__ = [
    "IDENTITY_FIELDS",
    "MODES",
    "Anonymous",
    "Authenticator",
    "AuthnConfigError",
    "AuthnOutcome",
    "AuthnSpec",
    "BackendCredential",
    "BackendCredentialSpec",
    "IdentityHeaderSpec",
    "Mode",
    "Refusal",
    "compile_authn",
]
