"""The HTTP/1.1 codec and header rules, without sockets: bytes in, events out."""

from __future__ import annotations

from dataplane.http.h1codec import (
    END,
    EndOfMessage,
    ParseFailure,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    last_chunk,
    split_target,
    status_line,
)
from dataplane.http.headers import HeaderView, downstream_response_headers, upstream_request_headers


def events(parser: RequestParser | ResponseParser) -> list[object]:
    out = []
    while (event := parser.next_event()) is not None:
        out.append(event)
    return out


def test_simple_get_yields_head_then_end_with_lowercase_names() -> None:
    parser = RequestParser()
    parser.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: Example.com\r\nX-Thing: V\r\n\r\n")
    head, end = events(parser)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version, head.host) == (b"GET", b"/a?b=1", "1.1", b"Example.com")
    assert head.headers == [(b"host", b"Example.com"), (b"x-thing", b"V")]
    assert head.keep_alive and not head.has_body
    assert end is END


def test_head_split_across_many_reads() -> None:
    parser = RequestParser()
    raw = b"GET /long/path HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    for index in range(len(raw)):
        parser.feed(raw[index : index + 1])
    head, end = events(parser)
    assert isinstance(head, RequestHead) and head.target == b"/long/path" and end is END


def test_content_length_body_arrives_as_bytes_events() -> None:
    parser = RequestParser()
    parser.feed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    parser.feed(b"llo")
    head, *rest = events(parser)
    assert isinstance(head, RequestHead) and head.content_length == 5 and head.has_body
    assert rest == [b"he", b"llo", END]


def test_a_body_that_arrived_whole_is_taken_at_once_and_the_next_request_stays() -> None:
    parser = RequestParser()
    parser.feed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    parser.feed(b"lloGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.take_complete_body() == (b"hello", [])
    following = parser.next_event()
    assert isinstance(following, RequestHead) and following.target == b"/next"


def test_a_body_still_arriving_is_not_taken_and_nothing_is_consumed() -> None:
    parser = RequestParser()
    parser.feed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhe")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.take_complete_body() is None
    parser.feed(b"llo")
    assert events(parser) == [b"he", b"llo", END]


def test_a_chunked_body_with_trailers_is_left_to_streaming() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.take_complete_body() is None
    data, end = events(parser)
    assert data == b"abc" and isinstance(end, EndOfMessage) and end.trailers == [(b"x-sum", b"9")]


def test_chunked_body_with_trailers() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n")
    head, data, end = events(parser)
    assert isinstance(head, RequestHead) and head.chunked
    assert data == b"abc"
    assert isinstance(end, EndOfMessage) and end.trailers == [(b"x-sum", b"9")]


def test_pipelined_requests_come_out_in_order() -> None:
    parser = RequestParser()
    parser.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    out = events(parser)
    assert [e.target for e in out if isinstance(e, RequestHead)] == [b"/1", b"/2"]
    assert out.count(END) == 2


def test_http10_without_keepalive_is_not_keepalive() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.0\r\n\r\n")
    head = parser.next_event()
    assert isinstance(head, RequestHead) and head.version == "1.0" and not head.keep_alive


def test_absolute_form_target_is_split_into_authority_and_path() -> None:
    parser = RequestParser()
    parser.feed(b"GET http://example.com:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
    head = parser.next_event()
    assert isinstance(head, RequestHead)
    assert (head.authority, head.target) == (b"example.com:8080", b"/x?y")
    assert split_target(b"https://h?q=1") == (b"h", b"/?q=1")
    assert split_target(b"nonsense") is None


def test_malformed_request_line_fails_with_400() -> None:
    parser = RequestParser()
    parser.feed(b"BLAH\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400
    parser.feed(b"GET / HTTP/1.1\r\n\r\n")  # nothing after a failure
    assert parser.next_event() is None


def test_missing_host_on_http11_fails_with_400() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400 and "Host" in failure.reason


def test_duplicate_host_fails_with_400() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400


def test_content_length_with_chunked_is_rejected() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400


def test_oversized_head_in_one_read_fails_with_431() -> None:
    parser = RequestParser(max_head_bytes=1024)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 431


def test_oversized_head_over_several_reads_fails_with_431() -> None:
    parser = RequestParser(max_head_bytes=1024)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    for _ in range(20):
        parser.feed(b"X-Filler: " + b"b" * 90 + b"\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 431


def test_large_body_does_not_count_against_the_head_limit() -> None:
    parser = RequestParser(max_head_bytes=1024)
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000)
    out = events(parser)
    assert isinstance(out[0], RequestHead) and out[-1] is END
    assert b"".join(e for e in out if isinstance(e, bytes)) == b"z" * 5000


def test_too_many_headers_fails_with_431() -> None:
    parser = RequestParser(max_header_count=5)
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10)) + b"\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 431


def test_upgrade_request_is_served_as_plain_http_and_the_next_request_still_parses() -> None:
    parser = RequestParser()
    parser.feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AA\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    out = events(parser)
    heads = [e for e in out if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/", b"/next"] and heads[0].upgrade


def test_upgrade_request_with_body_is_refused() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nabc")
    out = events(parser)
    assert isinstance(out[-1], ParseFailure) and out[-1].status == 501


def test_response_with_content_length_and_keepalive() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: x\r\n\r\nok")
    head, data, end = events(parser)
    assert isinstance(head, ResponseHead) and head.status == 200 and head.content_length == 2 and head.keep_alive
    assert (data, end) == (b"ok", END) and parser.reusable


def test_response_skips_1xx_informational_heads() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    head, end = events(parser)
    assert isinstance(head, ResponseHead) and head.status == 204 and end is END


def test_response_to_head_ends_at_the_head_and_is_not_reused() -> None:
    parser = ResponseParser()
    parser.expect(head_request=True)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    head, end = events(parser)
    assert isinstance(head, ResponseHead) and head.content_length == 100 and end is END
    assert not parser.reusable


def test_read_until_close_body_ends_at_eof() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.0 200 OK\r\n\r\nsome")
    parser.feed(b" data")
    parser.feed_eof()
    head, *rest = events(parser)
    assert isinstance(head, ResponseHead) and not head.keep_alive
    assert rest == [b"some", b" data", END]


def test_truncated_response_is_a_failure_at_eof() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    parser.feed_eof()
    out = events(parser)
    assert isinstance(out[-1], ParseFailure) and out[-1].status == 502


def test_garbage_response_fails_with_502() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"this is not http\r\n\r\n")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 502


def test_101_switching_protocols_is_refused() -> None:
    parser = ResponseParser()
    parser.expect(head_request=False)
    parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert any(isinstance(e, ParseFailure) for e in events(parser))


def test_serialization_helpers() -> None:
    assert status_line(404) == b"HTTP/1.1 404 Not Found\r\n"
    assert status_line(299) == b"HTTP/1.1 299 Status\r\n"
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert last_chunk([]) == b"0\r\n\r\n"
    assert last_chunk([(b"x", b"1")]) == b"0\r\nx: 1\r\n\r\n"


# --- header rules ---------------------------------------------------------------------------------


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in headers]


def test_request_hop_by_hop_headers_and_connection_listed_ones_are_removed() -> None:
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, X-Private"),
        (b"x-private", b"secret"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"gzip"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-authenticate", b"Basic"),
        (b"accept", b"*/*"),
    ]
    out = upstream_request_headers(headers, to_h2=False, client_host=b"10.0.0.1", scheme=b"http", host=b"a")
    assert names(out) == [b"accept", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"]


def test_te_trailers_survives_only_toward_h2() -> None:
    headers = [(b"te", b"trailers")]
    to_h2 = upstream_request_headers(headers, to_h2=True, client_host=b"c", scheme=b"http", host=b"")
    to_h1 = upstream_request_headers(headers, to_h2=False, client_host=b"c", scheme=b"http", host=b"")
    assert (b"te", b"trailers") in to_h2 and b"te" not in names(to_h1)


def test_forwarded_for_appends_and_request_id_is_kept_or_created() -> None:
    headers = [(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-proto", b"spoofed"), (b"x-request-id", b"abc")]
    out = dict(upstream_request_headers(headers, to_h2=False, client_host=b"2.2.2.2", scheme=b"https", host=b"h"))
    assert out[b"x-forwarded-for"] == b"1.1.1.1, 2.2.2.2"
    assert out[b"x-forwarded-proto"] == b"https"
    assert out[b"x-forwarded-host"] == b"h"
    assert out[b"x-request-id"] == b"abc"
    first = dict(upstream_request_headers([], to_h2=False, client_host=b"c", scheme=b"http", host=b""))
    second = dict(upstream_request_headers([], to_h2=False, client_host=b"c", scheme=b"http", host=b""))
    assert len(first[b"x-request-id"]) == 32 and first[b"x-request-id"] != second[b"x-request-id"]


def test_split_cookies_are_joined_toward_http1() -> None:
    headers = [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
    out = upstream_request_headers(headers, to_h2=False, client_host=b"c", scheme=b"http", host=b"")
    assert (b"cookie", b"a=1; b=2") in out


def test_response_hop_by_hop_headers_are_removed() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"3"),
    ]
    assert names(downstream_response_headers(headers)) == [b"content-type", b"content-length"]


def test_header_view_decodes_on_demand() -> None:
    view = HeaderView([(b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"3")])
    assert view.get("x-a") == "1" and view["x-b"] == "3" and view.get("nope") is None
    assert list(view) == ["x-a", "x-b"] and len(view) == 2


def test_transfer_encoding_not_ending_in_chunked_is_rejected_before_the_head() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabcd")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400 and "chunked" in failure.reason


def test_duplicate_content_length_is_rejected() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
    (failure,) = events(parser)
    assert isinstance(failure, ParseFailure) and failure.status == 400
