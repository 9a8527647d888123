"""Small values passed between the stream protocol states and the gRPC shell around them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2

from shared.resources import GATEWAY_METADATA_KEY, MESSAGE_TYPES, TYPE_ORDER


class RequestRejected(Exception):
    """A request the protocol cannot accept; the stream ends with INVALID_ARGUMENT and this text."""


class SyncState(enum.StrEnum):
    SYNCED = "SYNCED"
    # A response is not yet ACKed, or the stream has not caught up with the snapshot.
    STALE = "STALE"
    NACKED = "NACKED"


class FeedbackKind(enum.Enum):
    SUBSCRIBE = "subscribe"
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class NackRecord:
    node_id: str
    gateway: str
    type_url: str
    version: str
    nonce: str
    code: int
    message: str
    at: float  # Unix time


@dataclass(frozen=True, slots=True)
class Feedback:
    """What one request meant, for metrics and logs."""

    kind: FeedbackKind
    type_url: str
    version: str = ""
    nonce: str = ""
    # Seconds from the push to its ACK.
    latency: float | None = None
    nack: NackRecord | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A response ready for the wire: the shared body with this stream's nonce appended."""

    type_url: str
    version: str
    nonce: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TypeStatus:
    type_url: str
    sent_version: str
    acked_version: str
    state: SyncState
    subscribed: tuple[str, ...]
    last_nack: NackRecord | None


def check_type_url(type_url: str) -> None:
    if type_url not in MESSAGE_TYPES:
        raise RequestRejected(f"unknown type_url {type_url!r}; this control plane serves {', '.join(TYPE_ORDER)}")


def node_identity(node: base_pb2.Node, *, present: bool) -> tuple[str, str]:
    """(node id, gateway) from the first request's node; RequestRejected says what is wrong."""
    if not present:
        raise RequestRejected("the first request of a stream must carry node")
    field = node.metadata.fields.get(GATEWAY_METADATA_KEY)
    if field is None or field.WhichOneof("kind") != "string_value":
        raise RequestRejected(
            f'node.metadata["{GATEWAY_METADATA_KEY}"] is missing or not a string: a proxy must name the Gateway '
            'it serves as "namespace/name"'
        )
    gateway = field.string_value
    namespace, slash, name = gateway.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise RequestRejected(f'node.metadata["{GATEWAY_METADATA_KEY}"] is {gateway!r}; expected "namespace/name"')
    return node.id, gateway
