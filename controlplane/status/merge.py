"""Pure status arithmetic: what to write given what the API server holds and what we compute.

- `lastTransitionTime` is carried over from the condition of the same type (in the same place:
  the object, a listener by name, an HTTPRoute parent by parentRef) while its status is
  unchanged, else it is the write's time (metav1.Condition's definition).
- HTTPRoute ``status.parents`` is shared between controllers: entries whose ``controllerName``
  is another's are kept as they are, in their order; ours follow, replacing every entry we
  wrote before (so a parentRef removed from the route loses its entry).
- A Gateway some connected proxy rejects gets ``Programmed=False`` (reason Invalid) naming the
  rejection, whatever the translator said, until the proxies accept a config again.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

PROGRAMMED = "Programmed"
REASON_INVALID = "Invalid"


def timestamp(moment: datetime) -> str:
    """RFC 3339 with seconds, as metav1.Time serializes."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp(moment: datetime) -> str:
    """RFC 3339 with microseconds, as metav1.MicroTime serializes (Lease times, Event series)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def with_rejection(kind: str, status: Mapping[str, Any], rejection: str | None) -> dict[str, Any]:
    """`status` with a Gateway's Programmed condition turned False when proxies reject its config."""
    body = copy.deepcopy(dict(status))
    if kind != "Gateway" or not rejection:
        return body
    for cond in body.get("conditions") or ():
        if cond.get("type") == PROGRAMMED:
            cond.update(status="False", reason=REASON_INVALID, message=rejection)
    return body


def merged_status(
    kind: str, current: Mapping[str, Any] | None, desired: Mapping[str, Any] | None, controller_name: str, now: str
) -> dict[str, Any]:
    """The status to write: `desired` (None: an HTTPRoute we no longer report on) laid over `current`."""
    current = current if isinstance(current, Mapping) else {}
    if kind == "HTTPRoute":
        return _route_status(current, desired or {}, controller_name, now)
    body = copy.deepcopy(dict(desired or {}))
    _stamp(body.get("conditions"), current.get("conditions"), now)
    if kind == "Gateway":
        previous = _by_key(current.get("listeners"), lambda entry: entry.get("name"))
        for listener in body.get("listeners") or ():
            _stamp(listener.get("conditions"), (previous.get(listener.get("name")) or {}).get("conditions"), now)
    return body


def _route_status(
    current: Mapping[str, Any], desired: Mapping[str, Any], controller_name: str, now: str
) -> dict[str, Any]:
    existing = [p for p in current.get("parents") or () if isinstance(p, Mapping)]
    foreign = [copy.deepcopy(dict(p)) for p in existing if p.get("controllerName") != controller_name]
    ours_before = _by_key(
        [p for p in existing if p.get("controllerName") == controller_name], lambda p: _parent_key(p.get("parentRef"))
    )
    ours = []
    for parent in desired.get("parents") or ():
        entry = copy.deepcopy(dict(parent))
        before = ours_before.get(_parent_key(entry.get("parentRef")))
        _stamp(entry.get("conditions"), (before or {}).get("conditions"), now)
        ours.append(entry)
    body = {key: copy.deepcopy(value) for key, value in current.items() if key != "parents"}
    body["parents"] = foreign + ours
    return body


def _stamp(conditions: Any, previous: Any, now: str) -> None:
    """Set lastTransitionTime on each of `conditions` from `previous` (same type, same status) or `now`."""
    if not isinstance(conditions, list):
        return
    before = _by_key(previous, lambda c: c.get("type"))
    for cond in conditions:
        old = before.get(cond.get("type"))
        if old is not None and old.get("status") == cond.get("status") and old.get("lastTransitionTime"):
            cond["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            cond["lastTransitionTime"] = now


def _by_key(entries: Any, key: Any) -> dict[Any, Mapping[str, Any]]:
    if not isinstance(entries, Sequence):
        return {}
    return {key(entry): entry for entry in entries if isinstance(entry, Mapping)}


def _parent_key(ref: Any) -> tuple[Any, ...]:
    """A parentRef's identity with the API's defaults (group, kind Gateway), so echoes compare equal."""
    ref = ref if isinstance(ref, Mapping) else {}
    return (
        ref.get("group", "gateway.networking.k8s.io"), ref.get("kind", "Gateway"), ref.get("namespace"),
        ref.get("name"), ref.get("sectionName"), ref.get("port"),
    )
