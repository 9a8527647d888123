"""Regular expressions from configuration (route paths, header and query values), compiled with RE2.

RE2 matches in time linear in the input, so a pattern a user writes in an HTTPRoute can
never stall a worker with catastrophic backtracking (Envoy uses RE2 for the same reason).
Both planes compile through here, so the control plane rejects exactly the patterns a
proxy would reject.
"""

from __future__ import annotations

from typing import Protocol

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are reported to the config author, not to stderr


class Regex(Protocol):
    """The part of a compiled pattern the data path uses."""

    def fullmatch(self, text: str) -> object | None: ...


def compile_regex(pattern: str) -> Regex:
    """Compile an RE2 pattern; raises ValueError with RE2's reason."""
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"{reason} (RE2 syntax)") from None
