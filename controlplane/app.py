"""The control plane process: a config source feeds the translator, whose snapshots the
discovery server streams to proxies.

The source is a watched folder (`settings.config_dir`) or the Kubernetes API
(`settings.kubernetes`, through `settings.kube_api`); both hand over a `FolderState`. Every state
is translated whole (the translator is pure and fast), and the snapshot cache keeps the very same
snapshot, waking no proxy, for every Gateway whose content did not change: only Gateways whose
inputs changed are pushed.

With the Kubernetes source, statuses are also written back (controlplane.status): the reconcile
pass hands them to a `StatusWriter` without waiting, which writes them, and Warning Events for
proxies' NACKs, in the background while this replica leads (`leader_election`: a Lease; without
it, the only replica always leads). The folder source writes nothing: statuses are logged and
served on the metrics port's /status.

The source keeps the last good version of every object, the translator is pure, and the
snapshot cache refuses an inconsistent snapshot, so a bad edit never takes down what is
being served: it is reported (file, kind/name, field) and the previous config stays.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controlplane.grpc_server import RunningGrpcServer, start_grpc_server
from controlplane.jwks import JwksFetcher
from controlplane.jwks_wiring import JwksWiring
from controlplane.snapshot import SnapshotCache, SnapshotInconsistent
from controlplane.sources.folder import FolderSource, FolderState
from controlplane.sources.kubernetes import KubernetesSource, KubernetesSourceSettings
from controlplane.status import (
    KubeJson,
    LeaderElectionSettings,
    LeaderElector,
    NackWatcher,
    StatusWriter,
    StatusWriterSettings,
    default_identity,
)
from controlplane.token_review import KubeApiConfig, KubeTokenReviewer, TokenReviewService
from controlplane.translate import translate
from controlplane.xds_auth import XdsAuthMode, XdsSecurity
from shared.admin_http import AdminRequest, AdminResponse, AdminServer
from shared.logging import get_logger
from shared.resources import ResourceMap

log = get_logger("controlplane")


@dataclass(frozen=True)
class ControlPlaneSettings:
    # The config source: a folder of YAML, or (when `kubernetes` is set) the Kubernetes API.
    config_dir: Path | None = None
    xds_address: str = "0.0.0.0:9977"
    metrics_host: str = "0.0.0.0"
    # -1 disables the metrics endpoint.
    metrics_port: int = 9978
    # The Kubernetes API that reviews service-account tokens for proxies (KeyService.ReviewToken);
    # None: reviews answer FAILED_PRECONDITION.
    kube_api: KubeApiConfig | None = None
    # Read Gateway API objects and our CRDs from the Kubernetes API of `kube_api` instead of a folder.
    kubernetes: KubernetesSourceSettings | None = None
    # TLS and proxy authentication on the gRPC port (default: plaintext, no authentication).
    xds_security: XdsSecurity = field(default_factory=XdsSecurity)
    # With `kubernetes`: write status and Events only while holding this Lease (None: always).
    leader_election: LeaderElectionSettings | None = None
    status_writer: StatusWriterSettings = field(default_factory=StatusWriterSettings)

    def describe_source(self) -> str:
        if self.kubernetes is not None:
            where = self.kube_api.describe() if self.kube_api is not None else "no Kubernetes API"
            return f"Kubernetes API ({where}, {self.kubernetes.describe()})"
        return f"config folder {self.config_dir}"


@dataclass
class ReconcileReport:
    """What one pass over the source produced, for logs and tests."""

    gateways: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    status_changes: int = 0


@dataclass
class ControlPlane:
    settings: ControlPlaneSettings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    cache: SnapshotCache = field(default_factory=SnapshotCache)
    # Fetches the remote JWKS Policies name; their keys are shipped inline in the snapshots.
    jwks: JwksFetcher = field(default_factory=JwksFetcher)
    # Reviews service-account tokens for proxies; connected to `settings.kube_api` by `run`.
    token_review: TokenReviewService = field(default_factory=TokenReviewService)
    xds_port: int = 0
    metrics_port: int = 0
    _statuses: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _listeners: list[Callable[[ReconcileReport], None]] = field(default_factory=list)
    # The translator's last snapshots, before keys are filled in: published again when keys change.
    _translated: Mapping[str, ResourceMap] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    keys: JwksWiring = field(init=False)
    # Set while `run` serves the Kubernetes source.
    status_writer: StatusWriter | None = None
    leader: LeaderElector | None = None

    def __post_init__(self) -> None:
        self.keys = JwksWiring(self.jwks)
        self.jwks.on_change = self._jwks_changed

    def on_reconcile(self, callback: Callable[[ReconcileReport], None]) -> None:
        self._listeners.append(callback)

    def reconcile(self, state: FolderState) -> ReconcileReport:
        """Translate the source's objects and publish one snapshot per Gateway."""
        errors = [str(error) for error in state.errors]
        for error in errors:
            log.warning("config error", error=error)
        try:
            result = translate(state.objects)
        except Exception as exc:  # a translator bug must not stop serving: the last snapshots stay
            log.exception("translation failed; the previous snapshots are kept")
            errors.append(f"translation failed, previous snapshots kept: {type(exc).__name__}: {exc}")
            return self._report(ReconcileReport((), tuple(errors), 0))
        self._translated = result.snapshots
        self.keys.update(result.snapshots)
        published = self._publish(errors)
        for gateway in sorted(set(self.cache.gateways()) - set(result.snapshots)):
            if self.cache.get_snapshot(gateway) is not None:
                self.cache.remove_snapshot(gateway)
                log.info("gateway removed", gateway=gateway)
        changes = 0
        seen: set[tuple[str, str, str]] = set()
        for status in result.statuses:
            key = (status.kind, status.namespace, status.name)
            seen.add(key)
            body = json.dumps(status.status, sort_keys=True, default=str)
            if self._statuses.get(key) != body:
                self._statuses[key] = body
                changes += 1
                log.info("status", kind=status.kind, namespace=status.namespace, name=status.name,
                         status=status.status)
        for key in set(self._statuses) - seen:
            del self._statuses[key]
        if self.status_writer is not None:
            self.status_writer.submit(result.statuses)
        return self._report(ReconcileReport(tuple(published), tuple(errors), changes))

    def _report(self, report: ReconcileReport) -> ReconcileReport:
        """Record a pass's errors and tell the listeners."""
        self.errors = report.errors
        for callback in self._listeners:
            callback(report)
        return report

    def _publish(self, errors: list[str]) -> list[str]:
        """Publish the translated snapshots with the current JWKS keys inline; returns the Gateways
        published (unchanged content keeps its version), appending to `errors` for the others."""
        published: list[str] = []
        for gateway, resources in sorted(self._translated.items()):
            try:
                snapshot = self.cache.set_snapshot(gateway, self.keys.inline(resources))
            except SnapshotInconsistent as exc:
                message = f"Gateway {gateway}: snapshot not published, previous one kept: {exc}"
                errors.append(message)
                log.error("snapshot rejected", gateway=gateway, error=str(exc))
                continue
            published.append(gateway)
            log.debug("snapshot published", gateway=gateway, version=snapshot.version)
        return published

    def _jwks_changed(self, url: str, _jwks: str) -> None:
        """New keys for `url`: the Gateways whose Policies use it get a new snapshot version (a
        snapshot refused here is logged; the next reconcile reports it)."""
        self._publish([])

    def statuses(self) -> dict[str, object]:
        return {f"{k}/{ns}/{name}": json.loads(body) for (k, ns, name), body in sorted(self._statuses.items())}

    async def _metrics(self, request: AdminRequest) -> AdminResponse:
        if request.path == "/metrics":
            return AdminResponse(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if request.path == "/status":
            body = {"errors": list(self.errors), "status": self.statuses()}
            return AdminResponse(200, json.dumps(body, indent=2, default=str).encode(), "application/json")
        return AdminResponse.text(404, "not found: try /metrics or /status")

    def _check_source(self) -> None:
        """Refuse to start without exactly one usable source (SystemExit naming what is wrong)."""
        settings = self.settings
        if (settings.config_dir is None) == (settings.kubernetes is None):
            raise SystemExit("choose one config source: a config folder or the Kubernetes API")
        if settings.kubernetes is not None:
            if settings.kube_api is None:
                raise SystemExit("the Kubernetes source needs --kubeconfig PATH, or running in a pod")
        elif settings.config_dir is not None and not settings.config_dir.is_dir():
            raise SystemExit(f"config folder {settings.config_dir} does not exist or is not a folder")

    @asynccontextmanager
    async def _source(self) -> AsyncIterator[AsyncIterator[FolderState]]:
        """The states of the configured source, while the block runs."""
        kubernetes, kube_api = self.settings.kubernetes, self.settings.kube_api
        if kubernetes is None or kube_api is None:
            assert self.settings.config_dir is not None
            states = FolderSource(self.settings.config_dir).watch()
            try:
                yield states
            finally:
                await states.aclose()
            return
        try:
            # Its own client: long-held watches never take connections TokenReviews need.
            api_client = await kube_api.api_client()
        except Exception as exc:  # ConfigException, OSError, YAML and key errors of a bad file
            raise SystemExit(f"cannot use the {kube_api.describe()} for the Kubernetes source: {exc}") from None
        try:
            async with KubernetesSource(api_client, kubernetes).watch() as received:
                yield received
        finally:
            with anyio.CancelScope(shield=True):
                await api_client.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. `task_status.started()` fires once the first snapshot pass is done."""
        self._check_source()
        if self.settings.xds_security.auth is XdsAuthMode.TOKENREVIEW and self.settings.kube_api is None:
            raise SystemExit("--xds-auth tokenreview needs the Kubernetes API: --kubeconfig PATH, or running in a pod")
        reviewer = await self._connect_kube_api()
        try:
            server = await start_grpc_server(
                self.cache, self.settings.xds_address, registry=self.registry, jwks=self.keys,
                token_review=self.token_review, security=self.settings.xds_security,
            )
        except BaseException:
            if reviewer is not None:
                await reviewer.aclose()
            raise
        self.xds_port = server.port
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.jwks.run)
                if self.settings.metrics_port >= 0:
                    admin = AdminServer(self._metrics, self.settings.metrics_host, self.settings.metrics_port)
                    self.metrics_port = await tg.start(admin.serve)
                log.info("control plane serving", xds_port=self.xds_port, metrics_port=self.metrics_port,
                         source=self.settings.describe_source())
                started = False
                async with self._status_writes(server), self._source() as states:
                    async for state in states:
                        self.reconcile(state)
                        if not started:
                            started = True
                            task_status.started()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await server.stop(1.0)
                if reviewer is not None:
                    self.token_review.reviewer = None
                    await reviewer.aclose()

    @asynccontextmanager
    async def _status_writes(self, server: RunningGrpcServer) -> AsyncIterator[None]:
        """With the Kubernetes source: the status writer, the NACK watcher and (if configured) the
        leader elector run while the block does; the Lease is released before the client closes."""
        kube_api = self.settings.kube_api
        if self.settings.kubernetes is None or kube_api is None:
            yield
            return
        try:
            api_client = await kube_api.api_client()  # its own: status writes never queue behind watches
        except Exception as exc:  # ConfigException, OSError, YAML and key errors of a bad file
            raise SystemExit(f"cannot use the {kube_api.describe()} for status writes: {exc}") from None
        election = self.settings.leader_election
        identity = (election.identity if election is not None else "") or default_identity()
        writer = StatusWriter(KubeJson(api_client), self.settings.status_writer, identity=identity)
        watcher = NackWatcher(server.proxies, self.cache, writer.record_nack, writer.set_rejections)
        self.status_writer = writer
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                tg.start_soon(watcher.run)
                if election is not None:
                    self.leader = LeaderElector(
                        KubeJson(api_client, timeout=election.renew_deadline),
                        replace(election, identity=identity),
                        on_change=writer.set_leading,
                    )
                    tg.start_soon(self.leader.run)
                    log.info("leader election", lease=f"{election.namespace}/{election.lease_name}",
                             identity=identity)
                else:
                    writer.set_leading(True)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.status_writer = None
            with anyio.CancelScope(shield=True):
                await api_client.close()

    async def _connect_kube_api(self) -> KubeTokenReviewer | None:
        """The TokenReview client of `settings.kube_api`. A kubeconfig named on the command line that
        cannot be used stops the start; a broken in-cluster config is logged and reviews answer why."""
        config = self.settings.kube_api
        if config is None:
            log.info("token review disabled: no Kubernetes API configured")
            return None
        try:
            api_client = await config.api_client()
        except Exception as exc:  # ConfigException, OSError, YAML and key errors of a bad file
            message = f"cannot use the {config.describe()}: {exc}"
            if config.kubeconfig is not None:
                raise SystemExit(message) from None
            log.error("token review disabled", error=message)
            self.token_review.not_configured = f"no Kubernetes API configured ({message})"
            return None
        reviewer = KubeTokenReviewer(api_client, timeout=self.token_review.timeout)
        self.token_review.reviewer = reviewer
        log.info("token review enabled", source=config.describe(), host=api_client.configuration.host)
        return reviewer
