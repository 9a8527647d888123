"""Gateway API Duration strings (GEP-2257): "1h", "10s", "500ms", "1m30s"."""

from __future__ import annotations

import re
from datetime import timedelta

# The format is a strict subset of Go's time.ParseDuration: one to four <number><unit> pairs,
# each number at most five digits, units h, m, s, ms. "ms" is tried before "m" so "500ms" is
# 500 milliseconds, not 500 minutes followed by a stray "s".
_DURATION = re.compile(r"(?:[0-9]{1,5}(?:ms|h|m|s)){1,4}")
_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}


def parse_duration(text: str) -> timedelta:
    """Parse a Gateway API Duration; raises ValueError with a readable message."""
    if not isinstance(text, str):
        raise ValueError(f"must be a duration string like '10s' or '1m30s', got {type(text).__name__}")
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {text!r}: use 1 to 4 <number><unit> parts, units h, m, s, ms (e.g. 1m30s)")
    millis = sum(int(number) * _UNIT_MS[unit] for number, unit in _PART.findall(text))
    return timedelta(milliseconds=millis)
