"""Status conditions in the shape of metav1.Condition, and the reasons the Gateway API defines.

`lastTransitionTime` is left out on purpose: the translator is pure and cannot know when a
condition last changed. The status writer (controlplane/status/), which reads the previous
status, sets it: the old time is kept while a condition's status stays the same (as
metav1.Condition defines it), else the time of the write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ACCEPTED = "Accepted"
PROGRAMMED = "Programmed"
RESOLVED_REFS = "ResolvedRefs"
CONFLICTED = "Conflicted"
PARTIALLY_INVALID = "PartiallyInvalid"
# Policy and Backend: whether the object takes effect somewhere (a Gateway's snapshot holds it).
ATTACHED = "Attached"

# Reasons (gateway.networking.k8s.io/v1 and our Backend kind).
REASON_ACCEPTED = "Accepted"
REASON_PROGRAMMED = "Programmed"
REASON_RESOLVED_REFS = "ResolvedRefs"
REASON_INVALID = "Invalid"
REASON_LISTENERS_NOT_VALID = "ListenersNotValid"
REASON_UNSUPPORTED_ADDRESS = "UnsupportedAddress"
REASON_UNSUPPORTED_PROTOCOL = "UnsupportedProtocol"
REASON_NO_CONFLICTS = "NoConflicts"
REASON_HOSTNAME_CONFLICT = "HostnameConflict"
REASON_PROTOCOL_CONFLICT = "ProtocolConflict"
REASON_INVALID_CERTIFICATE_REF = "InvalidCertificateRef"
REASON_INVALID_ROUTE_KINDS = "InvalidRouteKinds"
REASON_REF_NOT_PERMITTED = "RefNotPermitted"
REASON_NOT_ALLOWED_BY_LISTENERS = "NotAllowedByListeners"
REASON_NO_MATCHING_LISTENER_HOSTNAME = "NoMatchingListenerHostname"
REASON_NO_MATCHING_PARENT = "NoMatchingParent"
REASON_UNSUPPORTED_VALUE = "UnsupportedValue"
REASON_BACKEND_NOT_FOUND = "BackendNotFound"
REASON_INVALID_KIND = "InvalidKind"
REASON_INVALID_CA_CERTIFICATE_REF = "InvalidCACertificateRef"
REASON_INVALID_SESSION_KEY_REF = "InvalidSessionKeyRef"
# Policy attachment (GEP-713).
REASON_TARGET_NOT_FOUND = "TargetNotFound"
REASON_ATTACHED = "Attached"
# A Backend no HTTPRoute attached to one of our Gateways refers to.
REASON_NOT_REFERENCED = "NotReferenced"
# A Backend routes refer to that cannot serve them (it is not accepted).
REASON_NOT_ACCEPTED = "BackendNotAccepted"


@dataclass(frozen=True, slots=True)
class RefProblem:
    """Why a backendRef cannot be used, as a ResolvedRefs reason and message."""

    reason: str
    message: str


def condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }
