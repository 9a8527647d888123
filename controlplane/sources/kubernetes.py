"""The Kubernetes config source: list and watch the API server, hand the control plane the same
`FolderState` the folder source does.

One reflector per kind lists, then watches from the list's resourceVersion with bookmarks, so a
watch that ends (its timeout, a dropped connection, an API server restart) resumes from the last
event or bookmark it saw and misses nothing. A 410 Gone (the history it would resume from is
compacted) makes it list again, which also catches deletions it could not see. Failures back
off exponentially with jitter, capped; what was known keeps serving meanwhile.

Objects go through the model code of the folder source (`object_from_manifest`, `validate`): an
invalid object is reported with kind, namespace, name and field, and its last valid version stays
in use. Changes are debounced (`KubernetesSourceSettings.debounce`) and a new state is handed over
only when it differs.

What is watched, and what reaches the translator:

- Gateway API GatewayClass, Gateway, HTTPRoute, ReferenceGrant; our Backend and Policy;
  Namespaces (their labels decide ``allowedRoutes`` selectors).
- Services, Secrets and ConfigMaps are watched whole (one watch each: the API cannot select
  "referenced by a route" server-side) but only those the other objects need reach the state:
  Services a route's backendRefs or a Backend's ``a2a.serviceRef`` name, and Services with an
  ``appProtocol`` of ``kgateway.dev/mcp`` or ``kgateway.dev/a2a``; Secrets and ConfigMaps named
  by a ``...Ref``/``...Refs`` field of a Gateway, Backend or Policy, and the MCP session key Secret
  of an MCP Service's namespace. Unreferenced Secrets never reach the translator or the logs.
  RBAC: get/list/watch on those kinds (no write), cluster-wide or, with ``namespace``, in one
  namespace (a Role); ``secret_selector`` narrows the Secret watch to labelled Secrets for
  clusters whose policy forbids reading all of them.
- Services resolve to their ``externalName`` or cluster DNS name (what the translator does),
  so EndpointSlices are not needed and not watched.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from controlplane.model import (
    AGENTGATE_GROUP,
    BACKEND,
    CONFIG_MAP,
    CORE_GROUP,
    GATEWAY,
    GATEWAY_CLASS,
    GATEWAY_GROUP,
    HTTP_ROUTE,
    NAMESPACE,
    POLICY,
    REFERENCE_GRANT,
    SECRET,
    SERVICE,
    ConfigError,
    KubeObject,
    ObjectKey,
    object_from_manifest,
    validate,
)
from controlplane.sources.folder import FolderState
from controlplane.translate.a2a import SERVICE_APP_PROTOCOL as A2A_APP_PROTOCOL
from controlplane.translate.mcp import SERVICE_APP_PROTOCOL as MCP_APP_PROTOCOL
from controlplane.translate.mcp import SERVICE_SESSION_KEY_SECRET
from shared.logging import get_logger

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

log = get_logger("controlplane.sources.kubernetes")

GATEWAY_VERSION: Final = "v1"
REFERENCE_GRANT_VERSION: Final = "v1beta1"
AGENTGATE_VERSION: Final = "v1alpha1"
# Reference fields that never name a Secret or ConfigMap.
_NOT_DATA_REFS: Final = frozenset({"targetRefs", "parentRefs", "backendRefs", "serviceRef", "extensionRef"})


@dataclass(frozen=True, slots=True)
class WatchedKind:
    """One kind the source lists and watches, and where the API serves it."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


WATCHED_KINDS: Final = (
    WatchedKind(GATEWAY_CLASS, GATEWAY_GROUP, GATEWAY_VERSION, "gatewayclasses", namespaced=False),
    WatchedKind(GATEWAY, GATEWAY_GROUP, GATEWAY_VERSION, "gateways", namespaced=True),
    WatchedKind(HTTP_ROUTE, GATEWAY_GROUP, GATEWAY_VERSION, "httproutes", namespaced=True),
    WatchedKind(REFERENCE_GRANT, GATEWAY_GROUP, REFERENCE_GRANT_VERSION, "referencegrants", namespaced=True),
    WatchedKind(BACKEND, AGENTGATE_GROUP, AGENTGATE_VERSION, "backends", namespaced=True),
    WatchedKind(POLICY, AGENTGATE_GROUP, AGENTGATE_VERSION, "policies", namespaced=True),
    WatchedKind(NAMESPACE, CORE_GROUP, "v1", "namespaces", namespaced=False),
    WatchedKind(SERVICE, CORE_GROUP, "v1", "services", namespaced=True),
    WatchedKind(SECRET, CORE_GROUP, "v1", "secrets", namespaced=True),
    WatchedKind(CONFIG_MAP, CORE_GROUP, "v1", "configmaps", namespaced=True),
)


@dataclass(frozen=True, slots=True)
class KubernetesSourceSettings:
    # Watch one namespace (GatewayClasses stay cluster-wide); None: every namespace.
    namespace: str | None = None
    # Seconds changes are gathered before a new state is computed.
    debounce: float = 0.1
    # Server-side timeout of one watch request; it then resumes from its last resourceVersion.
    watch_timeout: int = 300
    # Seconds a list may take, and a watch may stay silent beyond its timeout, before it is dropped.
    request_timeout: float = 30.0
    backoff_initial: float = 0.25
    backoff_max: float = 30.0
    # A label selector for the Secret watch ("" watches every Secret).
    secret_selector: str = ""

    def describe(self) -> str:
        return f"namespace {self.namespace}" if self.namespace else "every namespace"


class Backoff:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""

    def __init__(self, initial: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.initial, self.cap, self._rng = initial, cap, rng
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self.failures = 0


class ApiFailure(Exception):
    """A request the API server answered with an error Status (or garbage)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class Expired(Exception):
    """410 Gone: the resourceVersion to resume from is compacted; list again."""


class WatchDropped(Exception):
    """An established watch was cut (API server restart, load balancer): resume, nothing to report."""


@dataclass(slots=True)
class _Entry:
    """What the source holds for one object identity: its last valid version and current problems."""

    good: KubeObject | None
    errors: tuple[ConfigError, ...] = ()


class Reflector:
    """Keeps one kind's objects in step with the API server (list, then watch; relist on 410)."""

    def __init__(self, kind: WatchedKind, api_client: ApiClient, settings: KubernetesSourceSettings,
                 on_change: Callable[[], None]) -> None:
        self.kind = kind
        self.settings = settings
        self.entries: dict[ObjectKey, _Entry] = {}
        self.resource_version: str | None = None
        self.synced = False
        # Why the API cannot be read right now (shown in the state's errors); None when it can.
        self.problem: ConfigError | None = None
        self.lists = 0
        self._on_change = on_change
        self._api_client = api_client
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled."""
        import aiohttp

        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except Expired:
                log.info("resourceVersion expired, listing again", kind=self.kind.kind,
                         resource_version=self.resource_version)
                self.resource_version = None
            except WatchDropped as exc:
                delay = self._backoff.next_delay()
                log.info("watch dropped, resuming", kind=self.kind.kind, resource_version=self.resource_version,
                         error=str(exc.__cause__ or exc), retry_in=round(delay, 3))
                await anyio.sleep(delay)
            except (ApiFailure, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                await self._failed(exc)

    async def _failed(self, exc: Exception) -> None:
        delay = self._backoff.next_delay()
        if isinstance(exc, ApiFailure):
            message = f"the Kubernetes API answered {exc.status} {exc.reason} for {self.kind.resource}: {exc.message}"
            if exc.status == 403:
                message += f" (the control plane needs RBAC get/list/watch on {self.kind.resource})"
            elif exc.status == 404:
                message += f" (is the CRD for {self.kind.api_version} {self.kind.kind} installed?)"
            if exc.status in (403, 404) and not self.synced:
                # Nothing to serve of this kind until it is fixed: let the others start.
                self.synced = True
        else:
            message = f"cannot read {self.kind.resource} from the Kubernetes API: {exc or type(exc).__name__}"
        changed = self.problem is None or self.problem.message != message
        self.problem = ConfigError(kind=self.kind.kind, message=message)
        if changed:
            self._on_change()
        log.warning("kubernetes api error, retrying", kind=self.kind.kind, error=message, retry_in=round(delay, 3))
        await anyio.sleep(delay)

    def _recovered(self) -> None:
        self._backoff.reset()
        if self.problem is not None:
            self.problem = None
            self._on_change()

    # --- list ------------------------------------------------------------------------------------

    def _call(self, **params: Any) -> Any:
        """The list (or, with watch=True, watch) call of this kind, not yet awaited."""
        from kubernetes_asyncio import client as kube_client

        kind, namespace = self.kind, self.settings.namespace
        if kind.kind == SECRET and self.settings.secret_selector:
            params["label_selector"] = self.settings.secret_selector
        if kind.kind == NAMESPACE and namespace:
            params["field_selector"] = f"metadata.name={namespace}"
        if kind.group != CORE_GROUP:
            api = kube_client.CustomObjectsApi(self._api_client)
            if kind.namespaced and namespace:
                return api.list_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, **params)
            return api.list_cluster_custom_object(kind.group, kind.version, kind.plural, **params)
        core = kube_client.CoreV1Api(self._api_client)
        if not kind.namespaced:
            return getattr(core, f"list_{_singular(kind)}")(**params)
        if namespace:
            return getattr(core, f"list_namespaced_{_singular(kind)}")(namespace, **params)
        return getattr(core, f"list_{_singular(kind)}_for_all_namespaces")(**params)

    async def _list(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout)
        response = await self._call(_preload_content=False, _request_timeout=timeout)
        async with response:
            body = await _json_response(response)
        items = body.get("items")
        metadata = body.get("metadata")
        if not isinstance(items, list) or not isinstance(metadata, dict):
            raise ApiFailure(response.status, "BadResponse", f"a {self.kind.kind} list without items or metadata")
        entries: dict[ObjectKey, _Entry] = {}
        for item in items:
            self._accept(item, entries, previous=self.entries)
        self.entries = entries
        self.resource_version = str(metadata.get("resourceVersion") or "") or None
        self.synced = True
        self.lists += 1
        log.debug("listed", kind=self.kind.kind, objects=len(entries), resource_version=self.resource_version)
        self._recovered()
        self._on_change()

    # --- watch -----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """One watch request from `resource_version`; returns when the server ends it."""
        import aiohttp

        settings = self.settings
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.request_timeout,
            sock_read=settings.watch_timeout + settings.request_timeout,
        )
        response = await self._call(
            watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=settings.watch_timeout, _preload_content=False, _request_timeout=timeout,
        )
        async with response:
            if response.status != 200:
                try:
                    await _json_response(response)  # raises the Status as ApiFailure
                except ApiFailure as exc:
                    if exc.status == 410:
                        raise Expired(exc.message) from None
                    raise
            self._recovered()
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
                    raise WatchDropped(self.kind.kind) from exc
                if not line:
                    return  # the server ended the watch: resume from resource_version
                if line.strip():
                    self._event(json.loads(line))

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ApiFailure(200, "BadResponse", f"a watch event without an object: {str(event)[:200]}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Expired(obj.get("message", ""))
            raise ApiFailure(int(code or 500), str(obj.get("reason", "")), str(obj.get("message", "")))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._accept(obj, self.entries, previous=self.entries)
        elif kind == "DELETED":
            key = self._key(obj)
            if key is not None:
                self.entries.pop(key, None)
        elif kind != "BOOKMARK":
            raise ApiFailure(200, "BadResponse", f"unknown watch event type {kind!r}")
        if version:
            self.resource_version = str(version)
        if kind != "BOOKMARK":
            self._on_change()

    # --- objects ---------------------------------------------------------------------------------

    def _key(self, raw: Mapping[str, Any]) -> ObjectKey | None:
        metadata = raw.get("metadata") or {}
        name = metadata.get("name")
        if not isinstance(name, str):
            return None
        return ObjectKey(self.kind.kind, metadata.get("namespace", "") if self.kind.namespaced else "", name)

    def _accept(self, raw: dict[str, Any], into: dict[ObjectKey, _Entry], previous: Mapping[ObjectKey, _Entry]) -> None:
        """Put one API object into ``into``: valid, or its problems beside the last valid version."""
        # Built-in list items carry no kind or apiVersion.
        manifest = {**raw, "apiVersion": raw.get("apiVersion") or self.kind.api_version,
                    "kind": raw.get("kind") or self.kind.kind}
        key = self._key(manifest)
        if key is None:
            return
        obj, errors = object_from_manifest(manifest)
        if obj is not None and not errors:
            errors = validate(obj)
        before = previous.get(key)
        if errors or obj is None:
            if not errors:
                message = f"unsupported apiVersion {manifest['apiVersion']!r}"
                errors = [ConfigError(kind=key.kind, namespace=key.namespace, name=key.name, message=message)]
            into[key] = _Entry(before.good if before is not None else None, tuple(errors))
            return
        into[key] = _Entry(obj)


def _singular(kind: WatchedKind) -> str:
    return {"services": "service", "secrets": "secret", "configmaps": "config_map", "namespaces": "namespace"}[
        kind.plural
    ]


async def _json_response(response: Any) -> dict[str, Any]:
    """A response's JSON object; an error status raises ApiFailure with the Status's message."""
    data = await response.read()
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if response.status >= 300 or not isinstance(body, dict):
        status = body if isinstance(body, dict) else {}
        message = status.get("message") or data[:200].decode(errors="replace") or response.reason or ""
        raise ApiFailure(response.status, str(status.get("reason") or response.reason or ""), str(message))
    return body


# --- what reaches the translator -----------------------------------------------------------------


def _data_refs(obj: KubeObject) -> Iterator[ObjectKey]:
    """Secrets and ConfigMaps an object may name: every mapping under a ``...Ref`` key, or in a
    ``...Refs`` list, with a name (no kind: either; a superset is harmless)."""

    def walk(node: Any) -> Iterator[ObjectKey]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if isinstance(key, str) and key not in _NOT_DATA_REFS:
                    if key.endswith("Ref"):
                        yield from refs((value,))
                    elif key.endswith("Refs") and isinstance(value, list):
                        yield from refs(value)
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    def refs(items: Iterable[Any]) -> Iterator[ObjectKey]:
        for ref in items:
            if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str):
                continue
            namespace = ref.get("namespace") if isinstance(ref.get("namespace"), str) else obj.namespace
            kind = ref.get("kind")
            for data_kind in (SECRET, CONFIG_MAP):
                if kind in (None, data_kind):
                    yield ObjectKey(data_kind, namespace, ref["name"])

    yield from walk(obj.spec)


def _service_refs(obj: KubeObject) -> Iterator[ObjectKey]:
    if obj.kind == HTTP_ROUTE:
        for rule in obj.spec.get("rules") or ():
            for ref in (rule.get("backendRefs") or ()) if isinstance(rule, Mapping) else ():
                if (isinstance(ref, Mapping) and ref.get("group", CORE_GROUP) == CORE_GROUP
                        and ref.get("kind", SERVICE) == SERVICE and isinstance(ref.get("name"), str)):
                    yield ObjectKey(SERVICE, ref.get("namespace", obj.namespace), ref["name"])
    elif obj.kind == BACKEND:
        a2a = obj.spec.get("a2a")
        ref = a2a.get("serviceRef") if isinstance(a2a, Mapping) else None
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            yield ObjectKey(SERVICE, obj.namespace, ref["name"])


def agent_protocol_service(obj: KubeObject) -> bool:
    """A Service with a port of appProtocol kgateway.dev/mcp or kgateway.dev/a2a."""
    ports = obj.spec.get("ports")
    return isinstance(ports, list) and any(
        isinstance(port, Mapping) and port.get("appProtocol") in (MCP_APP_PROTOCOL, A2A_APP_PROTOCOL) for port in ports
    )


def needed(objects: Mapping[ObjectKey, KubeObject]) -> set[ObjectKey]:
    """The Services, Secrets and ConfigMaps the other objects need (see the module docstring)."""
    wanted: set[ObjectKey] = set()
    for obj in objects.values():
        if obj.kind in (GATEWAY, BACKEND, POLICY):
            wanted.update(_data_refs(obj))
        if obj.kind in (HTTP_ROUTE, BACKEND):
            wanted.update(_service_refs(obj))
    for key in list(wanted):
        service = objects.get(key) if key.kind == SERVICE else None
        if service is not None and agent_protocol_service(service):
            wanted.add(ObjectKey(SECRET, key.namespace, SERVICE_SESSION_KEY_SECRET))
    for obj in objects.values():
        if obj.kind == SERVICE and agent_protocol_service(obj):
            wanted.add(obj.key)
            wanted.add(ObjectKey(SECRET, obj.namespace, SERVICE_SESSION_KEY_SECRET))
    return wanted


_FILTERED_KINDS: Final = frozenset({SERVICE, SECRET, CONFIG_MAP})


class KubernetesSource:
    """The reflectors of every watched kind, and the debounced state they make together."""

    def __init__(self, api_client: ApiClient, settings: KubernetesSourceSettings | None = None) -> None:
        self.settings = settings or KubernetesSourceSettings()
        self.reflectors = tuple(Reflector(kind, api_client, self.settings, self._changed) for kind in WATCHED_KINDS)
        self._change = anyio.Event()

    def _changed(self) -> None:
        self._change.set()

    @property
    def synced(self) -> bool:
        """Every kind listed once (or found not served)."""
        return all(reflector.synced for reflector in self.reflectors)

    def reflector(self, kind: str) -> Reflector:
        return next(reflector for reflector in self.reflectors if reflector.kind.kind == kind)

    def state(self) -> FolderState:
        """Every object in use (sorted by identity) and every problem, now."""
        good: dict[ObjectKey, KubeObject] = {}
        problems: dict[ObjectKey, tuple[ConfigError, ...]] = {}
        api_errors: list[ConfigError] = []
        for reflector in self.reflectors:
            for key, entry in reflector.entries.items():
                if entry.good is not None:
                    good[key] = entry.good
                if entry.errors:
                    problems[key] = entry.errors
            if reflector.problem is not None:
                api_errors.append(reflector.problem)
        wanted = needed(good)
        objects = tuple(obj for key, obj in sorted(good.items()) if key.kind not in _FILTERED_KINDS or key in wanted)
        errors = [error for key, found in sorted(problems.items())
                  if key.kind not in _FILTERED_KINDS or key in wanted for error in found]
        return FolderState(objects, (*api_errors, *errors))

    async def run(
        self, send: MemoryObjectSendStream[FolderState], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send the state once every kind is listed, then after every change that alters it (changes
        within `settings.debounce` seconds make one state)."""
        async with send, anyio.create_task_group() as tasks:
            for reflector in self.reflectors:
                tasks.start_soon(reflector.run, name=f"reflector {reflector.kind.kind}")
            while True:
                self._change = anyio.Event()
                if self.synced:
                    break
                await self._change.wait()
            state = self.state()
            log.info("kubernetes source synced", scope=self.settings.describe(), objects=len(state.objects),
                     errors=len(state.errors))
            task_status.started()
            await send.send(state)
            while True:
                await self._change.wait()
                await anyio.sleep(self.settings.debounce)
                self._change = anyio.Event()
                new_state = self.state()
                if new_state != state:
                    state = new_state
                    log.info("kubernetes objects changed", objects=len(state.objects), errors=len(state.errors))
                    await send.send(state)

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[MemoryObjectReceiveStream[FolderState]]:
        """Run the source while the block runs; iterate the stream for its states."""
        send, receive = anyio.create_memory_object_stream[FolderState](1)
        async with anyio.create_task_group() as tasks, receive:
            tasks.start_soon(self.run, send)
            try:
                yield receive
            finally:
                tasks.cancel_scope.cancel()


__all__ = [
    "WATCHED_KINDS",
    "ApiFailure",
    "Backoff",
    "Expired",
    "KubernetesSource",
    "KubernetesSourceSettings",
    "Reflector",
    "WatchedKind",
    "agent_protocol_service",
    "needed",
]
