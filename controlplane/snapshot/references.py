"""Which resources a resource refers to, and the check that a snapshot has no dangling ones.

A child names its parent (resources.proto), so references only point from later types of
TYPE_ORDER to earlier ones (and from Policy to anything). The same function drives the
consistency check before a snapshot is published and the make-before-break ordering of
state-of-the-world pushes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from google.protobuf.message import Message

from shared.api.agentgate.config.v1 import resources_pb2 as pb
from shared.resources import BACKEND, LISTENER, POLICY, ROUTE, TARGET, ResourceMap, short_name

_POLICY_TARGET_TYPES: Mapping[int, str] = {
    pb.PolicyTargetRef.KIND_LISTENER: LISTENER,
    # An HTTPRoute key ("namespace/name") resolves through Route.route_key (see referable_keys).
    pb.PolicyTargetRef.KIND_ROUTE: ROUTE,
    pb.PolicyTargetRef.KIND_ROUTE_RULE: ROUTE,
    pb.PolicyTargetRef.KIND_BACKEND: BACKEND,
}


class SnapshotInconsistent(ValueError):
    """A snapshot was refused; every problem names the resource and what it points at."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(shown + more)


def _backend_refs(message: Message) -> Iterator[pb.BackendRef]:
    """Every BackendRef anywhere in a message: rule backends and filter-level ones alike."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = value.values()
        else:
            items = value if field.is_repeated else (value,)
        for item in items:
            if isinstance(item, pb.BackendRef):
                yield item
            if isinstance(item, Message):
                yield from _backend_refs(item)


def references(type_url: str, message: Message) -> set[tuple[str, str]]:
    """The (type URL, key) pairs a resource refers to.

    A Route with `direct_response_status` answers without forwarding (its backends could
    not be resolved), so its backends are not references. Policy targets of kind GATEWAY
    name the Gateway itself, not a resource, and are checked by `check_consistency`.
    """
    refs: set[tuple[str, str]] = set()
    if type_url == ROUTE:
        assert isinstance(message, pb.Route)
        refs.update((LISTENER, name) for name in message.listeners)
        if not message.direct_response_status:
            refs.update((BACKEND, ref.backend) for ref in _backend_refs(message) if not ref.direct_response_status)
    elif type_url == TARGET:
        assert isinstance(message, pb.Target)
        refs.add((BACKEND, message.backend))
    elif type_url == POLICY:
        assert isinstance(message, pb.Policy)
        for target in message.targets:
            target_type = _POLICY_TARGET_TYPES.get(target.kind)
            if target_type is not None:
                refs.add((target_type, target.name))
    return refs


def referable_keys(type_url: str, message: Message) -> set[str]:
    """The keys by which other resources may refer to this one.

    A Route is one rule of an HTTPRoute, so a Policy of kind ROUTE that names the whole
    HTTPRoute resolves through any of its rules' `route_key`.
    """
    keys = {message.name}  # type: ignore[attr-defined]
    if type_url == ROUTE:
        assert isinstance(message, pb.Route)
        if message.route_key:
            keys.add(message.route_key)
    return keys


def check_consistency(gateway: str, resources: ResourceMap) -> None:
    """Raise SnapshotInconsistent if any reference does not resolve inside these resources."""
    available: dict[str, set[str]] = {}
    for type_url, named in resources.items():
        keys: set[str] = set()
        for message in named.values():
            keys |= referable_keys(type_url, message)
        available[type_url] = keys
    problems: list[str] = []
    for type_url, named in sorted(resources.items()):
        kind = short_name(type_url)
        for name, message in sorted(named.items()):
            for ref_type, ref_name in sorted(references(type_url, message)):
                if ref_name not in available.get(ref_type, ()):
                    problems.append(
                        f"{kind} {name!r} references {short_name(ref_type)} {ref_name!r}, which is not in the snapshot"
                    )
            if type_url == POLICY:
                problems.extend(_policy_target_problems(gateway, name, message))
    if problems:
        raise SnapshotInconsistent(problems)


def _policy_target_problems(gateway: str, name: str, policy: Message) -> Iterator[str]:
    assert isinstance(policy, pb.Policy)
    for target in policy.targets:
        if target.kind == pb.PolicyTargetRef.KIND_GATEWAY and target.name != gateway:
            yield f"Policy {name!r} targets Gateway {target.name!r}, but this snapshot is for Gateway {gateway!r}"
        elif target.kind == pb.PolicyTargetRef.KIND_UNSPECIFIED:
            yield f"Policy {name!r} has a target {target.name!r} of unspecified kind"
