"""TokenReview in the control plane: the cache (TTL, negative TTL, token expiry, bound), the real
kubernetes-asyncio client against the in-process Kubernetes API (tests/peers/kube_api.py), single
flight and timeouts, the fake's own error answers, and `KeyService.ReviewToken` over real gRPC from a
running `ControlPlane` configured with a kubeconfig."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import anyio
import grpc
import httpx
import pytest

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.token_review import (
    KubeApiConfig,
    KubeTokenReviewer,
    ReviewCache,
    ReviewFailure,
    ReviewResult,
    TokenReviewError,
    TokenReviewService,
    cache_key,
    token_expiry,
)
from shared.api.agentgate.policy.v1 import keys_pb2, keys_pb2_grpc
from tests.conftest import free_port
from tests.peers.kube_api import API_AUDIENCE, FakeKubeApi, kube_api

# Async tests share one event loop: grpc.aio delivers late completions to the loop that started a call.
pytestmark = pytest.mark.anyio
ONE_LOOP = pytest.mark.usefixtures("shared_event_loop")

AUDIENCE = "agentgate"
WAIT = 10.0
OK = ReviewResult(True, "system:serviceaccount:ns:sa", audiences=(AUDIENCE,))
NO = ReviewResult(False, error="invalid bearer token")


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def jwt_with(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


# --- pure core ------------------------------------------------------------------------------------------


def test_token_expiry_is_read_only_from_jwt_shaped_tokens() -> None:
    assert token_expiry(jwt_with({"exp": 1234})) == 1234.0
    assert token_expiry(jwt_with({"sub": "x"})) is None
    assert token_expiry(jwt_with({"exp": "soon"})) is None
    assert token_expiry("opaque-token") is None
    assert token_expiry("a.!!!.c") is None


def test_cache_key_depends_on_token_and_audiences() -> None:
    assert cache_key("t", ("a",)) == cache_key("t", ("a",))
    assert cache_key("t", ("a",)) != cache_key("t", ("b",))
    assert cache_key("t", ("a", "b")) != cache_key("t", ("ab",))
    assert cache_key("t", ("a",)) != cache_key("u", ("a",))
    assert b"t" not in cache_key("t", ("a",))  # a digest, 32 bytes, not the token
    assert len(cache_key("t", ())) == 32


def test_cache_ttl_negative_ttl_and_token_expiry() -> None:
    clock = Clock()
    cache = ReviewCache(ttl=60, negative_ttl=5, clock=clock)
    cache.put(b"ok", OK, None)
    cache.put(b"no", NO, None)
    cache.put(b"short", OK, clock.now + 10)  # the token expires before the TTL
    cache.put(b"expired", OK, clock.now - 1)  # already expired: not remembered
    assert cache.get(b"expired") is None
    clock.now += 4.9
    assert cache.get(b"ok") is OK and cache.get(b"no") is NO and cache.get(b"short") is OK
    clock.now += 0.2
    assert cache.get(b"no") is None
    clock.now += 5
    assert cache.get(b"short") is None
    assert cache.get(b"ok") is OK
    clock.now += 50
    assert cache.get(b"ok") is None
    assert len(cache) == 0


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = ReviewCache(max_entries=2, clock=Clock())
    cache.put(b"a", OK, None)
    cache.put(b"b", OK, None)
    assert cache.get(b"a") is OK  # a is now the most recently used
    cache.put(b"c", OK, None)
    assert cache.get(b"b") is None
    assert cache.get(b"a") is OK and cache.get(b"c") is OK
    assert len(cache) == 2


@ONE_LOOP
async def test_service_without_reviewer_says_not_configured() -> None:
    with pytest.raises(TokenReviewError) as raised:
        await TokenReviewService().review("token", (AUDIENCE,))
    assert raised.value.failure is ReviewFailure.NOT_CONFIGURED
    assert "no Kubernetes API configured" in raised.value.message


def test_kube_api_config_detection() -> None:
    assert KubeApiConfig.detect("/etc/kube.yaml", {}) == KubeApiConfig(kubeconfig=Path("/etc/kube.yaml"))
    assert KubeApiConfig.detect(None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == KubeApiConfig(in_cluster=True)
    assert KubeApiConfig.detect("/etc/kube.yaml", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).kubeconfig is not None  # type: ignore[union-attr]
    assert KubeApiConfig.detect(None, {}) is None


# --- the real client against the fake API ---------------------------------------------------------------


async def reviewer_for(api: FakeKubeApi, tmp_path: Path, bearer: str | None = None) -> KubeTokenReviewer:
    config = KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig", bearer))
    return KubeTokenReviewer(await config.api_client(), timeout=WAIT)


@ONE_LOOP
async def test_real_client_reviews_valid_wrong_audience_and_unknown_tokens(tmp_path: Path) -> None:
    async with kube_api() as api:
        token = api.add_service_account_token("team-a", "agent", [AUDIENCE], pod="agent-7d9")
        other = api.add_service_account_token("team-a", "agent", ["vault"])
        reviewer = await reviewer_for(api, tmp_path)
        try:
            with anyio.fail_after(WAIT):
                good = await reviewer(token, (AUDIENCE, "spare"))
                wrong = await reviewer(other, (AUDIENCE,))
                unknown = await reviewer("not-a-token", (AUDIENCE,))
        finally:
            await reviewer.aclose()
    assert good.authenticated
    assert good.username == "system:serviceaccount:team-a:agent"
    assert good.audiences == (AUDIENCE,)  # the intersection with what was asked
    assert "system:serviceaccounts:team-a" in good.groups
    assert good.uid and good.extra["authentication.kubernetes.io/pod-name"] == ("agent-7d9",)
    assert not wrong.authenticated and "is invalid for the target audiences" in wrong.error
    assert not unknown.authenticated and unknown.error
    assert api.reviews == [(token, (AUDIENCE, "spare")), (other, (AUDIENCE,)), ("not-a-token", (AUDIENCE,))]


@ONE_LOOP
async def test_real_client_with_wrong_credentials_is_refused(tmp_path: Path) -> None:
    async with kube_api() as api:
        token = api.add_service_account_token("ns", "sa", [AUDIENCE])
        reviewer = await reviewer_for(api, tmp_path, bearer="stolen")
        try:
            with anyio.fail_after(WAIT), pytest.raises(TokenReviewError) as raised:
                await reviewer(token, (AUDIENCE,))
        finally:
            await reviewer.aclose()
    assert raised.value.failure is ReviewFailure.REFUSED
    assert "401" in raised.value.message and "tokenreviews" in raised.value.message
    assert api.reviews == []


@ONE_LOOP
async def test_real_client_with_api_down_is_unavailable(tmp_path: Path) -> None:
    api = FakeKubeApi(port=free_port())  # never started: connection refused
    reviewer = await reviewer_for(api, tmp_path)
    try:
        with anyio.fail_after(WAIT), pytest.raises(TokenReviewError) as raised:
            await reviewer("token", (AUDIENCE,))
    finally:
        await reviewer.aclose()
    assert raised.value.failure is ReviewFailure.UNAVAILABLE
    assert "cannot reach the Kubernetes API" in raised.value.message


@ONE_LOOP
async def test_service_caches_coalesces_and_times_out(tmp_path: Path) -> None:
    async with kube_api() as api:
        token = api.add_service_account_token("ns", "sa", [AUDIENCE])
        reviewer = await reviewer_for(api, tmp_path)
        service = TokenReviewService(reviewer, timeout=WAIT)
        try:
            # Ten concurrent reviews of one token while the API holds its answer: one call.
            api.stall()
            results: list[ReviewResult] = []

            async def review() -> None:
                results.append(await service.review(token, (AUDIENCE,)))

            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(review)
                    await api.stalled()  # the leader's request reached the API; the others joined it
                    assert len(service._inflight) == 1
                    api.release()
                assert len(results) == 10 and all(r is results[0] for r in results) and results[0].authenticated
                assert api.reviews_of(token) == 1
                # Cached: the API is not asked again, an unknown token is (and cached negatively).
                assert (await service.review(token, (AUDIENCE,))).authenticated
                assert not (await service.review("unknown", (AUDIENCE,))).authenticated
                assert not (await service.review("unknown", (AUDIENCE,))).authenticated
                assert api.reviews_of(token) == 1 and api.reviews_of("unknown") == 1
                assert service.calls == 2

            # A stalled API: the review gives up after the timeout, and the failure is not cached.
            api.stall()
            service.timeout = 0.2
            fresh = api.add_service_account_token("ns", "sa", [AUDIENCE])
            with anyio.fail_after(WAIT), pytest.raises(TokenReviewError) as raised:
                await service.review(fresh, (AUDIENCE,))
            assert raised.value.failure is ReviewFailure.TIMEOUT
            api.release()
            service.timeout = WAIT
            with anyio.fail_after(WAIT):
                assert (await service.review(fresh, (AUDIENCE,))).authenticated
        finally:
            await reviewer.aclose()


# --- the fake API's own answers -------------------------------------------------------------------------


@ONE_LOOP
async def test_fake_api_answers_like_kubernetes() -> None:
    async with kube_api() as api, httpx.AsyncClient(base_url=api.url, timeout=WAIT) as client:
        path = "/apis/authentication.k8s.io/v1/tokenreviews"
        auth = {"authorization": f"Bearer {api.bearer}"}
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "x"}}
        missing = await client.post(path, json=review)
        assert missing.status_code == 401
        assert missing.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
        assert (await client.post(path, json=review, headers={"authorization": "Bearer nope"})).status_code == 401
        no_token = await client.post(path, json={**review, "spec": {}}, headers=auth)
        assert no_token.status_code == 400
        assert no_token.json()["message"] == "token is required for TokenReview in authentication"
        garbage = await client.post(path, content=b"{not json", headers={**auth, "content-type": "application/json"})
        assert garbage.status_code == 400 and garbage.json()["reason"] == "BadRequest"
        wrong_kind = await client.post(path, json={**review, "kind": "SubjectAccessReview"}, headers=auth)
        assert wrong_kind.status_code == 400
        assert (await client.get(path, headers=auth)).json()["reason"] == "MethodNotAllowed"
        assert (await client.get("/api/v1/nodes", headers=auth)).json()["code"] == 404
        # No audiences: reviewed for the API server's own audience, as kube-apiserver does.
        token = api.add_service_account_token("ns", "sa", [API_AUDIENCE])
        created = await client.post(path, json={**review, "spec": {"token": token}}, headers=auth)
        assert created.status_code == 201
        assert created.json()["status"]["authenticated"] is True
        assert created.json()["status"]["audiences"] == [API_AUDIENCE]


# --- KeyService.ReviewToken from a running control plane ------------------------------------------------


@ONE_LOOP
async def test_review_token_over_grpc_from_a_control_plane_with_kubeconfig(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    async with kube_api() as api:
        token = api.add_service_account_token("team-a", "agent", [AUDIENCE])
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        settings = ControlPlaneSettings(
            folder, xds_address="127.0.0.1:0", metrics_port=-1, kube_api=KubeApiConfig(kubeconfig=kubeconfig)
        )
        plane = ControlPlane(settings)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                await group.start(plane.run)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
                    stub = keys_pb2_grpc.KeyServiceStub(channel)
                    request = keys_pb2.ReviewTokenRequest(token=token, audiences=[AUDIENCE])
                    good = await stub.ReviewToken(request)
                    again = await stub.ReviewToken(request)
                    bad = await stub.ReviewToken(keys_pb2.ReviewTokenRequest(token="forged", audiences=[AUDIENCE]))
                    with pytest.raises(grpc.aio.AioRpcError) as no_audience:
                        await stub.ReviewToken(keys_pb2.ReviewTokenRequest(token=token))
                    with pytest.raises(grpc.aio.AioRpcError) as no_token:
                        await stub.ReviewToken(keys_pb2.ReviewTokenRequest(audiences=[AUDIENCE]))
                    await api.stop()
                    fresh = api.add_service_account_token("team-a", "agent", [AUDIENCE])
                    with pytest.raises(grpc.aio.AioRpcError) as down:
                        await stub.ReviewToken(keys_pb2.ReviewTokenRequest(token=fresh, audiences=[AUDIENCE]))
                group.cancel_scope.cancel()
    assert good.authenticated and good.username == "system:serviceaccount:team-a:agent"
    assert list(good.audiences) == [AUDIENCE] and "system:authenticated" in good.groups
    assert list(good.extra["authentication.kubernetes.io/credential-id"].values)
    assert again == good and api.reviews_of(token) == 1
    assert not bad.authenticated and bad.error
    assert no_audience.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Kubernetes API" in (down.value.details() or "")


@ONE_LOOP
async def test_review_token_without_kubernetes_api_is_failed_precondition(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    plane = ControlPlane(ControlPlaneSettings(folder, xds_address="127.0.0.1:0", metrics_port=-1))
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            await group.start(plane.run)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
                stub = keys_pb2_grpc.KeyServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.ReviewToken(keys_pb2.ReviewTokenRequest(token="t", audiences=[AUDIENCE]))
            group.cancel_scope.cancel()
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no Kubernetes API configured" in (raised.value.details() or "")


@ONE_LOOP
async def test_unusable_kubeconfig_stops_the_start(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    settings = ControlPlaneSettings(
        folder, xds_address="127.0.0.1:0", metrics_port=-1,
        kube_api=KubeApiConfig(kubeconfig=tmp_path / "missing.yaml"),
    )
    with anyio.fail_after(WAIT), pytest.raises(SystemExit) as raised:
        await ControlPlane(settings).run()
    assert "missing.yaml" in str(raised.value)
