"""Hostname intersection between a listener and a route, per the Gateway API.

A wildcard "*.example.com" matches one or more labels in front of "example.com" (so both
"a.example.com" and "a.b.example.com") but never "example.com" itself.
"""

from __future__ import annotations

from collections.abc import Sequence


def _covers(wildcard: str, hostname: str) -> bool:
    """Whether wildcard "*.suffix" matches `hostname`, an exact name or a narrower wildcard."""
    return hostname != wildcard and hostname.endswith(wildcard[1:])


def intersect(listener: str, route: str) -> str | None:
    """The hostnames both accept, as the more specific of the two, or None if disjoint."""
    if not listener:
        return route
    if listener == route:
        return route
    listener_wild, route_wild = listener.startswith("*."), route.startswith("*.")
    if listener_wild and _covers(listener, route):
        return route
    if route_wild and _covers(route, listener):
        return listener
    return None


def effective_hostnames(listener: str, route: Sequence[str]) -> list[str] | None:
    """Hostnames a route serves on a listener: [] means any host, None means no overlap."""
    if not route:
        return [listener] if listener else []
    result: list[str] = []
    for hostname in route:
        common = intersect(listener, hostname)
        if common is not None and common not in result:
            result.append(common)
    return result or None
