"""The policy layer end to end with real processes. First, a control plane that fetches a remote JWKS over
HTTPS (served by this test), a worker enforcing JWT authentication, CEL authorization, identity
headers and a local rate limit in front of nginx, and key rotation through `KeyService.RefreshJwks`.
Second, a global limit shared by two worker processes through one redis-server, and what each
limit does when that Redis stops (FailOpen admits, FailClosed answers 503).

The control plane is `agentgate controlplane` with `--jwks-min-refresh 0`: by default one JWKS is
fetched at most once per 30 s, so a rotation straight after the startup fetch would wait for that.
The test CA is trusted the way an operator would, through ``SSL_CERT_FILE`` (urllib's
default context), not an option of ours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.controlplane.test_jwks_wiring import https_jwks_endpoint
from tests.dataplane.peers.tls import ca_pem
from tests.dataplane.policy.test_jwt import SigningKey, ec_key, jwks, sign
from tests.e2e.harness import (
    GATEWAY_CLASS,
    WorkerPorts,
    backend_yaml,
    controlplane_command,
    dataplane_command,
    event,
    gateway_yaml,
    logged_process,
    route_yaml,
    write_documents,
)
from tests.peers.nginx import nginx
from tests.peers.redis import redis_server

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.test"
AUDIENCE = "agentgate"
WITHIN = 20.0


def policy_yaml(jwks_url: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "agents", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "HTTPRoute", "name": "web"}],
                "authentication": {
                    "jwt": [
                        {
                            "name": "idp",
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks": {"remote": {"url": jwks_url}},
                            "requiredClaims": ["tenant"],
                            "claimsToHeaders": [{"claim": "sub", "header": "x-agent-identity"}],
                        }
                    ]
                },
                "authorization": {"require": ["jwt.claims.tenant == request.headers['x-tenant']"]},
                "rateLimits": [{"name": "per-agent", "key": "jwt.sub", "capacity": 3, "per": "1m"}],
            },
        },
        sort_keys=False,
    )


def bearer(key: SigningKey, sub: str, tenant: str = "acme") -> dict[str, str]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "tenant": tenant,
        "iat": now,
        "exp": now + 300,
    }
    return {"authorization": f"Bearer {sign(key, claims).decode()}"}


def policy_applied(line: dict[str, Any]) -> bool:
    return line.get("event") == "config applied" and line.get("type") == "Policy"


async def test_jwt_cel_identity_rate_limit_and_key_rotation(tmp_path: Path) -> None:
    old_key, new_key = ec_key("k-2024"), ec_key("k-2025")
    ca_file = tmp_path / "test-ca.pem"
    ca_file.write_bytes(ca_pem())
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port, xds_port = free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}/tools"

    with anyio.fail_after(WITHIN):
        async with (
            https_jwks_endpoint() as idp,
            nginx(tmp_path, "app", body="id=[$http_x_agent_identity]\\n") as app,
        ):
            idp.set_keys(jwks(old_key))
            write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)]))
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port),
                route_yaml("web", "gw", [("app", 1)]),
                policy_yaml(idp.url),
            )
            command = [*controlplane_command(folder, xds_port), "--jwks-min-refresh", "0"]
            async with logged_process("controlplane", command, env={"SSL_CERT_FILE": str(ca_file)}) as cp:
                # Keys are published with the snapshot before the worker starts, so its first config
                # already verifies tokens (no refresh is asked for before the rotation).
                await cp.wait_for(event("jwks updated", url=idp.url))
                ports = WorkerPorts.free()
                async with (
                    logged_process("worker", dataplane_command(xds_port, "default/gw", ports)) as worker,
                    httpx.AsyncClient(timeout=5) as client,
                ):
                    await worker.wait_for("worker ready")

                    missing = await client.get(url)
                    assert missing.status_code == 401, missing.text
                    assert missing.headers["www-authenticate"].startswith("Bearer")

                    spoofed = {**bearer(old_key, "alice"), "x-tenant": "acme", "x-agent-identity": "root"}
                    good = await client.get(url, headers=spoofed)
                    assert good.status_code == 200, good.text
                    assert good.text == "id=[alice]\n"  # set from `sub`; the client's copy never arrived

                    wrong_tenant = await client.get(url, headers={**bearer(old_key, "alice"), "x-tenant": "evil"})
                    assert wrong_tenant.status_code == 403, wrong_tenant.text

                    # Capacity 3 per minute per sub; the 403 above was refused before counting.
                    alice = {**bearer(old_key, "alice"), "x-tenant": "acme"}
                    for _ in range(2):
                        assert (await client.get(url, headers=alice)).status_code == 200
                    limited = await client.get(url, headers=alice)
                    assert limited.status_code == 429, limited.text
                    assert int(limited.headers["retry-after"]) >= 1

                    # Rotation: the provider now signs with a new kid. The token in hand is refused
                    # (keys are never fetched on the request path) and the worker asks for a refresh.
                    assert idp.requests == 1
                    idp.set_keys(jwks(new_key))
                    cp_mark, worker_mark = cp.mark(), worker.mark()
                    bob = {**bearer(new_key, "bob"), "x-tenant": "acme"}
                    first = await client.get(url, headers=bob)
                    assert first.status_code == 401, first.text
                    assert 'error="invalid_token"' in first.headers["www-authenticate"]

                    await cp.wait_for(event("jwks refresh requested", url=idp.url, refreshed=True), start=cp_mark)
                    await cp.wait_for(event("jwks updated", url=idp.url), start=cp_mark)
                    await worker.wait_for(policy_applied, start=worker_mark)
                    assert idp.requests == 2

                    rotated = await client.get(url, headers=bob)
                    assert rotated.status_code == 200, rotated.text
                    assert rotated.text == "id=[bob]\n"
                    retired = await client.get(url, headers={**bearer(old_key, "carol"), "x-tenant": "acme"})
                    assert retired.status_code == 401, retired.text


# --- a global limit shared by two worker processes through one Redis ---------------------------


def shared_route_yaml(name: str, path: str) -> str:
    """An HTTPRoute on both Gateways (gw-a and gw-b), so the test picks the worker by port."""
    return yaml.safe_dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "gw-a"}, {"name": "gw-b"}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                        "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": "app"}],
                    }
                ],
            },
        },
        sort_keys=False,
    )


def global_limit_yaml(name: str, route: str, redis_url: str, on_store_down: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "HTTPRoute", "name": route}],
                "rateLimits": [
                    {
                        "name": name,
                        "key": "request.headers['x-agent']",
                        "capacity": 4,
                        "per": "1h",
                        "scope": "Global",
                        "redis": {"url": redis_url},
                        "onStoreDown": on_store_down,
                    }
                ],
            },
        },
        sort_keys=False,
    )


async def test_global_limit_across_two_workers_and_redis_stopped_mid_test(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    port_a, port_b, xds_port, redis_port = free_port(), free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"

    with anyio.fail_after(WITHIN):
        async with nginx(tmp_path, "app", body="ok\\n") as app:
            write_documents(
                folder / "gateways.yaml",
                GATEWAY_CLASS,
                gateway_yaml("gw-a", [("http", port_a)]),
                gateway_yaml("gw-b", [("http", port_b)]),
            )
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port),
                shared_route_yaml("open", "/open"),
                shared_route_yaml("closed", "/closed"),
                global_limit_yaml("calls-open", "open", redis_url, "FailOpen"),
                global_limit_yaml("calls-closed", "closed", redis_url, "FailClosed"),
            )
            async with (
                logged_process("controlplane", controlplane_command(folder, xds_port)),
                logged_process("worker-a", dataplane_command(xds_port, "default/gw-a", WorkerPorts.free())) as a,
                logged_process("worker-b", dataplane_command(xds_port, "default/gw-b", WorkerPorts.free())) as b,
                httpx.AsyncClient(timeout=5) as client,
            ):
                for worker in (a, b):
                    await worker.wait_for("worker ready")

                async def call(port: int, path: str, agent: str = "alice") -> httpx.Response:
                    return await client.get(f"http://127.0.0.1:{port}{path}", headers={"x-agent": agent})

                async with redis_server(redis_port):
                    # Capacity 4 for alice, taken in turns on both workers: one bucket in Redis, not one each.
                    for port in (port_a, port_b, port_a, port_b):
                        assert (await call(port, "/open")).status_code == 200
                    for port in (port_a, port_b):
                        limited = await call(port, "/open")
                        assert limited.status_code == 429, limited.text
                        assert int(limited.headers["retry-after"]) >= 1
                        assert limited.headers["x-ratelimit-remaining"] == "0"
                    assert (await call(port_b, "/open", agent="bob")).status_code == 200  # its own bucket
                    first_closed = await call(port_a, "/closed")
                    assert first_closed.status_code == 200
                    assert first_closed.headers["x-ratelimit-remaining"] == "3"

                # Redis stopped: the FailOpen limit admits, the FailClosed one answers 503; both workers log it.
                marks = a.mark(), b.mark()
                for port in (port_a, port_b):
                    assert (await call(port, "/open")).status_code == 200
                    refused = await call(port, "/closed")
                    assert refused.status_code == 503, refused.text
                    assert int(refused.headers["retry-after"]) >= 1
                for worker, mark in zip((a, b), marks, strict=True):
                    await worker.wait_for(event("limit_store_down", behaviour="fail_open"), start=mark)
                    await worker.wait_for(event("limit_store_down", behaviour="fail_closed"), start=mark)
