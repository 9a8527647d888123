"""Validation of the HTTP headers of an MCP streamable-HTTP request, as pure functions.

Each check returns None (or the accepted value) on success and a `HeaderError` otherwise; the
error carries the HTTP status the spec asks for and, where the spec defines one, the JSON-RPC
error to put in the body. Sources: MCP basic/transports (2025-06-18, 2025-11-25) and
basic/transports/streamable-http (2026-07-28, "Request Metadata" and "Server Validation").

Policy choices, stated once:
- Accept: a POST must accept both application/json and text/event-stream. Wildcards count
  (`*/*`, `application/*`) because RFC 9110 gives them that meaning; `q=0` refuses a range, and
  the most specific matching range decides.
- Content-Type: application/json; a `charset` parameter, when present, must be utf-8 (415).
- MCP-Protocol-Version absent: the spec lets a server read it as 2025-03-26 (clients older than
  2025-06-18 did not send it); `check_protocol_version(..., absent_means=None)` refuses instead.
- Origin: an absent Origin is allowed (non-browser clients); a present one must be on the
  allow-list, compared after normalising case and default ports; the opaque origin `null` only
  passes when listed literally.
- Mcp-Method / Mcp-Name are checked against the body only for protocol versions that define them
  (2026-07-28 and later); for older versions intermediaries must not trust them, and we ignore them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from dataplane.mcp.jsonrpc import ErrorCode, Notification, Request, RequestId, error_response
from shared.origins import OriginAllowList

# Every protocol revision the gateway can speak downstream, oldest first.
SUPPORTED_PROTOCOL_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28")
# Revisions with per-request metadata (no sessions) and header/body validation.
MODERN_PROTOCOL_VERSIONS: Final = frozenset({"2026-07-28"})
# What a missing MCP-Protocol-Version header means (2025-06-18 "Protocol Version Header").
PROTOCOL_VERSION_WHEN_ABSENT: Final = "2025-03-26"

META_PROTOCOL_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
# Methods whose request must carry Mcp-Name, and the params field it mirrors.
MCP_NAME_SOURCE: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

_B64_PREFIX: Final = "=?base64?"
_B64_SUFFIX: Final = "?="


class HeaderProblem(StrEnum):
    """Stable labels for logs and metrics."""

    NOT_ACCEPTABLE = "not_acceptable"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    MISSING_PROTOCOL_VERSION = "missing_protocol_version"
    UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    HEADER_MISMATCH = "header_mismatch"


@dataclass(frozen=True, slots=True)
class HeaderError:
    problem: HeaderProblem
    status: int
    message: str
    # JSON-RPC error code for the response body, when the spec defines one.
    jsonrpc_code: int | None = None
    jsonrpc_data: Any = None

    def to_jsonrpc(self, request_id: RequestId | None = None) -> dict[str, Any] | None:
        """The JSON-RPC error body to send with `status`, or None when a bare status is enough."""
        if self.jsonrpc_code is None:
            return None
        return error_response(request_id, self.jsonrpc_code, self.message, self.jsonrpc_data)


def _mismatch(message: str) -> HeaderError:
    return HeaderError(HeaderProblem.HEADER_MISMATCH, 400, f"Header mismatch: {message}", ErrorCode.HEADER_MISMATCH)


# --------------------------------------------------------------------------------------------- Accept


def _media_ranges(accept: str) -> tuple[set[str], set[str]]:
    """(accepted, refused) media ranges, lower-cased without parameters; `q=0` means refused."""
    accepted: set[str] = set()
    refused: set[str] = set()
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if not media:
            continue
        refuse = False
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    refuse = float(value.strip()) <= 0.0
                except ValueError:
                    refuse = True  # an unreadable weight is not a promise to accept
        (refused if refuse else accepted).add(media)
    return accepted, refused


def _covers(ranges: tuple[set[str], set[str]], media_type: str) -> bool:
    """RFC 9110 12.5.1: the most specific matching range decides."""
    accepted, refused = ranges
    for candidate in (media_type, media_type.split("/", 1)[0] + "/*", "*/*"):
        if candidate in refused:
            return False
        if candidate in accepted:
            return True
    return False


def check_accept_post(accept: str | None) -> HeaderError | None:
    """A POST must accept both a JSON reply and an SSE stream (406 otherwise)."""
    ranges = _media_ranges(accept or "")
    if _covers(ranges, "application/json") and _covers(ranges, "text/event-stream"):
        return None
    return HeaderError(
        HeaderProblem.NOT_ACCEPTABLE,
        406,
        "Not Acceptable: the Accept header must list both application/json and text/event-stream",
        ErrorCode.INVALID_REQUEST,
    )


def check_accept_get(accept: str | None) -> HeaderError | None:
    """A GET (session-era standalone stream, or legacy SSE) must accept text/event-stream."""
    if _covers(_media_ranges(accept or ""), "text/event-stream"):
        return None
    return HeaderError(
        HeaderProblem.NOT_ACCEPTABLE,
        406,
        "Not Acceptable: the Accept header must list text/event-stream",
        ErrorCode.INVALID_REQUEST,
    )


# --------------------------------------------------------------------------------------- Content-Type


def check_content_type(content_type: str | None) -> HeaderError | None:
    """The POST body must be declared as JSON, in UTF-8 if a charset is given (415 otherwise)."""
    if content_type is not None:
        media, *params = content_type.split(";")
        if media.strip().lower() == "application/json":
            for param in params:
                name, _, value = param.partition("=")
                if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
                    break
            else:
                return None
    return HeaderError(
        HeaderProblem.UNSUPPORTED_MEDIA_TYPE,
        415,
        "Unsupported Media Type: Content-Type must be application/json",
        ErrorCode.INVALID_REQUEST,
    )


# ------------------------------------------------------------------------------- MCP-Protocol-Version


def check_protocol_version(
    value: str | None,
    supported: tuple[str, ...] = SUPPORTED_PROTOCOL_VERSIONS,
    *,
    absent_means: str | None = PROTOCOL_VERSION_WHEN_ABSENT,
) -> str | HeaderError:
    """The protocol version the request speaks, or a 400.

    An unsupported version gets the 2026-07-28 UnsupportedProtocolVersion error with the list to
    retry with; older clients only look at the 400, newer ones use the list.
    """
    if value is None:
        if absent_means is not None:
            return absent_means
        # 2026-07-28 "Server Validation": a missing required standard header is a HeaderMismatch.
        return HeaderError(
            HeaderProblem.MISSING_PROTOCOL_VERSION,
            400,
            "Header mismatch: the MCP-Protocol-Version header is required",
            ErrorCode.HEADER_MISMATCH,
        )
    version = value.strip()
    if version in supported:
        return version
    shown = version if version.isascii() and version.isprintable() and len(version) <= 64 else "(unreadable)"
    return HeaderError(
        HeaderProblem.UNSUPPORTED_PROTOCOL_VERSION,
        400,
        f"Unsupported protocol version: {shown}",
        ErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
        {"supported": list(supported), "requested": shown},
    )


# ---------------------------------------------------------------------------------------------- Origin


def check_origin(origin: str | None, allowed: OriginAllowList) -> HeaderError | None:
    """DNS-rebinding protection: a present Origin off the allow-list gets 403."""
    if origin is None or allowed.allows(origin):
        return None
    return HeaderError(HeaderProblem.FORBIDDEN_ORIGIN, 403, "Forbidden: Origin not allowed", ErrorCode.INVALID_REQUEST)


# ----------------------------------------------------------------------- Mcp-Method / Mcp-Name (2026)


def _plain_header_safe(value: str) -> bool:
    """True when `value` can travel as a header value as-is (visible ASCII, inner spaces/tabs)."""
    if not value or value[0] in " \t" or value[-1] in " \t":
        return False
    return all(c == "\t" or " " <= c <= "~" for c in value)


def encode_header_value(value: str) -> str:
    """Value for Mcp-Name / Mcp-Param-*: as-is when header-safe, else the `=?base64?...?=` form."""
    if _plain_header_safe(value) and not (value.startswith(_B64_PREFIX) and value.endswith(_B64_SUFFIX)):
        return value
    return _B64_PREFIX + base64.b64encode(value.encode("utf-8")).decode("ascii") + _B64_SUFFIX


def decode_header_value(value: str) -> str | None:
    """Undo `encode_header_value`; None when the value has invalid characters or bad Base64."""
    if (
        len(value) >= len(_B64_PREFIX) + len(_B64_SUFFIX)
        and value.startswith(_B64_PREFIX)
        and value.endswith(_B64_SUFFIX)
    ):
        encoded = value[len(_B64_PREFIX) : -len(_B64_SUFFIX)]
        try:
            return base64.b64decode(encoded.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError):
            return None
    if not all(c == "\t" or " " <= c <= "~" for c in value):
        return None
    return value


def check_request_metadata(
    message: Request | Notification,
    *,
    protocol_version: str,
    mcp_method: str | None,
    mcp_name: str | None,
) -> HeaderError | None:
    """Headers mirrored from the body must agree with it (2026-07-28 "Server Validation").

    `protocol_version` is the (already accepted) MCP-Protocol-Version header value. Header values
    are compared case-sensitively; names are compared after Base64 decoding.
    """
    if protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return None

    if mcp_method is None:
        # Required on every request; the revision defines no header rules for notifications.
        if isinstance(message, Request):
            return _mismatch("the Mcp-Method header is required")
    elif mcp_method.strip() != message.method:
        return _mismatch("the Mcp-Method header does not match the body method")

    params = message.params if isinstance(message.params, dict) else {}
    if isinstance(message, Request):
        meta = params.get("_meta")
        body_version = meta.get(META_PROTOCOL_VERSION) if isinstance(meta, dict) else None
        if body_version != protocol_version:
            return _mismatch(f"the MCP-Protocol-Version header does not match _meta {META_PROTOCOL_VERSION}")

    source = MCP_NAME_SOURCE.get(message.method)
    if source is None or not isinstance(message, Request):
        return None
    body_name = params.get(source)
    if mcp_name is None:
        if body_name is None:
            return None  # nothing to mirror; the method handler reports the missing param
        return _mismatch("the Mcp-Name header is required")
    decoded = decode_header_value(mcp_name.strip())
    if decoded is None:
        return _mismatch("the Mcp-Name header has invalid characters or invalid Base64")
    if decoded != body_name:
        return _mismatch(f"the Mcp-Name header does not match params.{source}")
    return None
