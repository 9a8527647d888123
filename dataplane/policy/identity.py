"""Who is calling: the one result every authenticator produces and every policy reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller.

    ``principal`` is the stable name policies and limits key on: the JWT ``sub`` (or a configured
    claim), ``system:serviceaccount:NS:SA`` for a Kubernetes service-account token, the API key's
    name, or the basic-auth user. ``claims`` are the verified JWT claims (empty for API keys and
    basic auth). ``namespace`` and ``service_account`` are set for service-account tokens.
    """

    principal: str
    method: str  # "jwt", "serviceaccount", "apikey", "basic"
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    namespace: str | None = None
    service_account: str | None = None


ANONYMOUS: Identity | None = None  # no credentials presented (allowed in optional and permissive modes)

__all__ = ["ANONYMOUS", "Identity"]
