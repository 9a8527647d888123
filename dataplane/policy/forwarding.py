"""The parts of an effective policy the forward path applies, compiled once.

`forward_policy` compiles resilience, CORS, header modifiers and the upstream credential of one
`EffectivePolicy` into a `ForwardPolicy`: effective policies are immutable objects built with the
config, so the result is cached by identity (holding the policy, so an id is never reused while
cached) and a request pays one dict probe. A policy setting none of those sections gives None, and
the request takes the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from dataplane.config.policy import EMPTY_POLICY, EffectivePolicy, ResilienceSettings
from dataplane.policy.cors import CorsPolicy
from dataplane.routing.filters import HeaderOps

# Compiled policies kept per worker; past this the cache starts over (configs change rarely).
MAX_CACHED: Final = 4096


@dataclass(frozen=True, slots=True)
class ForwardPolicy:
    """What `ProxyHandler._forward` applies from one effective policy."""

    resilience: ResilienceSettings | None = None
    cors: CorsPolicy | None = None
    # `cors` as MCP backends apply it (`CorsPolicy.for_mcp`): MCP's headers allowed and exposed.
    mcp_cors: CorsPolicy | None = None
    # After the route's and backend's filters.
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    # (lower-case name, value), set over any client-sent copy.
    credential: tuple[bytes, bytes] | None = None


class ForwardPolicyCache:
    """`EffectivePolicy` -> `ForwardPolicy | None`, by identity."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[EffectivePolicy, ForwardPolicy | None]] = {}

    def get(self, effective: EffectivePolicy) -> ForwardPolicy | None:
        entry = self._entries.get(id(effective))
        if entry is not None and entry[0] is effective:
            return entry[1]
        compiled = compile_forward_policy(effective)
        if len(self._entries) >= MAX_CACHED:
            self._entries.clear()
        self._entries[id(effective)] = (effective, compiled)
        return compiled


def compile_forward_policy(effective: EffectivePolicy) -> ForwardPolicy | None:
    sections = effective.sections
    credentials = sections.upstream_credentials
    request_headers = sections.request_headers
    response_headers = sections.response_headers
    cors = CorsPolicy.compile(sections.cors) if sections.cors is not None else None
    compiled = ForwardPolicy(
        resilience=sections.resilience,
        cors=cors,
        mcp_cors=cors.for_mcp() if cors is not None else None,
        request_headers=request_headers.ops if request_headers is not None else None,
        response_headers=response_headers.ops if response_headers is not None else None,
        credential=(
            (credentials.header.encode("latin-1"), credentials.value.encode("latin-1"))
            if credentials is not None
            else None
        ),
    )
    return None if compiled == _NOTHING else compiled


_NOTHING: Final = ForwardPolicy()
_CACHE: Final = ForwardPolicyCache()


def forward_policy(effective: EffectivePolicy) -> ForwardPolicy | None:
    """The compiled forward-path sections of `effective` (None: it sets none of them)."""
    if effective is EMPTY_POLICY:
        return None
    return _CACHE.get(effective)


__all__ = [
    "ForwardPolicy",
    "ForwardPolicyCache",
    "compile_forward_policy",
    "forward_policy",
]
