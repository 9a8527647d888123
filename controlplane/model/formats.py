"""String formats of Kubernetes and Gateway API fields, compiled once."""

from __future__ import annotations

import ipaddress
import re

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Gateway API Hostname: a DNS name, optionally with a leading "*." wildcard label; no IPs.
HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# RFC 7230 token, as Gateway API's HTTPHeaderName.
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
GROUP = re.compile(r"|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
KIND = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
CONTROLLER_NAME = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+"
)
# Kubernetes label key (optional DNS prefix) and value.
LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# Secret and ConfigMap data keys.
DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def hostname_problem(value: str, *, wildcard: bool = True) -> str | None:
    """Why `value` is not a valid Gateway API hostname, or None when it is."""
    if not value or len(value) > 253:
        return "must be 1 to 253 characters"
    if is_ip_address(value):
        return f"{value!r} is an IP address; a hostname is required"
    if not HOSTNAME.fullmatch(value) or (not wildcard and value.startswith("*.")):
        allowed = "lowercase DNS labels, optionally prefixed by '*.'" if wildcard else "lowercase DNS labels"
        return f"{value!r} is not a valid hostname ({allowed})"
    return None
