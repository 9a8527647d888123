"""The `agentgate` command: controlplane, dataplane, run (both from one folder), status."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from shared import logging as shared_logging
from shared.signals import stop_on_signal

if TYPE_CHECKING:
    from controlplane.status import LeaderElectionSettings
    from controlplane.xds_auth import XdsSecurity
    from dataplane.xds.channel import XdsClientSecurity

DEFAULT_XDS_PORT = 9977

# `agentgate run` forks worker processes that exec at once; gRPC's fork handlers are not
# needed and only warn. Set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _run(main: Callable[..., Awaitable[object]], *args: object) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main, *args, backend_options={"use_uvloop": True})


def cmd_controlplane(args: argparse.Namespace) -> int:
    from controlplane.app import ControlPlane, ControlPlaneSettings
    from controlplane.jwks import JwksFetcher
    from controlplane.sources.kubernetes import KubernetesSourceSettings
    from controlplane.token_review import KubeApiConfig

    if args.jwks_refresh <= 0 or args.jwks_min_refresh < 0:
        print("agentgate controlplane: --jwks-refresh must be > 0 and --jwks-min-refresh >= 0", file=sys.stderr)
        return 2
    if (args.config is None) == (not args.kubernetes):
        print("agentgate controlplane: give exactly one of --config DIR and --kubernetes", file=sys.stderr)
        return 2
    if not args.kubernetes and (args.namespace or args.secret_selector):
        print("agentgate controlplane: --namespace and --secret-selector need --kubernetes", file=sys.stderr)
        return 2
    if args.debounce < 0:
        print("agentgate controlplane: --debounce must be >= 0", file=sys.stderr)
        return 2
    leader_election = _leader_election(args)
    if isinstance(leader_election, str):
        print(f"agentgate controlplane: {leader_election}", file=sys.stderr)
        return 2
    kube_api = KubeApiConfig.detect(args.kubeconfig)
    xds_security = _xds_server_security(args, kube_api is not None)
    if isinstance(xds_security, str):
        print(f"agentgate controlplane: {xds_security}", file=sys.stderr)
        return 2
    kubernetes = None
    if args.kubernetes:
        if kube_api is None:
            print("agentgate controlplane: --kubernetes needs --kubeconfig PATH, or running in a pod",
                  file=sys.stderr)
            return 2
        kubernetes = KubernetesSourceSettings(
            namespace=args.namespace or None, debounce=args.debounce, secret_selector=args.secret_selector
        )
    jwks = JwksFetcher(refresh_interval=args.jwks_refresh, min_refresh_interval=args.jwks_min_refresh)
    settings = ControlPlaneSettings(
        config_dir=Path(args.config) if args.config is not None else None, xds_address=args.xds_address,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port, kube_api=kube_api, kubernetes=kubernetes,
        xds_security=xds_security, leader_election=leader_election,
    )

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(ControlPlane(settings, jwks=jwks).run)
            tg.start_soon(stop_on_signal, stop)
            await stop.wait()
            tg.cancel_scope.cancel()

    _run(main)
    return 0


def _leader_election(args: argparse.Namespace) -> LeaderElectionSettings | str | None:
    """The --leader-elect* flags as settings (None: off), or what is wrong with them."""
    from controlplane.status import LeaderElectionSettings, default_namespace

    if not args.leader_elect:
        return None
    if not args.kubernetes:
        return "--leader-elect needs --kubernetes (the folder source writes no status)"
    settings = LeaderElectionSettings(
        lease_name=args.leader_elect_lease_name, namespace=args.leader_elect_namespace or default_namespace(),
        lease_duration=args.leader_elect_lease_duration, renew_deadline=args.leader_elect_renew_deadline,
        retry_period=args.leader_elect_retry_period,
    )
    problems = settings.problems()
    return "; ".join(problems) if problems else settings


def _xds_server_security(args: argparse.Namespace, has_kube_api: bool) -> XdsSecurity | str:
    """The control plane's --xds-auth/--xds-tls-* flags as settings, or what is wrong with them."""
    from controlplane.xds_auth import XdsAuthMode, XdsSecurity, XdsServerTls

    auth = XdsAuthMode(args.xds_auth)
    if auth is XdsAuthMode.TOKENREVIEW and not has_kube_api:
        return "--xds-auth tokenreview needs the Kubernetes API: --kubeconfig PATH, or running in a pod"
    if not args.xds_audience:
        return "--xds-audience must not be empty"
    if (args.xds_tls_cert is None) != (args.xds_tls_key is None):
        return "--xds-tls-cert and --xds-tls-key go together"
    if args.xds_client_ca is not None and args.xds_tls_cert is None:
        return "--xds-client-ca (mTLS) needs --xds-tls-cert and --xds-tls-key"
    for flag, path in (("--xds-tls-cert", args.xds_tls_cert), ("--xds-tls-key", args.xds_tls_key),
                       ("--xds-client-ca", args.xds_client_ca)):
        if path is not None and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    tls = None
    if args.xds_tls_cert is not None:
        tls = XdsServerTls(
            Path(args.xds_tls_cert), Path(args.xds_tls_key),
            Path(args.xds_client_ca) if args.xds_client_ca is not None else None,
        )
    return XdsSecurity(auth=auth, audience=args.xds_audience, tls=tls)


def _xds_client_security(args: argparse.Namespace) -> XdsClientSecurity:
    """The worker's --xds-token-file/--xds-tls* flags as settings."""
    from dataplane.xds.channel import XdsClientSecurity

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return XdsClientSecurity(
        token_file=path(args.xds_token_file), tls=args.xds_tls, ca_file=path(args.xds_ca_file),
        cert_file=path(args.xds_cert_file), key_file=path(args.xds_key_file), server_name=args.xds_server_name,
    )


def _add_observability(parser: argparse.ArgumentParser) -> None:
    """The worker's tracing and access-log flags (dataplane and run)."""
    parser.add_argument(
        "--otlp-endpoint", default=None, metavar="URL",
        help="OTLP collector for traces, e.g. http://127.0.0.1:4317 (grpc) or http://127.0.0.1:4318 (http); "
        "default OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, tracing off without one",
    )
    parser.add_argument(
        "--otlp-protocol", choices=["grpc", "http"], default=None,
        help="OTLP transport (default OTEL_EXPORTER_OTLP_PROTOCOL, else http)",
    )
    parser.add_argument(
        "--trace-sampling", type=_ratio, default=None, metavar="RATIO",
        help="share of new traces recorded, 0..1 (parent-based; default OTEL_TRACES_SAMPLER[_ARG], else 1)",
    )
    parser.add_argument(
        "--access-log", default="stdout", metavar="stdout|off|PATH",
        help="one JSON line per request: to stdout, nowhere, or a file rotated by size",
    )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def cmd_dataplane(args: argparse.Namespace) -> int:
    from dataplane.observability.settings import TracingSettingsError
    from dataplane.worker import Worker, WorkerSettings

    if args.gateway.count("/") != 1 or not all(args.gateway.split("/")):
        print(f"agentgate dataplane: --gateway must be NAMESPACE/NAME, got {args.gateway!r}", file=sys.stderr)
        return 2
    xds_security = _xds_client_security(args)
    problems = xds_security.problems()
    for problem in problems:
        print(f"agentgate dataplane: {problem}", file=sys.stderr)
    if problems:
        return 2
    settings = WorkerSettings(
        xds=args.xds, gateway=args.gateway, node_id=args.node_id, xds_mode=args.xds_mode,
        admin_host=args.admin_host, stats_host=args.stats_host, admin_port=args.admin_port,
        metrics_port=args.metrics_port, readiness_port=args.readiness_port, drain_timeout=args.drain_timeout,
        stop_on_stdin_close=args.stop_on_stdin_close, otlp_endpoint=args.otlp_endpoint,
        otlp_protocol=args.otlp_protocol, trace_sampling=args.trace_sampling, access_log=args.access_log,
        xds_security=xds_security,
    )
    try:
        worker = Worker(settings)
    except TracingSettingsError as exc:
        print(f"agentgate dataplane: tracing: {exc}", file=sys.stderr)
        return 2
    _run(worker.run)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from controlplane.embedded import EmbeddedGateway, EmbeddedSettings
    from controlplane.token_review import KubeApiConfig

    if args.workers < 1:
        print("agentgate run: --workers must be at least 1", file=sys.stderr)
        return 2
    settings = EmbeddedSettings(
        config_dir=Path(args.config), workers=args.workers, host=args.host, xds_port=args.xds_port,
        admin_port=args.admin_port, metrics_port=args.metrics_port, readiness_port=args.readiness_port,
        controlplane_metrics_port=args.controlplane_metrics_port, xds_mode=args.xds_mode,
        drain_timeout=args.drain_timeout, log_level=args.log_level, kube_api=KubeApiConfig.detect(args.kubeconfig),
        otlp_endpoint=args.otlp_endpoint, otlp_protocol=args.otlp_protocol, trace_sampling=args.trace_sampling,
        access_log=args.access_log,
    )
    _run(EmbeddedGateway(settings).run)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from shared.status import print_status

    return anyio.run(print_status, args.xds, args.gateway, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cp = sub.add_parser(
        "controlplane", help="serve config from a folder of Gateway API YAML, or a cluster, over xDS (ADS)"
    )
    cp.add_argument("--config", default=None, metavar="DIR", help="folder of Kubernetes-style YAML, watched")
    cp.add_argument(
        "--kubernetes", action="store_true",
        help="watch Gateway API objects and agentgate.dev CRDs in the Kubernetes API (of --kubeconfig, or in-cluster)",
    )
    cp.add_argument("--namespace", default="", help="with --kubernetes: watch this namespace only")
    cp.add_argument(
        "--secret-selector", default="", metavar="LABELS",
        help="with --kubernetes: watch only Secrets with these labels (e.g. agentgate.dev/config=true)",
    )
    cp.add_argument("--debounce", type=float, default=0.1, help="with --kubernetes: seconds to gather changes")
    cp.add_argument("--xds-address", default=f"0.0.0.0:{DEFAULT_XDS_PORT}", help="gRPC discovery/debug address")
    cp.add_argument("--metrics-host", default="0.0.0.0")
    cp.add_argument("--metrics-port", type=int, default=9978, help="Prometheus /metrics and /status; -1 disables")
    cp.add_argument("--jwks-refresh", type=float, default=300.0, help="seconds between scheduled JWKS fetches")
    cp.add_argument(
        "--jwks-min-refresh", type=float, default=30.0,
        help="least seconds between fetches of one JWKS, for refreshes proxies ask for on an unknown kid",
    )
    cp.add_argument(
        "--kubeconfig", default=None, metavar="PATH",
        help="Kubernetes API for --kubernetes and TokenReviews (default: in-cluster when run in a pod)",
    )
    cp.add_argument(
        "--xds-auth", choices=["none", "tokenreview"], default="none",
        help="proxy authentication on the gRPC port: none (the default, for one machine), or tokenreview "
        "(production: each proxy presents a service-account token for --xds-audience and gets only Gateways of "
        "its own namespace)",
    )
    cp.add_argument(
        "--xds-audience", default="agentgate-xds", help="with --xds-auth tokenreview: the audience tokens must carry"
    )
    cp.add_argument("--xds-tls-cert", default=None, metavar="PATH", help="serve gRPC over TLS with this PEM cert")
    cp.add_argument("--xds-tls-key", default=None, metavar="PATH", help="the PEM key of --xds-tls-cert")
    cp.add_argument(
        "--xds-client-ca", default=None, metavar="PATH",
        help="require client certificates signed by this PEM CA bundle (mTLS; needs --xds-tls-cert)",
    )
    cp.add_argument(
        "--leader-elect", action="store_true",
        help="with --kubernetes: write status and Events only while holding a coordination.k8s.io Lease "
        "(every replica serves xDS); identity POD_NAME, else hostname.pid",
    )
    cp.add_argument("--leader-elect-lease-name", default="agentgate-controlplane", metavar="NAME")
    cp.add_argument(
        "--leader-elect-namespace", default="", metavar="NS",
        help="the Lease's namespace (default POD_NAMESPACE, else the pod's service-account namespace, else default)",
    )
    cp.add_argument("--leader-elect-lease-duration", type=float, default=15.0, metavar="SECONDS",
                    help="how long a Lease not renewed stays held")
    cp.add_argument("--leader-elect-renew-deadline", type=float, default=10.0, metavar="SECONDS",
                    help="the leader steps down when it could not renew for this long")
    cp.add_argument("--leader-elect-retry-period", type=float, default=2.0, metavar="SECONDS",
                    help="seconds between acquire and renew attempts")
    _add_common(cp)
    cp.set_defaults(func=cmd_controlplane)

    dp = sub.add_parser("dataplane", help="a proxy worker: subscribe to a Gateway's config and serve it")
    dp.add_argument("--xds", required=True, help="control plane address HOST:PORT")
    dp.add_argument("--gateway", required=True, help="the Gateway to serve, NAMESPACE/NAME")
    dp.add_argument("--node-id", default="", help="proxy id shown by the control plane (default host.pid)")
    dp.add_argument("--xds-mode", choices=["delta", "sotw"], default="delta", help="incremental or state of the world")
    dp.add_argument("--admin-host", default="127.0.0.1", help="address of the admin port")
    dp.add_argument("--stats-host", default="0.0.0.0", help="address of the metrics and readiness ports")
    dp.add_argument("--admin-port", type=int, default=15000, help="config dump, log level; -1 disables")
    dp.add_argument("--metrics-port", type=int, default=15020, help="Prometheus /metrics; -1 disables")
    dp.add_argument("--readiness-port", type=int, default=15021, help="/healthz/ready; -1 disables")
    dp.add_argument("--drain-timeout", type=float, default=15.0, help="seconds to finish in-flight requests on SIGTERM")
    dp.add_argument("--stop-on-stdin-close", action="store_true", help=argparse.SUPPRESS)
    dp.add_argument(
        "--xds-token-file", default=None, metavar="PATH",
        help="service-account token sent as 'authorization: Bearer' to the control plane (re-read on reconnect)",
    )
    dp.add_argument("--xds-tls", action="store_true", help="connect to the control plane over TLS")
    dp.add_argument(
        "--xds-ca-file", default=None, metavar="PATH", help="with --xds-tls: PEM CA bundle (default: system roots)"
    )
    dp.add_argument("--xds-cert-file", default=None, metavar="PATH", help="with --xds-tls: client certificate (mTLS)")
    dp.add_argument("--xds-key-file", default=None, metavar="PATH", help="with --xds-tls: the client certificate's key")
    dp.add_argument(
        "--xds-server-name", default="", help="with --xds-tls: the name to verify in the control plane's certificate"
    )
    _add_observability(dp)
    _add_common(dp)
    dp.set_defaults(func=cmd_dataplane)

    run = sub.add_parser("run", help="embedded mode: control plane plus workers from one folder")
    run.add_argument("--config", required=True, help="folder of Kubernetes-style YAML, watched for changes")
    run.add_argument("--workers", type=int, default=1, help="worker processes per Gateway (sharing its ports)")
    run.add_argument("--host", default="127.0.0.1", help="address of the control plane and operator ports")
    run.add_argument("--xds-port", type=int, default=DEFAULT_XDS_PORT)
    run.add_argument("--admin-port", type=int, default=15000, help="worker k uses this + k; -1 disables")
    run.add_argument("--metrics-port", type=int, default=15020, help="worker k uses this + 2k; -1 disables")
    run.add_argument("--readiness-port", type=int, default=15021, help="worker k uses this + 2k; -1 disables")
    run.add_argument("--controlplane-metrics-port", type=int, default=9978, help="-1 disables")
    run.add_argument("--xds-mode", choices=["delta", "sotw"], default="delta")
    run.add_argument("--drain-timeout", type=float, default=10.0)
    run.add_argument(
        "--kubeconfig", default=None, metavar="PATH",
        help="Kubernetes API for service-account TokenReviews (default: in-cluster when run in a pod)",
    )
    _add_observability(run)
    _add_common(run)
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="what every connected proxy has ACKed, and any NACK")
    st.add_argument("--xds", default=f"127.0.0.1:{DEFAULT_XDS_PORT}", help="control plane address HOST:PORT")
    st.add_argument("--gateway", default="", help="only this NAMESPACE/NAME")
    st.add_argument("--json", action="store_true", help="print JSON")
    _add_common(st)
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shared_logging.configure(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
