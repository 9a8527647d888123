"""Retries of one forwarded request: which failures are retried, after how long, and with which body.

The decision core is pure: `RetryState` is told what went wrong (a failure kind or a 5xx status) and
the time, and answers with the backoff to wait before the next try or None. The clock and the
randomness of the jitter are parameters, so tests drive it with fake ones.

What counts (Envoy's `retry_on` meanings, which operators know):

- ``connect-failure``: the upstream could not be reached (refused, unreachable, TLS handshake, connect
  timeout). Nothing was sent, so this is always safe to retry.
- ``reset``: the connection or stream closed or reset before a complete response, or the per-try
  timeout passed without a response head.
- ``5xx``: the upstream answered 5xx (only `status_codes` when set). As in Envoy, it also covers the
  two failures above.

A try is only repeated when its request can be sent again whole: no body, a body fully buffered
below `REPLAY_BODY_CAP` before the first try (`ReplayableBody`), or a streamed body no byte of which
left the buffer yet (a connect failure). A large streamed upload that has begun is never replayed:
its bytes are gone. Nothing is retried once response bytes went downstream.

MCP: a JSON-RPC request that may have side effects (`tools/call`) is not retried unless the policy
says `retry_non_idempotent_mcp` (`retries_mcp_method`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Final, Literal

from dataplane.config.model import UpstreamCluster, UpstreamTarget
from dataplane.config.policy import RetrySettings
from dataplane.http.errors import ProxyError, UpstreamConnectFailed, UpstreamConnectTimeout, UpstreamReset
from dataplane.http.messages import BodySource, Headers

FailureKind = Literal["connect-failure", "reset"]

# Bodies up to this size are read before the first try so a retry can send them again. Larger or
# longer ones stream through and are retried only while none of their bytes was sent.
REPLAY_BODY_CAP: Final = 64 * 1024
# MCP methods whose effect a second delivery could repeat (a tool run twice).
NON_IDEMPOTENT_MCP_METHODS: Final = frozenset({"tools/call"})


def failure_kind(error: ProxyError) -> FailureKind | None:
    """The retry condition an upstream failure falls under; None for failures no retry can help
    (a full local pool, a backend missing from the config, an invalid response)."""
    if isinstance(error, UpstreamConnectFailed | UpstreamConnectTimeout):
        return "connect-failure"
    if isinstance(error, UpstreamReset):
        return "reset"
    return None


def retries_failure(retry: RetrySettings, kind: FailureKind) -> bool:
    on = retry.on
    return kind in on or "5xx" in on


def retries_status(retry: RetrySettings, status: int) -> bool:
    if status < 500 or status > 599 or "5xx" not in retry.on:
        return False
    codes = retry.status_codes
    return not codes or status in codes


def retries_mcp_method(retry: RetrySettings | None, method: str) -> bool:
    """Whether an MCP request of `method` may be sent again under `retry` (never without one)."""
    if retry is None or retry.attempts == 0:
        return False
    return method not in NON_IDEMPOTENT_MCP_METHODS or retry.retry_non_idempotent_mcp


def backoff_delay(retry: RetrySettings, retry_number: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `retry_number` (1 for the first retry): exponential from
    `backoff_base`, capped at `backoff_max`, with full jitter (uniform in [0, cap)), so workers
    that failed together do not come back together."""
    ceiling = min(retry.backoff_max, retry.backoff_base * (1 << min(retry_number - 1, 30)))
    return rand() * ceiling


def next_target(
    cluster: UpstreamCluster, tried: Collection[UpstreamTarget], rand: Callable[[], float] = random.random
) -> UpstreamTarget | None:
    """A target for the next try: by weight, but one not tried yet when the backend has one."""
    pick = cluster.pick_target(rand)
    if pick is None or pick not in tried:
        return pick
    for target in cluster.targets:
        if target.weight > 0 and target not in tried:
            return target
    return pick


class ReplayableBody:
    """A request body that can be sent more than once while it fits in memory.

    `prime` reads ahead up to `cap` bytes. Each try reads through its own `reader`: the buffered
    pieces, then (for a body larger than the cap) the rest from the client, at which point the body
    stops being replayable. A body never primed replays until its first byte is read.
    """

    __slots__ = ("_cap", "_chunks", "_size", "_source", "complete", "streamed")

    def __init__(self, source: BodySource, cap: int = REPLAY_BODY_CAP) -> None:
        self._source = source
        self._cap = cap
        self._chunks: list[bytes] = []
        self._size = 0
        # Every byte is buffered (the source returned its end).
        self.complete = False
        # A try read past the buffer: those bytes exist nowhere else now.
        self.streamed = False

    async def prime(self) -> None:
        """Buffer the body, stopping once more than the cap is held (the rest then streams)."""
        while self._size <= self._cap:
            data = await self._source.read()
            if not data:
                self.complete = True
                return
            self._chunks.append(data)
            self._size += len(data)

    @property
    def can_replay(self) -> bool:
        return not self.streamed

    def reader(self) -> BodySource:
        """A body source for one try, from the first byte."""
        return _Replay(self)

    async def _read_past_buffer(self) -> bytes:
        if self.complete:
            return b""
        self.streamed = True
        return await self._source.read()

    @property
    def trailers(self) -> Headers:
        return self._source.trailers


class _Replay:
    __slots__ = ("_body", "_index")

    def __init__(self, body: ReplayableBody) -> None:
        self._body = body
        self._index = 0

    def take_complete(self) -> bytes | None:
        body = self._body
        if not body.complete or body.streamed:
            return None
        rest = body._chunks[self._index :]
        self._index = len(body._chunks)
        return rest[0] if len(rest) == 1 else b"".join(rest)

    async def read(self) -> bytes:
        body = self._body
        chunks = body._chunks
        index = self._index
        if index < len(chunks):
            self._index = index + 1
            return chunks[index]
        return await body._read_past_buffer()

    @property
    def trailers(self) -> Headers:
        return self._body.trailers


class RetryState:
    """The retries left for one request, and the whole-request deadline they must fit in.

    `decide` is asked after each failed try; a delay means "wait this long, then try again" and
    counts the retry. Times are in the units of the caller's clock (the event loop's).
    """

    __slots__ = ("_rand", "body", "deadline", "retries", "retry")

    def __init__(
        self,
        retry: RetrySettings | None,
        *,
        deadline: float | None = None,
        body: ReplayableBody | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.retry = retry
        self.deadline = deadline
        # The request's body when it has one (None: bodiless, always replayable).
        self.body = body
        self._rand = rand
        # Retries done so far.
        self.retries = 0

    def try_timeout(self, per_try: float | None, now: float) -> float | None:
        """The bound of the next try: the per-try timeout, cut to what the deadline leaves."""
        deadline = self.deadline
        if deadline is None:
            return per_try
        left = max(deadline - now, 0.0)
        return left if per_try is None else min(per_try, left)

    def decide(self, cause: FailureKind | int, now: float) -> float | None:
        """Backoff before the next try after `cause` (a failure kind or a response status), or None
        when this request is not retried: no retries left, a cause the policy does not retry, a body
        that cannot be sent again, or a wait that would end past the deadline."""
        retry = self.retry
        if retry is None or self.retries >= retry.attempts:
            return None
        if isinstance(cause, int):
            if not retries_status(retry, cause):
                return None
        elif not retries_failure(retry, cause):
            return None
        body = self.body
        if body is not None and body.streamed:
            return None
        delay = backoff_delay(retry, self.retries + 1, self._rand)
        if self.deadline is not None and now + delay >= self.deadline:
            return None
        self.retries += 1
        return delay


__all__ = [
    "NON_IDEMPOTENT_MCP_METHODS",
    "REPLAY_BODY_CAP",
    "FailureKind",
    "ReplayableBody",
    "RetryState",
    "backoff_delay",
    "failure_kind",
    "next_target",
    "retries_failure",
    "retries_mcp_method",
    "retries_status",
]
