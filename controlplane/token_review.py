"""Kubernetes TokenReview for the data plane: workers send a service-account token over gRPC
(`KeyService.ReviewToken`), the control plane asks the Kubernetes API whether it is valid, with its
own credentials, and answers with the TokenReview status.

Workers never hold API credentials and never call the API server. Here a review costs the API server
one request per distinct token per TTL, whatever the number of workers and requests:

- results are cached by the SHA-256 of (token, audiences), never the token itself; a positive result
  for ``ttl`` seconds but never past the token's own ``exp`` (read without verification, only ever to
  shorten the TTL), a negative one for ``negative_ttl``; errors are not cached;
- concurrent reviews of one token share one API call (single flight);
- every call runs under ``timeout``.

The cache and single flight (`TokenReviewService`) are a pure core around a `Reviewer` callable; the
real one, `KubeTokenReviewer`, is a thin shell over kubernetes-asyncio's
``AuthenticationV1Api.create_token_review``. Where its client config comes from is `KubeApiConfig`:
``--kubeconfig PATH``, else the pod's service account when ``KUBERNETES_SERVICE_HOST`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import anyio

from shared.logging import get_logger

if TYPE_CHECKING:  # imported when first used: the client package takes most of a second to import
    from kubernetes_asyncio.client import ApiClient
    from kubernetes_asyncio.client.exceptions import ApiException

log = get_logger("controlplane.token_review")

DEFAULT_TTL: Final = 60.0
DEFAULT_NEGATIVE_TTL: Final = 5.0
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_MAX_ENTRIES: Final = 4096
MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_AUDIENCES: Final = 16


class ReviewFailure(Enum):
    """Why no answer could be had; the gRPC layer maps each to a status code."""

    NOT_CONFIGURED = "not_configured"  # no kubeconfig and not in a pod
    REFUSED = "refused"  # the API refused our own credentials (401/403) or the request (4xx)
    UNAVAILABLE = "unavailable"  # connection failed, 5xx, unreadable answer
    TIMEOUT = "timeout"


class TokenReviewError(Exception):
    """A review that produced no answer (not a negative answer: that is a `ReviewResult`)."""

    def __init__(self, failure: ReviewFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


_EMPTY_EXTRA: Mapping[str, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """A TokenReview status: ``authenticated`` with the user, or not with ``error``."""

    authenticated: bool
    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY_EXTRA)
    error: str = ""


Reviewer = Callable[[str, tuple[str, ...]], Awaitable[ReviewResult]]


# ------------------------------------------------------------------------------------------- pure core


def token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT-shaped token, unverified (only to bound a cache entry), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    expiry = payload.get("exp") if isinstance(payload, dict) else None
    if type(expiry) not in (int, float) or not math.isfinite(expiry):
        return None
    return float(expiry)


def cache_key(token: str, audiences: Sequence[str]) -> bytes:
    """SHA-256 of the token and the audiences asked for (a result is only valid for those)."""
    digest = hashlib.sha256(token.encode())
    for audience in audiences:
        digest.update(b"\0" + audience.encode())
    return digest.digest()


class ReviewCache:
    """Bounded LRU of review results by `cache_key`, each with its own deadline."""

    __slots__ = ("_clock", "_entries", "max_entries", "negative_ttl", "ttl")

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 0 or negative_ttl < 0 or max_entries < 1:
            raise ValueError("ttl and negative_ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[ReviewResult, float]] = OrderedDict()

    def get(self, key: bytes) -> ReviewResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, result: ReviewResult, token_expires: float | None) -> None:
        """Remember ``result`` for its TTL, cut at ``token_expires`` (wall-clock seconds)."""
        now = self._clock()
        deadline = now + (self.ttl if result.authenticated else self.negative_ttl)
        if result.authenticated and token_expires is not None:
            deadline = min(deadline, token_expires)
        if deadline <= now:
            self._entries.pop(key, None)
            return
        self._entries[key] = (result, deadline)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class _Flight:
    """One review in progress; callers asking for the same key meanwhile wait for its outcome."""

    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: ReviewResult | TokenReviewError | None = None


class TokenReviewService:
    """Cached, single-flight, time-bounded reviews. ``reviewer`` is None until a Kubernetes API is
    configured; `review` then raises NOT_CONFIGURED with ``not_configured`` as the message."""

    def __init__(
        self,
        reviewer: Reviewer | None = None,
        *,
        cache: ReviewCache | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        not_configured: str = "no Kubernetes API configured (start the control plane with --kubeconfig, or in a pod)",
    ) -> None:
        self.reviewer = reviewer
        self.cache = cache if cache is not None else ReviewCache()
        self.timeout = timeout
        self.not_configured = not_configured
        self.calls = 0  # reviews sent to the API (for tests and logs)
        self._inflight: dict[bytes, _Flight] = {}

    async def review(self, token: str, audiences: Sequence[str]) -> ReviewResult:
        """The TokenReview status for ``token`` and ``audiences``; raises `TokenReviewError`."""
        wanted = tuple(audiences)
        key = cache_key(token, wanted)
        while True:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            flight = self._inflight.get(key)
            if flight is None:
                return await self._lead(key, token, wanted)
            await flight.done.wait()
            if isinstance(flight.outcome, TokenReviewError):
                raise flight.outcome
            if flight.outcome is not None:
                return flight.outcome
            # The leader was cancelled before it had an outcome: go again (one caller leads).

    async def _lead(self, key: bytes, token: str, audiences: tuple[str, ...]) -> ReviewResult:
        reviewer = self.reviewer
        if reviewer is None:
            raise TokenReviewError(ReviewFailure.NOT_CONFIGURED, self.not_configured)
        flight = self._inflight[key] = _Flight()
        try:
            self.calls += 1
            try:
                with anyio.fail_after(self.timeout):
                    flight.outcome = await reviewer(token, audiences)
            except TimeoutError:
                flight.outcome = TokenReviewError(
                    ReviewFailure.TIMEOUT, f"the Kubernetes API did not answer the TokenReview within {self.timeout:g}s"
                )
            except TokenReviewError as exc:
                flight.outcome = exc
            if isinstance(flight.outcome, ReviewResult):
                self.cache.put(key, flight.outcome, token_expiry(token))
        finally:
            del self._inflight[key]
            flight.done.set()
        if isinstance(flight.outcome, TokenReviewError):
            log.warning("token review failed", failure=flight.outcome.failure.value, error=flight.outcome.message)
            raise flight.outcome
        assert flight.outcome is not None
        return flight.outcome


# ------------------------------------------------------------------------------------ Kubernetes shell


@dataclass(frozen=True)
class KubeApiConfig:
    """Where the Kubernetes client config comes from: a kubeconfig file, or the pod's service account."""

    kubeconfig: Path | None = None
    in_cluster: bool = False
    context: str | None = None

    @classmethod
    def detect(cls, kubeconfig: str | None, environ: Mapping[str, str] = os.environ) -> KubeApiConfig | None:
        """``--kubeconfig`` if given, else in-cluster when ``KUBERNETES_SERVICE_HOST`` is set, else None."""
        if kubeconfig:
            return cls(kubeconfig=Path(kubeconfig))
        if environ.get("KUBERNETES_SERVICE_HOST"):
            return cls(in_cluster=True)
        return None

    def describe(self) -> str:
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig is not None else "in-cluster service account"

    async def api_client(self) -> ApiClient:
        """A connected client (call on the event loop; close it with ``await client.close()``).
        Raises `ConfigException` (or OSError) naming what is wrong with the config."""
        from kubernetes_asyncio import client as kube_client
        from kubernetes_asyncio import config as kube_config
        from kubernetes_asyncio.config.config_exception import ConfigException

        configuration = kube_client.Configuration()
        if self.kubeconfig is not None:
            if not self.kubeconfig.is_file():
                raise ConfigException(f"kubeconfig {self.kubeconfig} does not exist or is not a file")
            await kube_config.load_kube_config(
                config_file=str(self.kubeconfig),
                context=self.context,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
        return kube_client.ApiClient(configuration)


def _status_message(exc: ApiException) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason."""
    body = exc.body
    try:
        status = json.loads(body) if body else None
    except (ValueError, TypeError):
        status = None
    if isinstance(status, dict) and isinstance(status.get("message"), str):
        return status["message"][:300]
    return str(exc.reason or "")


def result_of(review: Any) -> ReviewResult:
    """A `ReviewResult` from a kubernetes-asyncio ``V1TokenReview`` (status fields may be None)."""
    status = review.status
    if status is None:
        raise TokenReviewError(ReviewFailure.UNAVAILABLE, "the Kubernetes API answered a TokenReview without status")
    user = status.user
    extra: dict[str, tuple[str, ...]] = {}
    if user is not None and user.extra:
        extra = {str(name): tuple(str(v) for v in values or ()) for name, values in user.extra.items()}
    return ReviewResult(
        authenticated=bool(status.authenticated),
        username=(user.username or "") if user is not None else "",
        uid=(user.uid or "") if user is not None else "",
        groups=tuple(user.groups or ()) if user is not None else (),
        audiences=tuple(status.audiences or ()),
        extra=MappingProxyType(extra),
        error=status.error or "",
    )


class KubeTokenReviewer:
    """POSTs TokenReviews with a kubernetes-asyncio client: the `Reviewer` of a `TokenReviewService`."""

    def __init__(self, api_client: ApiClient, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        from kubernetes_asyncio import client as kube_client

        self.api_client = api_client
        self._api = kube_client.AuthenticationV1Api(api_client)
        self.timeout = timeout

    async def __call__(self, token: str, audiences: tuple[str, ...]) -> ReviewResult:
        import aiohttp
        from kubernetes_asyncio import client as kube_client
        from kubernetes_asyncio.client.exceptions import ApiException

        body = kube_client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kube_client.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        try:
            review = await self._api.create_token_review(body, _request_timeout=self.timeout)
        except ApiException as exc:
            message = _status_message(exc)
            if exc.status in (401, 403):
                raise TokenReviewError(
                    ReviewFailure.REFUSED,
                    f"the Kubernetes API refused the control plane's credentials ({exc.status} {message}); "
                    "it needs RBAC permission to create tokenreviews.authentication.k8s.io",
                ) from None
            if exc.status is not None and 400 <= exc.status < 500:
                raise TokenReviewError(
                    ReviewFailure.REFUSED, f"the Kubernetes API refused the TokenReview ({exc.status} {message})"
                ) from None
            raise TokenReviewError(
                ReviewFailure.UNAVAILABLE, f"the Kubernetes API failed the TokenReview ({exc.status} {message})"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if isinstance(exc, TimeoutError):  # aiohttp's own timeouts: TokenReviewService reports them
                raise
            raise TokenReviewError(
                ReviewFailure.UNAVAILABLE, f"cannot reach the Kubernetes API: {exc or type(exc).__name__}"
            ) from None
        return result_of(review)

    async def aclose(self) -> None:
        await self.api_client.close()


__all__ = [
    "KubeApiConfig",
    "KubeTokenReviewer",
    "ReviewCache",
    "ReviewFailure",
    "ReviewResult",
    "Reviewer",
    "TokenReviewError",
    "TokenReviewService",
    "cache_key",
    "result_of",
    "token_expiry",
]
