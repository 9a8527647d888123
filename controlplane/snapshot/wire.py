"""The two pieces of the protobuf wire format we write by hand.

Responses are assembled from pre-serialized resources instead of being rebuilt as
messages per stream: a length-delimited field is tag, length, bytes; and a parser merges
fields in any order, so appending a field to a serialized message sets that field.
"""

from __future__ import annotations

_WIRE_TYPE_LEN = 2


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One string/bytes/message field: tag, length, payload."""
    return varint(field_number << 3 | _WIRE_TYPE_LEN) + varint(len(payload)) + payload
