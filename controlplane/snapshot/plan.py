"""What to push to one client, and in which order: pure functions of snapshot and client state.

Make before break (xds.md, "Consistency and order"): a client must never hold a resource
whose references it lacks. TYPE_ORDER lists referenced types first, so:

- Delta: upserts type by type in TYPE_ORDER, then removals type by type in reverse.
- State of the world, where every response replaces a whole type: pass 1 in TYPE_ORDER
  sends each changed type's new set plus any removed resource that a resource the client
  still holds (of another type) refers to; pass 2 in reverse TYPE_ORDER sends the final
  set of every type that kept something back. Each response's version is the hash of
  exactly the set it carries, so the intermediate sets are well defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.snapshot.model import Resource, Snapshot, set_version
from shared.resources import TYPE_ORDER

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Subscription:
    """The names a client wants of one type; wildcard means every resource of the type."""

    wildcard: bool = True
    names: frozenset[str] = frozenset()

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def select(self, available: Mapping[str, Resource]) -> Mapping[str, Resource]:
        if self.wildcard:
            return available
        return {name: available[name] for name in sorted(self.names) if name in available}

    def describe(self) -> list[str]:
        """For status output: '*' first, then the names."""
        return ([WILDCARD] if self.wildcard else []) + sorted(self.names)


# --- State of the world ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SotwTypeState:
    """One subscribed type as the planner needs to see it."""

    subscription: Subscription
    # What the client holds now (the set of its last response, or its accepted set after a NACK).
    held: Mapping[str, Resource]
    # Version of the last response sent for this type; None if nothing was sent yet.
    sent_version: str | None = None
    # A version the client NACKed: never sent again (go-control-plane issues 962, 582).
    parked_version: str | None = None


@dataclass(frozen=True, slots=True)
class SotwPush:
    """One state-of-the-world response: the full set of one type."""

    type_url: str
    version: str
    resources: tuple[Resource, ...]  # sorted by name


def _sorted(resources: Iterable[Resource]) -> tuple[Resource, ...]:
    return tuple(sorted(resources, key=lambda r: r.name))


def _referenced(type_url: str, holdings: Mapping[str, Mapping[str, Resource]]) -> set[str]:
    """Keys of `type_url` referred to by what the client holds of the other types."""
    names: set[str] = set()
    for other, held in holdings.items():
        if other == type_url:
            continue
        for resource in held.values():
            for ref_type, ref_name in resource.refs:
                if ref_type == type_url:
                    names.add(ref_name)
    return names


def sotw_desired(snapshot: Snapshot, type_url: str, subscription: Subscription) -> tuple[Mapping[str, Resource], str]:
    """The set a SotW client subscribed this way should end up with, and its version."""
    available = snapshot.resources(type_url)
    chosen = subscription.select(available)
    if chosen is available:
        return chosen, snapshot.type_version(type_url)  # a wildcard subscription: already hashed
    return chosen, set_version(chosen.values())


def plan_sotw(snapshot: Snapshot, types: Mapping[str, SotwTypeState]) -> list[SotwPush]:
    """The responses that bring a client from `types` to `snapshot`, make before break."""
    holdings: dict[str, Mapping[str, Resource]] = {t: s.held for t, s in types.items()}
    pushes: list[SotwPush] = []
    final: dict[str, tuple[str, Mapping[str, Resource]]] = {}
    kept_back: list[str] = []
    for type_url in TYPE_ORDER:
        state = types.get(type_url)
        if state is None:
            continue
        desired, desired_version = sotw_desired(snapshot, type_url, state.subscription)
        removed = [r for name, r in state.held.items() if name not in desired]
        retained: dict[str, Resource] = {}
        if removed:
            referenced = _referenced(type_url, holdings)
            retained = {r.name: r for r in removed if not r.keys.isdisjoint(referenced)}
        if retained:
            step = {**desired, **retained}
            step_version = set_version(step.values())
            kept_back.append(type_url)
            final[type_url] = (desired_version, desired)
        else:
            step, step_version = desired, desired_version
        if step_version in (state.sent_version, state.parked_version):
            continue
        pushes.append(SotwPush(type_url, step_version, _sorted(step.values())))
        holdings[type_url] = step
    for type_url in reversed(kept_back):
        version, desired = final[type_url]
        if version != types[type_url].parked_version:
            pushes.append(SotwPush(type_url, version, _sorted(desired.values())))
    return pushes


# --- Delta -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeltaTypeState:
    """One subscribed type of a Delta stream as the planner needs to see it."""

    subscription: Subscription
    # name -> version the client holds.
    known: Mapping[str, str]
    # Subscribed since the last push: sent even if unchanged, reported removed if absent.
    forced: frozenset[str] = frozenset()
    # First request of a wildcard subscription: answer even if there is nothing to send.
    must_respond: bool = False
    # System version of a NACKed response: while the snapshot still has it, send only `forced`.
    parked_version: str | None = None


@dataclass(frozen=True, slots=True)
class DeltaPush:
    """One Delta response: upserts and/or removals of one type."""

    type_url: str
    system_version: str
    upserts: tuple[Resource, ...] = ()
    removals: tuple[str, ...] = ()
    # The upserts are every resource of the type and nothing is removed: the body
    # is the same for every client that gets it, whatever it held before.
    complete: bool = False


def _delta_changes(snapshot: Snapshot, type_url: str, state: DeltaTypeState) -> tuple[list[Resource], list[str]]:
    available = snapshot.resources(type_url)
    known, forced = state.known, state.forced
    if state.parked_version == snapshot.type_version(type_url):
        # Parked after a NACK: only what was newly subscribed goes out.
        upserts = [available[name] for name in sorted(forced) if name in available]
        return upserts, sorted(name for name in forced if name not in available)
    if state.subscription.wildcard:
        # Snapshot mappings are sorted by name: the common case needs no sorting.
        upserts = [r for name, r in available.items() if known.get(name) != r.version or name in forced]
    else:
        wanted = sorted(state.subscription.names | forced)
        upserts = [r for r in map(available.get, wanted) if r is not None and (
            known.get(r.name) != r.version or r.name in forced)]
    removals = {name for name in known if name not in available}
    removals.update(name for name in forced if name not in available)
    return upserts, sorted(removals)


def plan_delta(snapshot: Snapshot, types: Mapping[str, DeltaTypeState]) -> list[DeltaPush]:
    """Upserts in TYPE_ORDER, then removals in reverse TYPE_ORDER (make before break)."""
    upserts: list[DeltaPush] = []
    removals: list[DeltaPush] = []
    for type_url in TYPE_ORDER:
        state = types.get(type_url)
        if state is None:
            continue
        version = snapshot.type_version(type_url)
        changed, removed = _delta_changes(snapshot, type_url, state)
        if changed or (state.must_respond and not removed):
            complete = not removed and len(changed) == len(snapshot.resources(type_url))
            upserts.append(DeltaPush(type_url, version, upserts=tuple(changed), complete=complete))
        if removed:
            removals.append(DeltaPush(type_url, version, removals=tuple(removed)))
    removals.reverse()
    if upserts and removals and upserts[-1].type_url == removals[0].type_url:
        # Adjacent pushes of one type: nothing can come between them, so send one response.
        last, first = upserts.pop(), removals.pop(0)
        upserts.append(DeltaPush(last.type_url, last.system_version, last.upserts, first.removals))
    return upserts + removals
