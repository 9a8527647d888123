"""The secured xDS port end to end with real processes: `agentgate controlplane --xds-auth tokenreview
--kubeconfig` (TokenReviews by the in-process Kubernetes API) serving gRPC over TLS, a worker of
Gateway team-a/gw presenting a team-a service-account token from `--xds-token-file` and trusting the
control plane through `--xds-ca-file`, serving traffic to nginx; the token rotated in its file is
used when the first one expires; a second worker with a team-b token is refused and says why; and
grpcurl lists the services with `-cacert` and `-H authorization`."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import httpx
import pytest
import trustme

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
from tests.peers.kube_api import kube_api
from tests.peers.nginx import nginx

pytestmark = pytest.mark.anyio

AUDIENCE = "agentgate-xds"
SERVER_NAME = "agentgate-controlplane.agentgate-system.svc"
GRPCURL = Path(sys.executable).parent / "grpcurl"
WITHIN = 60.0


def write_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a control plane certificate for SERVER_NAME and 127.0.0.1: (ca, cert, key)."""
    ca = trustme.CA()
    leaf = ca.issue_cert(SERVER_NAME, "127.0.0.1")
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "tls.crt", folder / "tls.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    return ca_file, cert_file, key_file


def secured_worker(xds_port: int, ports: WorkerPorts, token_file: Path, ca_file: Path) -> list[str]:
    return [*dataplane_command(xds_port, "team-a/gw", ports), "--xds-token-file", str(token_file), "--xds-tls",
            "--xds-ca-file", str(ca_file), "--xds-server-name", SERVER_NAME]


async def test_workers_authenticate_over_tls_and_get_only_their_namespace(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    ca_file, cert_file, key_file = write_pki(tmp_path)
    gateway_port, xds_port, metrics_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{gateway_port}/"

    with anyio.fail_after(WITHIN):
        async with kube_api() as api, nginx(tmp_path, "app", body="from app\\n") as app:
            write_documents(
                folder / "gateway.yaml", GATEWAY_CLASS, gateway_yaml("gw", [("http", gateway_port)], "team-a")
            )
            write_documents(
                folder / "app.yaml",
                backend_yaml("app", app.h1_port, namespace="team-a"),
                route_yaml("web", "gw", [("app", 1)], namespace="team-a"),
            )
            command = [
                *controlplane_command(folder, xds_port, metrics_port),
                "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")), "--xds-auth", "tokenreview",
                "--xds-tls-cert", str(cert_file), "--xds-tls-key", str(key_file),
            ]
            async with logged_process("controlplane", command) as cp:
                await cp.wait_for(event("grpc server listening", auth="tokenreview", tls="tls", audience=AUDIENCE))
                await cp.wait_for("control plane serving")

                # A token that expires in a few seconds: the stream must end then and come back with
                # the token the "kubelet" rotates into the file meanwhile. (Long enough for a worker
                # to start on a loaded 2-core machine: at 4 s it sometimes expired before the first call.)
                token_file = tmp_path / "team-a-token"
                token_file.write_text(api.add_service_account_token("team-a", "gateway", [AUDIENCE], lifetime=10))
                outsider_file = tmp_path / "team-b-token"
                outsider_file.write_text(api.add_service_account_token("team-b", "gateway", [AUDIENCE]))
                ports = WorkerPorts.free()
                async with (
                    logged_process("worker", secured_worker(xds_port, ports, token_file, ca_file)) as worker,
                    httpx.AsyncClient(timeout=10) as http,
                ):
                    await worker.wait_for("worker ready")
                    await cp.wait_for(event("xds stream opened", gateway="team-a/gw",
                                            identity="system:serviceaccount:team-a:gateway"))
                    response = await http.get(url)
                    assert response.status_code == 200 and response.text == "from app\n", response.text

                    # Another namespace's proxy asking for team-a/gw: refused, and both sides say why.
                    outsider_ports = WorkerPorts.free()
                    outsider = secured_worker(xds_port, outsider_ports, outsider_file, ca_file)
                    async with logged_process("outsider", outsider) as refused_worker:
                        line = await refused_worker.wait_for("xds stream ended")
                        assert line["reason"].startswith("PERMISSION_DENIED: system:serviceaccount:team-b:gateway "
                                                         "may not receive the config of Gateway team-a/gw")
                        await cp.wait_for(event("xds call refused", reason="other_gateway", gateway="team-a/gw",
                                                identity="system:serviceaccount:team-b:gateway"))
                        ready = await http.get(f"http://127.0.0.1:{outsider_ports.readiness}/healthz/ready")
                        assert ready.status_code == 503
                    scraped = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                    assert ('agentgate_xds_auth_decisions_total{decision="deny",reason="other_gateway",'
                            'service="ads"} 1.0') in scraped

                    # grpcurl over TLS with the token: reflection lists every service.
                    token = token_file.read_text()
                    listed = await anyio.run_process(
                        [str(GRPCURL), "-cacert", str(ca_file), "-H", f"authorization: Bearer {token}",
                         f"127.0.0.1:{xds_port}", "list"],
                        check=False,
                    )
                    assert listed.returncode == 0, listed.stderr.decode()
                    assert {"envoy.service.discovery.v3.AggregatedDiscoveryService", "agentgate.policy.v1.KeyService",
                            "agentgate.debug.v1.DebugService"} <= set(listed.stdout.decode().split())

                    # Rotation: the new token is in the file before the old one expires.
                    token_file.write_text(api.add_service_account_token("team-a", "gateway", [AUDIENCE]))
                    mark = cp.mark()
                    await cp.wait_for(event("xds call refused", reason="token_expired"), start=mark)
                    await cp.wait_for(event("xds stream opened", gateway="team-a/gw"), start=mark)
                    ended = await worker.wait_for(event("xds stream ended"))
                    assert ended["reason"].startswith("UNAUTHENTICATED: token expired"), ended
                    response = await http.get(url)
                    assert response.status_code == 200, response.text
