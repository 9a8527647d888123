"""Browser origin allow-lists (DNS-rebinding protection), shared by config validation and the proxy.

The control plane rejects an entry the proxy could not compile, so both use these rules. Origins
compare after lower-casing and dropping the scheme's default port (RFC 6454 serialisation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _normalise_origin(origin: str) -> str | None:
    """`scheme://host[:port]` lower-cased with the default port dropped; None if not an origin."""
    origin = origin.strip()
    scheme, sep, rest = origin.partition("://")
    if not sep or not scheme or not rest or "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        return None
    scheme = scheme.lower()
    rest = rest.lower()
    if rest.startswith("["):  # IPv6 literal
        host, bracket, port_part = rest.partition("]")
        if not bracket:
            return None
        host += "]"
        port = port_part[1:] if port_part.startswith(":") else ("" if not port_part else None)
    else:
        host, _, port = rest.partition(":")
    if port is None or not host or (port and not (port.isdigit() or port == "*")):
        return None
    if port.isdigit():
        if int(port) > 65535:
            return None
        port = str(int(port))  # "0080" and "80" are the same port
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


def _without_port(normal: str) -> str:
    colon = normal.rfind(":")
    if colon > normal.find("://") and "]" not in normal[colon:]:
        return normal[:colon]
    return normal


@dataclass(frozen=True, slots=True)
class OriginAllowList:
    """Origins a browser may call the MCP endpoint from; compiled at config time.

    Entries are exact origins (`https://app.example.com`), an origin with any port
    (`http://localhost:*`), the literal `null`, or `*` to allow every origin.
    """

    exact: frozenset[str]
    any_port: frozenset[str]
    allow_all: bool = False

    @classmethod
    def compile(cls, entries: Iterable[str]) -> OriginAllowList:
        exact: set[str] = set()
        any_port: set[str] = set()
        allow_all = False
        for entry in entries:
            entry = entry.strip()
            if entry == "*":
                allow_all = True
                continue
            if entry == "null":
                exact.add("null")
                continue
            normal = _normalise_origin(entry)
            if normal is None:
                raise ValueError(f"not an origin: {entry!r}")
            if normal.endswith(":*"):
                any_port.add(normal[:-2])
            else:
                exact.add(normal)
        return cls(frozenset(exact), frozenset(any_port), allow_all)

    def allows(self, origin: str) -> bool:
        if self.allow_all:
            return True
        if origin.strip() == "null":
            return "null" in self.exact
        normal = _normalise_origin(origin)
        if normal is None or normal.endswith(":*"):
            return False
        if normal in self.exact:
            return True
        return _without_port(normal) in self.any_port


def origin_problem(entry: str) -> str | None:
    """Why an allow-list entry is not valid, or None."""
    entry = entry.strip()
    if entry in ("*", "null") or _normalise_origin(entry) is not None:
        return None
    return f"not an origin: {entry!r} (want scheme://host[:port], scheme://host:*, null or *)"


__all__ = ["OriginAllowList", "origin_problem"]
