"""RFC 9728 OAuth 2.0 Protected Resource Metadata for MCP routes.

An MCP client that gets a 401 reads ``resource_metadata`` from the ``WWW-Authenticate`` challenge,
fetches this document, and learns which authorization servers issue tokens for the resource. The
document is built once per config; serving it is returning fixed bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dataplane.policy.credentials import AuthnConfigError

WELL_KNOWN = "/.well-known/oauth-protected-resource"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class ProtectedResourceSpec:
    """The resource (the MCP endpoint's public URL, e.g. ``https://gw.example.com/mcp``) and the
    authorization servers (issuer URLs) whose tokens it accepts."""

    resource: str
    authorization_servers: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    resource_name: str | None = None
    resource_documentation: str | None = None


@dataclass(frozen=True, slots=True)
class ProtectedResourceMetadata:
    """What to serve: GET or HEAD on ``path`` answers 200 with ``headers`` and ``body``.
    ``url`` is the absolute address to put in the ``resource_metadata`` challenge parameter."""

    path: str
    url: str
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    _path_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_path_bytes", self.path.encode())

    def matches(self, method: bytes, path: bytes) -> bool:
        """Whether a request (method, path with optional query) asks for this document."""
        return method in (b"GET", b"HEAD") and path.split(b"?", 1)[0] == self._path_bytes


def _check_url(value: str, where: str) -> tuple[str, str, str]:
    """(scheme, authority, path) of an absolute https URL without query or fragment (http only for loopback)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise AuthnConfigError(where, "must be an absolute https URL without query or fragment")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise AuthnConfigError(where, "must use https (http is accepted only for loopback addresses)")
    if any(ord(char) <= 0x20 or ord(char) >= 0x7F or char in '"\\' for char in value):
        raise AuthnConfigError(where, "must be printable ASCII without spaces, quotes or backslashes")
    return parts.scheme, parts.netloc, parts.path


def well_known_path(resource: str) -> str:
    """RFC 9728 3.1: the well-known suffix goes between the host and the resource's path, whose
    terminating slash after the host is dropped (``https://h/mcp`` -> ``/.well-known/oauth-protected-resource/mcp``)."""
    path = urlsplit(resource).path
    return WELL_KNOWN + (path if path not in ("", "/") else "")


def compile_protected_resource(
    spec: ProtectedResourceSpec, where: str = "protected_resource"
) -> ProtectedResourceMetadata:
    """Validate and render the document. Raises `AuthnConfigError` naming the field."""
    scheme, authority, _ = _check_url(spec.resource, f"{where}.resource")
    for index, server in enumerate(spec.authorization_servers):
        _check_url(server, f"{where}.authorization_servers[{index}]")
    for scope in spec.scopes_supported:
        if not scope or any(ord(char) <= 0x20 or ord(char) >= 0x7F or char in '"\\' for char in scope):
            raise AuthnConfigError(f"{where}.scopes_supported", f"invalid scope {scope!r} (RFC 6749 3.3)")
    if spec.resource_documentation is not None:
        _check_url(spec.resource_documentation, f"{where}.resource_documentation")
    document: dict[str, object] = {
        # 3.3: the value must be identical to the resource the client asked about.
        "resource": spec.resource,
        "bearer_methods_supported": ["header"],
    }
    if spec.authorization_servers:
        document["authorization_servers"] = list(spec.authorization_servers)
    if spec.scopes_supported:
        document["scopes_supported"] = list(spec.scopes_supported)
    if spec.resource_name:
        document["resource_name"] = spec.resource_name
    if spec.resource_documentation:
        document["resource_documentation"] = spec.resource_documentation
    body = json.dumps(document, separators=(",", ":")).encode()
    path = well_known_path(spec.resource)
    headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"public, max-age=300"),
        # Public metadata that browser-based MCP clients fetch cross-origin.
        (b"access-control-allow-origin", b"*"),
    )
    return ProtectedResourceMetadata(path=path, url=f"{scheme}://{authority}{path}", body=body, headers=headers)


__all__ = [
    "WELL_KNOWN",
    "ProtectedResourceMetadata",
    "ProtectedResourceSpec",
    "compile_protected_resource",
    "well_known_path",
]
