"""A small JSON client for the writes the status package makes (status subresources, Events,
Leases), over a kubernetes-asyncio `ApiClient`.

Plain dicts rather than the generated models: status bodies are ours to shape exactly (and must
round-trip foreign HTTPRoute parent entries untouched), and the generated CRD-less models would
drop fields they do not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

MERGE_PATCH: Final = "application/merge-patch+json"
# Seconds one request may take before it counts as failed (the writer retries it later).
DEFAULT_REQUEST_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Resource:
    """Where one kind lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str = "", subresource: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
        return base


_GATEWAY_API = "gateway.networking.k8s.io"
RESOURCES: Final[Mapping[str, Resource]] = {
    "GatewayClass": Resource(_GATEWAY_API, "v1", "gatewayclasses", namespaced=False),
    "Gateway": Resource(_GATEWAY_API, "v1", "gateways", namespaced=True),
    "HTTPRoute": Resource(_GATEWAY_API, "v1", "httproutes", namespaced=True),
    "Backend": Resource("agentgate.dev", "v1alpha1", "backends", namespaced=True),
    "Policy": Resource("agentgate.dev", "v1alpha1", "policies", namespaced=True),
    "Event": Resource("", "v1", "events", namespaced=True),
    "Lease": Resource("coordination.k8s.io", "v1", "leases", namespaced=True),
}


class KubeApiError(Exception):
    """The API server answered with an error Status, or could not be reached (`status` 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status, self.reason, self.message = status, reason, message

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def retryable(self) -> bool:
        """Worth trying again later: the server or the network failed, or it asked us to slow down."""
        return self.status == 0 or self.status == 429 or self.status >= 500


class KubeJson:
    """GET/POST/PUT/PATCH of JSON objects; every failure is a `KubeApiError`."""

    def __init__(self, api_client: ApiClient, *, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.api_client = api_client
        self.timeout = timeout

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", RESOURCES[kind].path(namespace, name))

    async def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call("POST", RESOURCES[kind].path(namespace), body)

    async def replace(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call("PUT", RESOURCES[kind].path(namespace, name), body)

    async def replace_status(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT .../status: only the status changes; a stale resourceVersion in `body` is a 409."""
        return await self._call("PUT", RESOURCES[kind].path(namespace, name, "status"), body)

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call("PATCH", RESOURCES[kind].path(namespace, name), patch, MERGE_PATCH)

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        import aiohttp

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = await self.api_client.call_api(
                path, method, header_params=headers, body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"], _preload_content=False, _request_timeout=self.timeout,
            )
            async with response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            message = f"cannot reach the Kubernetes API: {exc or type(exc).__name__}"
            raise KubeApiError(0, "Unavailable", message) from None
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = None
        if status >= 300 or not isinstance(decoded, dict):
            found = decoded if isinstance(decoded, dict) else {}
            message = found.get("message") or data[:200].decode(errors="replace") or f"HTTP {status}"
            raise KubeApiError(status, str(found.get("reason") or "BadResponse"), str(message))
        return decoded
