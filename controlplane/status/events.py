"""Warning Events for rejected configs (core v1 Event, reason ConfigRejected, on the Gateway).

Aggregated as kubectl shows them: one Event per Gateway, proxy, type and error text, whose
``count`` and ``lastTimestamp`` go up when the same rejection happens again. Its name is derived
from that identity, so a replica that takes over finds the Event its predecessor created (409
AlreadyExists) and counts on from it instead of creating another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

from controlplane.status.merge import timestamp

REASON_CONFIG_REJECTED: Final = "ConfigRejected"
COMPONENT: Final = "agentgate-controlplane"
# events.k8s.io caps note at 1 kB; core v1 keeps more, but kubectl shows one line.
MAX_MESSAGE: Final = 1024


def event_name(gateway_name: str, key: tuple[str, ...]) -> str:
    """A stable, valid name: the Gateway's name (cut to fit) and a digest of the aggregation key."""
    digest = hashlib.sha256("\x00".join(key).encode()).hexdigest()[:16]
    return f"{gateway_name[:200]}.{digest}"


@dataclass(slots=True)
class PendingEvent:
    """Occurrences of one rejection not yet written."""

    namespace: str
    gateway: str  # the Gateway's name
    name: str
    message: str
    count: int
    first: str
    last: str


def event_body(pending: PendingEvent, gateway_uid: str, count: int, reporting_instance: str) -> dict[str, Any]:
    involved: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "namespace": pending.namespace,
        "name": pending.gateway,
    }
    if gateway_uid:
        involved["uid"] = gateway_uid  # kubectl describe selects Events by uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": pending.name, "namespace": pending.namespace},
        "involvedObject": involved,
        "type": "Warning",
        "reason": REASON_CONFIG_REJECTED,
        "message": pending.message[:MAX_MESSAGE],
        "count": count,
        "firstTimestamp": pending.first,
        "lastTimestamp": pending.last,
        "source": {"component": COMPONENT},
        "reportingComponent": "agentgate.dev/gateway-controller",
        "reportingInstance": reporting_instance,
        "action": "ApplyConfig",
    }


__all__ = [
    "COMPONENT", "MAX_MESSAGE", "REASON_CONFIG_REJECTED", "PendingEvent", "event_body", "event_name", "timestamp",
]
