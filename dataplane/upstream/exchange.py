"""One request/response with an upstream, the same for HTTP/1.1 and HTTP/2."""

from __future__ import annotations

from typing import Protocol

from dataplane.http.h1codec import ResponseHead

Headers = list[tuple[bytes, bytes]]

# RFC 9110 9.2.2: a request with one of these may be repeated without changing the outcome.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class UpstreamRequest:
    """A request head ready for the upstream: hop-by-hop headers removed, filters applied.

    `headers` carries no Host (HTTP/1.1 writes `authority` as Host, HTTP/2 as :authority)
    and keeps content-length when the length is known.
    """

    __slots__ = ("authority", "content_length", "has_body", "headers", "method", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        authority: bytes,
        headers: Headers,
        has_body: bool,
        content_length: int | None,
    ) -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.headers = headers
        self.has_body = has_body
        self.content_length = content_length

    @property
    def retryable(self) -> bool:
        return not self.has_body and self.method in IDEMPOTENT_METHODS


class Exchange(Protocol):
    """A request in flight. The pool returns it with the head sent (and, without a body, the
    response head received); the connection goes back to its pool once both sides end."""

    async def send_data(self, data: bytes) -> None: ...

    async def end_request(self, trailers: Headers) -> None: ...

    async def response(self) -> ResponseHead:
        """The final response head (1xx skipped). Raises ProxyError subclasses."""
        ...

    def take_body(self) -> tuple[bytes, bool]:
        """Body bytes already received (no waiting) and whether the response is complete."""
        ...

    async def read(self) -> bytes:
        """The next body bytes; b"" at the end. Raises ProxyError subclasses."""
        ...

    @property
    def trailers(self) -> Headers: ...

    @property
    def complete(self) -> bool:
        """The response was read to its end."""
        ...

    def abort(self) -> None:
        """Give up: close the HTTP/1.1 connection or reset the HTTP/2 stream. Idempotent."""
        ...
