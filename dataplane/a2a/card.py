"""Agent cards rewritten to the gateway's address, so a client that fetched a card through the gateway keeps
calling through it.

Inputs: the **external base** (what the client used: scheme from X-Forwarded-Proto or the listener, host from
X-Forwarded-Host or Host, plus the route's public prefix such as ``/agents/planner``; ``external_base``) and
the agent's **upstream base** (its origin plus the base path the route's prefix is rewritten to). A
``CardRewriter`` is built once per backend when config is applied; ``rewrite`` runs per card fetch.

Which URLs change:

- **Interface URLs, always:** 0.2/0.3 ``url``, 0.3 ``additionalInterfaces[].url``, 1.0
  ``supportedInterfaces[].url``, and the snake_case spellings ProtoJSON readers (a2a-sdk among them) also
  accept (``additional_interfaces``, ``supported_interfaces``). Agents often advertise an address the
  gateway does not dial (localhost, a pod name, their public name), so these are matched by path only:
  the part under the base path is kept and put under the external base
  (``http://10.0.0.5:9000/a2a/rpc`` with base ``/a2a`` -> ``https://gw.example.com/agents/planner/rpc``);
  query and fragment are kept, userinfo is dropped. A path outside the base is put under the external base
  whole: the client still reaches the gateway (which answers for the route), never the agent directly.
  Relative URLs already resolve against the card's (gateway) URL and stay, and so do URLs already under
  the external base (an agent configured with the gateway's address, or a card passing two gateways).
  Every binding is rewritten; the gateway serves JSON-RPC and HTTP+JSON, so a gRPC interface reached
  through it gets a clear 404 instead of a path around the gateway.
- **Other URLs, only when they point at the agent itself:** ``documentationUrl``, ``iconUrl``,
  ``provider.url`` and every ``*Url`` under ``securitySchemes`` (OAuth authorization/token/refresh,
  OpenID Connect discovery, OAuth metadata) are rewritten only if their origin is the agent's (the upstream
  origin, or the origin of one of its interface URLs) and their path is under the base path, i.e. the
  route serves them and the client could not reach them otherwise. Third-party pages, IdPs and CDNs stay.
  Skills and extension params are the agent's own data and are not touched (an extension ``uri`` is an
  identifier, not an address).
- **Signed cards** (a non-empty ``signatures`` array of JWS, 0.3 and 1.0): a rewrite would break every
  signature, so ``signed_cards`` decides. ``"strip"`` (the default) removes ``signatures`` and rewrites: the
  client gets a card that works through the gateway, unsigned (a client that requires signatures refuses
  it, which is the honest outcome). ``"preserve"`` returns the card byte for byte: signatures stay
  verifiable, and its URLs are whatever the agent advertised (use it when the agent is configured with the
  gateway's public address). Re-signing with a gateway key would be a third mode; not built.

A body that is not JSON, not an object, or larger than ``max_card_bytes`` is an ``A2aInvalidAgentCard``
(the handler answers 502). When nothing changes, ``rewrite`` returns the very ``body`` object it was given
(check with ``is``): only then may the handler keep the agent's ``ETag`` / ``Content-Length``; a rewritten
card must drop them (and the handler should not forward ``If-None-Match``: a 304 from the agent says
nothing about a card rewritten for another Host).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

from dataplane.a2a.errors import A2aBadRequestHeader, A2aInvalidAgentCard, dumps, echo
from dataplane.mcp.jsonrpc import decode_json

SignedCards = Literal["strip", "preserve"]
CARD_PATHS: Final = ("/.well-known/agent-card.json", "/.well-known/agent.json")  # 0.3/1.0, and 0.2
DEFAULT_MAX_CARD_BYTES: Final = 1024 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# RFC 3986 authority without userinfo: reg-name or IPv4, or an IP literal, and an optional port.
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?\Z")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%]+)*/?\Z")
_INTERFACE_LISTS: Final = (
    "additionalInterfaces",
    "additional_interfaces",
    "supportedInterfaces",
    "supported_interfaces",
)
_TOP_LEVEL_URLS: Final = ("documentationUrl", "documentation_url", "iconUrl", "icon_url")
_SECURITY_SCHEMES: Final = ("securitySchemes", "security_schemes")


def is_card_path(path: str) -> bool:
    """Whether ``path`` (relative to the agent's mount, query allowed) is a well-known card path."""
    return path.partition("?")[0] in CARD_PATHS


@dataclass(frozen=True, slots=True)
class ExternalBase:
    """The gateway's address as the client used it: ``scheme://authority`` plus the route's public prefix
    (no trailing slash; "" for a route at the root)."""

    scheme: str
    authority: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.prefix}"


def _first(value: str | bytes | None) -> str:
    """The first element of a header that proxies append to (``a, b``): the one nearest the client."""
    if value is None:
        return ""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.partition(",")[0].strip()


def external_base(
    *,
    listener_scheme: str,
    host: str | bytes | None,
    public_prefix: str = "",
    forwarded_proto: str | bytes | None = None,
    forwarded_host: str | bytes | None = None,
    trust_forwarded: bool = True,
) -> ExternalBase:
    """The external base from the request: ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` when present (and
    trusted), else the listener's scheme and the ``Host`` (``:authority``). Raises ``A2aBadRequestHeader``
    for a missing or malformed host or a scheme other than http/https: a card must never carry a URL built
    from a header the gateway could not check."""
    scheme = listener_scheme.lower()
    proto = _first(forwarded_proto) if trust_forwarded else ""
    if proto:
        scheme = proto.lower()
    if scheme not in _DEFAULT_PORTS:
        raise A2aBadRequestHeader(f"X-Forwarded-Proto {echo(proto or scheme)!r} is not http or https")
    authority = (_first(forwarded_host) if trust_forwarded else "") or _first(host)
    match = _AUTHORITY.match(authority)
    if not authority or match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
        which = "X-Forwarded-Host" if trust_forwarded and _first(forwarded_host) else "Host"
        raise A2aBadRequestHeader(f"{which} {echo(authority)!r} is not a valid host[:port]")
    if public_prefix and _PREFIX.match(public_prefix) is None:
        raise ValueError(f"public prefix {public_prefix!r} is not an absolute path")
    return ExternalBase(scheme, authority, public_prefix.rstrip("/"))


def public_prefix(base_path: str, matched_prefix: str | None, replace_prefix_match: str | None) -> str:
    """The gateway path that reaches the agent's base path: with a URLRewrite ReplacePrefixMatch that maps
    ``matched_prefix`` (``/agents/planner``) to ``replace_prefix_match`` (``/``), the base path seen from the
    client's side (``/agents/planner`` + the part of the base below the replacement); without one (or when
    the base lies outside the rewritten space, or with ReplaceFullPath, which cannot be inverted) the base
    path itself. No trailing slash; "" for the root."""
    base = _normal_base_path(base_path)
    if matched_prefix is None or replace_prefix_match is None:
        return base
    replacement = replace_prefix_match.rstrip("/")
    if not _under(base, replacement):
        return base
    return matched_prefix.rstrip("/") + base[len(replacement) :]


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """(scheme, host, port) with default ports filled in; None for a URL without a usable origin."""
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not scheme or not host:
        return None
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def _normal_base_path(path: str) -> str:
    """A base path without its trailing slash; "" for the root."""
    path = path.strip()
    if path and not path.startswith("/"):
        path = "/" + path
    return path.rstrip("/")


class CardRewriter:
    """Rewrites one agent's cards; built when config is applied (see the module docstring for the rules)."""

    __slots__ = ("_base_path", "_origin", "max_card_bytes", "signed_cards")

    def __init__(
        self,
        *,
        upstream_base: str,
        signed_cards: SignedCards = "strip",
        max_card_bytes: int = DEFAULT_MAX_CARD_BYTES,
    ) -> None:
        """``upstream_base`` is the agent's origin and base path (``http://10.0.0.5:9000/a2a``)."""
        if signed_cards not in ("strip", "preserve"):
            raise ValueError(f"signed_cards must be 'strip' or 'preserve', got {signed_cards!r}")
        parts = urlsplit(upstream_base)
        origin = _origin(parts)
        if origin is None:
            raise ValueError(f"upstream base {upstream_base!r} is not an absolute URL")
        self._origin = origin
        self._base_path = _normal_base_path(parts.path)
        self.signed_cards: SignedCards = signed_cards
        self.max_card_bytes = max_card_bytes

    def rewrite(self, body: bytes, external: ExternalBase) -> bytes:
        """The card in ``body`` as the client should see it; ``body`` itself when nothing changes."""
        card = self._decode(body, "agent card")
        rewritten = self._rewrite_object(card, external)
        return body if rewritten is None else dumps(rewritten)

    def rewrite_jsonrpc_result(self, body: bytes, external: ExternalBase) -> bytes:
        """A JSON-RPC answer to GetExtendedAgentCard / agent/getAuthenticatedExtendedCard: its ``result`` is a
        card and gets the same rewrite. An error answer passes unchanged."""
        response = self._decode(body, "extended agent card response")
        result = response.get("result")
        if type(result) is not dict:
            if "error" in response:
                return body
            raise A2aInvalidAgentCard("Agent's extended card response has no card in its result")
        rewritten = self._rewrite_object(result, external)
        if rewritten is None:
            return body
        return dumps({**response, "result": rewritten})

    def _decode(self, body: bytes, what: str) -> dict[str, Any]:
        if len(body) > self.max_card_bytes:
            raise A2aInvalidAgentCard(f"Agent's {what} is larger than {self.max_card_bytes} bytes")
        try:
            value = decode_json(body)
        except ValueError as exc:
            raise A2aInvalidAgentCard(f"Agent's {what} is not valid JSON: {exc}") from None
        if type(value) is not dict:
            raise A2aInvalidAgentCard(f"Agent's {what} is not a JSON object")
        return value

    def _rewrite_object(self, card: dict[str, Any], external: ExternalBase) -> dict[str, Any] | None:
        """A rewritten copy of ``card``, or None when nothing changes."""
        signed = bool(card.get("signatures"))
        if signed and self.signed_cards == "preserve":
            return None
        out = dict(card)
        changed = False
        if signed:
            del out["signatures"]
            changed = True
        # The agent's own origins: the upstream's and its interfaces' (read before rewriting them).
        origins = {self._origin}
        interface_holders: list[dict[str, Any]] = [out]
        for key in _INTERFACE_LISTS:
            interfaces = out.get(key)
            if type(interfaces) is not list:
                continue
            copied = [dict(item) if type(item) is dict else item for item in interfaces]
            out[key] = copied
            interface_holders.extend(item for item in copied if type(item) is dict)
        for holder in interface_holders:
            url = holder.get("url")
            if type(url) is str:
                origin = _origin(urlsplit(url))
                if origin is not None:
                    origins.add(origin)
        for holder in interface_holders:
            url = holder.get("url")
            if type(url) is str:
                new = self._map_interface(url, external)
                if new is not None and new != url:
                    holder["url"] = new
                    changed = True

        def own(url: str) -> str | None:
            return self._map_own(url, external, origins)

        for key in _TOP_LEVEL_URLS:
            changed |= _replace(out, key, own)
        provider = out.get("provider")
        if type(provider) is dict:
            provider = out["provider"] = dict(provider)
            changed |= _replace(provider, "url", own)
        for key in _SECURITY_SCHEMES:
            schemes = out.get(key)
            if type(schemes) is dict:
                copied_schemes, schemes_changed = _rewrite_urls_deep(schemes, own)
                if schemes_changed:
                    out[key] = copied_schemes
                    changed = True
        return out if changed else None

    def _remainder(self, path: str) -> str | None:
        """The part of ``path`` under the base path (may be ""), or None when it is outside."""
        return path[len(self._base_path) :] if _under(path, self._base_path) else None

    def _map_interface(self, url: str, external: ExternalBase) -> str | None:
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return None  # relative: resolves against the card's own (gateway) URL already
        if _origin(parts) == _origin(urlsplit(external.url)) and _under(parts.path, external.prefix):
            return None  # already the gateway's address (an agent configured with it, or a second pass)
        remainder = self._remainder(parts.path)
        return _build(external, parts.path if remainder is None else remainder, parts)

    def _map_own(self, url: str, external: ExternalBase, origins: set[tuple[str, str, int]]) -> str | None:
        parts = urlsplit(url)
        if _origin(parts) not in origins:
            return None
        remainder = self._remainder(parts.path)
        return None if remainder is None else _build(external, remainder, parts)


def _under(path: str, base: str) -> bool:
    """Whether ``path`` is ``base`` or below it (``base`` has no trailing slash; "" is the root)."""
    return not base or path == base or path.startswith(base + "/")


def _build(external: ExternalBase, path: str, parts: SplitResult) -> str:
    url = f"{external.scheme}://{external.authority}{external.prefix}{path}"
    if parts.query:
        url += "?" + parts.query
    if parts.fragment:
        url += "#" + parts.fragment
    return url


def _replace(holder: dict[str, Any], key: str, mapper: Callable[[str], str | None]) -> bool:
    value = holder.get(key)
    if type(value) is not str:
        return False
    new = mapper(value)
    if new is None or new == value:
        return False
    holder[key] = new
    return True


def _is_url_key(key: str) -> bool:
    return key == "url" or key.endswith(("Url", "_url", "URL"))


def _rewrite_urls_deep(value: Any, mapper: Callable[[str], str | None]) -> tuple[Any, bool]:
    """A copy of ``value`` with every string under a ``*Url`` key mapped; (value, whether anything changed).
    The decoder bounds nesting (128 levels), so the recursion is bounded too."""
    if type(value) is dict:
        changed = False
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(item) is str and _is_url_key(key):
                new = mapper(item)
                if new is not None and new != item:
                    out[key] = new
                    changed = True
                    continue
                out[key] = item
            else:
                out[key], item_changed = _rewrite_urls_deep(item, mapper)
                changed |= item_changed
        return (out, True) if changed else (value, False)
    if type(value) is list:
        items = [_rewrite_urls_deep(item, mapper) for item in value]
        if any(changed for _, changed in items):
            return [item for item, _ in items], True
        return value, False
    return value, False


def rewrite_card(
    body: bytes,
    *,
    external: ExternalBase,
    upstream_base: str,
    signed_cards: SignedCards = "strip",
    max_card_bytes: int = DEFAULT_MAX_CARD_BYTES,
) -> bytes:
    """One-off ``CardRewriter(...).rewrite(body, external)`` (handlers keep a compiled rewriter instead)."""
    rewriter = CardRewriter(upstream_base=upstream_base, signed_cards=signed_cards, max_card_bytes=max_card_bytes)
    return rewriter.rewrite(body, external)


__all__ = [
    "CARD_PATHS",
    "DEFAULT_MAX_CARD_BYTES",
    "CardRewriter",
    "ExternalBase",
    "SignedCards",
    "external_base",
    "is_card_path",
    "public_prefix",
    "rewrite_card",
]
