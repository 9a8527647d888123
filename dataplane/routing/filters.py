"""Gateway API HTTPRoute filters in their compiled form: header edits, URL rewrite, redirect.

Each object is built once per config update from validated input, so applying one is
plain string and list work with no parsing on the request path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Ports a Location header leaves out for its scheme (Gateway API RequestRedirect).
DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """A RequestHeaderModifier or ResponseHeaderModifier: set replaces, add appends, remove drops.

    Names are lower-case bytes (valid for HTTP/1.1 and required by HTTP/2). `set` and
    `remove` act on existing headers; `add` keeps existing values and appends.
    """

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()
    # Names whose existing values go (set + remove), and the headers appended after.
    _drop: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _append: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_drop", frozenset(name for name, _ in self.set) | self.remove)
        object.__setattr__(self, "_append", self.set + self.add)

    @classmethod
    def from_strings(
        cls,
        set: Iterable[tuple[str, str]] = (),
        add: Iterable[tuple[str, str]] = (),
        remove: Iterable[str] = (),
    ) -> HeaderOps:
        """Build from validated names and values; the first `set` of a name wins, as Gateway API says."""
        set_ops: dict[bytes, bytes] = {}
        for name, value in set:
            set_ops.setdefault(name.lower().encode("latin-1"), value.encode("latin-1"))
        return cls(
            set=tuple(set_ops.items()),
            add=tuple((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in add),
            remove=frozenset(name.lower().encode("latin-1") for name in remove),
        )

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Edit `headers` in place (names compared case-insensitively) and return the same list."""
        drop = self._drop
        if drop:
            headers[:] = [header for header in headers if header[0].lower() not in drop]
        if self._append:
            headers.extend(self._append)
        return headers


def replace_prefix(path: str, matched_prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: swap the matched path elements, keeping the rest.

    A trailing "/" on either side is ignored, so /foo -> /bar turns /foo/x into /bar/x,
    /foo into /bar and /foo/ into /bar/; a replacement of "/" strips the prefix.
    """
    prefix = matched_prefix.rstrip("/")
    if not path.startswith(prefix):
        return path
    rewritten = replacement.rstrip("/") + path[len(prefix) :]
    return rewritten or "/"


@dataclass(frozen=True, slots=True)
class CompiledUrlRewrite:
    """A URLRewrite filter: optional new Host and optional path modifier."""

    hostname: str | None = None
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None

    def rewrite_path(self, path: str, matched_prefix: str | None) -> str:
        """The upstream path (no query). Unchanged when there is no path modifier.

        ReplacePrefixMatch needs the PathPrefix that matched; the compiler only accepts it
        on rules whose matches are all PathPrefix, so None here leaves the path as is.
        """
        if self.replace_full_path is not None:
            return self.replace_full_path
        if self.replace_prefix_match is not None and matched_prefix is not None:
            return replace_prefix(path, matched_prefix, self.replace_prefix_match)
        return path


def split_host_port(authority: str) -> tuple[str, int | None]:
    """'host:port' / '[v6]:port' / 'host' -> (host, port or None); a bad port reads as None."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return authority, None
        host, rest = authority[1:end], authority[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        colon = authority.rfind(":")
        if colon < 0 or authority.find(":") != colon:  # no port, or a bare IPv6 literal
            return authority, None
        host, port_text = authority[:colon], authority[colon + 1 :]
    return host, int(port_text) if port_text.isdigit() else None


@dataclass(frozen=True, slots=True)
class CompiledRedirect:
    """A RequestRedirect filter. Unset parts keep the request's value; the query is kept."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None
    status: int = 302

    def location(
        self, scheme: str, host: str, port: int | None, path: str, query: str, matched_prefix: str | None
    ) -> str:
        """The Location header value.

        `scheme` is the request's ("http"/"https"), `host` its authority (a port in it is
        dropped), `port` the listener port the request arrived on. Per Gateway API, an
        unset port becomes the well-known port of a redirect scheme, else the listener
        port; the port is omitted when it is the default for the resulting scheme.
        """
        new_scheme = self.scheme or scheme
        new_host = self.hostname if self.hostname is not None else split_host_port(host)[0]
        if self.port is not None:
            new_port: int | None = self.port
        elif self.scheme is not None:
            new_port = DEFAULT_PORTS.get(self.scheme, port)
        else:
            new_port = port
        if ":" in new_host:
            new_host = f"[{new_host}]"
        if new_port is not None and new_port != DEFAULT_PORTS.get(new_scheme):
            new_host = f"{new_host}:{new_port}"
        if self.replace_full_path is not None:
            path = self.replace_full_path
        elif self.replace_prefix_match is not None and matched_prefix is not None:
            path = replace_prefix(path, matched_prefix, self.replace_prefix_match)
        if query:
            return f"{new_scheme}://{new_host}{path}?{query}"
        return f"{new_scheme}://{new_host}{path}"
