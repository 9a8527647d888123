"""CORS answered from a policy: preflights (Fetch "CORS-preflight fetch") and actual-response headers."""

from __future__ import annotations

from dataplane.config.policy import CorsSettings
from dataplane.http.messages import Headers
from dataplane.policy.cors import CorsPolicy, is_preflight
from shared.origins import OriginAllowList


def cors(origins: tuple[str, ...] = ("https://app.example.com",), **options: object) -> CorsPolicy:
    settings = CorsSettings("ns/cors", OriginAllowList.compile(origins), **options)  # type: ignore[arg-type]
    return CorsPolicy.compile(settings)


def preflight(origin: str, method: str = "PUT", headers: str | None = None) -> Headers:
    out = [(b"origin", origin.encode()), (b"access-control-request-method", method.encode())]
    if headers is not None:
        out.append((b"access-control-request-headers", headers.encode()))
    return out


def as_dict(headers: Headers) -> dict[bytes, bytes]:
    return dict(headers)


def test_a_preflight_is_options_with_origin_and_request_method() -> None:
    assert is_preflight(b"OPTIONS", preflight("https://a.example"))
    assert not is_preflight(b"OPTIONS", [(b"origin", b"https://a.example")])
    assert not is_preflight(b"GET", preflight("https://a.example"))


def test_allowed_preflight_gets_204_with_the_configured_lists() -> None:
    policy = cors(allow_methods=("GET", "PUT"), allow_headers=("x-tenant", "content-type"), max_age=600.0)
    answer = policy.preflight(preflight("https://app.example.com", "PUT", "X-Tenant, content-type"))
    headers = as_dict(answer.headers)
    assert answer.status == 204
    assert headers[b"access-control-allow-origin"] == b"https://app.example.com"
    assert headers[b"vary"] == b"origin"
    assert headers[b"access-control-allow-methods"] == b"GET, PUT"
    assert headers[b"access-control-allow-headers"] == b"x-tenant, content-type"
    assert headers[b"access-control-max-age"] == b"600"
    assert headers[b"content-length"] == b"0"
    assert b"access-control-allow-credentials" not in headers


def test_origin_compare_ignores_case_and_default_port() -> None:
    assert cors().preflight(preflight("HTTPS://App.Example.com:443", "GET")).status == 204


def test_refused_preflights_say_what_is_not_allowed() -> None:
    policy = cors(allow_methods=("GET", "PUT"), allow_headers=("x-tenant",))
    origin = policy.preflight(preflight("https://evil.example"))
    assert origin.status == 403 and "origin 'https://evil.example'" in origin.reason and not origin.headers
    method = policy.preflight(preflight("https://app.example.com", "DELETE"))
    assert method.status == 403 and "method 'DELETE'" in method.reason
    header = policy.preflight(preflight("https://app.example.com", "PUT", "x-tenant, x-secret"))
    assert header.status == 403 and "'x-secret'" in header.reason and "ns/cors" in header.reason


def test_safelisted_methods_are_always_allowed() -> None:
    assert cors(allow_methods=("PUT",)).preflight(preflight("https://app.example.com", "POST")).status == 204


def test_wildcards_echo_what_was_asked_and_credentials_are_announced() -> None:
    policy = cors(("http://localhost:*",), allow_methods=("*",), allow_headers=("*",), allow_credentials=True)
    answer = policy.preflight(preflight("http://localhost:5173", "PATCH", "x-a,x-b"))
    headers = as_dict(answer.headers)
    assert answer.status == 204
    assert headers[b"access-control-allow-origin"] == b"http://localhost:5173"
    assert headers[b"access-control-allow-methods"] == b"PATCH"
    assert headers[b"access-control-allow-headers"] == b"x-a, x-b"
    assert headers[b"access-control-allow-credentials"] == b"true"


def test_any_origin_without_credentials_answers_star_without_vary() -> None:
    headers = as_dict(cors(("*",)).preflight(preflight("https://x.example", "GET")).headers)
    assert headers[b"access-control-allow-origin"] == b"*" and b"vary" not in headers


def test_actual_response_gets_policy_headers_and_loses_the_upstreams() -> None:
    policy = cors(expose_headers=("x-request-id",), allow_credentials=True)
    upstream = [(b"content-type", b"text/plain"), (b"access-control-allow-origin", b"*")]
    out = policy.response_headers([(b"origin", b"https://app.example.com")], list(upstream))
    assert (b"access-control-allow-origin", b"*") not in out
    assert (b"access-control-allow-origin", b"https://app.example.com") in out
    assert (b"access-control-allow-credentials", b"true") in out
    assert (b"access-control-expose-headers", b"x-request-id") in out
    assert (b"vary", b"origin") in out and (b"content-type", b"text/plain") in out


def test_disallowed_or_absent_origin_gets_no_allow_origin_but_vary() -> None:
    policy = cors()
    for request in ([(b"origin", b"https://evil.example")], []):
        out = policy.response_headers(request, [(b"access-control-allow-origin", b"*")])
        assert out == [(b"vary", b"origin")]
    # "*" for everyone: the answer does not depend on the origin.
    assert cors(("*",)).response_headers([], []) == []
