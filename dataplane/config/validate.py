"""Checks and conversions shared by the resource compilers. Each reports, never raises."""

from __future__ import annotations

import ipaddress
import re

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from dataplane.config.errors import ErrorReporter
from shared import regex as shared_regex
from shared.config_rules import HEADER_VALUE_RULE, is_header_value
from shared.regex import Regex

# RFC 9110 token characters: what a header field name may contain.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 1123 labels; Gateway API hostnames are lower case but requests may not be.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
MAX_WEIGHT_TOTAL = 2**32 - 1


def check_header_name(report: ErrorReporter, field: str, name: str) -> bool:
    if not _TOKEN.fullmatch(name):
        report(field, f"invalid header name {name!r}")
        return False
    return True


def check_header_value(report: ErrorReporter, field: str, value: str) -> bool:
    if not is_header_value(value):
        report(field, f"invalid header value {value!r}: {HEADER_VALUE_RULE}")
        return False
    return True


def check_hostname(report: ErrorReporter, field: str, hostname: str, *, wildcard: bool) -> bool:
    """An RFC 1123 name, or with `wildcard` also "*.suffix"."""
    name = hostname[2:] if wildcard and hostname.startswith("*.") else hostname
    if len(hostname) > 253 or not _HOSTNAME.fullmatch(name.lower()):
        kind = "hostname or *.wildcard" if wildcard else "hostname"
        report(field, f"invalid {kind} {hostname!r}")
        return False
    return True


def is_valid_host(host: str) -> bool:
    """An IP address or an RFC 1123 hostname: what an upstream address may name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(host) and check_hostname(lambda _field, _message: None, "", host, wildcard=False)
    return True


def compile_regex(report: ErrorReporter, field: str, pattern: str) -> Regex | None:
    try:
        return shared_regex.compile_regex(pattern)
    except ValueError as exc:
        report(field, f"invalid regular expression: {exc}")
        return None


def check_path(report: ErrorReporter, field: str, path: str) -> bool:
    if not path.startswith("/") or any(char in path for char in "?# \t\r\n\0"):
        report(field, f"invalid path {path!r}: must start with '/' and have no query, fragment or whitespace")
        return False
    return True


def duration_seconds(report: ErrorReporter, field: str, parent: Message, name: str) -> float | None:
    """A Duration field in seconds; None when unset. Negative or malformed durations are errors."""
    if not parent.HasField(name):
        return None
    value: Duration = getattr(parent, name)
    if value.seconds < 0 or value.nanos < 0 or value.nanos >= 1_000_000_000:
        report(field, f"invalid duration {value.seconds}s {value.nanos}ns: must be non-negative")
        return None
    return value.seconds + value.nanos / 1e9


def check_enum(report: ErrorReporter, field: str, message: Message, name: str) -> bool:
    """Proto3 enums are open: a value from a newer control plane arrives as a bare number."""
    value = getattr(message, name)
    enum = message.DESCRIPTOR.fields_by_name[name].enum_type
    if value not in enum.values_by_number:
        report(field, f"unknown {enum.name} value {value}")
        return False
    return True
