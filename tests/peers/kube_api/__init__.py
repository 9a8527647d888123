"""An in-process Kubernetes API server for tests, spoken to by the real kubernetes-asyncio client.

`FakeKubeApi` serves plain HTTP on 127.0.0.1 (a free port) with bearer-token authentication, and
writes a kubeconfig for it (`write_kubeconfig`). Responses follow the Kubernetes API conventions:
objects as JSON, errors as a ``Status`` object (``kind: Status``, ``status: Failure``, ``reason``,
``code``, ``message``, ``details`` naming the object), 401 for a missing or wrong bearer, 404 for
unknown paths and objects, 405 for a method a resource does not serve, 409 ``AlreadyExists`` and
``Conflict``, 410 ``Expired``, 415 for a body or patch format it does not take, 400 for a body
that is not the expected object.

Served:

- ``POST /apis/authentication.k8s.io/v1/tokenreviews``, backed by the service-account tokens a
  test registers (`add_service_account_token`). Like kube-apiserver, a review with no
  ``spec.audiences`` is for the API server's own audience, a token whose audiences miss every
  requested one is not authenticated (with the authenticator's error), and ``status.audiences``
  is the intersection. Every review is recorded (`reviews`).
- The object kinds of `resources.RESOURCE_TYPES` (core Namespace, Service, Secret, ConfigMap,
  Event; EndpointSlice; Lease; Gateway API GatewayClass, Gateway, HTTPRoute, ReferenceGrant; our
  Backend and Policy): list (every namespace or one; ``labelSelector``; ``fieldSelector`` on
  ``metadata.name``/``metadata.namespace``; the list's ``metadata.resourceVersion``), get, create
  (POST), replace (PUT; a stale ``resourceVersion`` is 409 Conflict), patch (merge patch, JSON
  patch; strategic merge patch on built-in kinds, applied as a merge patch), delete (with
  preconditions), and the ``/status`` subresource (PUT/PATCH change only the status; the main
  resource ignores status; ``metadata.generation`` moves only when the spec does; a no-op write
  keeps its resourceVersion and sends no event).
- Watch (``?watch=1``): from ``resourceVersion`` (the changes after it) or from now (every object
  as ADDED first), ``allowWatchBookmarks`` (BOOKMARK every `bookmark_interval` and on
  `send_bookmarks`), ``timeoutSeconds`` (a clean end). A compacted resourceVersion gets an ERROR
  event holding a 410 ``Expired`` Status (and an ``Exact`` list of it a 410).

Test controls: `compact` (forget history), `drop_watches` (cut every watch mid-stream),
`fail_next` (the next N requests get a 500 Status), `stall`/`release` (hold requests),
`wait_for_watches`, `requests` (what was asked), and `put`/`put_status`/`remove`/`get` to change
objects without HTTP (each still bumps the resourceVersion and reaches watches).
"""

from tests.peers.kube_api.resources import RESOURCE_TYPES, ResourceType, resource_type
from tests.peers.kube_api.server import (
    API_AUDIENCE,
    ISSUER,
    FakeKubeApi,
    ServiceAccountToken,
    kube_api,
    status_body,
    status_response,
)
from tests.peers.kube_api.store import ApiError, ObjectStore

__all__ = [
    "API_AUDIENCE",
    "ISSUER",
    "RESOURCE_TYPES",
    "ApiError",
    "FakeKubeApi",
    "ObjectStore",
    "ResourceType",
    "ServiceAccountToken",
    "kube_api",
    "resource_type",
    "status_body",
    "status_response",
]
