"""Who may use the control plane's gRPC port, and what a proxy may receive.

With ``--xds-auth tokenreview`` every ADS stream and every KeyService call carries
``authorization: Bearer <token>``: a projected service-account token bound to the xDS audience
(``--xds-audience``, default ``agentgate-xds``). The control plane reviews it with the Kubernetes
API (`controlplane.token_review`: cached, single flight, bounded) asking for that audience only, so a
token minted for anything else (the API server, another service) is refused. The reviewed identity
must be a service account, ``system:serviceaccount:NS:SA``.

Authorization is one rule, kept simple so it is easy to audit: a proxy may subscribe only to a
Gateway of its own namespace (the Gateway its node metadata names; the stream never serves anything
else). A namespace is Kubernetes' boundary for Secrets, and a Gateway's config holds its
namespace's Secrets (TLS keys, session keys), so nothing a pod of that namespace could not already
read leaves to it. Proxies of a shared Gateway run in the Gateway's namespace.

A stream lives no longer than its token: it ends with UNAUTHENTICATED at the token's ``exp`` and
is reviewed again every `DEFAULT_RECHECK_INTERVAL` seconds (a deleted pod or service account ends
it at the next check); the proxy reconnects with the token the kubelet has rotated in meanwhile.
A review the API cannot answer keeps an open stream (the proxy keeps its config) until ``exp``, but
refuses new ones with UNAVAILABLE.

Services: ADS checks token and Gateway itself (it needs the identity); KeyService (and any service
not named below) needs a valid token; DebugService answers loopback callers only (``kubectl
port-forward``, ``kubectl exec``): it shows every Gateway's proxies and NACK texts. Health and
reflection stay open, so probes and ``grpcurl list`` work without credentials.

The checks are pure functions (`bearer_token`, `identity_of`, `check_gateway`, `is_loopback`);
`XdsAuthenticator` adds the review, the counter and the log lines; `XdsAuthInterceptor` applies them
to the unary services.
"""

from __future__ import annotations

import enum
import inspect
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter

from controlplane.token_review import (
    MAX_TOKEN_BYTES,
    ReviewResult,
    TokenReviewError,
    TokenReviewService,
    token_expiry,
)
from shared.logging import get_logger

log = get_logger("controlplane.xds_auth")

DEFAULT_AUDIENCE: Final = "agentgate-xds"
DEFAULT_RECHECK_INTERVAL: Final = 300.0
SERVICE_ACCOUNT_PREFIX: Final = "system:serviceaccount:"

HEALTH_SERVICE: Final = "grpc.health.v1.Health"
REFLECTION_SERVICES: Final = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


class XdsAuthMode(enum.StrEnum):
    NONE = "none"
    TOKENREVIEW = "tokenreview"


@dataclass(frozen=True, slots=True)
class XdsServerTls:
    """Server certificate and key (PEM files); with ``client_ca`` clients must present a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Read the files now (OSError names the file): a rotated certificate needs a restart."""
        cert = self.cert_file.read_bytes()
        key = self.key_file.read_bytes()
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file is not None else None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class XdsSecurity:
    """How the gRPC port is protected (the default: plaintext, no authentication, as in folder mode)."""

    auth: XdsAuthMode = XdsAuthMode.NONE
    audience: str = DEFAULT_AUDIENCE
    tls: XdsServerTls | None = None
    recheck_interval: float = DEFAULT_RECHECK_INTERVAL


class Reason(enum.StrEnum):
    """Why a call was refused: the metric's ``reason`` label (a fixed set)."""

    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    NOT_SERVICE_ACCOUNT = "not_service_account"
    OTHER_GATEWAY = "other_gateway"
    TOKEN_EXPIRED = "token_expired"
    REVIEW_UNAVAILABLE = "review_unavailable"
    NOT_LOCAL = "not_local"


class XdsAuthRefused(Exception):
    """A refused call: the gRPC status to end it with, and the text the caller (and the log) gets."""

    def __init__(self, code: grpc.StatusCode, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """A reviewed caller: its service account, and when its token stops being valid (Unix time)."""

    namespace: str
    service_account: str
    expires_at: float | None = None

    @property
    def username(self) -> str:
        return f"{SERVICE_ACCOUNT_PREFIX}{self.namespace}:{self.service_account}"


def _unauthenticated(reason: Reason, message: str) -> XdsAuthRefused:
    return XdsAuthRefused(grpc.StatusCode.UNAUTHENTICATED, reason, message)


# ------------------------------------------------------------------------------------------- pure checks


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer ...`` entry of a call's metadata."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise _unauthenticated(
            Reason.MISSING_TOKEN,
            "no credentials: send 'authorization: Bearer <token>' with a service-account token for this control "
            "plane's audience (agentgate dataplane --xds-token-file)",
        )
    if len(values) > 1:
        raise _unauthenticated(Reason.INVALID_TOKEN, "more than one authorization header")
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthenticated(Reason.INVALID_TOKEN, "the authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_BYTES:
        raise _unauthenticated(Reason.INVALID_TOKEN, f"token larger than {MAX_TOKEN_BYTES} bytes")
    return token


def identity_of(result: ReviewResult, audience: str, token: str) -> ProxyIdentity:
    """The service account a TokenReview answer names, if it authenticated the token for ``audience``."""
    if not result.authenticated:
        detail = f": {result.error}" if result.error else ""
        raise _unauthenticated(Reason.INVALID_TOKEN, f"token not valid for audience {audience!r}{detail}")
    if audience not in result.audiences:
        raise _unauthenticated(Reason.INVALID_TOKEN, f"token is not bound to audience {audience!r}")
    namespace, _, name = result.username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    if not result.username.startswith(SERVICE_ACCOUNT_PREFIX) or not namespace or not name or ":" in name:
        raise XdsAuthRefused(
            grpc.StatusCode.PERMISSION_DENIED, Reason.NOT_SERVICE_ACCOUNT,
            f"{result.username!r} is not a service account: only proxies' service accounts may use this port",
        )
    return ProxyIdentity(namespace, name, token_expiry(token))


def check_gateway(identity: ProxyIdentity, gateway: str) -> None:
    """A proxy may serve a Gateway ("namespace/name") of its own namespace only."""
    namespace = gateway.partition("/")[0]
    if namespace != identity.namespace:
        raise XdsAuthRefused(
            grpc.StatusCode.PERMISSION_DENIED, Reason.OTHER_GATEWAY,
            f"{identity.username} may not receive the config of Gateway {gateway}: a proxy may only serve "
            f"Gateways of its own namespace ({identity.namespace})",
        )


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is this host."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    if kind == "ipv4":
        host = address.rpartition(":")[0]
    elif kind == "ipv6":
        host = address.rpartition(":")[0].strip("[]").split("%", 1)[0]
    else:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# ------------------------------------------------------------------------------------------ the shell


class XdsAuthMetrics:
    """agentgate_xds_auth_decisions_total{service, decision, reason}: every authentication decision."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "agentgate_xds_auth_decisions_total",
            "Calls to the xDS port checked for credentials, by service (ads|keys|debug), decision (allow|deny) "
            "and reason (ok or why refused).",
            ["service", "decision", "reason"], registry=registry,
        )

    def allowed(self, service: str) -> None:
        self.decisions.labels(service, "allow", "ok").inc()

    def refused(self, service: str, reason: Reason) -> None:
        self.decisions.labels(service, "deny", reason.value).inc()


class XdsAuthenticator:
    """Reviews callers' tokens for the xDS audience; counts and logs every refusal."""

    def __init__(
        self,
        token_review: TokenReviewService,
        metrics: XdsAuthMetrics,
        *,
        audience: str = DEFAULT_AUDIENCE,
        recheck_interval: float = DEFAULT_RECHECK_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token_review = token_review
        self.metrics = metrics
        self.audience = audience
        self.recheck_interval = recheck_interval
        self.clock = clock

    async def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, *, service: str, peer: str, **fields: str
    ) -> tuple[ProxyIdentity, str]:
        """The caller's identity and token; raises (counted, logged with `fields`) `XdsAuthRefused`."""
        try:
            token = bearer_token(metadata)
            identity = await self.review(token)
        except XdsAuthRefused as refused:
            self.refuse(refused, service=service, peer=peer, **fields)
            raise
        return identity, token

    async def review(self, token: str) -> ProxyIdentity:
        """Review ``token`` now (the review cache answers repeats); raises `XdsAuthRefused`, uncounted."""
        try:
            result = await self.token_review.review(token, (self.audience,))
        except TokenReviewError as exc:
            raise XdsAuthRefused(
                grpc.StatusCode.UNAVAILABLE, Reason.REVIEW_UNAVAILABLE, f"cannot review the token now: {exc.message}"
            ) from None
        identity = identity_of(result, self.audience, token)
        if identity.expires_at is not None and identity.expires_at <= self.clock():
            raise _unauthenticated(Reason.TOKEN_EXPIRED, "token expired")
        return identity

    def authorize_gateway(self, identity: ProxyIdentity, gateway: str, *, peer: str, node_id: str) -> None:
        """`check_gateway`, counted and logged: the last check before a stream serves anything."""
        try:
            check_gateway(identity, gateway)
        except XdsAuthRefused as refused:
            self.refuse(refused, service="ads", peer=peer, node=node_id, gateway=gateway, identity=identity.username)
            raise
        self.metrics.allowed("ads")

    def refuse(self, refused: XdsAuthRefused, *, service: str, peer: str, **fields: str) -> None:
        self.metrics.refused(service, refused.reason)
        log.warning(
            "xds call refused", service=service, peer=peer, code=refused.code.name, reason=refused.reason.value,
            message=refused.message, **fields,
        )


_Behavior = Callable[..., Any]


class XdsAuthInterceptor(grpc.aio.ServerInterceptor):
    """Guards the unary services: a token for KeyService and unknown services, loopback for DebugService.

    ADS authenticates inside its handler (it needs the identity for the Gateway check); health and
    reflection pass untouched.
    """

    def __init__(self, authenticator: XdsAuthenticator, *, ads_service: str, debug_service: str) -> None:
        self._auth = authenticator
        self._ads = ads_service
        self._debug = debug_service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service == self._ads or service == HEALTH_SERVICE or service in REFLECTION_SERVICES:
            return handler
        check = self._local_only if service == self._debug else self._token
        label = "debug" if service == self._debug else "keys" if service.endswith(".KeyService") else "other"
        return _guarded(handler, check, label)

    async def _token(self, context: grpc.aio.ServicerContext, label: str) -> None:
        try:
            await self._auth.authenticate(context.invocation_metadata(), service=label, peer=context.peer())
        except XdsAuthRefused as refused:
            await context.abort(refused.code, refused.message)
        self._auth.metrics.allowed(label)

    async def _local_only(self, context: grpc.aio.ServicerContext, label: str) -> None:
        peer = context.peer()
        if not is_loopback(peer):
            refused = XdsAuthRefused(
                grpc.StatusCode.PERMISSION_DENIED, Reason.NOT_LOCAL,
                "the debug service answers local callers only when --xds-auth is on: use "
                "`kubectl port-forward` or `kubectl exec` into the control plane",
            )
            self._auth.refuse(refused, service=label, peer=peer)
            await context.abort(refused.code, refused.message)
        self._auth.metrics.allowed(label)


_Check = Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]


def _guarded(handler: grpc.RpcMethodHandler, check: _Check, label: str) -> grpc.RpcMethodHandler:
    """``handler`` with ``check`` run before its behavior (which then never runs on a refusal)."""
    replace: Any = handler._replace  # type: ignore[attr-defined]  # RpcMethodHandler is a namedtuple
    if handler.unary_unary is not None:
        unary_unary: _Behavior = handler.unary_unary

        async def checked_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context, label)
            return await unary_unary(request, context)

        return replace(unary_unary=checked_unary_unary)
    if handler.stream_unary is not None:
        stream_unary: _Behavior = handler.stream_unary

        async def checked_stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await check(context, label)
            return await stream_unary(requests, context)

        return replace(stream_unary=checked_stream_unary)
    field = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    streaming: _Behavior = getattr(handler, field)
    if inspect.isasyncgenfunction(streaming):

        async def checked_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context, label)
            async for item in streaming(request, context):
                yield item

        return replace(**{field: checked_generator})

    async def checked_writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context, label)
        return await streaming(request, context)

    return replace(**{field: checked_writer})

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_RECHECK_INTERVAL",
    "ProxyIdentity",
    "Reason",
    "XdsAuthInterceptor",
    "XdsAuthMetrics",
    "XdsAuthMode",
    "XdsAuthRefused",
    "XdsAuthenticator",
    "XdsSecurity",
    "XdsServerTls",
    "bearer_token",
    "check_gateway",
    "identity_of",
    "is_loopback",
]
