"""Build protobuf resources and compile them through the real config path."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from dataplane.config.compile import compile_config
from dataplane.config.model import RuntimeConfig
from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, ROUTE, TARGET

GATEWAY = "default/gw"


def listener(
    port: int,
    *,
    name: str = "http",
    hostname: str = "",
    tls: tuple[bytes, bytes] | None = None,
    alpn: Iterable[str] = (),
) -> pb.Listener:
    message = pb.Listener(
        name=f"{GATEWAY}/{name}",
        gateway=GATEWAY,
        address="127.0.0.1",
        port=port,
        protocol=pb.LISTENER_PROTOCOL_HTTPS if tls else pb.LISTENER_PROTOCOL_HTTP,
        hostname=hostname,
    )
    if tls:
        message.tls.CopyFrom(
            pb.ServerTls(certificate_chain_pem=tls[0], private_key_pem=tls[1], alpn_protocols=list(alpn))
        )
    return message


def backend(
    name: str = "default/app",
    *,
    http2: bool = False,
    ca_pem: bytes | None = None,
    server_name: str = "",
    max_connections: int = 0,
    connect_timeout: float | None = None,
    idle_timeout: float | None = None,
) -> pb.Backend:
    message = pb.Backend(
        name=name,
        protocol=pb.UPSTREAM_PROTOCOL_HTTP2 if http2 else pb.UPSTREAM_PROTOCOL_HTTP1,
        http=pb.HttpBackend(),
    )
    if ca_pem is not None:
        message.tls.CopyFrom(pb.UpstreamTls(ca_certificates_pem=ca_pem, server_name=server_name))
    if max_connections:
        message.pool.max_connections = max_connections
    if connect_timeout is not None:
        message.pool.connect_timeout.CopyFrom(_duration(connect_timeout))
    if idle_timeout is not None:
        message.pool.idle_timeout.CopyFrom(_duration(idle_timeout))
    return message


def target(backend_name: str, port: int, *, name: str = "t0", host: str = "127.0.0.1", weight: int = 1) -> pb.Target:
    return pb.Target(
        name=f"{backend_name}/{name}",
        backend=backend_name,
        weight=weight,
        address=pb.SocketAddress(host=host, port=port),
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def route(
    name: str = "default/r/0",
    *,
    backends: Iterable[tuple[str, int]] = (("default/app", 1),),
    listeners: Iterable[str] = (f"{GATEWAY}/http",),
    hostnames: Iterable[str] = (),
    prefix: str = "/",
    filters: Iterable[pb.RouteFilter] = (),
    request_timeout: float | None = None,
    backend_timeout: float | None = None,
    direct_response_status: int = 0,
) -> pb.Route:
    message = pb.Route(
        name=name,
        listeners=list(listeners),
        hostnames=list(hostnames),
        matches=[pb.RouteMatch(path=pb.PathMatch(kind=pb.PathMatch.KIND_PREFIX, value=prefix))],
        filters=list(filters),
        backends=[pb.BackendRef(backend=b, weight=w) for b, w in backends],
        route_key=name.rsplit("/", 1)[0],
        direct_response_status=direct_response_status,
    )
    if request_timeout is not None:
        message.timeouts.request.CopyFrom(_duration(request_timeout))
    if backend_timeout is not None:
        message.timeouts.backend_request.CopyFrom(_duration(backend_timeout))
    return message


def compile_resources(*messages: Message, version: str = "v1") -> RuntimeConfig:
    """Compile resources (grouped by their type) through `compile_config`."""
    type_of = {pb.Listener: LISTENER, pb.Backend: BACKEND, pb.Target: TARGET, pb.Route: ROUTE}
    resources: dict[str, dict[str, Message]] = {LISTENER: {}, BACKEND: {}, TARGET: {}, ROUTE: {}}
    for message in messages:
        resources[type_of[type(message)]][message.name] = message  # type: ignore[attr-defined]
    return compile_config(resources, version=version)


def simple_config(
    listen_port: int, upstream_port: int, *, http2: bool = False, version: str = "v1", **route_options: object
) -> RuntimeConfig:
    """One HTTP listener, one route for "/", one backend with one target."""
    return compile_resources(
        listener(listen_port),
        backend(http2=http2),
        target("default/app", upstream_port),
        route(**route_options),  # type: ignore[arg-type]
        version=version,
    )
