"""The resource types the fake API server serves, and where each lives in the URL space.

Built-in kinds (core, discovery, coordination) list their items without ``kind``/``apiVersion``,
as kube-apiserver does; custom resources (Gateway API, agentgate.dev) carry them, as the
apiextensions server does. Clients must cope with both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # Served at .../NAME/status: the main resource ignores status, /status ignores the rest.
    status_subresource: bool = False
    # metadata.generation is kept and bumped on every change outside metadata and status.
    tracks_generation: bool = False
    # A custom resource: list items carry kind and apiVersion.
    custom: bool = False
    # Its payload lives outside spec (Secret/ConfigMap data, Event fields).
    has_spec: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        """The API path the resource hangs under: /api/v1 or /apis/GROUP/VERSION."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def resource(self) -> str:
        """'services', 'httproutes.gateway.networking.k8s.io': how errors name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_GATEWAY = "gateway.networking.k8s.io"
_OURS = "agentgate.dev"

RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True),
    ResourceType("", "v1", "services", "Service", namespaced=True, status_subresource=True),
    ResourceType("", "v1", "secrets", "Secret", namespaced=True, has_spec=False),
    ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True, has_spec=False),
    ResourceType("", "v1", "events", "Event", namespaced=True, has_spec=False),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True, has_spec=False),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True),
    ResourceType(_GATEWAY, "v1", "gatewayclasses", "GatewayClass", namespaced=False, status_subresource=True,
                 tracks_generation=True, custom=True),
    ResourceType(_GATEWAY, "v1", "gateways", "Gateway", namespaced=True, status_subresource=True,
                 tracks_generation=True, custom=True),
    ResourceType(_GATEWAY, "v1", "httproutes", "HTTPRoute", namespaced=True, status_subresource=True,
                 tracks_generation=True, custom=True),
    ResourceType(_GATEWAY, "v1beta1", "referencegrants", "ReferenceGrant", namespaced=True, tracks_generation=True,
                 custom=True),
    ResourceType(_OURS, "v1alpha1", "backends", "Backend", namespaced=True, status_subresource=True,
                 tracks_generation=True, custom=True),
    ResourceType(_OURS, "v1alpha1", "policies", "Policy", namespaced=True, status_subresource=True,
                 tracks_generation=True, custom=True),
)

BY_KIND: Mapping[tuple[str, str], ResourceType] = {(t.api_version, t.kind): t for t in RESOURCE_TYPES}


def resource_type(api_version: str, kind: str) -> ResourceType:
    """The served type of ``kind`` in ``api_version``; KeyError when not served."""
    return BY_KIND[(api_version, kind)]
