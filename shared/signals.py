"""SIGTERM/SIGINT as an event, so a process drains instead of dying mid-request."""

from __future__ import annotations

import signal

import anyio

from shared.logging import get_logger

log = get_logger("signals")


async def stop_on_signal(stop: anyio.Event) -> None:
    """Set `stop` on the first SIGTERM or SIGINT."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal received", signal=signal.Signals(signum).name)
            stop.set()
            return
