"""Our discovery resource types: type URLs, message classes and their send order.

Both planes import this so a type URL is spelled in one place. TYPE_ORDER lists
referenced types before the types whose resources refer to them (a Target names its
Backend, a Route names Listeners and Backends, a Policy names any of them): the
control plane sends updates in this order and removals in the reverse order.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from shared.api.agentgate.config.v1 import resources_pb2 as pb

TYPE_PREFIX = "type.googleapis.com/"

BACKEND = TYPE_PREFIX + pb.Backend.DESCRIPTOR.full_name
TARGET = TYPE_PREFIX + pb.Target.DESCRIPTOR.full_name
LISTENER = TYPE_PREFIX + pb.Listener.DESCRIPTOR.full_name
ROUTE = TYPE_PREFIX + pb.Route.DESCRIPTOR.full_name
POLICY = TYPE_PREFIX + pb.Policy.DESCRIPTOR.full_name

TYPE_ORDER: tuple[str, ...] = (BACKEND, TARGET, LISTENER, ROUTE, POLICY)

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    BACKEND: pb.Backend,
    TARGET: pb.Target,
    LISTENER: pb.Listener,
    ROUTE: pb.Route,
    POLICY: pb.Policy,
}

# Node metadata key under which a proxy names the Gateway it serves ("namespace/name").
GATEWAY_METADATA_KEY = "gateway"

# Resources of one gateway, grouped by type URL then by resource name.
ResourceMap = Mapping[str, Mapping[str, Message]]


def short_name(type_url: str) -> str:
    """'type.googleapis.com/agentgate.config.v1.Route' -> 'Route' (for logs and errors)."""
    return type_url.rsplit(".", 1)[-1]


def pack(message: Message) -> AnyProto:
    packed = AnyProto()
    packed.Pack(message, type_url_prefix=TYPE_PREFIX.rstrip("/"))
    return packed


def unpack(type_url: str, packed: AnyProto) -> Message:
    """Decode one resource; raises ValueError naming the problem."""
    cls = MESSAGE_TYPES.get(type_url)
    if cls is None:
        raise ValueError(f"unknown type URL {type_url!r}")
    if packed.type_url != type_url:
        raise ValueError(f"resource has type {packed.type_url!r}, expected {type_url!r}")
    message = cls()
    if not packed.Unpack(message):
        raise ValueError(f"cannot decode {short_name(type_url)}")
    return message
