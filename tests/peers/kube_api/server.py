"""`FakeKubeApi`: the aiohttp application, its routing, bearer authentication and test controls.

Routes are generated from `RESOURCE_TYPES`: for each type a collection (list, watch, create), an
item (get, replace, patch, delete) and, where the type has one, a ``/status`` subresource. A
cluster-scoped type hangs under ``PREFIX/PLURAL``, a namespaced one also under
``PREFIX/namespaces/NS/PLURAL`` (the bare collection then lists every namespace).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import yaml
from aiohttp import web

from tests.conftest import free_port
from tests.peers.kube_api.resources import RESOURCE_TYPES, ResourceType, resource_type
from tests.peers.kube_api.selectors import SelectorError, field_selector, label_selector
from tests.peers.kube_api.store import DROP, ApiError, ObjectStore, Watch, gone

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# What kube-apiserver picks when a watch names no timeoutSeconds is 30 to 60 minutes.
DEFAULT_WATCH_TIMEOUT = 1800.0
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_body(code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``metav1.Status`` failure, as every Kubernetes API error body is."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


def status_response(code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> web.Response:
    return web.json_response(status_body(code, reason, message, details), status=code)


def _error_response(error: ApiError) -> web.Response:
    return status_response(error.code, error.reason, error.message, error.details)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


@dataclass(frozen=True)
class ServiceAccountToken:
    """A registered token: who it names and what it is bound to."""

    token: str
    namespace: str
    name: str
    uid: str
    audiences: tuple[str, ...]
    expires: float
    pod: str = ""

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@dataclass
class FakeKubeApi:
    """The fake API server. Use `kube_api()` to run one; register tokens or put objects, then point a
    client at `write_kubeconfig`'s file."""

    bearer: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    issuer: str = ISSUER
    tokens: dict[str, ServiceAccountToken] = field(default_factory=dict)
    # Every TokenReview received: (token, requested audiences).
    reviews: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    port: int = 0
    # Between `stall` and `release` requests wait (to test timeouts and coalescing); `held` is set
    # when one does.
    hold: anyio.Event | None = None
    held: anyio.Event = field(default_factory=anyio.Event)
    store: ObjectStore = field(default_factory=ObjectStore)
    # Seconds between BOOKMARK events on watches that allow them (kube-apiserver: about a minute).
    bookmark_interval: float = 60.0
    # Every authenticated request: (method, path with query).
    requests: list[tuple[str, str]] = field(default_factory=list)
    _failures: list[tuple[int, str]] = field(default_factory=list)
    _watches_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------------------------- test helpers

    def add_service_account_token(
        self, namespace: str, name: str, audiences: tuple[str, ...] | list[str], *, lifetime: float = 3600.0,
        pod: str = "",
    ) -> str:
        """Register a projected service-account token and return it. It is JWT-shaped (header,
        claims like the kubelet's, a random signature) so readers can see its ``iss`` and ``exp``;
        only this server can say whether it is valid."""
        now = int(time.time())
        uid = str(uuid.uuid4())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "aud": list(audiences),
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
        }
        header = {"alg": "RS256", "kid": "fake"}
        token = ".".join(
            (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(secrets.token_bytes(64)))
        )
        self.tokens[token] = ServiceAccountToken(token, namespace, name, uid, tuple(audiences), now + lifetime, pod)
        return token

    def stall(self) -> None:
        """Hold every request from now until `release`."""
        self.hold, self.held = anyio.Event(), anyio.Event()

    async def stalled(self) -> None:
        """Return once a request is being held."""
        await self.held.wait()

    def release(self) -> None:
        """Answer the held requests, and the next ones at once."""
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.set()

    def reviews_of(self, token: str) -> int:
        return sum(1 for reviewed, _ in self.reviews if reviewed == token)

    def fail_next(self, count: int, code: int = 500, reason: str = "InternalError") -> None:
        """Answer the next ``count`` requests (of any kind) with a ``code`` Status."""
        self._failures.extend([(code, reason)] * count)

    def heal(self) -> None:
        """Stop failing requests (the failures `fail_next` queued are dropped)."""
        self._failures.clear()

    @property
    def failures_pending(self) -> int:
        return len(self._failures)

    def compact(self) -> int:
        """Forget the change history (etcd compaction): watches from before now get 410 Gone."""
        return self.store.compact()

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream (no clean end); returns how many."""
        for watch in self.store.watches:
            watch.queue.put_nowait(DROP)
        return len(self.store.watches)

    def send_bookmarks(self) -> None:
        """Queue a BOOKMARK (the current resourceVersion) on every watch that allows them."""
        for watch in self.store.watches:
            if watch.bookmarks:
                watch.queue.put_nowait(watch.bookmark(self.store.revision))

    def open_watches(self, plural: str | None = None) -> int:
        return sum(1 for watch in self.store.watches if plural is None or watch.rtype.plural == plural)

    async def wait_for_watches(self, count: int, plural: str | None = None) -> None:
        """Return once at least ``count`` watches (of ``plural``) are open; bound it with fail_after."""
        while self.open_watches(plural) < count:
            self._watches_changed.clear()
            await self._watches_changed.wait()

    def put(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        """Create or replace an object directly (no HTTP), as `kubectl apply` would end up; returns it."""
        rtype, namespace, name = self._identify(manifest)
        if (rtype, namespace, name) in self.store.objects:
            body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": None}}
            body["metadata"].pop("resourceVersion")
            return self.store.replace(rtype, namespace, name, body)
        return self.store.create(rtype, namespace, manifest)

    def put_status(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        rtype, namespace, name = self._identify(manifest)
        return self.store.replace(rtype, namespace, name, {"status": manifest.get("status")}, status=True)

    def remove(self, api_version: str, kind: str, name: str, namespace: str = "") -> Mapping[str, Any]:
        rtype = resource_type(api_version, kind)
        return self.store.delete(rtype, (namespace or "default") if rtype.namespaced else "", name)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> Mapping[str, Any]:
        rtype = resource_type(api_version, kind)
        return self.store.get(rtype, (namespace or "default") if rtype.namespaced else "", name)

    @staticmethod
    def _identify(manifest: Mapping[str, Any]) -> tuple[ResourceType, str, str]:
        rtype = resource_type(manifest["apiVersion"], manifest["kind"])
        metadata = manifest["metadata"]
        namespace = metadata.get("namespace", "default") if rtype.namespaced else ""
        return rtype, namespace, metadata["name"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, bearer: str | None = None) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agentgate", "user": {"token": self.bearer if bearer is None else bearer}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agentgate"}}],
            "current-context": "fake",
        }

    def write_kubeconfig(self, path: Path, bearer: str | None = None) -> Path:
        """A kubeconfig for this server (``bearer`` overrides the credential, to test refusals)."""
        path.write_text(yaml.safe_dump(self.kubeconfig(bearer), sort_keys=False))
        return path

    # ----------------------------------------------------------------------------------- server

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate], client_max_size=4 * 1024 * 1024)
        self._routes(app.router)
        return app

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", "/apis/authentication.k8s.io/v1/tokenreviews", self._tokenreviews)
        for rtype in RESOURCE_TYPES:
            base = rtype.prefix
            scopes = [f"{base}/namespaces/{{namespace}}/{rtype.plural}"] if rtype.namespaced else []
            scopes.append(f"{base}/{rtype.plural}")
            for collection in scopes:
                router.add_route("*", collection, partial(self._collection, rtype))
                if collection.startswith(f"{base}/namespaces/") or not rtype.namespaced:
                    router.add_route("*", f"{collection}/{{name}}", partial(self._item, rtype))
                    if rtype.status_subresource:
                        router.add_route("*", f"{collection}/{{name}}/status", partial(self._status, rtype))

    async def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1 (a free port unless ``port``: restart on the same one after `stop`)."""
        self.port = port or self.port or free_port()
        runner = web.AppRunner(self.application(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self.drop_watches()
            await runner.cleanup()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(credential.strip(), self.bearer):
            return status_response(401, "Unauthorized", "Unauthorized")
        self.requests.append((request.method, request.path_qs))
        hold = self.hold
        if hold is not None:
            self.held.set()
            await hold.wait()
        if self._failures:
            code, reason = self._failures.pop(0)
            return status_response(code, reason, f"injected failure ({code} {reason})")
        try:
            return await handler(request)
        except ApiError as error:
            return _error_response(error)
        except web.HTTPNotFound:
            return status_response(404, "NotFound", "the server could not find the requested resource")

    async def _json_body(self, request: web.Request) -> Any:
        """The request body decoded, or ApiError as kube-apiserver answers an unreadable one."""
        try:
            return json.loads(await request.read())
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the object provided is unrecognized: {exc}") from None

    async def _json_object(self, request: web.Request, kind: str, api_version: str) -> dict[str, Any] | web.Response:
        """The request body as a ``kind`` object, or the error response a kube-apiserver gives."""
        if request.content_type not in ("application/json", "application/yaml", ""):
            message = f"the body of the request was in an unknown format - {request.content_type}"
            return status_response(415, "UnsupportedMediaType", message)
        try:
            body = await self._json_body(request)
        except ApiError as error:
            return _error_response(error)
        if not isinstance(body, dict):
            return status_response(400, "BadRequest", "the object provided is not a JSON object")
        if body.get("kind", kind) != kind or body.get("apiVersion", api_version) != api_version:
            got = f"{body.get('apiVersion')}, Kind={body.get('kind')}"
            return status_response(
                400, "BadRequest", f"the object provided is unrecognized ({got}); expected {api_version}, Kind={kind}"
            )
        return body

    # ---------------------------------------------------------------------------- object resources

    @staticmethod
    def _method_not_allowed() -> web.Response:
        message = "the server does not allow this method on the requested resource"
        return status_response(405, "MethodNotAllowed", message)

    async def _collection(self, rtype: ResourceType, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("namespace")
        if request.method == "GET":
            if _true(request.query.get("watch")):
                return await self._watch(rtype, namespace, request)
            return self._list(rtype, namespace, request)
        if request.method == "POST" and (namespace is not None or not rtype.namespaced):
            body = await self._json_object(request, rtype.kind, rtype.api_version)
            if isinstance(body, web.Response):
                return body
            return web.json_response(self.store.create(rtype, namespace or "", body), status=201)
        return self._method_not_allowed()

    def _selectors(self, request: web.Request) -> tuple[Any, Any]:
        try:
            return (label_selector(request.query.get("labelSelector", "")),
                    field_selector(request.query.get("fieldSelector", "")))
        except SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from None

    def _list(self, rtype: ResourceType, namespace: str | None, request: web.Request) -> web.Response:
        labels, fields = self._selectors(request)
        since = request.query.get("resourceVersion", "")
        if since not in ("", "0") and request.query.get("resourceVersionMatch") == "Exact":
            revision = self.store.parse_revision(since)
            if revision < self.store.compacted:
                raise gone(revision, self.store.compacted)
            if revision != self.store.revision:
                raise ApiError(400, "BadRequest", "the fake serves Exact lists at the current resourceVersion only")
        items = self.store.list(rtype, namespace, labels, fields)
        if not rtype.custom:  # built-in lists leave kind and apiVersion out of their items
            items = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]
        body = {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": str(self.store.revision)},
            "items": items,
        }
        return web.json_response(body)

    async def _watch(self, rtype: ResourceType, namespace: str | None, request: web.Request) -> web.StreamResponse:
        labels, fields = self._selectors(request)
        timeout = DEFAULT_WATCH_TIMEOUT
        if "timeoutSeconds" in request.query:
            try:
                timeout = float(int(request.query["timeoutSeconds"]))
            except ValueError:
                raise ApiError(400, "BadRequest", "timeoutSeconds: must be an integer") from None
        watch = Watch(rtype, namespace, labels, fields, bookmarks=_true(request.query.get("allowWatchBookmarks")))
        expired: ApiError | None = None
        try:
            self.store.open_watch(watch, request.query.get("resourceVersion"))
        except ApiError as error:
            if error.code != 410:
                raise
            expired = error  # kube-apiserver answers 200, then one ERROR event
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if expired is not None:
            event = {"type": "ERROR", "object": status_body(expired.code, expired.reason, expired.message)}
            await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
            return response
        self._watches_changed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (remaining := deadline - loop.time()) > 0:
                wait = min(remaining, self.bookmark_interval) if watch.bookmarks else remaining
                try:
                    event = await asyncio.wait_for(watch.queue.get(), wait)
                except TimeoutError:
                    if not watch.bookmarks or deadline - loop.time() <= 0:
                        continue
                    event = watch.bookmark(self.store.revision)
                if event is DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self.store.close_watch(watch)
            self._watches_changed.set()
        return response

    async def _item(self, rtype: ResourceType, request: web.Request) -> web.StreamResponse:
        return await self._object(rtype, request, status=False)

    async def _status(self, rtype: ResourceType, request: web.Request) -> web.StreamResponse:
        return await self._object(rtype, request, status=True)

    async def _object(self, rtype: ResourceType, request: web.Request, *, status: bool) -> web.StreamResponse:
        namespace, name = request.match_info.get("namespace", ""), request.match_info["name"]
        if request.method == "GET":
            return web.json_response(self.store.get(rtype, namespace, name))
        if request.method == "PUT":
            body = await self._json_object(request, rtype.kind, rtype.api_version)
            if isinstance(body, web.Response):
                return body
            return web.json_response(self.store.replace(rtype, namespace, name, body, status=status))
        if request.method == "PATCH":
            patch = await self._json_body(request)
            return web.json_response(
                self.store.patch(rtype, namespace, name, patch, request.content_type, status=status)
            )
        if request.method == "DELETE" and not status:
            options = await self._json_body(request) if request.can_read_body else {}
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            return web.json_response(self.store.delete(rtype, namespace, name, preconditions))
        return self._method_not_allowed()

    # --------------------------------------------------------------------------------- token reviews

    async def _tokenreviews(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return self._method_not_allowed()
        body = await self._json_object(request, "TokenReview", "authentication.k8s.io/v1")
        if isinstance(body, web.Response):
            return body
        return self._create_token_review(body)

    def _create_token_review(self, body: dict[str, Any]) -> web.Response:
        spec = body.get("spec")
        if spec is not None and not isinstance(spec, dict):
            return status_response(400, "BadRequest", "spec: expected an object")
        spec = spec or {}
        token, requested = spec.get("token"), spec.get("audiences") or []
        if not isinstance(requested, list) or not all(isinstance(a, str) for a in requested):
            return status_response(400, "BadRequest", "spec.audiences: expected a list of strings")
        if not isinstance(token, str) or not token:
            return status_response(400, "BadRequest", "token is required for TokenReview in authentication")
        self.reviews.append((token, tuple(requested)))
        audiences = requested or [API_AUDIENCE]
        status: dict[str, Any] = {"user": {}}
        found = self.tokens.get(token)
        if found is None:
            status["error"] = "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
        elif time.time() >= found.expires:
            status["error"] = "[invalid bearer token, service account token has expired]"
        else:
            matched = [audience for audience in audiences if audience in found.audiences]
            if not matched:
                status["error"] = (
                    f"[invalid bearer token, token audiences {json.dumps(list(found.audiences))} is invalid for "
                    f"the target audiences {json.dumps(audiences)}]"
                )
            else:
                extra = {"authentication.kubernetes.io/credential-id": [f"JTI={found.uid}"]}
                if found.pod:
                    extra["authentication.kubernetes.io/pod-name"] = [found.pod]
                status = {
                    "authenticated": True,
                    "user": {
                        "username": found.username,
                        "uid": found.uid,
                        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{found.namespace}",
                                   "system:authenticated"],
                        "extra": extra,
                    },
                    "audiences": matched,
                }
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(review, status=201)


@asynccontextmanager
async def kube_api(**settings: Any) -> AsyncIterator[FakeKubeApi]:
    """A running `FakeKubeApi` (``settings`` are its fields, e.g. ``bookmark_interval``), stopped on exit."""
    api = FakeKubeApi(**settings)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


__all__ = ["API_AUDIENCE", "ISSUER", "FakeKubeApi", "ServiceAccountToken", "kube_api", "status_body", "status_response"]
