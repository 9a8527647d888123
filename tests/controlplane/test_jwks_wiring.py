"""Remote JWKS wired into the control plane: a real HTTPS JWKS endpoint on 127.0.0.1, keys shipped
inline in the snapshot, rotation publishing a new snapshot, and RefreshJwks over real gRPC."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import grpc
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration

from controlplane.app import ControlPlane, ControlPlaneSettings
from controlplane.jwks import JwksFetcher
from controlplane.jwks_wiring import JwksWiring, jwks_sources, with_inline_keys
from controlplane.snapshot.model import Snapshot
from dataplane.policy.jwks_refresh import JwksRefreshClient
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import POLICY, ResourceMap, unpack
from tests.controlplane.test_jwks import FakeClock, JwksEndpoint
from tests.dataplane.peers.tls import client_context, server_context
from tests.dataplane.policy.test_jwt import ec_key, jwks

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("shared_event_loop")]

GATEWAY = "default/web"
POLICY_KEY = "default/corp-jwt"
WAIT = 10.0

CONFIG = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: agentgate}
spec: {controllerName: agentgate.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: agentgate
  listeners: [{name: http, port: 8080, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: default}
spec:
  parentRefs: [{name: web}]
  rules: [{backendRefs: [{group: agentgate.dev, kind: Backend, name: app}]}]
---
apiVersion: agentgate.dev/v1alpha1
kind: Backend
metadata: {name: app, namespace: default}
spec: {static: {host: app.example.com, port: 8000}}
---
apiVersion: agentgate.dev/v1alpha1
kind: Policy
metadata: {name: corp-jwt, namespace: default}
spec:
  targetRefs: [{kind: Gateway, name: web}]
  authentication:
    jwt:
    - name: corp
      issuer: https://idp.example.com
      audiences: [agentgate]
      jwks: {remote: {url: "URL"}}
"""


@asynccontextmanager
async def https_jwks_endpoint() -> AsyncIterator[JwksEndpoint]:
    """The JWKS endpoint of test_jwks.py behind TLS (a trustme certificate for 127.0.0.1)."""
    endpoint = JwksEndpoint()
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    endpoint.url = f"https://127.0.0.1:{tcp.extra(SocketAttribute.local_port)}/.well-known/jwks.json"
    listener = TLSListener(tcp, server_context(["http/1.1"]), standard_compatible=False)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, endpoint.handle)
        try:
            yield endpoint
        finally:
            group.cancel_scope.cancel()


def inline_keys(snapshot: Snapshot) -> list[dict[str, object]]:
    message = unpack(POLICY, AnyProto.FromString(snapshot.resources(POLICY)[POLICY_KEY].packed))
    assert isinstance(message, pb.Policy)
    text = message.authentication.jwt_providers[0].jwks.inline
    return json.loads(text)["keys"] if text else []


async def snapshot_where(cp: ControlPlane, wanted: object, known: Snapshot | None = None) -> Snapshot:
    """The first snapshot (after `known`) whose inline keys are `wanted`."""
    with anyio.fail_after(WAIT):
        while True:
            known = await cp.cache.wait_for_change(GATEWAY, known)
            if inline_keys(known) == wanted:
                return known


@asynccontextmanager
async def control_plane(tmp_path: Path, url: str, clock: FakeClock) -> AsyncIterator[ControlPlane]:
    (tmp_path / "config.yaml").write_text(CONFIG.replace("URL", url))
    fetcher = JwksFetcher(ssl_context=client_context(["http/1.1"]), timeout=5.0, clock=clock)
    settings = ControlPlaneSettings(config_dir=tmp_path, xds_address="127.0.0.1:0", metrics_port=-1)
    cp = ControlPlane(settings, jwks=fetcher)
    async with anyio.create_task_group() as group:
        with anyio.fail_after(WAIT):
            await group.start(cp.run)
        try:
            yield cp
        finally:
            group.cancel_scope.cancel()


async def test_url_provider_gets_inline_keys_and_rotation_publishes_a_new_snapshot(tmp_path: Path) -> None:
    first, second = ec_key("k1"), ec_key("k2")
    clock = FakeClock()
    async with https_jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(first))
        async with control_plane(tmp_path, endpoint.url, clock) as cp:
            before = await snapshot_where(cp, [first.public_jwk])
            assert endpoint.requests == 1

            client = JwksRefreshClient(f"127.0.0.1:{cp.xds_port}")
            async with anyio.create_task_group() as group:
                with anyio.fail_after(WAIT):
                    await group.start(client.run)
                    # Rotation: the provider now signs with k2; a worker met a k2 token.
                    endpoint.set_keys(jwks(second))
                    clock.now += 31
                    answer = await client.refresh(endpoint.url)
                assert answer.refreshed and answer.error == ""
                assert endpoint.requests == 2
                after = await snapshot_where(cp, [second.public_jwk], before)
                assert after.version != before.version

                with anyio.fail_after(WAIT):
                    # Straight after: throttled, no fetch.
                    again = await client.refresh(endpoint.url)
                    assert not again.refreshed and endpoint.requests == 2
                    # Only URLs the config names are ever fetched.
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await client.refresh("https://attacker.example/jwks")
                    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
                    with pytest.raises(grpc.aio.AioRpcError) as empty:
                        await client.refresh("")
                    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                group.cancel_scope.cancel()


async def test_fire_and_forget_requests_from_a_worker_cost_one_fetch(tmp_path: Path) -> None:
    first, second = ec_key("k1"), ec_key("k2")
    clock = FakeClock()
    async with https_jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(first))
        async with control_plane(tmp_path, endpoint.url, clock) as cp:
            before = await snapshot_where(cp, [first.public_jwk])
            client = JwksRefreshClient(f"127.0.0.1:{cp.xds_port}")
            async with anyio.create_task_group() as group:
                with anyio.fail_after(WAIT):
                    await group.start(client.run)
                endpoint.set_keys(jwks(first, second))
                clock.now += 31
                for _ in range(5):  # many tokens with the new kid at once (what JwksRefreshGate calls)
                    client.request(endpoint.url)
                await snapshot_where(cp, [first.public_jwk, second.public_jwk], before)
                group.cancel_scope.cancel()
            assert endpoint.requests == 2  # the first fetch and one refresh


async def test_a_failed_fetch_keeps_the_previous_keys_and_says_why(tmp_path: Path) -> None:
    key = ec_key("k1")
    clock = FakeClock()
    async with https_jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(key))
        async with control_plane(tmp_path, endpoint.url, clock) as cp:
            current = await snapshot_where(cp, [key.public_jwk])
            endpoint.status = 500
            clock.now += 31
            client = JwksRefreshClient(f"127.0.0.1:{cp.xds_port}")
            async with anyio.create_task_group() as group:
                with anyio.fail_after(WAIT):
                    await group.start(client.run)
                    answer = await client.refresh(endpoint.url)
                group.cancel_scope.cancel()
            assert not answer.refreshed and answer.error == "HTTP 500"
            assert cp.cache.get_snapshot(GATEWAY) is current


# --- the pure parts ---------------------------------------------------------------------------


def seconds(value: int) -> Duration:
    return Duration(seconds=value)


def remote_policy(name: str, url: str, refresh: int | None = None) -> pb.Policy:
    message = pb.Policy(name=name)
    provider = message.authentication.jwt_providers.add(name="p", issuer="https://idp")
    provider.jwks.url = url
    if refresh is not None:
        provider.jwks.refresh_interval.CopyFrom(seconds(refresh))
    return message


def test_sources_collect_every_url_with_the_shortest_interval_asked() -> None:
    inline = pb.Policy(name="ns/inline")
    inline.authentication.jwt_providers.add(name="p", issuer="i").jwks.inline = '{"keys":[]}'
    account = pb.Policy(name="ns/sa")
    account.authentication.service_account_providers.add(name="sa", issuer="k8s").jwks.url = "https://k8s/jwks"
    snapshots: dict[str, ResourceMap] = {
        "ns/a": {POLICY: {"ns/p1": remote_policy("ns/p1", "https://idp/a", 600), "ns/inline": inline}},
        "ns/b": {POLICY: {"ns/p2": remote_policy("ns/p2", "https://idp/a", 60), "ns/sa": account}},
    }
    assert jwks_sources(snapshots) == {"https://idp/a": 60.0, "https://k8s/jwks": None}


def test_inline_keys_are_filled_in_copies_and_other_policies_are_shared() -> None:
    remote = remote_policy("ns/p", "https://idp/a")
    other = pb.Policy(name="ns/other")
    resources: ResourceMap = {POLICY: {"ns/p": remote, "ns/other": other}}
    filled = with_inline_keys(resources, {"https://idp/a": '{"keys":[1]}'}.get)
    copied = filled[POLICY]["ns/p"]
    assert isinstance(copied, pb.Policy) and copied.authentication.jwt_providers[0].jwks.inline == '{"keys":[1]}'
    assert remote.authentication.jwt_providers[0].jwks.inline == ""  # the translator's message is untouched
    assert filled[POLICY]["ns/other"] is other
    pending = with_inline_keys(resources, {}.get)
    assert pending[POLICY]["ns/p"].authentication.jwt_providers[0].jwks.inline == ""  # type: ignore[attr-defined]
    no_remote: ResourceMap = {POLICY: {"ns/other": other}}
    assert with_inline_keys(no_remote, {}.get) is no_remote


def test_wiring_watches_usable_urls_at_the_shortest_interval() -> None:
    fetcher = JwksFetcher(refresh_interval=300.0)
    wiring = JwksWiring(fetcher)
    policies = {"ns/p": remote_policy("ns/p", "https://idp/a", 120), "ns/q": remote_policy("ns/q", "http://idp/b")}
    wiring.update({"ns/gw": {POLICY: policies}})
    assert wiring.watches("https://idp/a") and not wiring.watches("http://idp/b")  # plain http refused
    assert fetcher.refresh_interval == 120.0
    wiring.update({})
    assert not wiring.watches("https://idp/a") and fetcher.refresh_interval == 300.0
