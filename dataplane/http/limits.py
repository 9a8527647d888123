"""Resource limits of the proxy: what one client or upstream may make a worker hold or wait for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds that keep one slow or hostile peer from exhausting a worker.

    Every value is a deliberate default; tests shrink them to reach each branch quickly.
    """

    # Request line + headers (HTTP/1.1) or header block (HTTP/2); larger -> 431.
    max_request_head_bytes: int = 64 * 1024
    # More header fields than this -> 431.
    max_header_count: int = 128
    # From the first byte of a request head to its end; slower -> 408 and close (slowloris).
    header_read_timeout: float = 10.0
    # A keep-alive connection with no request in progress is closed after this long.
    keepalive_idle_timeout: float = 60.0
    # No request-body byte for this long -> the request is abandoned and the connection closed.
    body_idle_timeout: float = 60.0
    tls_handshake_timeout: float = 10.0
    # Bytes read from one socket but not yet consumed; above it the socket stops being read.
    connection_buffer_bytes: int = 256 * 1024
    # HTTP/2: streams a client may open at once, and the receive windows we advertise.
    h2_max_concurrent_streams: int = 128
    h2_stream_window: int = 256 * 1024
    h2_connection_window: int = 1024 * 1024
    # Upstream response head (status line + headers); larger -> 502.
    max_response_head_bytes: int = 64 * 1024


DEFAULT_LIMITS = ProxyLimits()
