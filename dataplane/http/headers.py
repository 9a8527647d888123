"""Header rewriting between the two hops: hop-by-hop removal, X-Forwarded-*, X-Request-Id.

One pass over the header list per direction, driven by a dict of the names that need
attention, so the common header costs one dict probe and one append.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping

Headers = list[tuple[bytes, bytes]]

# Kinds of request headers that are not copied as they are.
_DROP, _CONNECTION, _TE, _XFF, _REQUEST_ID, _COOKIE = range(6)

# RFC 9110 7.6.1 hop-by-hop fields (plus Proxy-Connection and Keep-Alive by custom), the
# Host (sent as Host or :authority by the upstream side) and Expect (the proxy answers
# 100-continue itself and streams the body).
_REQUEST_KINDS: dict[bytes, int] = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _TE,
    b"transfer-encoding": _DROP,
    b"upgrade": _DROP,
    b"proxy-authenticate": _DROP,
    b"proxy-authorization": _DROP,
    b"http2-settings": _DROP,
    b"host": _DROP,
    b"expect": _DROP,
    b"x-forwarded-for": _XFF,
    # Replaced with what this hop saw.
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"x-request-id": _REQUEST_ID,
    b"cookie": _COOKIE,
}

_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
    }
)

# Connection options that name no header.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b""})

_ID_PREFIX = os.urandom(8).hex().encode()
_ids = itertools.count(1)


def new_request_id() -> bytes:
    """Unique per process run and cheap: a random process prefix and a counter (32 hex digits)."""
    return b"%b%016x" % (_ID_PREFIX, next(_ids))


def _connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")} - _CONNECTION_OPTIONS


def upstream_request_headers(
    headers: Headers,
    *,
    to_h2: bool,
    client_host: bytes,
    scheme: bytes,
    host: bytes,
) -> Headers:
    """The request headers to forward: hop-by-hop fields gone, X-Forwarded-* and X-Request-Id set.

    X-Forwarded-For gets the client appended; X-Forwarded-Proto and -Host are replaced with
    what this hop saw; X-Request-Id is kept if present, else created. Toward HTTP/2, TE
    survives only as "trailers"; toward HTTP/1.1, split Cookie fields are joined (RFC 9113 8.2.3).
    """
    out: Headers = []
    kinds = _REQUEST_KINDS
    listed: set[bytes] | None = None
    forwarded_for: bytes | None = None
    has_request_id = False
    cookies: list[bytes] | None = None
    for header in headers:
        kind = kinds.get(header[0])
        if kind is None:
            out.append(header)
        elif kind == _DROP:
            continue
        elif kind == _CONNECTION:
            tokens = _connection_tokens(header[1])
            if tokens:
                listed = tokens if listed is None else listed | tokens
        elif kind == _TE:
            if to_h2 and header[1].strip().lower() == b"trailers":
                out.append(header)
        elif kind == _XFF:
            forwarded_for = header[1] if forwarded_for is None else forwarded_for + b", " + header[1]
        elif kind == _REQUEST_ID:
            has_request_id = True
            out.append(header)
        elif to_h2:  # cookie
            out.append(header)
        elif cookies is None:
            cookies = [header[1]]
        else:
            cookies.append(header[1])
    if listed:
        out = [header for header in out if header[0] not in listed]
    if cookies is not None:
        out.append((b"cookie", cookies[0] if len(cookies) == 1 else b"; ".join(cookies)))
    out.append((b"x-forwarded-for", client_host if forwarded_for is None else forwarded_for + b", " + client_host))
    out.append((b"x-forwarded-proto", scheme))
    if host:
        out.append((b"x-forwarded-host", host))
    if not has_request_id:
        out.append((b"x-request-id", new_request_id()))
    return out


def downstream_response_headers(headers: Headers) -> Headers:
    """The response headers to return: hop-by-hop fields (and those Connection lists) gone."""
    drop = _RESPONSE_DROP
    out: Headers = []
    listed: set[bytes] | None = None
    for header in headers:
        name = header[0]
        if name in drop:
            if name == b"connection":
                tokens = _connection_tokens(header[1])
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            continue
        out.append(header)
    if listed:
        out = [header for header in out if header[0] not in listed]
    return out


class HeaderView(Mapping[str, str]):
    """Request headers as the route matcher wants them (str, lower-case names), decoded only
    for the names a rule actually asks about. Repeated fields read as their first value."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        wanted = name.encode("latin-1")
        for key, value in self._headers:
            if key == wanted:
                return value.decode("latin-1")
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(key.decode("latin-1") for key, _ in self._headers))

    def __len__(self) -> int:
        return len({key for key, _ in self._headers})
