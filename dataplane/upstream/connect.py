"""Opening a TCP (and TLS) connection to an upstream target, with the errors mapped to statuses."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TypeVar

import anyio

from dataplane.http.errors import UpstreamConnectFailed, UpstreamConnectTimeout

P = TypeVar("P", bound=asyncio.Protocol)


async def open_connection(
    factory: Callable[[], P],
    host: str,
    port: int,
    *,
    authority: str,
    ssl_context: ssl.SSLContext | None,
    server_name: str | None,
    connect_timeout: float,
) -> tuple[asyncio.Transport, P]:
    """Connect (and handshake) within `connect_timeout`; refused/reset/TLS failures raise 502 errors,
    the timeout a 504 error, each naming the target."""
    loop = asyncio.get_running_loop()
    try:
        with anyio.fail_after(connect_timeout):
            transport, protocol = await loop.create_connection(
                factory,
                host,
                port,
                ssl=ssl_context,
                server_hostname=(server_name or host) if ssl_context is not None else None,
            )
    except TimeoutError:
        raise UpstreamConnectTimeout(f"connect to upstream {authority} timed out after {connect_timeout:g}s") from None
    except ConnectionRefusedError:
        raise UpstreamConnectFailed(f"upstream {authority} refused the connection") from None
    except ssl.SSLError as exc:
        raise UpstreamConnectFailed(f"TLS handshake with upstream {authority} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise UpstreamConnectFailed(f"cannot connect to upstream {authority}: {exc.strerror or exc}") from None
    return transport, protocol  # type: ignore[return-value]
