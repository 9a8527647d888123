"""Service-account tokens reviewed through the control plane, as a worker sees them: the identity a
review proves, `TokenReviewClient` over real gRPC to a control plane whose reviewer talks to the
in-process Kubernetes API (tests/peers/kube_api.py) with the real kubernetes-asyncio client (cache,
single flight, timeouts, control plane down), and the authenticator choosing TokenReview by issuer
(200 identity, 401 with a challenge, 503 without one, permissive mode)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry

from controlplane.grpc_server import RunningGrpcServer, start_grpc_server
from controlplane.jwks import JwksFetcher
from controlplane.jwks_wiring import JwksWiring
from controlplane.snapshot import SnapshotCache
from controlplane.token_review import KubeApiConfig, KubeTokenReviewer, TokenReviewService
from dataplane.policy.authn import Anonymous, AuthnConfigError, AuthnSpec, IdentityHeaderSpec, Refusal, compile_authn
from dataplane.policy.credentials import Rejection
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import AUDIENCE_MISMATCH, EXPIRED, NOT_SERVICE_ACCOUNT
from dataplane.policy.token_review import (
    NOT_AUTHENTICATED,
    TokenReviewClient,
    TokenReviewSpec,
    TokenReviewUnavailable,
    identity_from_review,
    unverified_claims,
)
from shared.api.agentgate.policy.v1 import keys_pb2
from tests.dataplane.policy.test_jwt import AUDIENCE, claims, ec_key, provider, sign
from tests.peers.kube_api import ISSUER, FakeKubeApi, kube_api

pytestmark = pytest.mark.anyio
ONE_LOOP = pytest.mark.usefixtures("shared_event_loop")  # grpc.aio: one loop for every async test here
WAIT = 10.0
KEY = ec_key("idp-key")
REVIEW = TokenReviewSpec("serviceaccount", ISSUER, (AUDIENCE,))


def response(**fields: object) -> keys_pb2.ReviewTokenResponse:
    values: dict[str, object] = {
        "authenticated": True,
        "username": "system:serviceaccount:team-a:agent",
        "uid": "u-1",
        "groups": ["system:serviceaccounts"],
        "audiences": [AUDIENCE],
    }
    values.update(fields)
    return keys_pb2.ReviewTokenResponse(**values)  # type: ignore[arg-type]


# --- pure core ------------------------------------------------------------------------------------------


def test_review_proves_a_service_account_identity() -> None:
    reviewed = response()
    reviewed.extra["authentication.kubernetes.io/pod-name"].values.append("agent-0")
    identity = identity_from_review(reviewed, (AUDIENCE,), {"iss": ISSUER, "exp": 2_000_000_000})
    assert isinstance(identity, Identity)
    assert identity.principal == "system:serviceaccount:team-a:agent"
    assert (identity.method, identity.namespace, identity.service_account) == ("serviceaccount", "team-a", "agent")
    assert identity.issuer == ISSUER
    assert identity.claims["sub"] == identity.principal and identity.claims["exp"] == 2_000_000_000
    assert identity.claims["kubernetes.io"]["serviceaccount"] == {"name": "agent", "uid": "u-1"}
    assert identity.claims["extra"] == {"authentication.kubernetes.io/pod-name": ["agent-0"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"authenticated": False, "username": "", "error": "invalid bearer token"}, NOT_AUTHENTICATED),
        ({"audiences": []}, AUDIENCE_MISMATCH),  # valid only for the API server itself
        ({"audiences": ["vault"]}, AUDIENCE_MISMATCH),
        ({"username": "alice@example.com"}, NOT_SERVICE_ACCOUNT),
        ({"username": "system:serviceaccount:Team_A:agent"}, NOT_SERVICE_ACCOUNT),
        ({"username": "system:serviceaccount:team-a"}, NOT_SERVICE_ACCOUNT),
    ],
)
def test_review_refusals(fields: dict[str, object], expected: Rejection) -> None:
    assert identity_from_review(response(**fields), (AUDIENCE,), None) == expected


def test_unverified_claims_reads_only_jwt_shaped_tokens() -> None:
    assert unverified_claims(sign(KEY, claims(iss=ISSUER)))["iss"] == ISSUER  # type: ignore[index]
    assert unverified_claims(b"opaque") is None
    assert unverified_claims(b"a.bm90IGpzb24.c") is None


def test_token_review_needs_a_reviewer_and_an_audience() -> None:
    with pytest.raises(AuthnConfigError, match="control plane connection"):
        compile_authn(AuthnSpec(token_review=REVIEW))
    client = TokenReviewClient("127.0.0.1:1")
    with pytest.raises(AuthnConfigError) as raised:
        compile_authn(AuthnSpec(token_review=TokenReviewSpec("sa", ISSUER, ())), token_reviewer=client)
    assert raised.value.field == "token_review.audiences"
    with pytest.raises(AuthnConfigError, match="also the issuer"):
        compile_authn(
            AuthnSpec(jwt_providers=(provider(KEY, issuer=ISSUER),), token_review=REVIEW), token_reviewer=client
        )


# --- the client against a control plane and the Kubernetes API ------------------------------------------


@dataclass
class Peers:
    api: FakeKubeApi
    service: TokenReviewService
    server: RunningGrpcServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def peers(tmp_path: Path) -> AsyncIterator[Peers]:
    """The fake Kubernetes API and a control plane gRPC server whose KeyService reviews through it."""
    async with kube_api() as api:
        config = KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
        reviewer = KubeTokenReviewer(await config.api_client(), timeout=WAIT)
        service = TokenReviewService(reviewer, timeout=WAIT)
        wiring = JwksWiring(JwksFetcher())
        server = await start_grpc_server(
            SnapshotCache(), "127.0.0.1:0", registry=CollectorRegistry(), jwks=wiring, token_review=service
        )
        try:
            yield Peers(api, service, server)
        finally:
            await server.stop(None)
            await reviewer.aclose()


@asynccontextmanager
async def running(client: TokenReviewClient) -> AsyncIterator[TokenReviewClient]:
    async with anyio.create_task_group() as group:
        await group.start(client.run)
        yield client
        group.cancel_scope.cancel()


@ONE_LOOP
async def test_client_reviews_and_caches(tmp_path: Path) -> None:
    async with peers(tmp_path) as p, running(TokenReviewClient(p.target)) as client:
        token = p.api.add_service_account_token("team-a", "agent", [AUDIENCE])
        wrong = p.api.add_service_account_token("team-a", "agent", ["vault"])
        with anyio.fail_after(WAIT):
            first = await client.review(token, (AUDIENCE,))
            second = await client.review(token, (AUDIENCE,))
            refused = await client.review(wrong, (AUDIENCE,))
            refused_again = await client.review(wrong, (AUDIENCE,))
            other_audiences = await client.review(token, (AUDIENCE, "more"))
    assert isinstance(first, Identity) and first.principal == "system:serviceaccount:team-a:agent"
    assert first.namespace == "team-a" and first.service_account == "agent"
    assert second is first  # the worker's cache: same object, so CEL contexts are reused too
    assert refused == NOT_AUTHENTICATED and refused_again == NOT_AUTHENTICATED
    assert isinstance(other_audiences, Identity)  # another key: reviewed again
    assert client.calls == 3
    assert p.api.reviews_of(token) == 2 and p.api.reviews_of(wrong) == 1


@ONE_LOOP
async def test_concurrent_reviews_of_one_token_make_one_call(tmp_path: Path) -> None:
    async with peers(tmp_path) as p, running(TokenReviewClient(p.target)) as client:
        token = p.api.add_service_account_token("ns", "sa", [AUDIENCE])
        p.api.stall()
        outcomes: list[Identity | Rejection] = []

        async def review() -> None:
            outcomes.append(await client.review(token, (AUDIENCE,)))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(review)
                await p.api.stalled()  # the one call reached the API; the other reviews joined it
                p.api.release()
    assert len(outcomes) == 8 and all(outcome is outcomes[0] for outcome in outcomes)
    assert isinstance(outcomes[0], Identity)
    assert client.calls == 1 and p.api.reviews_of(token) == 1


@ONE_LOOP
async def test_slow_or_missing_control_plane_is_unavailable(tmp_path: Path) -> None:
    async with peers(tmp_path) as p:
        token = p.api.add_service_account_token("ns", "sa", [AUDIENCE])
        with anyio.fail_after(WAIT), pytest.raises(TokenReviewUnavailable, match="not connected"):
            await TokenReviewClient(p.target).review(token, (AUDIENCE,))  # run() never started
        async with running(TokenReviewClient(p.target, call_timeout=0.3)) as client:
            p.api.stall()
            started = time.monotonic()
            with anyio.fail_after(WAIT), pytest.raises(TokenReviewUnavailable):
                await client.review(token, (AUDIENCE,))
            assert time.monotonic() - started < 3.0
            p.api.release()
            with anyio.fail_after(WAIT):
                assert isinstance(await client.review(token, (AUDIENCE,)), Identity)  # failures are not cached
        port = p.server.port
    async with running(TokenReviewClient(f"127.0.0.1:{port}")) as client:
        with anyio.fail_after(WAIT), pytest.raises(TokenReviewUnavailable, match="UNAVAILABLE"):
            await client.review(token, (AUDIENCE,))


# --- the authenticator ----------------------------------------------------------------------------------


def bearer(token: str | bytes) -> list[tuple[bytes, bytes]]:
    value = token if isinstance(token, bytes) else token.encode()
    return [(b"authorization", b"Bearer " + value), (b"x-sa", b"spoofed")]


@ONE_LOOP
async def test_authenticator_routes_by_issuer_and_maps_outcomes(tmp_path: Path) -> None:
    spec = AuthnSpec(
        jwt_providers=(provider(KEY),),
        token_review=REVIEW,
        identity_headers=(IdentityHeaderSpec("x-sa", "principal"), IdentityHeaderSpec("x-ns", "namespace")),
    )
    async with peers(tmp_path) as p, running(TokenReviewClient(p.target)) as client:
        authenticator = compile_authn(spec, token_reviewer=client)
        token = p.api.add_service_account_token("team-a", "agent", [AUDIENCE])
        wrong = p.api.add_service_account_token("team-a", "agent", ["vault"])
        expired = p.api.add_service_account_token("team-a", "agent", [AUDIENCE], lifetime=-3600)
        with anyio.fail_after(WAIT):
            good = await authenticator.authenticate(bearer(token))
            refused = await authenticator.authenticate(bearer(wrong))
            stale = await authenticator.authenticate(bearer(expired))
            jwt_user = await authenticator.authenticate(bearer(sign(KEY, claims())))  # another issuer: JWT
            opaque = await authenticator.authenticate(bearer("opaque"))  # not JWT-shaped: never reviewed
        assert isinstance(good, Identity) and good.principal == "system:serviceaccount:team-a:agent"
        upstream = dict(authenticator.strip_and_set_headers(bearer(token), good))
        assert upstream == {b"x-sa": b"system:serviceaccount:team-a:agent", b"x-ns": b"team-a"}
        assert isinstance(refused, Refusal) and refused.status == 401
        assert refused.www_authenticate.startswith('Bearer realm="agentgate", error="invalid_token"')
        assert isinstance(stale, Refusal) and stale.reason == EXPIRED.reason
        assert p.api.reviews_of(expired) == 0  # refused locally from its exp
        assert isinstance(jwt_user, Identity) and jwt_user.method == "jwt"
        assert isinstance(opaque, Refusal) and opaque.status == 401
        assert p.api.reviews_of("opaque") == 0

        # Control plane gone: 503 without a challenge (strict), anonymous (permissive).
        fresh = p.api.add_service_account_token("team-a", "agent", [AUDIENCE])
        await p.server.stop(None)
        with anyio.fail_after(WAIT):
            unavailable = await authenticator.authenticate(bearer(fresh))
            permissive = compile_authn(AuthnSpec(token_review=REVIEW, mode="permissive"), token_reviewer=client)
            anonymous = await permissive.authenticate(bearer(fresh))
            cached = await authenticator.authenticate(bearer(token))
        assert isinstance(unavailable, Refusal) and unavailable.status == 503
        assert unavailable.headers() == [] and unavailable.reason == "token_review_unavailable"
        assert anonymous == Anonymous("token_review_unavailable")
        assert cached is good  # still within the worker's TTL
