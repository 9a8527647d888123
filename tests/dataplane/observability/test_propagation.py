"""Trace context on the wire: W3C traceparent/tracestate, B3 single and multi, MCP `_meta`."""

from __future__ import annotations

import pytest
from mcp.shared._otel import extract_trace_context
from opentelemetry.trace import get_current_span

from dataplane.observability.propagation import (
    B3Style,
    IncomingContext,
    extract,
    extract_mcp_meta,
    inject,
    inject_mcp_meta,
    parse_traceparent,
    parse_tracestate,
)

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_w3c_traceparent_sampled_and_not() -> None:
    assert extract([(b"traceparent", TRACEPARENT)]) == IncomingContext(TRACE, SPAN, True)
    unsampled = TRACEPARENT[:-2] + b"00"
    assert extract([(b"host", b"x"), (b"traceparent", unsampled)]) == IncomingContext(TRACE, SPAN, False)
    # Only bit 0 of the flags is the sampled flag.
    assert parse_traceparent(TRACEPARENT[:-2] + b"03") == (TRACE, SPAN, True)
    assert parse_traceparent(b"  " + TRACEPARENT + b"\t") == (TRACE, SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT.upper(),  # hex must be lower-case
        b"ff" + TRACEPARENT[2:],  # version ff is forbidden
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        TRACEPARENT[:-1],  # too short
        TRACEPARENT + b"-extra",  # version 00 has exactly four fields
        b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",  # misplaced dash
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"",
        b"garbage",
    ],
)
def test_malformed_traceparent_is_ignored(value: bytes) -> None:
    assert parse_traceparent(value) is None
    assert extract([(b"traceparent", value), (b"tracestate", b"a=1")]) is None


def test_future_version_keeps_the_known_fields() -> None:
    assert parse_traceparent(b"cc" + TRACEPARENT[2:] + b"-what-comes-next") == (TRACE, SPAN, True)
    assert parse_traceparent(b"cc" + TRACEPARENT[2:] + b"x") is None


def test_two_traceparent_fields_are_ignored() -> None:
    assert extract([(b"traceparent", TRACEPARENT), (b"traceparent", TRACEPARENT)]) is None


def test_tracestate_is_joined_validated_and_normalized() -> None:
    context = extract(
        [(b"traceparent", TRACEPARENT), (b"tracestate", b"congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"),
         (b"tracestate", b" ,tenant@vendor=x ")]
    )
    assert context is not None
    assert context.tracestate == b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,tenant@vendor=x"


@pytest.mark.parametrize(
    "value",
    [
        b"Upper=1",  # keys are lower-case
        b"a=1,a=2",  # a key may appear once
        b"novalue",
        b"a=b=c",  # '=' is not allowed in a value
        b"a=caf\xc3\xa9",  # values are printable ASCII
        b"a=" + b"x" * 257,  # values are at most 256 characters
        b",".join(b"k%d=v" % i for i in range(33)),  # at most 32 members
    ],
)
def test_invalid_tracestate_is_dropped_but_traceparent_kept(value: bytes) -> None:
    assert parse_tracestate([value]) == b""
    assert extract([(b"traceparent", TRACEPARENT), (b"tracestate", value)]) == IncomingContext(TRACE, SPAN, True)


def test_tracestate_alone_is_nothing() -> None:
    assert extract([(b"tracestate", b"a=1")]) is None


def test_b3_single_header() -> None:
    full = b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3ac9a4f6e3b90"
    assert extract([(b"b3", full)]) == IncomingContext(TRACE, SPAN, True, b3=B3Style.SINGLE)
    assert extract([(b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0")]) == IncomingContext(
        TRACE, SPAN, False, b3=B3Style.SINGLE
    )
    # Debug means sampled; no sampling state means the caller deferred the decision.
    assert extract([(b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-d")]).sampled is True  # type: ignore[union-attr]
    assert extract([(b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")]) == IncomingContext(
        TRACE, SPAN, None, b3=B3Style.SINGLE
    )
    # A 64-bit trace id is the low half of a 128-bit one.
    assert extract([(b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7-1")]) == IncomingContext(
        0xA3CE929D0E0E4736, SPAN, True, b3=B3Style.SINGLE
    )


def test_b3_single_sampling_only() -> None:
    assert extract([(b"b3", b"0")]) == IncomingContext(0, 0, False, b3=B3Style.SINGLE)
    assert extract([(b"b3", b"1")]) == IncomingContext(0, 0, True, b3=B3Style.SINGLE)
    assert extract([(b"b3", b"d")]) == IncomingContext(0, 0, True, b3=B3Style.SINGLE)


@pytest.mark.parametrize(
    "value",
    [
        b"2",
        b"4bf92f3577b34da6a3ce929d0e0e4736",  # no span id
        b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-2",  # bad sampling state
        b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3",  # short parent id
        b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1-05e3ac9a4f6e3b90-x",  # five fields
        b"4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-1",  # upper-case hex
        b"4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-1",  # 31 hex digits
        b"00000000000000000000000000000000-00f067aa0ba902b7-1",  # zero trace id
        b"4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-1",  # zero span id
    ],
)
def test_malformed_b3_single_is_ignored(value: bytes) -> None:
    assert extract([(b"b3", value)]) is None


def test_b3_multi_headers() -> None:
    headers = [
        (b"x-b3-traceid", b"4bf92f3577b34da6a3ce929d0e0e4736"),
        (b"x-b3-spanid", b"00f067aa0ba902b7"),
        (b"x-b3-parentspanid", b"05e3ac9a4f6e3b90"),
        (b"x-b3-sampled", b"1"),
    ]
    assert extract(headers) == IncomingContext(TRACE, SPAN, True, b3=B3Style.MULTI)
    assert extract([*headers[:2], (b"x-b3-sampled", b"0")]).sampled is False  # type: ignore[union-attr]
    assert extract([*headers[:2], (b"x-b3-sampled", b"true")]).sampled is True  # type: ignore[union-attr]
    assert extract(headers[:2]).sampled is None  # type: ignore[union-attr]
    # Debug (X-B3-Flags: 1) means sampled, whatever X-B3-Sampled says.
    assert extract([*headers[:2], (b"x-b3-flags", b"1"), (b"x-b3-sampled", b"0")]).sampled is True  # type: ignore[union-attr]


def test_b3_multi_sampling_only_and_malformed() -> None:
    assert extract([(b"x-b3-sampled", b"0")]) == IncomingContext(0, 0, False, b3=B3Style.MULTI)
    assert extract([(b"x-b3-flags", b"1")]) == IncomingContext(0, 0, True, b3=B3Style.MULTI)
    # Ids that do not parse leave only the decision, or nothing.
    assert extract([(b"x-b3-traceid", b"xyz"), (b"x-b3-spanid", b"00f067aa0ba902b7")]) is None
    assert extract([(b"x-b3-traceid", b"4bf92f3577b34da6a3ce929d0e0e4736")]) is None
    assert extract(
        [(b"x-b3-traceid", b"4bf92f3577b34da6a3ce929d0e0e4736"), (b"x-b3-spanid", b"short"), (b"x-b3-sampled", b"1")]
    ) == IncomingContext(0, 0, True, b3=B3Style.MULTI)
    assert extract([(b"x-b3-sampled", b"maybe")]) is None


def test_precedence_w3c_then_single_then_multi() -> None:
    single = (b"b3", b"a3ce929d0e0e4736a3ce929d0e0e4736-1111111111111111-0")
    multi = [(b"x-b3-traceid", b"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"), (b"x-b3-spanid", b"2222222222222222")]
    both = extract([single, (b"traceparent", TRACEPARENT), *multi])
    # W3C wins, and the request is remembered as a B3 one (the upstream gets B3 back too).
    assert both == IncomingContext(TRACE, SPAN, True, b3=B3Style.SINGLE)
    assert extract([single, *multi]).trace_id == 0xA3CE929D0E0E4736A3CE929D0E0E4736  # type: ignore[union-attr]
    fallback = extract([(b"traceparent", b"00-bad"), *multi])
    assert fallback == IncomingContext(0xBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB, 0x2222222222222222, None, b3=B3Style.MULTI)


def test_no_trace_headers() -> None:
    assert extract([]) is None
    assert extract([(b"host", b"example"), (b"accept", b"*/*")]) is None


def test_inject_replaces_client_copies_and_keeps_the_rest_in_order() -> None:
    headers = [
        (b"host", b"up"),
        (b"traceparent", b"00-11111111111111111111111111111111-2222222222222222-01"),
        (b"tracestate", b"old=1"),
        (b"b3", b"1"),
        (b"x-b3-traceid", b"1111111111111111"),
        (b"x-b3-spanid", b"2222222222222222"),
        (b"x-b3-parentspanid", b"3333333333333333"),
        (b"x-b3-sampled", b"1"),
        (b"x-b3-flags", b"1"),
        (b"accept", b"*/*"),
    ]
    out = inject(headers, TRACE, 0x1234, True, b"rojo=1", B3Style.NONE)
    assert out == [
        (b"host", b"up"),
        (b"accept", b"*/*"),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-01"),
        (b"tracestate", b"rojo=1"),
    ]
    assert len(headers) == 10  # the input is left alone


def test_inject_b3_in_the_style_the_client_used() -> None:
    single = inject([], TRACE, SPAN, False, b"", B3Style.SINGLE)
    assert single == [
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        (b"b3", b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"),
    ]
    multi = inject([], 0xA3CE929D0E0E4736, SPAN, True, b"", B3Style.MULTI)
    assert multi[1:] == [
        (b"x-b3-traceid", b"0000000000000000a3ce929d0e0e4736"),
        (b"x-b3-spanid", b"00f067aa0ba902b7"),
        (b"x-b3-sampled", b"1"),
    ]
    # What we send parses back to the same context.
    assert extract(single) == IncomingContext(TRACE, SPAN, False, b3=B3Style.SINGLE)
    assert extract(multi) == IncomingContext(0xA3CE929D0E0E4736, SPAN, True, b3=B3Style.MULTI)


def test_mcp_meta_inject_copies_and_keeps_other_keys() -> None:
    params = {"name": "search", "arguments": {"q": "x"}, "_meta": {"progressToken": 7, "baggage": "k=v",
                                                                  "traceparent": "00-client", "tracestate": "c=1"}}
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out = inject_mcp_meta(params, traceparent, "")
    assert out == {"name": "search", "arguments": {"q": "x"},
                   "_meta": {"progressToken": 7, "baggage": "k=v", "traceparent": traceparent}}
    assert params["_meta"]["traceparent"] == "00-client"  # a fan-out's shared params stay as they were
    assert inject_mcp_meta(None, traceparent, "a=1") == {"_meta": {"traceparent": traceparent, "tracestate": "a=1"}}


def test_mcp_meta_round_trip_through_the_mcp_sdk() -> None:
    """The official MCP SDK's server-side extraction reads what we put in `_meta`."""
    out = inject_mcp_meta({}, TRACEPARENT.decode(), "rojo=00f067aa0ba902b7")
    context = extract_trace_context(out["_meta"])
    assert context is not None
    span_context = get_current_span(context).get_span_context()
    assert (span_context.trace_id, span_context.span_id, span_context.trace_flags.sampled) == (TRACE, SPAN, True)
    assert span_context.trace_state.get("rojo") == "00f067aa0ba902b7"
    # And we read what an MCP client puts there.
    assert extract_mcp_meta(out) == IncomingContext(TRACE, SPAN, True, b"rojo=00f067aa0ba902b7")


@pytest.mark.parametrize(
    "params",
    [None, [], {"_meta": "x"}, {"_meta": {"traceparent": 5}}, {"_meta": {"traceparent": "00-bad"}},
     {"_meta": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é"}}],
)
def test_mcp_meta_without_a_valid_context(params: object) -> None:
    assert extract_mcp_meta(params) is None
