"""CORS (Fetch standard, "CORS protocol") answered by the gateway from a policy's `CorsSettings`.

Preflights (OPTIONS with Origin and Access-Control-Request-Method) are answered here and never
reach the upstream: 204 with the allow headers when origin, method and every requested header are
allowed, else 403 naming what is not (a browser fails the preflight either way; the text helps the
person reading the network tab). Actual responses to an allowed origin get Access-Control-Allow-Origin
(the origin itself, or "*" when every origin is allowed without credentials), Vary: Origin,
-Allow-Credentials and -Expose-Headers. The policy is the authority: any Access-Control-* header the
upstream sent is dropped, so a permissive upstream cannot widen it.

`CorsPolicy.compile` does all string work once per config; a request costs a header scan and,
for browsers, one origin lookup.

MCP routes (`CorsPolicy.for_mcp`): a browser MCP client sends headers no policy author should have to
list, so on an MCP backend the policy's allowed request headers also include `MCP_REQUEST_HEADERS`
(Content-Type, Authorization, Mcp-Session-Id, Mcp-Protocol-Version, Last-Event-ID, Mcp-Method, Mcp-Name)
and any `Mcp-Param-*` (2026-07-28 parameter headers), and its exposed headers include
`MCP_EXPOSED_HEADERS` (Mcp-Session-Id, which a client must read to continue its session; WWW-Authenticate,
which starts OAuth discovery; Retry-After and x-ratelimit-*). Origins, methods and credentials stay the
policy's own. The MCP backend's `allowedOrigins` check (DNS-rebinding protection) still applies to the
actual requests, so a browser origin must be allowed by both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from dataplane.config.policy import CorsSettings
from dataplane.http.messages import Headers
from shared.origins import OriginAllowList

# Methods a browser sends without asking (Fetch: CORS-safelisted methods).
SAFELISTED_METHODS: Final = frozenset({"GET", "HEAD", "POST"})
_UPSTREAM_CORS_HEADERS: Final = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
    }
)
_VARY_ORIGIN: Final = (b"vary", b"origin")
# What MCP routes allow and expose on top of a policy's own lists (see the module docstring).
MCP_REQUEST_HEADERS: Final = (
    "content-type",
    "authorization",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
    "mcp-method",
    "mcp-name",
)
MCP_REQUEST_HEADER_PREFIXES: Final = ("mcp-param-",)
MCP_EXPOSED_HEADERS: Final = (
    "mcp-session-id",
    "www-authenticate",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
_NO_BODY: Final = (b"content-length", b"0")


@dataclass(frozen=True, slots=True)
class PreflightAnswer:
    """What to send for a preflight: 204 with `headers`, or 403 with `reason` as the text body."""

    status: int
    headers: Headers
    reason: str = ""


def is_preflight(method: bytes, headers: Headers) -> bool:
    """An OPTIONS request carrying Origin and Access-Control-Request-Method."""
    if method != b"OPTIONS":
        return False
    origin = requested = False
    for name, _ in headers:
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            requested = True
    return origin and requested


def _first(headers: Headers, wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Compiled `CorsSettings`."""

    policy: str
    origins: OriginAllowList
    methods: frozenset[str]
    any_method: bool
    headers: frozenset[str]
    any_header: bool
    credentials: bool
    # Precomputed header values.
    methods_value: bytes
    headers_value: bytes
    expose_value: bytes
    max_age_value: bytes | None
    # Request headers allowed by prefix (MCP's parameter headers), besides `headers`.
    header_prefixes: tuple[str, ...] = ()

    @classmethod
    def compile(cls, settings: CorsSettings) -> CorsPolicy:
        methods = tuple(method.upper() for method in settings.allow_methods)
        return cls(
            policy=settings.policy,
            origins=settings.allow_origins,
            methods=frozenset(methods),
            any_method="*" in methods,
            headers=frozenset(settings.allow_headers),
            any_header="*" in settings.allow_headers,
            credentials=settings.allow_credentials,
            methods_value=", ".join(methods).encode("latin-1"),
            headers_value=", ".join(settings.allow_headers).encode("latin-1"),
            expose_value=", ".join(settings.expose_headers).encode("latin-1"),
            max_age_value=None if settings.max_age is None else b"%d" % int(settings.max_age),
        )

    def for_mcp(self) -> CorsPolicy:
        """This policy on an MCP route: MCP's request headers allowed, its response headers exposed."""
        allowed = tuple(dict.fromkeys([*sorted(self.headers), *MCP_REQUEST_HEADERS]))
        exposed = [name.strip() for name in self.expose_value.decode("latin-1").split(",") if name.strip()]
        exposed = list(dict.fromkeys([*exposed, *MCP_EXPOSED_HEADERS]))
        return replace(
            self,
            headers=frozenset(allowed),
            headers_value=self.headers_value if self.any_header else ", ".join(allowed).encode("latin-1"),
            expose_value=", ".join(exposed).encode("latin-1"),
            header_prefixes=MCP_REQUEST_HEADER_PREFIXES,
        )

    @property
    def echoes_origin(self) -> bool:
        """Allow-Origin names each allowed origin (so responses vary by Origin), rather than "*"."""
        return not (self.origins.allow_all and not self.credentials)

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """Allow-Origin (and Vary when it depends on the origin) plus Allow-Credentials."""
        if not self.echoes_origin:
            return [(b"access-control-allow-origin", b"*")]
        out = [(b"access-control-allow-origin", origin), _VARY_ORIGIN]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    def preflight(self, request_headers: Headers) -> PreflightAnswer:
        """The answer to a preflight (see `is_preflight`)."""
        origin = _first(request_headers, b"origin") or b""
        method = (_first(request_headers, b"access-control-request-method") or b"").decode("latin-1").strip()
        origin_text = origin.decode("latin-1")
        where = f"CORS policy {self.policy}"
        if not self.origins.allows(origin_text):
            return PreflightAnswer(403, [], f"{where}: origin {origin_text!r} is not allowed")
        if not (self.any_method or method in self.methods or method in SAFELISTED_METHODS):
            return PreflightAnswer(403, [], f"{where}: method {method!r} is not allowed")
        requested = [
            name.strip().lower()
            for value in (v for k, v in request_headers if k == b"access-control-request-headers")
            for name in value.decode("latin-1").split(",")
            if name.strip()
        ]
        by_prefix: list[str] = []
        if not self.any_header:
            for name in requested:
                if name in self.headers:
                    continue
                if not name.startswith(self.header_prefixes):
                    return PreflightAnswer(403, [], f"{where}: request header {name!r} is not allowed")
                by_prefix.append(name)
        headers = self._allow_origin(origin)
        if self.any_method:
            # With credentials "*" is taken literally by browsers: name the method asked for.
            headers.append((b"access-control-allow-methods", method.encode("latin-1")))
        else:
            headers.append((b"access-control-allow-methods", self.methods_value))
        if requested:
            value = ", ".join(requested).encode("latin-1") if self.any_header else self.headers_value
            if by_prefix:
                value = b", ".join([part for part in (value, *(n.encode("latin-1") for n in by_prefix)) if part])
            headers.append((b"access-control-allow-headers", value))
        if self.max_age_value is not None:
            headers.append((b"access-control-max-age", self.max_age_value))
        headers.append(_NO_BODY)
        return PreflightAnswer(204, headers)

    def response_headers(self, request_headers: Headers, headers: Headers) -> Headers:
        """`headers` of an actual response with the upstream's CORS headers replaced by the policy's."""
        if any(name in _UPSTREAM_CORS_HEADERS for name, _ in headers):
            headers = [header for header in headers if header[0] not in _UPSTREAM_CORS_HEADERS]
        origin = _first(request_headers, b"origin")
        if origin is None or not self.origins.allows(origin.decode("latin-1")):
            if self.echoes_origin:
                # The answer differs by origin: caches must not serve this one to an allowed origin.
                headers.append(_VARY_ORIGIN)
            return headers
        headers.extend(self._allow_origin(origin))
        if self.expose_value:
            headers.append((b"access-control-expose-headers", self.expose_value))
        return headers


__all__ = [
    "MCP_EXPOSED_HEADERS",
    "MCP_REQUEST_HEADERS",
    "MCP_REQUEST_HEADER_PREFIXES",
    "SAFELISTED_METHODS",
    "CorsPolicy",
    "PreflightAnswer",
    "is_preflight",
]
