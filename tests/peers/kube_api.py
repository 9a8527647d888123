"""An in-process Kubernetes API server for tests, spoken to by the real kubernetes-asyncio client.

`FakeKubeApi` serves plain HTTP on 127.0.0.1 (a free port) with bearer-token authentication, and
writes a kubeconfig for it (`write_kubeconfig`). Responses follow the Kubernetes API conventions:
objects as JSON, errors as a ``Status`` object (``kind: Status``, ``status: Failure``, ``reason``,
``code``, ``message``), 401 for a missing or wrong bearer, 404 for unknown paths, 405 for a method a
resource does not serve, 415 for a body that is not JSON, 400 for a body that is not the expected
object.

Served today: ``POST /apis/authentication.k8s.io/v1/tokenreviews``, backed by the service-account
tokens a test registers (`add_service_account_token`). Like kube-apiserver, a review with no
``spec.audiences`` is for the API server's own audience, a token whose audiences miss every requested
one is not authenticated (with the authenticator's error), and ``status.audiences`` is the
intersection. Every review is recorded (`reviews`) so tests can count calls.

Resources are routes on one ``aiohttp.web`` application (`_routes`); more (list/watch, status
subresources, leases) are added there, with handlers beside `_create_token_review`.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import yaml
from aiohttp import web

from tests.conftest import free_port

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``metav1.Status`` failure, as every Kubernetes API error body is."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_body(code, reason, message), status=code)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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
    """The fake API server. Use `kube_api()` to run one; register tokens, then point a client at
    `write_kubeconfig`'s file."""

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
        app = web.Application(middlewares=[self._authenticate], client_max_size=1024 * 1024)
        self._routes(app.router)
        return app

    def _routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", "/apis/authentication.k8s.io/v1/tokenreviews", self._tokenreviews)

    async def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1 (a free port unless ``port``: restart on the same one after `stop`)."""
        self.port = port or self.port or free_port()
        runner = web.AppRunner(self.application(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(credential.strip(), self.bearer):
            return status_response(401, "Unauthorized", "Unauthorized")
        hold = self.hold
        if hold is not None:
            self.held.set()
            await hold.wait()
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return status_response(404, "NotFound", "the server could not find the requested resource")

    async def _json_object(self, request: web.Request, kind: str, api_version: str) -> dict[str, Any] | web.Response:
        """The request body as a ``kind`` object, or the error response a kube-apiserver gives."""
        if request.content_type not in ("application/json", "application/yaml", ""):
            message = f"the body of the request was in an unknown format - {request.content_type}"
            return status_response(415, "UnsupportedMediaType", message)
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return status_response(400, "BadRequest", f"the object provided is unrecognized: {exc}")
        if not isinstance(body, dict):
            return status_response(400, "BadRequest", "the object provided is not a JSON object")
        if body.get("kind", kind) != kind or body.get("apiVersion", api_version) != api_version:
            got = f"{body.get('apiVersion')}, Kind={body.get('kind')}"
            return status_response(
                400, "BadRequest", f"the object provided is unrecognized ({got}); expected {api_version}, Kind={kind}"
            )
        return body

    # ---------------------------------------------------------------------------------- resources

    async def _tokenreviews(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            message = "the server does not allow this method on the requested resource"
            return status_response(405, "MethodNotAllowed", message)
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
async def kube_api() -> AsyncIterator[FakeKubeApi]:
    """A running `FakeKubeApi`, stopped on exit."""
    api = FakeKubeApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


__all__ = ["API_AUDIENCE", "ISSUER", "FakeKubeApi", "ServiceAccountToken", "kube_api", "status_body"]
