"""Run the proxy under test inside the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dataplane.config.model import RuntimeConfig
from dataplane.http.limits import DEFAULT_LIMITS, ProxyLimits
from dataplane.http.server import ProxyServer


@asynccontextmanager
async def running_proxy(config: RuntimeConfig, limits: ProxyLimits = DEFAULT_LIMITS) -> AsyncIterator[ProxyServer]:
    async with ProxyServer(limits) as server:
        await server.apply(config)
        yield server
