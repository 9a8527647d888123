"""The text/event-stream parser against the WHATWG interpretation rules."""

from __future__ import annotations

import pytest

from dataplane.mcp.sse import SseEvent, SseEventTooLarge, SseParser

STREAM = (
    b"\xef\xbb\xbf: a comment\r\n"
    b"retry: 1500\r\n"
    b"id: 7\r\n"
    b"event: message\r\n"
    b'data: {"a":\r\n'
    b"data:1}\r\n"
    b"\r\n"
    b"data\n"
    b"\n"
    b"id: 8\r"
    b"event: ping\r"
    b"data:  two spaces\r"
    b"\r"
    b"id: bad\x00id\n"
    b"data: last\n"
    b"\n"
)
EXPECTED = [
    SseEvent("message", '{"a":\n1}', "7", 1500),
    SseEvent("message", "", "7", None),
    SseEvent("ping", " two spaces", "8", None),
    SseEvent("message", "last", "8", None),
]


def parse_in_pieces(pieces: list[bytes], max_event_bytes: int = 1 << 20) -> list[SseEvent]:
    parser = SseParser(max_event_bytes)
    events: list[SseEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events


def test_whole_stream_yields_every_event_with_ids_retry_and_data_lines_joined() -> None:
    assert parse_in_pieces([STREAM]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_a_split_at_any_byte_boundary_gives_the_same_events(cut: int) -> None:
    assert parse_in_pieces([STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_one_byte_at_a_time_gives_the_same_events() -> None:
    assert parse_in_pieces([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending_separates_lines_and_events(eol: bytes) -> None:
    stream = eol.join([b"data: one", b"data: two", b"", b"data: three", b"", b""])
    assert [e.data for e in parse_in_pieces([stream])] == ["one\ntwo", "three"]


def test_cr_then_lf_in_the_next_chunk_is_one_line_end_not_an_empty_line() -> None:
    # Were the LF read as a second line end, "data: a" would be dispatched early, alone.
    events = parse_in_pieces([b"data: a\r", b"\ndata: b\r\n\r\n"])
    assert events == [SseEvent("message", "a\nb", None)]


def test_an_event_without_its_blank_line_is_not_dispatched() -> None:
    parser = SseParser()
    assert parser.feed(b"id: 1\ndata: unfinished\n") == []
    assert parser.last_event_id == "1"


def test_fields_without_data_dispatch_nothing_but_id_and_retry_persist() -> None:
    parser = SseParser()
    assert parser.feed(b"id: 42\nretry: 10\nevent: x\n\n") == []
    assert (parser.last_event_id, parser.retry) == ("42", 10)
    assert parser.feed(b"data: y\n\n") == [SseEvent("message", "y", "42", None)]


def test_invalid_retry_and_unknown_fields_are_ignored() -> None:
    parser = SseParser()
    assert parser.feed(b"retry: 1a\nfoo: bar\ndata: z\n\n") == [SseEvent("message", "z", None, None)]
    assert parser.retry is None


def test_an_empty_id_resets_the_last_event_id() -> None:
    parser = SseParser()
    parser.feed(b"id: 1\ndata: a\n\n")
    assert parser.feed(b"id\ndata: b\n\n") == [SseEvent("message", "b", "", None)]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse_in_pieces([b"data: \xff\n\n"]) == [SseEvent("message", "\ufffd", None)]


def test_an_oversized_event_is_rejected_across_many_data_lines() -> None:
    parser = SseParser(max_event_bytes=64)
    with pytest.raises(SseEventTooLarge):
        for _ in range(10):
            parser.feed(b"data: 0123456789\n")


def test_an_oversized_line_is_rejected_before_its_end_arrives() -> None:
    parser = SseParser(max_event_bytes=64)
    with pytest.raises(SseEventTooLarge):
        parser.feed(b": comment " + b"x" * 100)


def test_the_bound_applies_per_event_not_per_stream() -> None:
    parser = SseParser(max_event_bytes=64)
    events: list[SseEvent] = []
    for _ in range(20):
        events.extend(parser.feed(b"data: 0123456789\n\n"))
    assert len(events) == 20
