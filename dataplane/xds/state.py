"""What a proxy has accepted from the control plane, per type, and how a response changes it.

Pure: a response is turned into a candidate view of *all* types; the caller compiles and
applies that candidate as one unit and only then commits it here. A rejected response
leaves the accepted state untouched, so the proxy keeps serving its last good config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from shared.resources import TYPE_ORDER, short_name, unpack


class ResponseRejected(Exception):
    """A response that cannot be decoded; the message names the resource."""


@dataclass
class TypeState:
    """Accepted resources of one type: name -> (version, message)."""

    version: str = ""
    resources: dict[str, tuple[str, Message]] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """All types as they would be after applying one response."""

    type_url: str
    version: str
    nonce: str
    type_resources: dict[str, tuple[str, Message]]

    def config_version(self, states: Mapping[str, TypeState]) -> str:
        """One label for the whole config: a short hash of every type's version."""
        parts = []
        for type_url in TYPE_ORDER:
            version = self.version if type_url == self.type_url else states[type_url].version
            parts.append(f"{short_name(type_url)}={version}")
        return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


class SubscriptionState:
    """Accepted state for every subscribed type of one ADS subscription."""

    def __init__(self, type_urls: tuple[str, ...] = TYPE_ORDER) -> None:
        self.types: dict[str, TypeState] = {t: TypeState() for t in type_urls}
        # Types for which at least one response has been accepted: the initial sync is
        # complete once every subscribed type is here (a proxy is not ready before).
        self.received: set[str] = set()

    def resources(self, candidate: Candidate | None = None) -> dict[str, dict[str, Message]]:
        """type URL -> name -> message, with the candidate's type replaced if given."""
        out: dict[str, dict[str, Message]] = {}
        for type_url, state in self.types.items():
            entries = candidate.type_resources if candidate and candidate.type_url == type_url else state.resources
            out[type_url] = {name: msg for name, (_, msg) in entries.items()}
        return out

    def _check_type(self, type_url: str) -> None:
        if type_url not in self.types:
            raise ResponseRejected(f"response for unsubscribed type {type_url!r}")

    def candidate_from_sotw(self, response: discovery_pb2.DiscoveryResponse) -> Candidate:
        """A state-of-the-world response replaces the whole set of its type."""
        self._check_type(response.type_url)
        entries: dict[str, tuple[str, Message]] = {}
        for index, packed in enumerate(response.resources):
            try:
                message = unpack(response.type_url, packed)
            except ValueError as exc:
                raise ResponseRejected(f"{short_name(response.type_url)} resources[{index}]: {exc}") from None
            name = getattr(message, "name", "")
            if not name:
                raise ResponseRejected(f"{short_name(response.type_url)} resources[{index}]: name is empty")
            if name in entries:
                raise ResponseRejected(f"{short_name(response.type_url)} {name}: sent twice in one response")
            entries[name] = (response.version_info, message)
        return Candidate(response.type_url, response.version_info, response.nonce, entries)

    def candidate_from_delta(self, response: discovery_pb2.DeltaDiscoveryResponse) -> Candidate:
        """A delta response upserts and removes named resources of its type."""
        self._check_type(response.type_url)
        entries = dict(self.types[response.type_url].resources)
        kind = short_name(response.type_url)
        for resource in response.resources:
            try:
                message = unpack(response.type_url, resource.resource)
            except ValueError as exc:
                raise ResponseRejected(f"{kind} {resource.name}: {exc}") from None
            if getattr(message, "name", "") != resource.name:
                raise ResponseRejected(f"{kind} {resource.name}: resource name does not match its body")
            entries[resource.name] = (resource.version, message)
        for name in response.removed_resources:
            entries.pop(name, None)
        return Candidate(response.type_url, response.system_version_info, response.nonce, entries)

    def commit(self, candidate: Candidate) -> None:
        state = self.types[candidate.type_url]
        state.version = candidate.version
        state.resources = candidate.type_resources
        self.received.add(candidate.type_url)

    @property
    def synced(self) -> bool:
        return len(self.received) == len(self.types)

    def initial_versions(self, type_url: str) -> dict[str, str]:
        """For a Delta reconnect: what we hold, so the server sends only the difference."""
        return {name: version for name, (version, _) in self.types[type_url].resources.items()}
