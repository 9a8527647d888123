"""Immutable, content-addressed snapshots of one Gateway's discovery resources.

Every version here is a hash of content, never a counter or a timestamp: two control
plane replicas that translate the same input publish byte-identical versions, so a proxy
that reconnects to another replica is not sent what it already holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from controlplane.snapshot.references import SnapshotInconsistent, referable_keys, references
from controlplane.snapshot.wire import length_delimited
from shared.resources import MESSAGE_TYPES, TYPE_ORDER, ResourceMap, short_name

# 12 bytes (24 hex digits): collisions are out of reach for any realistic config size.
_DIGEST_SIZE = 12

# DiscoveryResponse.resources = 2 (Any); DeltaDiscoveryResponse.resources = 2 (Resource).
_RESPONSE_RESOURCES_FIELD = 2
# envoy.service.discovery.v3.Resource: version = 1, resource = 2, name = 3.
_RESOURCE_VERSION_FIELD = 1
_RESOURCE_ANY_FIELD = 2
_RESOURCE_NAME_FIELD = 3


def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=_DIGEST_SIZE)


def _feed(digest: hashlib.blake2b, text: str) -> None:
    """Length-prefixed, so no two different sequences of strings hash alike."""
    data = text.encode()
    digest.update(len(data).to_bytes(4, "big"))
    digest.update(data)


def set_version(resources: Iterable[Resource]) -> str:
    """Version of a set of resources: a hash of its sorted (name, version) pairs."""
    digest = _digest()
    for resource in sorted(resources, key=_by_name):
        _feed(digest, resource.name)
        _feed(digest, resource.version)
    return digest.hexdigest()


def _by_name(resource: Resource) -> str:
    return resource.name


@dataclass(frozen=True, slots=True)
class Resource:
    """One discovery resource, serialized once when the snapshot is built.

    `sotw_field` and `delta_field` are the resource already framed as a repeated field of
    DiscoveryResponse and DeltaDiscoveryResponse, so building a response is a join.
    """

    type_url: str
    name: str
    version: str
    packed: bytes
    sotw_field: bytes
    delta_field: bytes
    # (type URL, key) pairs this resource refers to.
    refs: frozenset[tuple[str, str]]
    # Keys other resources may use to refer to this one.
    keys: frozenset[str]

    @classmethod
    def from_message(cls, type_url: str, message: Message, previous: Resource | None = None) -> Resource:
        """Serialize a message; returns `previous` itself if the content is unchanged (shared, not copied)."""
        value = message.SerializeToString(deterministic=True)
        digest = _digest()
        digest.update(value)
        version = digest.hexdigest()
        if previous is not None and previous.version == version:
            return previous
        name: str = message.name  # type: ignore[attr-defined]
        packed = AnyProto(type_url=type_url, value=value).SerializeToString(deterministic=True)
        discovery_resource = (
            length_delimited(_RESOURCE_VERSION_FIELD, version.encode())
            + length_delimited(_RESOURCE_ANY_FIELD, packed)
            + length_delimited(_RESOURCE_NAME_FIELD, name.encode())
        )
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            packed=packed,
            sotw_field=length_delimited(_RESPONSE_RESOURCES_FIELD, packed),
            delta_field=length_delimited(_RESPONSE_RESOURCES_FIELD, discovery_resource),
            refs=frozenset(references(type_url, message)),
            keys=frozenset(referable_keys(type_url, message)),
        )


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one type, sorted by name, and the version of that set."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one Gateway's proxies should hold: every type of TYPE_ORDER, possibly empty."""

    gateway: str
    version: str
    types: Mapping[str, TypeSnapshot]

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self.types[type_url].resources

    def type_version(self, type_url: str) -> str:
        return self.types[type_url].version

    def resource_count(self) -> int:
        return sum(len(t.resources) for t in self.types.values())


def build_snapshot(gateway: str, resources: ResourceMap, previous: Snapshot | None = None) -> Snapshot:
    """Serialize and version every resource; unchanged ones are shared with `previous`.

    Raises SnapshotInconsistent for unknown types, wrong message classes and keys that
    differ from the message's name. References are not checked here (see
    `check_consistency`) so tests can build the intermediate states a proxy may hold.
    """
    unknown = sorted(set(resources) - set(TYPE_ORDER))
    if unknown:
        raise SnapshotInconsistent([f"unknown type URL(s) {unknown}; expected some of {list(TYPE_ORDER)}"])
    types: dict[str, TypeSnapshot] = {}
    for type_url in TYPE_ORDER:
        expected = MESSAGE_TYPES[type_url]
        before = previous.resources(type_url) if previous is not None else {}
        built: dict[str, Resource] = {}
        problems: list[str] = []
        for key, message in sorted(resources.get(type_url, {}).items()):
            kind = short_name(type_url)
            name = getattr(message, "name", None)
            if not isinstance(message, expected):
                problems.append(f"{kind} {key!r} is a {type(message).__name__}, expected {expected.__name__}")
            elif name != key:
                problems.append(f"{kind} {key!r} is stored under a key that differs from its name {name!r}")
            else:
                built[key] = Resource.from_message(type_url, message, before.get(key))
        if problems:
            raise SnapshotInconsistent(problems)
        types[type_url] = TypeSnapshot(type_url, set_version(built.values()), MappingProxyType(built))
    digest = _digest()
    for type_url in TYPE_ORDER:
        _feed(digest, type_url)
        _feed(digest, types[type_url].version)
    return Snapshot(gateway, digest.hexdigest(), MappingProxyType(types))


def empty_snapshot(gateway: str) -> Snapshot:
    return build_snapshot(gateway, {})
