"""Snapshots of each Gateway's discovery resources, their consistency check, and push planning.

Pure: nothing here touches a socket. The discovery server (controlplane.xds) asks the
cache for snapshots, the planners for what to send, and the response cache for bytes.
"""

from controlplane.snapshot.cache import SnapshotCache
from controlplane.snapshot.model import Resource, Snapshot, TypeSnapshot, build_snapshot, empty_snapshot, set_version
from controlplane.snapshot.plan import (
    WILDCARD,
    DeltaPush,
    DeltaTypeState,
    SotwPush,
    SotwTypeState,
    Subscription,
    plan_delta,
    plan_sotw,
    sotw_desired,
)
from controlplane.snapshot.references import SnapshotInconsistent, check_consistency, referable_keys, references
from controlplane.snapshot.responses import ResponseCache, delta_body, sotw_body, with_nonce

__all__ = [
    "WILDCARD",
    "DeltaPush",
    "DeltaTypeState",
    "Resource",
    "ResponseCache",
    "Snapshot",
    "SnapshotCache",
    "SnapshotInconsistent",
    "SotwPush",
    "SotwTypeState",
    "Subscription",
    "TypeSnapshot",
    "build_snapshot",
    "check_consistency",
    "delta_body",
    "empty_snapshot",
    "plan_delta",
    "plan_sotw",
    "referable_keys",
    "references",
    "set_version",
    "sotw_body",
    "sotw_desired",
    "with_nonce",
]
