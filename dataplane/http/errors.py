"""Why a request failed, as a typed taxonomy: each kind carries its HTTP status and a log label.

The message becomes the plain-text body the client reads, so it names the cause (the
route, backend or upstream address) without exposing anything beyond the config.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A request the proxy cannot serve. Subclasses fix `status` and `kind`."""

    status = 502
    # A short stable label for logs and metrics.
    kind = "proxy_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoRoute(ProxyError):
    status = 404
    kind = "no_route"


class NoBackend(ProxyError):
    """The route resolved to nothing to forward to (all weights 0, or a direct response)."""

    status = 500
    kind = "no_backend"


class UnsupportedRequest(ProxyError):
    """A request the proxy does not serve by design (CONNECT)."""

    status = 501
    kind = "unsupported"


class BackendUnavailable(ProxyError):
    """The backend is not in the config, has no targets, or its pool is exhausted."""

    status = 503
    kind = "backend_unavailable"


class PoolExhausted(BackendUnavailable):
    kind = "pool_exhausted"


class UpstreamConnectFailed(ProxyError):
    status = 502
    kind = "upstream_connect_failed"


class UpstreamProtocolError(ProxyError):
    """The upstream sent something that is not a valid response."""

    status = 502
    kind = "upstream_protocol_error"


class UpstreamReset(ProxyError):
    """The upstream closed or reset the connection or stream."""

    status = 502
    kind = "upstream_reset"


class RetryableUpstreamError(UpstreamReset):
    """The upstream provably did not process the request (a stale keep-alive connection, a
    stream refused by GOAWAY or REFUSED_STREAM), so a bodiless idempotent request may be
    sent again once."""

    kind = "upstream_stale"


class GatewayTimeout(ProxyError):
    status = 504
    kind = "timeout"


class UpstreamConnectTimeout(GatewayTimeout):
    kind = "upstream_connect_timeout"


class ClientGone(Exception):
    """The downstream client disconnected or reset its stream; nobody is left to answer."""


class RequestRejected(Exception):
    """Downstream input we refuse before routing (malformed body framing, too large, ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
