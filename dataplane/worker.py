"""One proxy worker process: ADS subscription -> compiled config -> HTTP listeners.

A config is compiled (dataplane.config) and then handed to the proxy server, which
binds any new sockets before it swaps the config in one assignment. Either step may
refuse the update; the ADS client then NACKs and the previous config keeps serving.

Observability: the worker owns the request path's recorders (`dataplane.observability`): metrics
(prepared for each config once it applied, served on the metrics port), tracing (OTLP, started when
serving, flushed on drain) and the access log (stdout, a file or off; closed on drain).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Literal

import anyio
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from dataplane.http.server import ProxyServer
from dataplane.metrics import WorkerMetrics
from dataplane.observability.access_log import AccessLog, FileSink, StreamSink
from dataplane.observability.request import Observability
from dataplane.observability.settings import Protocol, SamplerKind, TracingSettings, traces_endpoint
from dataplane.observability.tracing import Tracing
from dataplane.policy.jwks_refresh import JwksRefreshClient
from dataplane.policy.token_review import TokenReviewClient
from dataplane.xds.channel import XdsClientSecurity, XdsTransport
from dataplane.xds.client import AdsClient, AdsSettings
from shared import logging as shared_logging
from shared.admin_http import AdminRequest, AdminResponse, AdminServer
from shared.logging import get_logger
from shared.resources import short_name
from shared.signals import stop_on_signal

log = get_logger("dataplane.worker")


@dataclass(frozen=True)
class WorkerSettings:
    xds: str
    gateway: str
    node_id: str = ""
    xds_mode: Literal["delta", "sotw"] = "delta"
    # Admin (config dump, log level) stays on loopback by default, like Envoy's admin;
    # metrics and readiness listen where Prometheus and the kubelet can reach them.
    admin_host: str = "127.0.0.1"
    stats_host: str = "0.0.0.0"
    admin_port: int = 15000
    metrics_port: int = 15020
    readiness_port: int = 15021
    drain_timeout: float = 15.0
    # Set by `agentgate run`: the parent holds our stdin; EOF means it is gone.
    stop_on_stdin_close: bool = False
    # Tracing: None means "as the OTEL_* environment says" (off without an endpoint).
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http"] | None = None
    trace_sampling: float | None = None
    # "stdout", "off" or a file path (each worker needs its own file).
    access_log: str = "stdout"
    # TLS to the control plane and the token file presented on the ADS stream and KeyService calls.
    xds_security: XdsClientSecurity = field(default_factory=XdsClientSecurity)

    def tracing_settings(self, environ: dict[str, str] | None = None) -> TracingSettings:
        """OTEL_* settings with the flags on top: --otlp-endpoint is the collector's base URL (http/protobuf
        gets /v1/traces appended unless given), --trace-sampling a parent-based ratio. Raises
        TracingSettingsError naming the bad value."""
        overrides: dict[str, object] = {}
        base = TracingSettings.from_env(environ)
        protocol = base.protocol
        if self.otlp_protocol is not None:
            protocol = overrides["protocol"] = Protocol.GRPC if self.otlp_protocol == "grpc" else Protocol.HTTP_PROTOBUF
        if self.otlp_endpoint is not None:
            endpoint = self.otlp_endpoint
            if protocol is Protocol.HTTP_PROTOBUF and not endpoint.rstrip("/").endswith("/v1/traces"):
                endpoint = traces_endpoint(endpoint, protocol)
            overrides["endpoint"] = endpoint
        if self.trace_sampling is not None:
            overrides["sampler"] = SamplerKind.PARENT_BASED_TRACE_ID_RATIO
            overrides["ratio"] = self.trace_sampling
        return TracingSettings.from_env(environ, **overrides) if overrides else base

    def resolved_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}.{os.getpid()}"


class Worker:
    def __init__(self, settings: WorkerSettings, proxy: ProxyServer | None = None) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(gateway=settings.gateway)
        self.proxy = proxy or ProxyServer()
        self.tracing = Tracing(settings.tracing_settings())
        self.access_log: AccessLog | None = None
        if settings.access_log != "off":
            sink = StreamSink() if settings.access_log == "stdout" else FileSink(settings.access_log)
            self.access_log = AccessLog(sink, on_drop=self.metrics.access_log_dropped.inc)
        handler = self.proxy._handler  # the server's forwarding logic (dataplane/http/server.py)
        handler.observability = Observability(
            gateway=settings.gateway, tracing=self.tracing, metrics=self.metrics, access_log=self.access_log
        )
        handler.mcp.sessions.metrics = self.metrics
        # One way to the control plane for every call: the ADS stream and KeyService.
        self.xds_transport = XdsTransport(settings.xds, settings.xds_security)
        self.ads = AdsClient(
            AdsSettings(
                target=settings.xds,
                gateway=settings.gateway,
                node_id=settings.resolved_node_id(),
                mode=settings.xds_mode,
            ),
            self.apply,
            self.metrics,
            transport=self.xds_transport,
        )
        self.ads.on_update = self._after_update
        # A token with an unknown kid asks the control plane to refetch that JWKS (throttled per URL);
        # the worker itself never calls an identity provider.
        self.jwks_refresh = JwksRefreshClient(settings.xds, channel=self.xds_transport.channel)
        self.proxy.policies.on_jwks_refresh = self.jwks_refresh.request
        # Service-account tokens of tokenReview providers are reviewed by the control plane, which
        # holds the Kubernetes API credentials (KeyService.ReviewToken).
        self.token_review = TokenReviewClient(settings.xds, channel=self.xds_transport.channel)
        self.proxy.policies.token_reviewer = self.token_review
        self.config: RuntimeConfig | None = None
        self.draining = False
        self._announced_ready = False
        self.admin_ports: dict[str, int] = {}

    async def apply(self, resources: dict[str, dict[str, Message]], version: str) -> None:
        """Compile and install a whole config; raises (-> NACK) if it cannot be served."""
        config = compile_config(resources, version=version)
        await self.proxy.apply(config)
        self.config = config
        # Only an applied config changes what is exported (a NACKed one must not).
        self.metrics.prepare(config)

    def _after_update(self) -> None:
        """Called by the ADS client after each handled response."""
        if self.ready and not self._announced_ready:
            self._announced_ready = True
            self.metrics.config_ready.set(1)
            log.info("worker ready", gateway=self.settings.gateway, node_id=self.ads.settings.node_id,
                     config_version=self.config.version)

    @property
    def ready(self) -> bool:
        """Serving a complete config: every type has arrived at least once and applied."""
        return self.config is not None and self.ads.state.synced and not self.draining

    # --- operator endpoints ------------------------------------------------------------
    def _readiness(self) -> AdminResponse:
        if self.draining:
            return AdminResponse.text(503, "draining")
        if not self.ready:
            missing = sorted(short_name(t) for t in self.ads.state.types if t not in self.ads.state.received)
            return AdminResponse.text(503, f"not ready: waiting for {', '.join(missing)} from {self.settings.xds}")
        return AdminResponse.text(200, "ready")

    def _liveness(self) -> AdminResponse:
        """Alive while the event loop answers: readiness says whether to send traffic, this whether to restart."""
        return AdminResponse.text(200, "draining" if self.draining else "alive")

    async def handle_readiness(self, request: AdminRequest) -> AdminResponse:
        if request.path in ("/healthz/ready", "/ready"):
            return self._readiness()
        if request.path == "/healthz/live":
            return self._liveness()
        return AdminResponse.text(404, "not found: try /healthz/ready or /healthz/live")

    async def handle_metrics(self, request: AdminRequest) -> AdminResponse:
        if request.path in ("/metrics", "/stats/prometheus"):
            return AdminResponse(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        return AdminResponse.text(404, "not found: try /metrics")

    async def handle_admin(self, request: AdminRequest) -> AdminResponse:
        if request.path in ("/healthz/ready", "/ready"):
            return self._readiness()
        if request.path == "/healthz/live":
            return self._liveness()
        if request.path == "/config_dump":
            return AdminResponse(200, json.dumps(self.config_dump(), indent=2).encode(), "application/json")
        if request.path == "/logging":
            if request.method != "POST":
                return AdminResponse.text(405, "use POST /logging?level=debug|info|warning|error")
            level = (request.query.get("level") or [""])[0]
            if level not in ("debug", "info", "warning", "error"):
                return AdminResponse.text(400, f"unknown level {level!r}: use debug, info, warning or error")
            shared_logging.configure(level)
            log.info("log level changed", level=level)
            return AdminResponse.text(200, f"level {level}")
        if request.path == "/":
            return AdminResponse.text(
                200, "endpoints: /config_dump /healthz/ready /healthz/live POST /logging?level="
            )
        return AdminResponse.text(
            404, "not found: try /config_dump, /healthz/ready, /healthz/live or POST /logging?level="
        )

    def config_dump(self) -> dict[str, object]:
        """The applied config and what the control plane last told us, as JSON."""
        types: dict[str, object] = {}
        for type_url, state in self.ads.state.types.items():
            types[short_name(type_url)] = {
                "version": state.version,
                "resources": [
                    {"name": name, "version": version, "resource": MessageToDict(message)}
                    for name, (version, message) in sorted(state.resources.items())
                ],
            }
        return {
            "gateway": self.settings.gateway,
            "node_id": self.ads.settings.node_id,
            "ready": self.ready,
            "xds": {"target": self.settings.xds, "mode": self.settings.xds_mode, "connected": self.ads.connected},
            "config_version": self.config.version if self.config else "",
            "last_nack": {short_name(t): error for t, error in self.ads.last_nack.items()},
            "types": types,
        }

    # --- lifecycle -----------------------------------------------------------------------
    async def run(self, *, stop: anyio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight requests and return."""
        stop = stop or anyio.Event()
        self.tracing.start()
        if self.access_log is not None:
            self.access_log.start()
        try:
            await self._serve(stop)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_observability()

    async def _close_observability(self) -> None:
        """Export the spans still queued (bounded) and write the access-log lines still queued."""
        await self.tracing.shutdown(grace=5.0)
        access_log = self.access_log
        if access_log is not None:
            await anyio.to_thread.run_sync(access_log.close)

    async def _serve(self, stop: anyio.Event) -> None:
        settings = self.settings
        async with anyio.create_task_group() as tg:
            for name, host, port, handler in (
                ("admin", settings.admin_host, settings.admin_port, self.handle_admin),
                ("metrics", settings.stats_host, settings.metrics_port, self.handle_metrics),
                ("readiness", settings.stats_host, settings.readiness_port, self.handle_readiness),
            ):
                if port >= 0:
                    server = AdminServer(handler, host, port)
                    self.admin_ports[name] = await tg.start(server.serve)
            tg.start_soon(self.proxy.run)
            tg.start_soon(self.ads.run)
            await tg.start(self.jwks_refresh.run)
            await tg.start(self.token_review.run)
            tg.start_soon(stop_on_signal, stop)
            if settings.stop_on_stdin_close:
                tg.start_soon(self._watch_stdin, stop)
            log.info("worker started", gateway=settings.gateway, xds=settings.xds, node_id=self.ads.settings.node_id,
                     xds_security=self.xds_transport.describe(),
                     tracing=self.tracing.settings.endpoint or "off", access_log=settings.access_log,
                     **{f"{k}_port": v for k, v in self.admin_ports.items()})
            await stop.wait()
            self.draining = True
            log.info("draining", in_flight=self.proxy.in_flight, timeout=settings.drain_timeout)
            await self.proxy.shutdown(settings.drain_timeout)
            log.info("worker stopped")
            tg.cancel_scope.cancel()

    @staticmethod
    async def _watch_stdin(stop: anyio.Event) -> None:
        """Stop when the supervisor's pipe closes (it died). Reads on the event loop, not in a
        thread: a thread blocked in read() cannot be cancelled and would hold up the exit."""
        fd = sys.stdin.fileno()
        os.set_blocking(fd, False)
        while True:
            await anyio.wait_readable(fd)
            try:
                if not os.read(fd, 4096):
                    break
            except BlockingIOError:
                continue
        log.info("parent process gone (stdin closed)")
        stop.set()

