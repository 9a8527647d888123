"""The rule for MCP target names, enforced alike by the control plane, the proxy's config
compiler and the federation layer that uses the names as prefixes.

A target name is 1-63 characters of [A-Za-z0-9_-], starts and ends with a letter or digit,
and never contains "__". The federation separator is "__" (see dataplane/mcp/naming.py), so
the first "__" of an exposed name "<target>__<tool>" always ends the target, whatever the
tool name holds; and a name never contains "/", which ends the target in rewritten URIs.
"""

from __future__ import annotations

import re

SEPARATOR = "__"
_TARGET_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_)){0,61}[A-Za-z0-9]|[A-Za-z0-9]")
TARGET_NAME_RULE = (
    f"use 1-63 of [A-Za-z0-9_-], starting and ending with a letter or digit, without {SEPARATOR!r} "
    "(the prefix separator)"
)


def target_name_problem(name: object) -> str | None:
    """None if `name` is a valid MCP target name, else the reason (for a config error)."""
    if isinstance(name, str) and _TARGET_NAME.fullmatch(name) is not None:
        return None
    return f"invalid MCP target name {name!r}: {TARGET_NAME_RULE}"
