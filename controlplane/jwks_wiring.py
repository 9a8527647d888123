"""Remote JWKS in the snapshots: which URLs the Policies name, their keys filled in before publishing,
and `KeyService`, the gRPC service proxies call for keys and credentials: `RefreshJwks` when a token's
kid is unknown, `ReviewToken` for service-account tokens a Policy validates by TokenReview (the review
itself, its cache and the Kubernetes client are `controlplane.token_review`'s).

The translator stays pure and leaves `Jwks.inline` empty for URL providers. `JwksWiring` keeps a
`JwksFetcher` watching exactly the URLs the current snapshots name; `with_inline_keys` copies each
Policy holding such a provider and fills in the last good keys (the translator's messages may be
shared between snapshots, so they are never edited in place). When a URL's keys change the control
plane publishes again: a Gateway whose Policies use that URL gets a new snapshot version, the others
keep theirs (the snapshot cache recognises identical content).

Refresh cadence: the fetcher refreshes every URL at one interval, the shortest `refresh_interval`
any provider asks for (five minutes when none does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

import grpc

from controlplane.jwks import JwksFetcher
from controlplane.token_review import (
    MAX_AUDIENCES,
    MAX_TOKEN_BYTES,
    ReviewFailure,
    TokenReviewError,
    TokenReviewService,
)
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.api.agentgate.policy.v1 import keys_pb2, keys_pb2_grpc
from shared.logging import get_logger
from shared.resources import POLICY, ResourceMap

log = get_logger("controlplane.jwks")

KEY_SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
DEFAULT_REFRESH_INTERVAL = 300.0


def _providers(policy: pb.Policy) -> Iterator[pb.JwtProvider | pb.ServiceAccountProvider]:
    if not policy.HasField("authentication"):
        return
    yield from policy.authentication.jwt_providers
    yield from policy.authentication.service_account_providers


def _remote(provider: pb.JwtProvider | pb.ServiceAccountProvider) -> pb.Jwks | None:
    return provider.jwks if provider.HasField("jwks") and provider.jwks.url else None


def jwks_sources(snapshots: Mapping[str, ResourceMap]) -> dict[str, float | None]:
    """Every JWKS URL the snapshots' Policies name -> the shortest refresh interval asked for it
    (None: no provider set one)."""
    sources: dict[str, float | None] = {}
    for resources in snapshots.values():
        for policy in resources.get(POLICY, {}).values():
            if not isinstance(policy, pb.Policy):
                continue
            for provider in _providers(policy):
                jwks = _remote(provider)
                if jwks is None:
                    continue
                asked = None
                if jwks.HasField("refresh_interval"):
                    asked = jwks.refresh_interval.ToTimedelta().total_seconds()
                known = sources.get(jwks.url)
                if jwks.url not in sources or (asked is not None and (known is None or asked < known)):
                    sources[jwks.url] = asked
    return sources


def with_inline_keys(resources: ResourceMap, keys_for: Callable[[str], str | None]) -> ResourceMap:
    """`resources` with the current keys of every URL provider inline. Policies without one are
    shared as they are; a URL with no keys yet (first fetch pending or failed) stays empty inline."""
    policies = resources.get(POLICY)
    if not policies:
        return resources
    filled: dict[str, object] = {}
    changed = False
    for name, policy in policies.items():
        if not isinstance(policy, pb.Policy) or not any(_remote(p) is not None for p in _providers(policy)):
            filled[name] = policy
            continue
        copy = pb.Policy()
        copy.CopyFrom(policy)
        for provider in _providers(copy):
            jwks = _remote(provider)
            if jwks is not None:
                jwks.inline = keys_for(jwks.url) or ""
        filled[name] = copy
        changed = True
    if not changed:
        return resources
    out = dict(resources)
    out[POLICY] = filled  # type: ignore[assignment]
    return out


class JwksWiring:
    """The fetcher of the URLs the current config names, and the snapshots' view of its keys."""

    def __init__(self, fetcher: JwksFetcher) -> None:
        self.fetcher = fetcher
        self._default_interval = fetcher.refresh_interval or DEFAULT_REFRESH_INTERVAL
        self._urls: frozenset[str] = frozenset()

    def update(self, snapshots: Mapping[str, ResourceMap]) -> None:
        """Watch the URLs of `snapshots` (new ones are fetched at once by `fetcher.run`)."""
        sources = jwks_sources(snapshots)
        usable = {}
        for url, interval in sources.items():
            problem = self._url_problem(url)
            if problem:
                log.warning("jwks url not fetched", url=url, reason=problem)
                continue
            usable[url] = interval
        intervals = [interval for interval in usable.values() if interval is not None]
        self.fetcher.refresh_interval = min([self._default_interval, *intervals])
        urls = frozenset(usable)
        if urls != self._urls:
            log.info("jwks urls watched", urls=sorted(urls))
        self._urls = urls
        self.fetcher.watch(urls)

    def watches(self, url: str) -> bool:
        return url in self._urls

    def inline(self, resources: ResourceMap) -> ResourceMap:
        return with_inline_keys(resources, self.fetcher.keys_for)

    def _url_problem(self, url: str) -> str:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            return str(exc)
        if parts.scheme == "https" or (parts.scheme == "http" and self.fetcher.allow_http):
            return "" if parts.hostname else "no host"
        return "must be an https URL"


_REVIEW_STATUS = {
    ReviewFailure.NOT_CONFIGURED: grpc.StatusCode.FAILED_PRECONDITION,
    ReviewFailure.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    ReviewFailure.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ReviewFailure.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    """`RefreshJwks`: a proxy met an unknown kid (coalescing and throttling are the fetcher's).
    `ReviewToken`: a proxy holds a service-account token to review (caching and single flight are
    the `TokenReviewService`'s; without one every review is FAILED_PRECONDITION)."""

    def __init__(self, wiring: JwksWiring, token_review: TokenReviewService | None = None) -> None:
        self._wiring = wiring
        self._token_review = token_review

    async def RefreshJwks(
        self, request: keys_pb2.RefreshJwksRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.RefreshJwksResponse:
        url = request.url
        if not url:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "url is required")
        if not self._wiring.watches(url):
            # Never fetch an address a caller made up: only what the config names.
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no Policy names the JWKS URL {url!r}")
        fetcher = self._wiring.fetcher
        refreshed = await fetcher.refresh_now(url)
        log.info("jwks refresh requested", url=url, refreshed=refreshed, peer=context.peer())
        return keys_pb2.RefreshJwksResponse(refreshed=refreshed, error="" if refreshed else fetcher.error_for(url))

    async def ReviewToken(
        self, request: keys_pb2.ReviewTokenRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ReviewTokenResponse:
        token, audiences = request.token, tuple(request.audiences)
        if not token:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token is required")
        if len(token) > MAX_TOKEN_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token larger than {MAX_TOKEN_BYTES} bytes")
        # No audience would review the token for the API server's own audience: never what a proxy wants.
        if not audiences or len(audiences) > MAX_AUDIENCES or not all(audiences):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"audiences: 1 to {MAX_AUDIENCES} non-empty audiences are required"
            )
        service = self._token_review
        if service is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no Kubernetes API configured")
        assert service is not None
        try:
            result = await service.review(token, audiences)
        except TokenReviewError as exc:
            await context.abort(_REVIEW_STATUS[exc.failure], exc.message)
            raise  # abort raises; this keeps type checkers content
        if not result.authenticated:
            log.info("token review: not authenticated", error=result.error, audiences=list(audiences))
        response = keys_pb2.ReviewTokenResponse(
            authenticated=result.authenticated,
            username=result.username,
            uid=result.uid,
            groups=result.groups,
            audiences=result.audiences,
            error=result.error,
        )
        for name, values in result.extra.items():
            response.extra[name].values.extend(values)
        return response


__all__ = ["KEY_SERVICE", "JwksWiring", "KeyService", "jwks_sources", "with_inline_keys"]
