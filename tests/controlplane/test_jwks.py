"""The control plane's JWKS fetcher against a real HTTP endpoint on 127.0.0.1, and the whole
rotation path: unknown kid in a worker -> one refresh -> new inline keys -> token accepted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from controlplane.jwks import JwksFetcher
from dataplane.policy.authn import AuthnSpec, Refusal, compile_authn
from dataplane.policy.identity import Identity
from dataplane.policy.jwt import JwksRefreshGate
from tests.dataplane.policy.test_jwt import claims, ec_key, jwks, provider, sign

pytestmark = pytest.mark.anyio


@dataclass
class JwksEndpoint:
    """A minimal HTTP/1.1 server: answers every GET with the current status and body, counting requests."""

    url: str = ""
    body: bytes = b'{"keys":[]}'
    status: int = 200
    extra_headers: bytes = b""
    send_length: bool = True
    hang: bool = False
    requests: int = 0
    arrived: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                try:
                    head += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
            self.requests += 1
            self.arrived.set()
            if self.hang:
                await self.release.wait()
            response = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nConnection: close\r\n" % self.status
            if self.send_length:
                response += b"Content-Length: %d\r\n" % len(self.body)
            try:
                await stream.send(response + self.extra_headers + b"\r\n" + self.body)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    def set_keys(self, document: dict[str, object]) -> None:
        self.body = json.dumps(document).encode()


@asynccontextmanager
async def jwks_endpoint() -> AsyncIterator[JwksEndpoint]:
    endpoint = JwksEndpoint()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    endpoint.url = f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}/jwks"
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, endpoint.handle)
        try:
            yield endpoint
        finally:
            group.cancel_scope.cancel()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetcher_for(endpoint: JwksEndpoint, **options: object) -> tuple[JwksFetcher, FakeClock]:
    clock = FakeClock()
    fetcher = JwksFetcher(allow_http=True, timeout=2.0, clock=clock, **options)  # type: ignore[arg-type]
    fetcher.watch([endpoint.url])
    return fetcher, clock


async def test_fetch_serves_keys_inline_and_reports_changes() -> None:
    key = ec_key("k1")
    changes: list[tuple[str, str]] = []
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(key))
        fetcher, clock = fetcher_for(endpoint, on_change=lambda url, text: changes.append((url, text)))
        assert fetcher.keys_for(endpoint.url) is None
        with anyio.fail_after(10):
            assert await fetcher.refresh_now(endpoint.url)
        inline = fetcher.keys_for(endpoint.url)
        assert inline is not None and json.loads(inline) == {"keys": [key.public_jwk]}
        assert changes == [(endpoint.url, inline)]
        clock.now += 31
        with anyio.fail_after(10):
            assert await fetcher.refresh_now(endpoint.url)
        assert len(changes) == 1  # same keys: no change reported
        assert endpoint.requests == 2


async def test_on_demand_refresh_is_throttled() -> None:
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(ec_key()))
        fetcher, clock = fetcher_for(endpoint, min_refresh_interval=30.0)
        with anyio.fail_after(10):
            assert await fetcher.refresh_now(endpoint.url)
            for _ in range(20):
                assert not await fetcher.refresh_now(endpoint.url)
            assert endpoint.requests == 1
            clock.now += 30
            assert await fetcher.refresh_now(endpoint.url)
        assert endpoint.requests == 2


async def test_concurrent_refreshes_share_one_fetch() -> None:
    results: list[bool] = []
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(ec_key()))
        endpoint.hang = True
        fetcher, _ = fetcher_for(endpoint)

        async def refresh() -> None:
            results.append(await fetcher.refresh_now(endpoint.url))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                for _ in range(10):
                    group.start_soon(refresh)
                await endpoint.arrived.wait()
                endpoint.release.set()
        assert results == [True] * 10
        assert endpoint.requests == 1


async def test_failures_keep_the_previous_keys() -> None:
    key = ec_key()
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(key))
        fetcher, clock = fetcher_for(endpoint, max_bytes=4096)
        with anyio.fail_after(10):
            assert await fetcher.refresh_now(endpoint.url)
        good = fetcher.keys_for(endpoint.url)
        cases = [
            ({"status": 500}, "HTTP 500"),
            ({"status": 302, "extra_headers": b"Location: http://127.0.0.1:1/elsewhere\r\n"}, "HTTP 302"),
            ({"body": b"<html>oops</html>"}, "not JSON"),
            ({"body": b'{"keys": "none"}'}, "not a JWKS"),
            ({"body": b" " * 5000 + b"{}"}, "more than 4096"),
            ({"body": b" " * 5000 + b"{}", "send_length": False}, "larger than 4096"),
        ]
        for change, error in cases:
            endpoint.status, endpoint.extra_headers, endpoint.send_length = 200, b"", True
            endpoint.body = b'{"keys":[]}'
            for name, value in change.items():
                setattr(endpoint, name, value)
            clock.now += 31
            with anyio.fail_after(10):
                assert not await fetcher.refresh_now(endpoint.url), change
            assert error in fetcher.error_for(endpoint.url), (change, fetcher.error_for(endpoint.url))
            assert fetcher.keys_for(endpoint.url) == good


async def test_fetch_is_bounded_in_time() -> None:
    async with jwks_endpoint() as endpoint:
        endpoint.hang = True  # accepts and never answers
        fetcher = JwksFetcher(allow_http=True, timeout=0.3)
        fetcher.watch([endpoint.url])
        with anyio.fail_after(5):
            assert not await fetcher.refresh_now(endpoint.url)
        assert fetcher.error_for(endpoint.url) == "timed out"
        assert fetcher.keys_for(endpoint.url) is None


async def test_symmetric_keys_and_private_members_are_not_shipped() -> None:
    key = ec_key("pub")
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(
            {"keys": [{**key.public_jwk, "d": "c2VjcmV0"}, {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}
        )
        fetcher, _ = fetcher_for(endpoint)
        with anyio.fail_after(10):
            assert await fetcher.refresh_now(endpoint.url)
        inline = fetcher.keys_for(endpoint.url)
        assert inline is not None and json.loads(inline) == {"keys": [key.public_jwk]}


async def test_only_watched_urls_are_fetched_and_http_needs_opting_in() -> None:
    async with jwks_endpoint() as endpoint:
        fetcher = JwksFetcher(allow_http=True)
        with anyio.fail_after(10):
            assert not await fetcher.refresh_now(endpoint.url)
        assert endpoint.requests == 0
    with pytest.raises(ValueError, match="https"):
        JwksFetcher().watch(["http://idp.example.com/jwks"])


async def test_refresh_loop_fetches_new_urls_and_refreshes_periodically() -> None:
    first, second = ec_key("one"), ec_key("two")
    send, receive = anyio.create_memory_object_stream[str](10)
    async with jwks_endpoint() as endpoint:
        endpoint.set_keys(jwks(first))
        fetcher = JwksFetcher(
            allow_http=True, refresh_interval=0.05, on_change=lambda url, text: send.send_nowait(text)
        )
        async with anyio.create_task_group() as group:
            group.start_soon(fetcher.run)
            fetcher.watch([endpoint.url])
            with anyio.fail_after(10):
                assert json.loads(await receive.receive())["keys"][0]["kid"] == "one"
                endpoint.set_keys(jwks(second))
                assert json.loads(await receive.receive())["keys"][0]["kid"] == "two"
            group.cancel_scope.cancel()
    send.close()
    receive.close()


async def test_unknown_kid_triggers_one_refresh_and_the_new_key_is_accepted() -> None:
    """Key rotation end to end: 50 tokens signed with a new key cost the provider one fetch."""
    old, new = ec_key("2024"), ec_key("2025")
    send, receive = anyio.create_memory_object_stream[str](10)
    async with jwks_endpoint() as endpoint, anyio.create_task_group() as group:
        endpoint.set_keys(jwks(old))
        fetcher, clock = fetcher_for(endpoint, on_change=lambda url, text: send.send_nowait(text))
        with anyio.fail_after(10):
            await fetcher.refresh_now(endpoint.url)
            await receive.receive()
        # The worker's side: one gate for the worker's life; in production the callback crosses to the
        # control plane, here it calls the fetcher directly.
        gate = JwksRefreshGate(lambda url: group.start_soon(fetcher.refresh_now, url))

        def worker_config() -> AuthnSpec:
            inline = fetcher.keys_for(endpoint.url)
            return AuthnSpec(jwt_providers=(provider(jwks_inline=inline, jwks_url=endpoint.url),))

        authenticator = compile_authn(worker_config(), refresh_gate=gate)
        endpoint.set_keys(jwks(old, new))  # the provider rotates
        clock.now += 31
        token = sign(new, claims())
        for _ in range(50):
            outcome = await authenticator.authenticate([(b"authorization", b"Bearer " + token)])
            assert isinstance(outcome, Refusal) and outcome.reason == "kid_unknown"
        with anyio.fail_after(10):
            await receive.receive()  # the control plane saw new keys and would publish a snapshot
        authenticator = compile_authn(worker_config(), refresh_gate=gate)
        outcome = await authenticator.authenticate([(b"authorization", b"Bearer " + token)])
        assert isinstance(outcome, Identity) and outcome.principal == "alice"
        assert endpoint.requests == 2
    send.close()
    receive.close()
