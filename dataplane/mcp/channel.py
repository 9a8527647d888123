"""The one interface every MCP target transport offers the gateway: a JSON-RPC channel.

The federation core (federation.py) decides what to send to which target; a channel
carries those messages over one transport (streamable HTTP, legacy SSE, stdio) and hands
back everything the target sends: responses, notifications and server-to-client requests,
in arrival order. One channel is one upstream MCP session.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

JSON = dict[str, Any]
# What a failed send may be retried on (the policy's retryOn): nothing reached the target, the
# connection broke before any response, or an HTTP 5xx status (dataplane.policy.resilience).
SendFailure = Literal["connect-failure", "reset"] | int


class TargetUnavailable(Exception):
    """The target cannot be reached or stopped answering; the message says why (for the JSON-RPC error).

    ``failure`` is set only where the transport knows the request got no response at all (a connect
    failure, a reset before the response head, a 5xx head), which is when a retry may help; None for
    everything else (bad responses, stdio processes, broken streams), which is never retried.
    """

    def __init__(self, message: str = "", *, failure: SendFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure


class TargetClosed(Exception):
    """The channel ended: the target closed its side or the channel was closed."""


class TargetChannel(Protocol):
    """A JSON-RPC conversation with one MCP target."""

    @property
    def target(self) -> str:
        """The target's name (as configured)."""
        ...

    @property
    def session_id(self) -> str | None:
        """The upstream session id (streamable HTTP session era), kept in the gateway's session token."""
        ...

    async def send(self, message: JSON) -> None:
        """Send one request, notification or response; raises TargetUnavailable or TargetClosed."""
        ...

    async def receive(self) -> JSON:
        """The next message from the target; raises TargetClosed when no more will come."""
        ...

    async def aclose(self) -> None:
        """End the upstream session (DELETE for streamable HTTP, stop the process for stdio). Idempotent."""
        ...
