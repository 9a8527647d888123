"""Service-account tokens validated by TokenReview, end to end with real processes: `agentgate
controlplane --kubeconfig` talking to the in-process Kubernetes API (tests/peers/kube_api.py) with
the real kubernetes-asyncio client, and one `agentgate dataplane` worker in front of nginx with a
Policy whose authentication is ``serviceAccount: {tokenReview: true}``. The worker never sees the
API: it asks the control plane (`KeyService.ReviewToken`)."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
import yaml

from tests.conftest import free_port
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
from tests.peers.kube_api import ISSUER, kube_api
from tests.peers.nginx import nginx

pytestmark = pytest.mark.anyio

AUDIENCE = "agentgate"
WITHIN = 30.0


def policy_yaml() -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "agents", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "HTTPRoute", "name": "web"}],
                "authentication": {
                    "serviceAccount": {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "tokenReview": True,
                        "claimsToHeaders": [{"claim": "sub", "header": "x-agent-identity"}],
                    }
                },
                "authorization": {"deny": ["source.namespace == 'blocked'"]},
            },
        },
        sort_keys=False,
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_service_account_tokens_reviewed_by_the_kubernetes_api(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    gateway_port, xds_port = free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}/tools"

    with anyio.fail_after(WITHIN):
        async with kube_api() as api, nginx(tmp_path, "app", body="id=[$http_x_agent_identity]\\n") as app:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            write_documents(folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)]))
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port),
                route_yaml("web", "gw", [("app", 1)]),
                policy_yaml(),
            )
            command = [*controlplane_command(folder, xds_port), "--kubeconfig", str(kubeconfig)]
            async with logged_process("controlplane", command) as cp:
                await cp.wait_for(event("token review enabled", host=api.url))
                await cp.wait_for("control plane serving")
                ports = WorkerPorts.free()
                async with (
                    logged_process("worker", dataplane_command(xds_port, "default/gw", ports)) as worker,
                    httpx.AsyncClient(timeout=10) as client,
                ):
                    await worker.wait_for("worker ready")
                    agent = api.add_service_account_token("team-a", "agent", [AUDIENCE, "vault"])
                    other_audience = api.add_service_account_token("team-a", "agent", ["vault"])
                    blocked = api.add_service_account_token("blocked", "agent", [AUDIENCE])
                    revoked = api.add_service_account_token("team-a", "agent", [AUDIENCE])
                    del api.tokens[revoked]  # JWT-shaped, our issuer, unknown to the API server
                    spare = api.add_service_account_token("team-a", "agent", [AUDIENCE])

                    missing = await client.get(url)
                    assert missing.status_code == 401, missing.text
                    assert missing.headers["www-authenticate"].startswith("Bearer")

                    spoofed = {**bearer(agent), "x-agent-identity": "system:serviceaccount:kube-system:admin"}
                    good = await client.get(url, headers=spoofed)
                    assert good.status_code == 200, good.text
                    assert good.text == "id=[system:serviceaccount:team-a:agent]\n"

                    wrong = await client.get(url, headers=bearer(other_audience))
                    assert wrong.status_code == 401, wrong.text
                    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]

                    unknown = await client.get(url, headers=bearer(revoked))
                    assert unknown.status_code == 401, unknown.text
                    assert "www-authenticate" in unknown.headers

                    denied = await client.get(url, headers=bearer(blocked))
                    assert denied.status_code == 403, denied.text

                    # Cached by the worker (and the control plane): the API reviewed each token once.
                    for _ in range(3):
                        again = await client.get(url, headers=bearer(agent))
                        assert again.status_code == 200, again.text
                    assert api.reviews_of(agent) == 1
                    assert api.reviews_of(other_audience) == 1 and api.reviews_of(revoked) == 1

                    # The API server goes away: a token not reviewed yet gets 503, not 500 or 401.
                    await api.stop()
                    down = await client.get(url, headers=bearer(spare))
                    assert down.status_code == 503, down.text
                    assert "Service Unavailable" in down.text
                    assert "www-authenticate" not in down.headers
                    await cp.wait_for(event("token review failed", failure="unavailable"))
                    # A token reviewed before still works from the cache.
                    assert (await client.get(url, headers=bearer(agent))).status_code == 200
