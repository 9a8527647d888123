"""The aggregated discovery service (ADS): SotW and Delta streams over the snapshot cache.

Protocol state per stream is sans-I/O (sotw.py, delta.py); server.py is the grpc.aio shell.
"""

from controlplane.xds.delta import DeltaStream
from controlplane.xds.proxies import ConnectedProxies, ProxyConnection
from controlplane.xds.records import NackRecord, RequestRejected, SyncState, TypeStatus
from controlplane.xds.server import ADS_SERVICE, AdsServer
from controlplane.xds.sotw import SotwStream

__all__ = [
    "ADS_SERVICE",
    "AdsServer",
    "ConnectedProxies",
    "DeltaStream",
    "NackRecord",
    "ProxyConnection",
    "RequestRejected",
    "SotwStream",
    "SyncState",
    "TypeStatus",
]
