"""Charging the token usage a response reports to the budgets and token limits that admitted it.

`MeteredSink` is the proxy's seam: a `ResponseSink` that passes every call on unchanged and shows
the body to a `UsageMeter` on the way (the meter only looks: no byte waits for it beyond the
look). The proxy calls `settle` when the response is over, however it ended (complete, upstream cut,
timeout, client gone): it charges the total seen so far, once. A charge that fails or hangs is
logged and dropped: the response already went out, and a budget errs towards admitting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import anyio

from dataplane.http.messages import Headers, ResponseSink
from dataplane.llm.usage import JSON_CAP, TokenUsage, UsageMeter
from shared.logging import get_logger

log = get_logger("dataplane.llm.metering")

# How long a charge may take once the response is over (Redis calls have their own, shorter bounds).
CHARGE_TIMEOUT: Final = 5.0

Charge = Callable[[int], Awaitable[None]]


class MeteredSink:
    """Wraps the response sink of one request whose policy charges tokens after the response."""

    __slots__ = ("_cap", "_charge", "_meter", "_route", "_settled", "_sink")

    def __init__(self, sink: ResponseSink, charge: Charge, *, route: str = "", cap: int = JSON_CAP) -> None:
        self._sink = sink
        self._charge = charge
        self._route = route
        self._cap = cap
        self._meter: UsageMeter | None = None
        self._settled = False

    @property
    def started(self) -> bool:
        return self._sink.started

    async def start(self, status: int, headers: Headers, content_length: int | None, body: bytes, end: bool) -> None:
        meter = self._meter = UsageMeter.for_response(headers, cap=self._cap)
        if body:
            meter.feed(body)
        await self._sink.start(status, headers, content_length, body, end)

    async def write(self, data: bytes) -> None:
        meter = self._meter
        if meter is not None:
            meter.feed(data)
        await self._sink.write(data)

    async def end(self, trailers: Headers) -> None:
        await self._sink.end(trailers)

    def abort(self) -> None:
        self._sink.abort()

    async def settle(self) -> TokenUsage | None:
        """Charge the usage the body carried (so far), once; returns it. Never raises but for
        programming errors: runs shielded (the request may be being cancelled) and bounded."""
        if self._settled:
            return None
        self._settled = True
        meter = self._meter
        if meter is None:  # no response head went out (refused, failed before the upstream answered)
            return None
        usage = meter.finish()
        if meter.gave_up is not None and usage is None:
            log.info("response usage not read; nothing charged", route=self._route, reason=meter.gave_up)
        if usage is None or usage.total_tokens <= 0:
            return usage
        tokens = usage.total_tokens
        with anyio.move_on_after(CHARGE_TIMEOUT, shield=True) as scope:
            try:
                await self._charge(tokens)
            except Exception as exc:  # a store error must not fail a response that already went out
                log.warning("token usage not charged", route=self._route, tokens=tokens, error=repr(exc))
                return usage
        if scope.cancelled_caught:
            log.warning(
                "token usage not charged: the charge timed out", route=self._route, tokens=tokens,
                timeout=CHARGE_TIMEOUT,
            )  # fmt: skip
        else:
            log.debug("token usage charged", route=self._route, tokens=tokens)
        return usage


__all__ = ["CHARGE_TIMEOUT", "Charge", "MeteredSink"]
