"""The control plane's gRPC server: ADS, DebugService, health and reflection on one port.

Reflection and health make `grpcurl -plaintext HOST:PORT list|describe` work against a
running control plane with no proto files at hand; they stay open when `XdsSecurity` turns on
token authentication (controlplane.xds_auth says what each service then requires) or TLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from controlplane.debug_service import DebugService
from controlplane.jwks_wiring import KEY_SERVICE, JwksWiring, KeyService
from controlplane.metrics import XdsMetrics
from controlplane.snapshot import SnapshotCache
from controlplane.token_review import TokenReviewService
from controlplane.xds import ADS_SERVICE, AdsServer, ConnectedProxies
from controlplane.xds_auth import XdsAuthenticator, XdsAuthInterceptor, XdsAuthMetrics, XdsAuthMode, XdsSecurity
from shared.api.agentgate.debug.v1 import debug_pb2, debug_pb2_grpc
from shared.api.agentgate.policy.v1 import keys_pb2_grpc
from shared.logging import get_logger

log = get_logger("controlplane.grpc")

DEBUG_SERVICE = debug_pb2.DESCRIPTOR.services_by_name["DebugService"].full_name

# ADS streams live for hours: ping idle connections so dead proxies are noticed and dropped.
_SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # gRPC defaults to SO_REUSEPORT: a second control plane on the same port would then
    # silently share it. Fail to bind instead.
    ("grpc.so_reuseport", 0),
)


@dataclass
class RunningGrpcServer:
    server: grpc.aio.Server
    port: int
    ads: AdsServer
    proxies: ConnectedProxies
    health: health.aio.HealthServicer
    metrics: XdsMetrics

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, end ADS streams (UNAVAILABLE), then stop with `grace` for unary calls."""
        await self.health.enter_graceful_shutdown()
        await self.ads.close()
        await self.server.stop(grace)
        log.info("grpc server stopped", port=self.port)


async def start_grpc_server(
    cache: SnapshotCache,
    address: str = "127.0.0.1:9977",
    *,
    registry: CollectorRegistry | None = None,
    jwks: JwksWiring | None = None,
    token_review: TokenReviewService | None = None,
    security: XdsSecurity | None = None,
) -> RunningGrpcServer:
    """Bind `address` (port 0 picks a free port) and serve until `stop()`.

    Metrics go to `registry` (default: prometheus_client's global registry; pass a fresh
    one when several servers share a process, as tests do). With `jwks`, proxies can ask
    for a JWKS refresh and (with `token_review`) for TokenReviews: KeyService. `security`
    turns on TLS (its files are read here: OSError names a missing one) and token
    authentication, which reviews tokens with `token_review`.
    """
    security = security or XdsSecurity()
    registry = registry if registry is not None else REGISTRY
    metrics = XdsMetrics(registry, cache)
    auth_metrics = XdsAuthMetrics(registry)
    authenticator: XdsAuthenticator | None = None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if security.auth is XdsAuthMode.TOKENREVIEW:
        if token_review is None:
            raise ValueError("xds auth tokenreview needs a TokenReviewService")
        authenticator = XdsAuthenticator(
            token_review, auth_metrics, audience=security.audience, recheck_interval=security.recheck_interval
        )
        interceptors.append(XdsAuthInterceptor(authenticator, ads_service=ADS_SERVICE, debug_service=DEBUG_SERVICE))
    credentials = security.tls.credentials() if security.tls is not None else None
    proxies = ConnectedProxies()
    ads = AdsServer(cache, metrics, proxies, auth=authenticator)
    server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=interceptors)
    server.add_generic_rpc_handlers((ads.rpc_handler(),))
    debug_pb2_grpc.add_DebugServiceServicer_to_server(DebugService(cache, proxies), server)
    services = [ADS_SERVICE, DEBUG_SERVICE]
    if jwks is not None:
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyService(jwks, token_review), server)
        services.append(KEY_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *services):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        await server.stop(None)
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    await server.start()
    tls = "off" if security.tls is None else "mtls" if security.tls.client_ca_file is not None else "tls"
    log.info("grpc server listening", address=address, port=port, auth=security.auth.value, tls=tls,
             audience=security.audience if authenticator is not None else "")
    return RunningGrpcServer(server, port, ads, proxies, health_servicer, metrics)
