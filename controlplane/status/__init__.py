"""Status, Events and leader election: what the control plane writes back to Kubernetes.

The translator (pure) says what each object's status should be; `StatusWriter` writes it
through the status subresource, and turns proxies' NACKs (`NackWatcher`) into Warning Events
and the Gateway's Programmed condition; `LeaderElector` decides, by a Lease, which replica
writes. The folder source writes nothing (statuses go to the log and /status there).
"""

from controlplane.status.kube import KubeApiError, KubeJson
from controlplane.status.leader import (
    DEFAULT_LEASE_NAME,
    LeaderElectionSettings,
    LeaderElector,
    default_identity,
    default_namespace,
)
from controlplane.status.nacks import NackWatcher, Rejection
from controlplane.status.writer import StatusWriter, StatusWriterSettings, TokenBucket

__all__ = [
    "DEFAULT_LEASE_NAME",
    "KubeApiError",
    "KubeJson",
    "LeaderElectionSettings",
    "LeaderElector",
    "NackWatcher",
    "Rejection",
    "StatusWriter",
    "StatusWriterSettings",
    "TokenBucket",
    "default_identity",
    "default_namespace",
]
