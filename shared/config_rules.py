"""Rules both planes apply to config values: the control plane validates what users write, and the
proxy re-checks what it is sent (a hand-written snapshot, an older control plane). One home, so the
two checks cannot drift apart."""

from __future__ import annotations

import re

# --- headers the gateway owns -------------------------------------------------------------------

# HTTP framing and hop-by-hop fields: no configured header may set them.
FRAMING_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    }
)
MCP_SESSION_HEADERS = frozenset({"mcp-session-id", "mcp-protocol-version"})
# What claims-to-headers and upstream credentials of a Policy may not write.
POLICY_RESERVED_HEADERS = FRAMING_HEADERS | MCP_SESSION_HEADERS
# What an MCP target's configured headers may not set (the channel manages sessions and streams).
MCP_MANAGED_HEADERS = FRAMING_HEADERS | MCP_SESSION_HEADERS | {"accept", "last-event-id"}
# What an LLM provider's configured headers may not set (the credential comes from apiKeyRef).
LLM_MANAGED_HEADERS = FRAMING_HEADERS | {"authorization", "x-api-key", "api-key"}

# --- names --------------------------------------------------------------------------------------

# An A2A agent: "namespace/name" or one name; each part letters, digits, '.', '_', '-', starting and
# ending with a letter or digit. At most one '/', so a rule can split namespace from name.
A2A_AGENT_NAME_MAX_LENGTH = 253
_A2A_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
A2A_AGENT_NAME = re.compile(rf"{_A2A_NAME_PART}(?:/{_A2A_NAME_PART})?")
A2A_AGENT_NAME_RULE = (
    "use 'namespace/name' or 'name', each part of letters, digits, '.', '_' and '-' "
    "starting and ending with a letter or digit"
)
# An LLM provider of a Backend (a DNS-label-like name, used in logs and metrics).
LLM_PROVIDER_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
# Model names as clients and providers write them ("gpt-4o", "claude-sonnet-4-5",
# "meta-llama/Llama-3.1-8B-Instruct", "llama3:8b"): printable ASCII without spaces or quotes.
LLM_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,256}")
LLM_AZURE_API_VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:-[a-z]+)?")


# --- paths --------------------------------------------------------------------------------------

# Characters allowed in a path value (RFC 3986 pchar and '/'; anything else percent-encoded).
PATH_VALUE = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")


def path_problem(value: str) -> str | None:
    """None for an absolute path as Gateway API takes Exact and PathPrefix values (and a provider's
    base path): no empty, '.' or '..' segment, no encoded '/', only characters a request line
    carries as they are; else what is wrong."""
    if not value.startswith("/"):
        return "must be an absolute path starting with '/'"
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in value:
            return f"must not contain {bad!r}"
    if value.endswith(("/..", "/.")):
        return "must not end with '/..' or '/.'"
    if not PATH_VALUE.fullmatch(value):
        return "contains characters that are not allowed in a path (percent-encode them)"
    return None


# --- header values ------------------------------------------------------------------------------

HEADER_VALUE_RULE = "must be ASCII without control characters (a tab is allowed)"


def is_header_value(value: str) -> bool:
    """Whether `value` can go out as an HTTP field value as it is (RFC 9110: visible ASCII, spaces and
    tabs; obs-text is not taken), the rule for configured header values and credentials alike."""
    return value.isascii() and all(" " <= ch < "\x7f" or ch == "\t" for ch in value)
