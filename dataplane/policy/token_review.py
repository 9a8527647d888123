"""Kubernetes service-account tokens validated by TokenReview, through the control plane.

A Policy's ``serviceAccount`` with ``tokenReview: true`` names no keys: the Kubernetes API decides.
Workers hold no API credentials, so `TokenReviewClient` asks the control plane
(`KeyService.ReviewToken`), which posts the TokenReview and caches the answer for every worker.

Compile time: the provider becomes a `ReviewedIssuer` (issuer, audiences, leeway, the worker's
reviewer). Request time, `Authenticator` hands it a bearer token when the token's ``iss`` (read
without verification: it only chooses who verifies) is the provider's issuer. An expired ``exp`` is
refused locally; anything else goes to the reviewer, which answers:

- an `Identity` ``system:serviceaccount:NS:SA`` with ``namespace`` and ``service_account`` set, and
  claims built from the review (``sub``, ``iss``, ``aud``, ``exp``, ``groups``, ``uid``, ``extra``,
  ``kubernetes.io.namespace`` and ``kubernetes.io.serviceaccount.name``) for identity headers and CEL;
- a `Rejection` (401): not authenticated, not for one of the policy's audiences (the status must name
  one: an empty list means "valid for the API server itself"), or not a service account;
- or it raises `TokenReviewUnavailable` (503): control plane or API down, or no answer in time.

The client keeps its own small cache (token hash -> outcome, short TTL, never past ``exp``) and
coalesces concurrent reviews of one token, so a busy agent costs one gRPC call per TTL per worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Final

import anyio
import grpc
from anyio.abc import TaskStatus

from dataplane.policy.credentials import AuthnConfigError, Rejection
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import (
    AUDIENCE_MISMATCH,
    EXPIRED,
    NOT_SERVICE_ACCOUNT,
    SERVICE_ACCOUNT_PREFIX,
    TokenReviewer,
)
from shared.api.agentgate.policy.v1 import keys_pb2, keys_pb2_grpc
from shared.logging import get_logger

log = get_logger("dataplane.policy.token_review")

DEFAULT_CALL_TIMEOUT: Final = 5.0
DEFAULT_TTL: Final = 30.0
DEFAULT_NEGATIVE_TTL: Final = 5.0
DEFAULT_MAX_ENTRIES: Final = 1024

NOT_AUTHENTICATED = Rejection("token_review_refused", "The access token is not valid")
_BAD_ARGUMENT = Rejection("token_review_refused", "The access token is not valid")
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


class TokenReviewUnavailable(Exception):
    """No answer about a token could be had (control plane or Kubernetes API unreachable, too slow,
    or not configured): the request gets 503, not 401, since the token may well be good."""


@dataclass(frozen=True, slots=True)
class TokenReviewSpec:
    """A service-account provider validated by TokenReview: tokens whose ``iss`` is ``issuer`` are
    reviewed for ``audiences`` (at least one)."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    leeway_seconds: float = 60.0


# ------------------------------------------------------------------------------------------- pure core


def unverified_claims(token: bytes | str) -> dict[str, Any] | None:
    """The payload of a JWT-shaped token without verifying it, or None if it is not one."""
    raw = token.encode() if isinstance(token, str) else token
    parts = raw.split(b".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii, Unicode and JSON errors are ValueErrors
        return None
    return payload if isinstance(payload, dict) else None


def _expiry(claims: Mapping[str, Any] | None) -> float | None:
    value = claims.get("exp") if claims is not None else None
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def _dns_name(value: str) -> bool:
    return 0 < len(value) <= 253 and set(value) <= _DNS_CHARS


def identity_from_review(
    response: keys_pb2.ReviewTokenResponse, audiences: tuple[str, ...], token_claims: Mapping[str, Any] | None
) -> Identity | Rejection:
    """What a TokenReview status proves for a policy accepting ``audiences``."""
    if not response.authenticated:
        return NOT_AUTHENTICATED
    granted = [audience for audience in response.audiences if audience in audiences]
    if not granted:
        return AUDIENCE_MISMATCH
    username = response.username
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return NOT_SERVICE_ACCOUNT
    parts = username[len(SERVICE_ACCOUNT_PREFIX) :].split(":")
    if len(parts) != 2 or not _dns_name(parts[0]) or not _dns_name(parts[1]):
        return NOT_SERVICE_ACCOUNT
    namespace, name = parts
    issuer = token_claims.get("iss") if token_claims is not None else None
    claims: dict[str, Any] = {
        "sub": username,
        "aud": granted,
        "groups": list(response.groups),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": response.uid}},
    }
    if type(issuer) is str:
        claims["iss"] = issuer
    expiry = _expiry(token_claims)
    if expiry is not None:
        claims["exp"] = expiry
    if response.uid:
        claims["uid"] = response.uid
    if response.extra:
        claims["extra"] = {key: list(value.values) for key, value in response.extra.items()}
    return Identity(
        principal=username,
        method="serviceaccount",
        issuer=issuer if type(issuer) is str else None,
        claims=MappingProxyType(claims),
        namespace=namespace,
        service_account=name,
    )


class ReviewedIssuer:
    """A compiled `TokenReviewSpec`: which bearer tokens are its, and their review."""

    __slots__ = ("_clock", "_reviewer", "audiences", "issuer", "leeway", "name")

    def __init__(
        self,
        spec: TokenReviewSpec,
        reviewer: TokenReviewer | None,
        *,
        field: str = "token_review",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reviewer is None:
            raise AuthnConfigError(field, "TokenReview needs the control plane connection; this proxy has none")
        if not spec.issuer:
            raise AuthnConfigError(f"{field}.issuer", "must not be empty")
        if not spec.audiences or not all(spec.audiences):
            raise AuthnConfigError(f"{field}.audiences", "service-account tokens are audience-bound: name the audience")
        if not 0 <= spec.leeway_seconds <= 600:
            raise AuthnConfigError(f"{field}.leeway_seconds", "must be between 0 and 600")
        self.name = spec.name
        self.issuer = spec.issuer
        self.audiences = spec.audiences
        self.leeway = float(spec.leeway_seconds)
        self._reviewer = reviewer
        self._clock = clock

    def owns(self, claims: Mapping[str, Any] | None) -> bool:
        """The (unverified) claims name this provider's issuer."""
        return claims is not None and claims.get("iss") == self.issuer

    async def review(self, token: bytes, claims: Mapping[str, Any]) -> Identity | Rejection:
        """Raises `TokenReviewUnavailable` when no answer can be had."""
        expiry = _expiry(claims)
        if expiry is not None and self._clock() >= expiry + self.leeway:
            return EXPIRED  # the API server would say no too; spare it the call
        return await self._reviewer.review(token.decode("latin-1"), self.audiences)


# ------------------------------------------------------------------------------------ gRPC client


@dataclass(slots=True)
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Identity | Rejection | TokenReviewUnavailable | None = None


class TokenReviewClient:
    """`TokenReviewer` over `KeyService.ReviewToken` to the control plane at ``target`` ("host:port").

    One per worker, long-lived (its cache outlives configs). `run` holds the channel; start it in the
    worker's task group before serving.
    """

    def __init__(
        self,
        target: str,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        channel: Callable[[], grpc.aio.Channel] | None = None,
    ) -> None:
        self.target = target
        # Opens the channel (the worker's adds TLS and its xDS token); default: plaintext to `target`.
        self._open_channel = channel or partial(grpc.aio.insecure_channel, target)
        self.call_timeout = call_timeout
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.calls = 0  # ReviewToken calls made (for tests)
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[Identity | Rejection, float]] = OrderedDict()
        self._inflight: dict[bytes, _Flight] = {}
        self._stub: keys_pb2_grpc.KeyServiceStub | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the channel until cancelled."""
        async with self._open_channel() as channel:
            self._stub = keys_pb2_grpc.KeyServiceStub(channel)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._stub = None

    async def review(self, token: str, audiences: tuple[str, ...]) -> Identity | Rejection:
        key = _key(token, audiences)
        while True:
            cached = self._cached(key)
            if cached is not None:
                return cached
            flight = self._inflight.get(key)
            if flight is None:
                return await self._lead(key, token, audiences)
            await flight.done.wait()
            outcome = flight.outcome
            if isinstance(outcome, TokenReviewUnavailable):
                raise outcome
            if outcome is not None:
                return outcome
            # The leader was cancelled (its client went away): one of the waiters leads now.

    def _cached(self, key: bytes) -> Identity | Rejection | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._cache[key]
            return None
        return entry[0]

    def _remember(self, key: bytes, outcome: Identity | Rejection, expiry: float | None) -> None:
        now = self._clock()
        deadline = now + (self.ttl if isinstance(outcome, Identity) else self.negative_ttl)
        if expiry is not None:
            deadline = min(deadline, expiry)
        if deadline <= now:
            return
        cache = self._cache
        cache[key] = (outcome, deadline)
        cache.move_to_end(key)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)

    async def _lead(self, key: bytes, token: str, audiences: tuple[str, ...]) -> Identity | Rejection:
        flight = self._inflight[key] = _Flight()
        try:
            outcome = flight.outcome = await self._call(token, audiences)
            if outcome is not _BAD_ARGUMENT:
                self._remember(key, outcome, _expiry(unverified_claims(token)))
        except TokenReviewUnavailable as exc:
            flight.outcome = exc
        finally:
            del self._inflight[key]
            flight.done.set()
        if isinstance(flight.outcome, TokenReviewUnavailable):
            raise flight.outcome
        assert flight.outcome is not None
        return flight.outcome

    async def _call(self, token: str, audiences: tuple[str, ...]) -> Identity | Rejection:
        stub = self._stub
        if stub is None:
            raise TokenReviewUnavailable("the proxy is not connected to the control plane")
        self.calls += 1
        request = keys_pb2.ReviewTokenRequest(token=token, audiences=audiences)
        try:
            # gRPC's deadline answers DEADLINE_EXCEEDED; the scope is only a backstop behind it.
            with anyio.fail_after(self.call_timeout + 1.0):
                response = await stub.ReviewToken(request, timeout=self.call_timeout)
        except TimeoutError:
            raise TokenReviewUnavailable(f"no token review answer within {self.call_timeout:g}s") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                log.info("token review refused the token", detail=exc.details())
                return _BAD_ARGUMENT  # about the token (too large...): a 401, not cached
            log.warning("token review unavailable", code=exc.code().name, detail=exc.details())
            raise TokenReviewUnavailable(f"token review unavailable ({exc.code().name}: {exc.details()})") from None
        claims = unverified_claims(token)
        outcome = identity_from_review(response, audiences, claims)
        if isinstance(outcome, Rejection):
            log.info("service-account token refused", reason=outcome.reason, error=response.error)
        return outcome


def _key(token: str, audiences: tuple[str, ...]) -> bytes:
    digest = hashlib.sha256(token.encode("latin-1", "replace"))
    for audience in audiences:
        digest.update(b"\0" + audience.encode())
    return digest.digest()


__all__ = [
    "NOT_AUTHENTICATED",
    "ReviewedIssuer",
    "TokenReviewClient",
    "TokenReviewSpec",
    "TokenReviewUnavailable",
    "identity_from_review",
    "unverified_claims",
]
