"""Serialized discovery responses, built once and shared by every stream that needs them.

A body is a DiscoveryResponse or DeltaDiscoveryResponse without its nonce. N proxies of
one Gateway that need the same update share one body; each stream appends its own nonce
field (`with_nonce`), which costs one small allocation instead of a re-serialization.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

from controlplane.snapshot.model import Resource, Snapshot
from controlplane.snapshot.wire import length_delimited

# DiscoveryResponse: version_info = 1, type_url = 4, nonce = 5.
# DeltaDiscoveryResponse: system_version_info = 1, type_url = 4, nonce = 5, removed_resources = 6.
_VERSION_FIELD = 1
_TYPE_URL_FIELD = 4
_NONCE_FIELD = 5
_REMOVED_FIELD = 6

# Entries per Gateway beyond the current snapshot's; Delta bodies vary with client state.
DEFAULT_ENTRIES_PER_GATEWAY = 256


def with_nonce(body: bytes, nonce: str) -> bytes:
    """The body with its nonce field appended (protobuf merges appended fields)."""
    return body + length_delimited(_NONCE_FIELD, nonce.encode())


def sotw_body(type_url: str, version: str, resources: Iterable[Resource]) -> bytes:
    return b"".join(
        (
            length_delimited(_VERSION_FIELD, version.encode()),
            *(r.sotw_field for r in resources),
            length_delimited(_TYPE_URL_FIELD, type_url.encode()),
        )
    )


def delta_body(type_url: str, system_version: str, upserts: Iterable[Resource], removals: Iterable[str]) -> bytes:
    return b"".join(
        (
            length_delimited(_VERSION_FIELD, system_version.encode()),
            *(r.delta_field for r in upserts),
            length_delimited(_TYPE_URL_FIELD, type_url.encode()),
            *(length_delimited(_REMOVED_FIELD, name.encode()) for name in removals),
        )
    )


def _names_digest(upserts: Sequence[Resource], removals: Sequence[str]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for resource in upserts:
        digest.update(resource.name.encode() + b"\0")
    digest.update(b"\1")
    for name in removals:
        digest.update(name.encode() + b"\0")
    return digest.digest()


class ResponseCache:
    """Bodies keyed by (type URL, version, variant) per Gateway, bounded.

    A SotW body is fully named by the version of its set. A Delta body also depends on
    which resources the client lacks, so its key adds a digest of the names it carries.
    `retain(snapshot)` drops bodies of superseded versions; an LRU bound caps the rest.
    """

    def __init__(self, max_entries_per_gateway: int = DEFAULT_ENTRIES_PER_GATEWAY) -> None:
        self._max = max_entries_per_gateway
        self._bodies: dict[str, OrderedDict[tuple[str, str, Hashable], bytes]] = {}
        self.builds = 0
        self.hits = 0

    def _lookup(self, gateway: str, key: tuple[str, str, Hashable]) -> bytes | None:
        entries = self._bodies.get(gateway)
        if entries is None:
            return None
        body = entries.get(key)
        if body is not None:
            entries.move_to_end(key)
            self.hits += 1
        return body

    def _store(self, gateway: str, key: tuple[str, str, Hashable], body: bytes) -> bytes:
        entries = self._bodies.setdefault(gateway, OrderedDict())
        entries[key] = body
        if len(entries) > self._max:
            entries.popitem(last=False)
        self.builds += 1
        return body

    def sotw(self, gateway: str, type_url: str, version: str, resources: Sequence[Resource]) -> bytes:
        key = (type_url, version, "sotw")
        body = self._lookup(gateway, key)
        if body is None:
            body = self._store(gateway, key, sotw_body(type_url, version, resources))
        return body

    def delta(
        self,
        gateway: str,
        type_url: str,
        system_version: str,
        upserts: Sequence[Resource],
        removals: Sequence[str],
        *,
        complete: bool = False,
    ) -> bytes:
        """`complete`: the upserts are the whole type (keyed without hashing every name)."""
        key = (type_url, system_version, "complete" if complete else _names_digest(upserts, removals))
        body = self._lookup(gateway, key)
        if body is None:
            body = self._store(gateway, key, delta_body(type_url, system_version, upserts, removals))
        return body

    def retain(self, snapshot: Snapshot) -> None:
        """Drop this Gateway's bodies whose version is no longer the snapshot's version of their type."""
        entries = self._bodies.get(snapshot.gateway)
        if not entries:
            return
        current = {(t, s.version) for t, s in snapshot.types.items()}
        for key in [k for k in entries if (k[0], k[1]) not in current]:
            del entries[key]

    def entries(self, gateway: str) -> int:
        return len(self._bodies.get(gateway, ()))
