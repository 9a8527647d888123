"""Securing the xDS port: token authentication (TokenReview through the in-process Kubernetes API),
the Gateway-namespace rule, stream life bound to the token, KeyService and DebugService guards, and
TLS / mTLS with trustme certificates, all with real gRPC clients (and the worker's own ADS client and
transport) against an in-process server."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import pytest
import trustme
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from controlplane.grpc_server import RunningGrpcServer, start_grpc_server
from controlplane.jwks import JwksFetcher
from controlplane.jwks_wiring import JwksWiring
from controlplane.snapshot import SnapshotCache
from controlplane.token_review import (
    KubeApiConfig,
    KubeTokenReviewer,
    ReviewCache,
    ReviewResult,
    TokenReviewService,
)
from controlplane.xds_auth import (
    ProxyIdentity,
    Reason,
    XdsAuthMode,
    XdsAuthRefused,
    XdsSecurity,
    XdsServerTls,
    bearer_token,
    check_gateway,
    identity_of,
    is_loopback,
)
from dataplane.policy.token_review import TokenReviewClient
from dataplane.xds.channel import BearerToken, XdsClientSecurity, XdsCredentialsError, XdsTransport
from dataplane.xds.client import AdsClient, AdsSettings
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.api.agentgate.policy.v1 import keys_pb2, keys_pb2_grpc
from shared.resources import BACKEND, GATEWAY_METADATA_KEY
from tests.peers.kube_api import FakeKubeApi, kube_api

# Async tests share one event loop: grpc.aio delivers late completions to the loop that started a call.
ONE_LOOP = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

AUDIENCE = "agentgate-xds"
GW = "team-a/gw"
WAIT = 10.0
GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVER_NAME = "agentgate-controlplane.agentgate-system.svc"


# --- pure checks ---------------------------------------------------------------------------------------


def refused(call: object, *args: object) -> XdsAuthRefused:
    with pytest.raises(XdsAuthRefused) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_bearer_token_is_read_from_one_authorization_entry() -> None:
    assert bearer_token([("authorization", "Bearer abc.def.ghi")]) == "abc.def.ghi"
    assert bearer_token([("x", "y"), ("authorization", b"bearer  tok ")]) == "tok"
    missing = refused(bearer_token, [("x", "y")])
    assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.MISSING_TOKEN)
    assert "authorization: Bearer" in missing.message
    assert refused(bearer_token, None).reason is Reason.MISSING_TOKEN
    assert "'Bearer <token>'" in refused(bearer_token, [("authorization", "Basic dTpw")]).message
    two = [("authorization", "Bearer a"), ("authorization", "Bearer b")]
    assert "more than one" in refused(bearer_token, two).message
    assert "larger than" in refused(bearer_token, [("authorization", "Bearer " + "a" * 20_000)]).message


def test_identity_needs_an_authenticated_service_account_for_the_audience() -> None:
    ok = ReviewResult(True, "system:serviceaccount:team-a:proxy", audiences=(AUDIENCE,))
    assert identity_of(ok, AUDIENCE, "opaque") == ProxyIdentity("team-a", "proxy", None)
    no = refused(identity_of, ReviewResult(False, error="token has expired"), AUDIENCE, "t")
    assert no.code is grpc.StatusCode.UNAUTHENTICATED and "token has expired" in no.message
    other_audience = ReviewResult(True, "system:serviceaccount:team-a:proxy", audiences=("api",))
    assert "not bound to audience 'agentgate-xds'" in refused(identity_of, other_audience, AUDIENCE, "t").message
    user = refused(identity_of, ReviewResult(True, "alice", audiences=(AUDIENCE,)), AUDIENCE, "t")
    assert (user.code, user.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.NOT_SERVICE_ACCOUNT)


def test_a_proxy_may_serve_gateways_of_its_own_namespace_only() -> None:
    identity = ProxyIdentity("team-a", "proxy")
    check_gateway(identity, "team-a/gw")
    denied = refused(check_gateway, identity, "team-b/gw")
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert "system:serviceaccount:team-a:proxy may not receive the config of Gateway team-b/gw" in denied.message


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True), ("ipv4:127.8.0.1:5000", True), ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True), ("unix:/tmp/s", True), ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[fe80::1%eth0]:5000", False), ("ipv6:[::ffff:10.1.2.3]:1", False), ("garbage", False),
    ],
)
def test_loopback_peers(peer: str, local: bool) -> None:
    assert is_loopback(peer) is local


def test_bearer_token_file_is_reread_when_fresh_or_old(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "token"
    path.write_text("one\n")
    token = BearerToken(path, max_age=30.0, clock=lambda: now[0])
    assert token.metadata() == (("authorization", "Bearer one"),)
    path.write_text("two")  # the kubelet rotated it
    assert token.read() == "one"
    assert token.read(fresh=True) == "two"
    path.write_text("three")
    now[0] = 31.0
    assert token.read() == "three"
    path.write_text("")
    with pytest.raises(XdsCredentialsError, match="is empty"):
        token.read(fresh=True)
    path.unlink()
    with pytest.raises(XdsCredentialsError, match="cannot read --xds-token-file"):
        token.read(fresh=True)


def test_client_flags_that_do_not_fit_are_named(tmp_path: Path) -> None:
    assert XdsClientSecurity().problems() == []
    problems = XdsClientSecurity(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "c.pem").problems()
    assert any("need --xds-tls" in p for p in problems)
    assert any("go together" in p for p in problems)
    assert any("--xds-ca-file" in p and "no such file" in p for p in problems)


# --- token authentication over gRPC ----------------------------------------------------------------------


@dataclass
class Env:
    api: FakeKubeApi
    server: RunningGrpcServer
    cache: SnapshotCache
    registry: CollectorRegistry
    reviews: TokenReviewService

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def decisions(self, service: str, decision: str, reason: str) -> float:
        labels = {"service": service, "decision": decision, "reason": reason}
        return self.registry.get_sample_value("agentgate_xds_auth_decisions_total", labels) or 0.0


@asynccontextmanager
async def auth_server(
    tmp_path: Path, *, recheck_interval: float = 300.0, review_cache: ReviewCache | None = None
) -> AsyncIterator[Env]:
    async with kube_api() as api:
        config = KubeApiConfig(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
        reviewer = KubeTokenReviewer(await config.api_client(), timeout=WAIT)
        reviews = TokenReviewService(reviewer)
        if review_cache is not None:  # assigned: an empty cache is falsy, `cache=` would be replaced
            reviews.cache = review_cache
        cache, registry = SnapshotCache(), CollectorRegistry()
        cache.set_snapshot(GW, {BACKEND: {"team-a/b1": pb.Backend(name="team-a/b1")}})
        cache.set_snapshot("team-b/gw", {BACKEND: {"team-b/secret": pb.Backend(name="team-b/secret")}})
        security = XdsSecurity(auth=XdsAuthMode.TOKENREVIEW, audience=AUDIENCE, recheck_interval=recheck_interval)
        server = await start_grpc_server(
            cache, "127.0.0.1:0", registry=registry, jwks=JwksWiring(JwksFetcher()), token_review=reviews,
            security=security,
        )
        try:
            yield Env(api, server, cache, registry, reviews)
        finally:
            with anyio.fail_after(WAIT):
                await server.stop(0)
                await reviewer.aclose()


def node(gateway: str, node_id: str = "proxy-1") -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({GATEWAY_METADATA_KEY: gateway})
    return base_pb2.Node(id=node_id, metadata=metadata)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def open_delta(
    target: str, gateway: str, metadata: tuple[tuple[str, str], ...] | None
) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]:
    channel = grpc.aio.insecure_channel(target)
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(metadata=metadata)
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=BACKEND, node=node(gateway)))
    return channel, call


async def refusal(target: str, gateway: str, metadata: tuple[tuple[str, str], ...] | None) -> grpc.aio.AioRpcError:
    """The error a stream ends with; no response may come before it."""
    channel, call = await open_delta(target, gateway, metadata)
    async with channel:
        with anyio.fail_after(WAIT), pytest.raises(grpc.aio.AioRpcError) as caught:
            response = await call.read()
            pytest.fail(f"a refused stream received {response}")
    return caught.value


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_streams_without_a_valid_token_or_for_another_namespace_are_refused(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as env:
        no_token = await refusal(env.target, GW, None)
        assert no_token.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "no credentials" in (no_token.details() or "")

        api_token = env.api.add_service_account_token("team-a", "proxy", ["https://kubernetes.default.svc"])
        wrong_audience = await refusal(env.target, GW, bearer(api_token))
        assert wrong_audience.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "not valid for audience 'agentgate-xds'" in (wrong_audience.details() or "")
        assert "token audiences" in (wrong_audience.details() or "")  # the API server's own reason

        garbage = await refusal(env.target, GW, bearer("not-a-token"))
        assert garbage.code() is grpc.StatusCode.UNAUTHENTICATED

        other_namespace = env.api.add_service_account_token("team-b", "proxy", [AUDIENCE])
        denied = await refusal(env.target, GW, bearer(other_namespace))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "system:serviceaccount:team-b:proxy may not receive the config of Gateway team-a/gw" in (
            denied.details() or ""
        )
        # The reviews asked for the xDS audience only, never the API server's.
        assert {audiences for _, audiences in env.api.reviews} == {(AUDIENCE,)}
        assert not env.server.proxies.connections()
        assert env.decisions("ads", "deny", "missing_token") == 1
        assert env.decisions("ads", "deny", "invalid_token") == 2
        assert env.decisions("ads", "deny", "other_gateway") == 1
        assert env.decisions("ads", "allow", "ok") == 0


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_the_worker_client_reads_the_refusal_not_a_failed_write(tmp_path: Path) -> None:
    """The worker writes its other subscriptions only once the stream is accepted: a refusal racing
    those writes would otherwise reach it as INTERNAL (grpc/grpc#36066), hiding why."""
    async with auth_server(tmp_path) as env:
        outsider = env.api.add_service_account_token("team-b", "proxy", [AUDIENCE])
        client = AdsClient(AdsSettings(env.target, GW, "outsider"), apply=None)  # type: ignore[arg-type]
        seen = set()
        for attempt in range(20):
            metadata = bearer(outsider) if attempt % 2 else None
            async with grpc.aio.insecure_channel(env.target) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                with anyio.fail_after(WAIT), pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client._run_stream(stub, metadata)
            seen.add(caught.value.code())
        assert seen == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_the_right_token_gets_its_gateway_and_nothing_else(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as env:
        token = env.api.add_service_account_token("team-a", "proxy", [AUDIENCE], pod="proxy-0")
        channel, call = await open_delta(env.target, GW, bearer(token))
        async with channel:
            with anyio.fail_after(WAIT):
                response = await call.read()
            assert [r.name for r in response.resources] == ["team-a/b1"]
            [connection] = env.server.proxies.connections()
            assert connection.gateway == GW
            call.cancel()
        assert env.decisions("ads", "allow", "ok") == 1
        assert env.api.reviews_of(token) == 1


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_a_stream_ends_when_its_token_expires(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as env:
        token = env.api.add_service_account_token("team-a", "proxy", [AUDIENCE], lifetime=2)
        channel, call = await open_delta(env.target, GW, bearer(token))
        async with channel:
            with anyio.fail_after(WAIT):
                assert [r.name for r in (await call.read()).resources] == ["team-a/b1"]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call.read()
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "token expired" in (caught.value.details() or "")
        assert env.decisions("ads", "deny", "token_expired") == 1


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_a_stream_ends_when_a_recheck_refuses_its_token(tmp_path: Path) -> None:
    # No positive caching, so each periodic review reaches the API (as it does past the cache's TTL).
    async with auth_server(tmp_path, recheck_interval=0.2, review_cache=ReviewCache(ttl=0)) as env:
        token = env.api.add_service_account_token("team-a", "proxy", [AUDIENCE])
        channel, call = await open_delta(env.target, GW, bearer(token))
        async with channel:
            with anyio.fail_after(WAIT):
                await call.read()
                del env.api.tokens[token]  # the pod (or its service account) was deleted
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call.read()
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "square/go-jose" in (caught.value.details() or "")
        assert env.api.reviews_of(token) >= 2


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_key_service_needs_the_token_and_the_worker_client_sends_it(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as env:
        token = env.api.add_service_account_token("team-a", "proxy", [AUDIENCE])
        token_file = tmp_path / "xds-token"
        token_file.write_text(token)
        async with grpc.aio.insecure_channel(env.target) as channel:
            keys = keys_pb2_grpc.KeyServiceStub(channel)
            with anyio.fail_after(WAIT), pytest.raises(grpc.aio.AioRpcError) as caught:
                await keys.RefreshJwks(keys_pb2.RefreshJwksRequest(url="https://idp.example/jwks"))
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with anyio.fail_after(WAIT), pytest.raises(grpc.aio.AioRpcError) as caught:
                await keys.RefreshJwks(
                    keys_pb2.RefreshJwksRequest(url="https://idp.example/jwks"), metadata=bearer(token)
                )
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # past authentication: no Policy names it
        # The worker's TokenReviewClient over the worker's transport: the interceptor adds the token.
        caller = env.api.add_service_account_token("team-c", "agent", ["agentgate"])
        transport = XdsTransport(env.target, XdsClientSecurity(token_file=token_file))
        client = TokenReviewClient(env.target, channel=transport.channel)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(WAIT):
                await tg.start(client.run)
                identity = await client.review(caller, ("agentgate",))
            tg.cancel_scope.cancel()
        assert getattr(identity, "namespace", None) == "team-c"
        assert env.decisions("keys", "deny", "missing_token") == 1
        assert env.decisions("keys", "allow", "ok") == 2


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_debug_health_and_reflection_stay_usable_locally(tmp_path: Path) -> None:
    async with auth_server(tmp_path) as env:
        async with grpc.aio.insecure_channel(env.target) as channel:
            with anyio.fail_after(WAIT):
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                snapshots = await debug_pb2_grpc.DebugServiceStub(channel).ListSnapshots(
                    debug_pb2.ListSnapshotsRequest()
                )
        assert sorted(s.gateway for s in snapshots.snapshots) == ["team-a/gw", "team-b/gw"]
        assert env.decisions("debug", "allow", "ok") == 1
        with anyio.fail_after(WAIT):
            listed = await anyio.run_process([str(GRPCURL), "-plaintext", env.target, "list"], check=False)
        assert listed.returncode == 0, listed.stderr.decode()
        assert "envoy.service.discovery.v3.AggregatedDiscoveryService" in listed.stdout.decode().split()


# --- TLS and mTLS -----------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert(SERVER_NAME)
    client = client_ca.issue_cert("proxy.team-a")
    paths = Pki(*(tmp_path / name for name in ("ca.pem", "tls.crt", "tls.key", "client-ca.pem", "c.crt", "c.key")))
    server_ca.cert_pem.write_to_path(str(paths.ca))
    client_ca.cert_pem.write_to_path(str(paths.client_ca))
    leaves = ((server, paths.server_cert, paths.server_key), (client, paths.client_cert, paths.client_key))
    for leaf, cert, key in leaves:
        leaf.private_key_pem.write_to_path(str(key))
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
    return paths


@asynccontextmanager
async def tls_server(tls: XdsServerTls) -> AsyncIterator[RunningGrpcServer]:
    cache = SnapshotCache()
    cache.set_snapshot(GW, {BACKEND: {"team-a/b1": pb.Backend(name="team-a/b1")}})
    server = await start_grpc_server(cache, "127.0.0.1:0", registry=CollectorRegistry(), security=XdsSecurity(tls=tls))
    try:
        yield server
    finally:
        with anyio.fail_after(WAIT):
            await server.stop(0)


async def config_through_worker_client(target: str, security: XdsClientSecurity) -> dict[str, dict[str, Message]]:
    """Run the worker's ADS client over `XdsTransport` until it has applied the Gateway's backend."""
    applied = anyio.Event()
    received: dict[str, dict[str, Message]] = {}

    async def apply(resources: dict[str, dict[str, Message]], version: str) -> None:
        received.update(resources)
        if resources.get(BACKEND):
            applied.set()

    client = AdsClient(AdsSettings(target, GW, "tls-proxy"), apply, transport=XdsTransport(target, security))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)
        with anyio.fail_after(WAIT):
            await applied.wait()
        tg.cancel_scope.cancel()
    return received


async def health_code(target: str, security: XdsClientSecurity) -> grpc.StatusCode:
    async with XdsTransport(target, security).channel() as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_tls_serves_clients_that_trust_the_ca(pki: Pki) -> None:
    async with tls_server(XdsServerTls(pki.server_cert, pki.server_key)) as server:
        target = f"127.0.0.1:{server.port}"
        trusting = XdsClientSecurity(tls=True, ca_file=pki.ca, server_name=SERVER_NAME)
        received = await config_through_worker_client(target, trusting)
        assert list(received[BACKEND]) == ["team-a/b1"]
        # A client that does not trust the CA, one checking another name, and a plaintext one all fail.
        assert await health_code(target, XdsClientSecurity(tls=True, ca_file=pki.client_ca,
                                                           server_name=SERVER_NAME)) is grpc.StatusCode.UNAVAILABLE
        wrong_name = XdsClientSecurity(tls=True, ca_file=pki.ca, server_name="other.example")
        assert await health_code(target, wrong_name) is grpc.StatusCode.UNAVAILABLE
        assert await health_code(target, XdsClientSecurity()) is grpc.StatusCode.UNAVAILABLE


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_mtls_requires_a_client_certificate_from_the_client_ca(pki: Pki) -> None:
    async with tls_server(XdsServerTls(pki.server_cert, pki.server_key, pki.client_ca)) as server:
        target = f"127.0.0.1:{server.port}"
        without_cert = XdsClientSecurity(tls=True, ca_file=pki.ca, server_name=SERVER_NAME)
        assert await health_code(target, without_cert) is grpc.StatusCode.UNAVAILABLE
        # A certificate the client CA did not sign (the server's own) is refused too.
        foreign = XdsClientSecurity(tls=True, ca_file=pki.ca, server_name=SERVER_NAME, cert_file=pki.server_cert,
                                    key_file=pki.server_key)
        assert await health_code(target, foreign) is grpc.StatusCode.UNAVAILABLE
        with_cert = XdsClientSecurity(tls=True, ca_file=pki.ca, server_name=SERVER_NAME, cert_file=pki.client_cert,
                                      key_file=pki.client_key)
        assert await health_code(target, with_cert) is grpc.StatusCode.OK
        received = await config_through_worker_client(target, with_cert)
        assert list(received[BACKEND]) == ["team-a/b1"]


@ONE_LOOP[0]
@ONE_LOOP[1]
async def test_missing_tls_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"nope\.crt"):
        await start_grpc_server(
            SnapshotCache(), "127.0.0.1:0", registry=CollectorRegistry(),
            security=XdsSecurity(tls=XdsServerTls(tmp_path / "nope.crt", tmp_path / "nope.key")),
        )
