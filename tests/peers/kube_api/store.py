"""The fake API server's storage: objects, one global resourceVersion counter, the change history
watches replay from, and the open watches.

Every write makes a new object dict (stored ones are never mutated), so history and watch queues
can share them. ``compact()`` forgets the history, as etcd compaction does: a watch (or an exact
list) from an older resourceVersion is then answered 410 Gone.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.peers.kube_api.resources import ResourceType
from tests.peers.kube_api.selectors import LabelPredicate, SelectorError, json_patch, merge_patch

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A failure the API server answers with a Status object."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, dict(details or {})


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    details = {"name": name, "group": rtype.group, "kind": rtype.plural}
    return ApiError(404, "NotFound", f'{rtype.resource} "{name}" not found', details)


def _conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    details = {"name": name, "group": rtype.group, "kind": rtype.plural}
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.resource} "{name}": {why}', details)


MODIFIED_ELSEWHERE = "the object has been modified; please apply your changes to the latest version and try again"


def gone(revision: int, compacted: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {revision} ({compacted})")


@dataclass(frozen=True, slots=True)
class Change:
    revision: int
    rtype: ResourceType
    type: str  # ADDED, MODIFIED or DELETED
    obj: Mapping[str, Any]
    previous: Mapping[str, Any] | None


# Queued to a watch: an event to send, or DROP (cut the connection).
DROP: Any = object()


@dataclass(eq=False)
class Watch:
    """One open watch: what it selects, and the events waiting to be written to it."""

    rtype: ResourceType
    namespace: str | None
    labels: LabelPredicate
    fields: Callable[[Mapping[str, Any]], bool]
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def selects(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        metadata = obj.get("metadata") or {}
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return self.labels(metadata.get("labels") or {}) and self.fields(obj)

    def event_for(self, change: Change) -> dict[str, Any] | None:
        """The event this watch sees for a change (a label edit moving an object in or out of its
        selector is ADDED or DELETED, as kube-apiserver does), or None."""
        if change.rtype is not self.rtype:
            return None
        now, before = self.selects(change.obj), self.selects(change.previous)
        if change.type == "DELETED":
            return {"type": "DELETED", "object": change.obj} if before else None
        if now and before:
            return {"type": "MODIFIED", "object": change.obj}
        if now:
            return {"type": "ADDED", "object": change.obj}
        if before:
            return {"type": "DELETED", "object": change.obj}
        return None

    def bookmark(self, revision: int) -> dict[str, Any]:
        body = {"kind": self.rtype.kind, "apiVersion": self.rtype.api_version,
                "metadata": {"resourceVersion": str(revision)}}
        return {"type": "BOOKMARK", "object": body}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a generation counts: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


class ObjectStore:
    def __init__(self) -> None:
        self.revision = 0
        self.compacted = 0
        self.objects: dict[tuple[ResourceType, str, str], Mapping[str, Any]] = {}
        self.history: list[Change] = []
        self.watches: set[Watch] = set()

    # --- reads -----------------------------------------------------------------------------------

    def list(
        self, rtype: ResourceType, namespace: str | None, labels: LabelPredicate,
        fields: Callable[[Mapping[str, Any]], bool],
    ) -> list[Mapping[str, Any]]:
        probe = Watch(rtype, namespace, labels, fields, bookmarks=False)
        found = [obj for (kind, _, _), obj in self.objects.items() if kind is rtype and probe.selects(obj)]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def get(self, rtype: ResourceType, namespace: str, name: str) -> Mapping[str, Any]:
        obj = self.objects.get((rtype, namespace, name))
        if obj is None:
            raise _not_found(rtype, name)
        return obj

    # --- writes ----------------------------------------------------------------------------------

    def create(self, rtype: ResourceType, namespace: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        obj = copy.deepcopy(dict(body))
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", "metadata: expected an object")
        if metadata.get("resourceVersion"):
            raise ApiError(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if rtype.namespaced:
            if metadata.get("namespace", namespace) != namespace:
                message = "the namespace of the provided object does not match the namespace sent on the request"
                raise ApiError(400, "BadRequest", message)
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = f"{metadata['generateName']}{secrets.token_hex(3)[:5]}"
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Invalid", f'{rtype.kind} "" is invalid: metadata.name: Required value: name or '
                                           "generateName is required", {"kind": rtype.kind})
        key = (rtype, namespace if rtype.namespaced else "", name)
        if key in self.objects:
            details = {"name": name, "group": rtype.group, "kind": rtype.plural}
            raise ApiError(409, "AlreadyExists", f'{rtype.resource} "{name}" already exists', details)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        if rtype.tracks_generation:
            metadata["generation"] = 1
        else:
            metadata.pop("generation", None)
        if rtype.status_subresource:
            obj.pop("status", None)
        return self._commit(rtype, key, "ADDED", obj, None)

    def replace(
        self, rtype: ResourceType, namespace: str, name: str, body: Mapping[str, Any], *, status: bool = False
    ) -> Mapping[str, Any]:
        """PUT: the object (its status kept when it has a status subresource) or, with ``status``,
        only the status. A resourceVersion in the body must be the current one."""
        key = (rtype, namespace if rtype.namespaced else "", name)
        current = self.objects.get(key)
        if current is None:
            raise _not_found(rtype, name)
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise ApiError(400, "BadRequest", "metadata: expected an object")
        if metadata.get("name", name) != name:
            message = f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})"
            raise ApiError(400, "BadRequest", message)
        wanted = metadata.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name, MODIFIED_ELSEWHERE)
        if status:
            obj = copy.deepcopy(dict(current))
            if "status" in body:
                obj["status"] = copy.deepcopy(body["status"])
            else:
                obj.pop("status", None)
        else:
            obj = copy.deepcopy(dict(body))
            obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
            kept = {k: current["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "generation")
                    if k in current["metadata"]}
            obj["metadata"] = {**copy.deepcopy(dict(metadata)), "name": name, **kept}
            if rtype.status_subresource:
                obj.pop("status", None)
                if "status" in current:
                    obj["status"] = copy.deepcopy(current["status"])
            if rtype.tracks_generation and _content(obj) != _content(current):
                obj["metadata"]["generation"] = current["metadata"].get("generation", 0) + 1
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if obj == current:
            return current  # a no-op update: no new resourceVersion, no event
        return self._commit(rtype, key, "MODIFIED", obj, current)

    def patch(
        self, rtype: ResourceType, namespace: str, name: str, patch: Any, content_type: str, *, status: bool = False
    ) -> Mapping[str, Any]:
        current = self.get(rtype, namespace if rtype.namespaced else "", name)
        try:
            if content_type == MERGE_PATCH or (content_type == STRATEGIC_PATCH and not rtype.custom):
                # Strategic merge patch is served for built-in kinds as a merge patch: lists are
                # replaced rather than merged by key (enough for the fields tests patch).
                patched = merge_patch(current, patch)
            elif content_type == JSON_PATCH:
                patched = json_patch(current, patch)
            else:
                accepted = f"{JSON_PATCH}, {MERGE_PATCH}" + ("" if rtype.custom else f", {STRATEGIC_PATCH}")
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types include: {accepted}")
        except SelectorError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from None
        if not isinstance(patched, dict):
            raise ApiError(400, "BadRequest", "the patched object is not a JSON object")
        return self.replace(rtype, namespace, name, patched, status=status)

    def delete(
        self, rtype: ResourceType, namespace: str, name: str, preconditions: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any]:
        key = (rtype, namespace if rtype.namespaced else "", name)
        current = self.objects.get(key)
        if current is None:
            raise _not_found(rtype, name)
        for field_name in ("resourceVersion", "uid"):
            wanted = (preconditions or {}).get(field_name)
            if wanted and wanted != current["metadata"].get(field_name):
                raise _conflict(rtype, name, f"Precondition failed: {field_name}: {wanted}, "
                                             f"{field_name} in object meta: {current['metadata'].get(field_name)}")
        obj = copy.deepcopy(dict(current))
        return self._commit(rtype, key, "DELETED", obj, current)

    def _commit(
        self, rtype: ResourceType, key: tuple[ResourceType, str, str], change_type: str, obj: dict[str, Any],
        previous: Mapping[str, Any] | None,
    ) -> Mapping[str, Any]:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        if change_type == "DELETED":
            del self.objects[key]
        else:
            self.objects[key] = obj
        change = Change(self.revision, rtype, change_type, obj, previous)
        self.history.append(change)
        for watch in self.watches:
            event = watch.event_for(change)
            if event is not None:
                watch.queue.put_nowait(event)
        return obj

    # --- history and watches ---------------------------------------------------------------------

    def compact(self) -> int:
        """Forget every change so far; returns the compacted revision."""
        self.compacted = self.revision
        self.history.clear()
        return self.compacted

    def parse_revision(self, text: str) -> int:
        try:
            revision = int(text)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}") from None
        if revision < 0:
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}")
        return revision

    def open_watch(self, watch: Watch, since: str | None) -> None:
        """Register ``watch`` and queue what it has missed: every object now (no resourceVersion, or
        "0") or the changes after ``since``. Raises 410 Gone for a compacted ``since``."""
        if since in (None, "", "0"):
            for (rtype, _, _), obj in sorted(self.objects.items(), key=lambda item: item[0][1:]):
                if rtype is watch.rtype and watch.selects(obj):
                    watch.queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            revision = self.parse_revision(since)
            if revision < self.compacted:
                raise gone(revision, self.compacted)
            for change in self.history:
                if change.revision > revision:
                    event = watch.event_for(change)
                    if event is not None:
                        watch.queue.put_nowait(event)
        self.watches.add(watch)

    def close_watch(self, watch: Watch) -> None:
        self.watches.discard(watch)
