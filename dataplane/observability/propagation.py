"""Trace context on the wire (sans-I/O): W3C Trace Context and B3 read from request headers, written
into upstream request headers and into MCP `params._meta`.

Headers are our lists of (lower-case name, value) bytes. One pass finds the fields; anything
malformed is ignored as if absent (a client cannot break a request through its trace headers), as
the W3C and B3 specs ask. Precedence: a valid `traceparent`, else a valid single `b3`, else valid
`X-B3-*` fields. `tracestate` is only read along with a valid `traceparent`.

MCP (SEP-414): the unprefixed `_meta` keys `traceparent` and `tracestate` carry the same W3C values
inside JSON-RPC requests, for targets without headers (stdio); `baggage` is left as the client sent it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, Final

Headers = list[tuple[bytes, bytes]]

# Every field a client may send that says which trace a request belongs to: all are replaced on the
# way upstream when tracing is on (a stale copy would tie the upstream to another trace).
TRACE_HEADER_NAMES: Final = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)

_HEX: Final = b"0123456789abcdef"
_OWS: Final = b" \t"
# A tracestate longer than this is dropped whole (the spec lets vendors cut at 512 characters; this
# keeps every real one and bounds the work on hostile input).
_TRACESTATE_MAX: Final = 8192
_TRACESTATE_MAX_MEMBERS: Final = 32
_TRACESTATE_KEY: Final = re.compile(
    rb"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
# 0-255 chars of %x20-2B / %x2D-3C / %x3E-7E, not ending in a space.
_TRACESTATE_VALUE: Final = re.compile(rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


class B3Style(IntEnum):
    """Whether (and how) the request carried B3, so the upstream gets the same style back."""

    NONE = 0
    SINGLE = 1  # one `b3` header
    MULTI = 2  # X-B3-TraceId, X-B3-SpanId, X-B3-Sampled...


class IncomingContext:
    """The trace a request continues. `trace_id` and `span_id` are 0 when the caller sent only a
    sampling decision (B3 `b3: 0`, `X-B3-Sampled: 1`); `sampled` is None when it deferred the decision
    (B3 ids without a sampling state). `tracestate` is validated W3C tracestate, b"" when none."""

    __slots__ = ("b3", "sampled", "span_id", "trace_id", "tracestate")

    def __init__(
        self, trace_id: int, span_id: int, sampled: bool | None, tracestate: bytes = b"", b3: B3Style = B3Style.NONE
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate
        self.b3 = b3

    @property
    def has_ids(self) -> bool:
        return self.trace_id != 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IncomingContext) and (
            self.trace_id,
            self.span_id,
            self.sampled,
            self.tracestate,
            self.b3,
        ) == (other.trace_id, other.span_id, other.sampled, other.tracestate, other.b3)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"IncomingContext(trace_id={self.trace_id:032x}, span_id={self.span_id:016x}, "
            f"sampled={self.sampled}, tracestate={self.tracestate!r}, b3={self.b3.name})"
        )


# Header name -> slot in the values `extract` collects.
_TRACEPARENT, _TRACESTATE, _B3, _B3_TRACE, _B3_SPAN, _B3_SAMPLED, _B3_FLAGS = range(7)
_SLOTS: Final[Mapping[bytes, int]] = {
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
    b"b3": _B3,
    b"x-b3-traceid": _B3_TRACE,
    b"x-b3-spanid": _B3_SPAN,
    b"x-b3-sampled": _B3_SAMPLED,
    b"x-b3-flags": _B3_FLAGS,
}


def extract(headers: Headers) -> IncomingContext | None:
    """The trace context of a request, or None when it carries no usable one."""
    slots = _SLOTS
    found: list[list[bytes] | None] | None = None
    for name, value in headers:
        slot = slots.get(name)
        if slot is None:
            continue
        if found is None:
            found = [None] * 7
        values = found[slot]
        if values is None:
            found[slot] = [value]
        else:
            values.append(value)
    if found is None:
        return None
    b3 = _b3_single(found[_B3]) or _b3_multi(found)
    traceparent = found[_TRACEPARENT]
    if traceparent is not None and len(traceparent) == 1:
        parsed = parse_traceparent(traceparent[0])
        if parsed is not None:
            tracestate = found[_TRACESTATE]
            return IncomingContext(
                parsed[0],
                parsed[1],
                parsed[2],
                b"" if tracestate is None else parse_tracestate(tracestate),
                B3Style.NONE if b3 is None else b3.b3,
            )
    return b3


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent id, sampled) of a W3C traceparent, or None when it is not valid."""
    value = value.strip(_OWS)
    size = len(value)
    if size < 55 or (size > 55 and (value[:2] == b"00" or value[55:56] != b"-")):
        return None
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version, trace, parent, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == b"ff" or not _lower_hex(version + trace + parent + flags):
        return None
    trace_id = int(trace, 16)
    span_id = int(parent, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def parse_tracestate(values: list[bytes]) -> bytes:
    """The W3C tracestate of one or more header fields (joined), normalized; b"" when any member is
    invalid, a key repeats, or there are more than 32 members (the whole field is then dropped)."""
    joined = values[0] if len(values) == 1 else b",".join(values)
    if len(joined) > _TRACESTATE_MAX:
        return b""
    members: list[bytes] = []
    keys: set[bytes] = set()
    for raw in joined.split(b","):
        member = raw.strip(_OWS)
        if not member:
            continue
        key, sep, val = member.partition(b"=")
        if not sep or key in keys or not _TRACESTATE_KEY.fullmatch(key) or not _TRACESTATE_VALUE.fullmatch(val):
            return b""
        keys.add(key)
        members.append(member)
    if len(members) > _TRACESTATE_MAX_MEMBERS:
        return b""
    return b",".join(members)


def _lower_hex(value: bytes) -> bool:
    return bool(value) and not value.translate(None, _HEX)


def _b3_trace_id(value: bytes) -> int:
    """A B3 trace id (16 or 32 lower-hex; a 64-bit id is the low half of a 128-bit one), 0 if invalid."""
    if len(value) not in (16, 32) or not _lower_hex(value):
        return 0
    return int(value, 16)


def _b3_span_id(value: bytes) -> int:
    if len(value) != 16 or not _lower_hex(value):
        return 0
    return int(value, 16)


_B3_SAMPLING: Final[Mapping[bytes, bool]] = {b"0": False, b"1": True, b"d": True}


def _b3_single(values: list[bytes] | None) -> IncomingContext | None:
    """`b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or just `b3: {SamplingState}`."""
    if values is None or len(values) != 1:
        return None
    value = values[0].strip(_OWS)
    if len(value) == 1:
        sampled = _B3_SAMPLING.get(value)
        return None if sampled is None else IncomingContext(0, 0, sampled, b3=B3Style.SINGLE)
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = _b3_span_id(parts[1])
    if trace_id == 0 or span_id == 0:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        sampled = _B3_SAMPLING.get(parts[2])
        if sampled is None:
            return None
    if len(parts) == 4 and _b3_span_id(parts[3]) == 0:
        return None
    return IncomingContext(trace_id, span_id, sampled, b3=B3Style.SINGLE)


_B3_SAMPLED_VALUES: Final[Mapping[bytes, bool]] = {b"1": True, b"0": False, b"true": True, b"false": False}


def _b3_multi(found: list[list[bytes] | None]) -> IncomingContext | None:
    """X-B3-TraceId + X-B3-SpanId (+ X-B3-Sampled, X-B3-Flags: 1 for debug), or only a decision."""
    sampled: bool | None = None
    flags = found[_B3_FLAGS]
    if flags is not None and len(flags) == 1 and flags[0].strip(_OWS) == b"1":
        sampled = True
    else:
        decision = found[_B3_SAMPLED]
        if decision is not None and len(decision) == 1:
            sampled = _B3_SAMPLED_VALUES.get(decision[0].strip(_OWS).lower())
    trace_values, span_values = found[_B3_TRACE], found[_B3_SPAN]
    if trace_values is not None and span_values is not None and len(trace_values) == len(span_values) == 1:
        trace_id = _b3_trace_id(trace_values[0].strip(_OWS))
        span_id = _b3_span_id(span_values[0].strip(_OWS))
        if trace_id and span_id:
            return IncomingContext(trace_id, span_id, sampled, b3=B3Style.MULTI)
    if sampled is None:
        return None
    return IncomingContext(0, 0, sampled, b3=B3Style.MULTI)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def inject(
    headers: Headers, trace_id: int, span_id: int, sampled: bool, tracestate: bytes, b3: B3Style
) -> Headers:
    """`headers` without the client's trace fields, plus ours: traceparent (and tracestate) always,
    B3 in the style the request used."""
    names = TRACE_HEADER_NAMES
    out = [header for header in headers if header[0] not in names]
    out.append((b"traceparent", format_traceparent(trace_id, span_id, sampled)))
    if tracestate:
        out.append((b"tracestate", tracestate))
    if b3 == B3Style.SINGLE:
        out.append((b"b3", b"%032x-%016x-%s" % (trace_id, span_id, b"1" if sampled else b"0")))
    elif b3 == B3Style.MULTI:
        out.append((b"x-b3-traceid", b"%032x" % trace_id))
        out.append((b"x-b3-spanid", b"%016x" % span_id))
        out.append((b"x-b3-sampled", b"1" if sampled else b"0"))
    return out


def inject_mcp_meta(params: Mapping[str, Any] | None, traceparent: str, tracestate: str) -> dict[str, Any]:
    """A copy of JSON-RPC `params` whose `_meta` carries `traceparent` (and `tracestate`, or none),
    other `_meta` keys kept. The input is not changed: a fan-out sends one params to many targets."""
    out = dict(params) if params else {}
    meta = out.get("_meta")
    new_meta = dict(meta) if isinstance(meta, Mapping) else {}
    new_meta["traceparent"] = traceparent
    if tracestate:
        new_meta["tracestate"] = tracestate
    else:
        new_meta.pop("tracestate", None)
    out["_meta"] = new_meta
    return out


def extract_mcp_meta(params: Any) -> IncomingContext | None:
    """The W3C context in a JSON-RPC request's `params._meta` (an MCP client that puts it there
    rather than in headers), or None."""
    if not isinstance(params, Mapping):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, Mapping):
        return None
    traceparent = meta.get("traceparent")
    if not isinstance(traceparent, str) or not traceparent.isascii():
        return None
    parsed = parse_traceparent(traceparent.encode("ascii"))
    if parsed is None:
        return None
    tracestate = meta.get("tracestate")
    state = b""
    if isinstance(tracestate, str) and tracestate.isascii():
        state = parse_tracestate([tracestate.encode("ascii")])
    return IncomingContext(parsed[0], parsed[1], parsed[2], state)
