"""Remote JWKS for the data plane: the control plane fetches identity providers' key sets, keeps the
last good copy, and ships the keys inline in the snapshot, so proxy workers never call out.

Refreshes happen on a schedule (`JwksFetcher.run`) and on demand (`refresh_now`, when a worker met a
token with an unknown ``kid``). On-demand refreshes of one URL are coalesced (callers during a fetch
share it) and throttled (at most one per ``min_refresh_interval``), so key rotation costs the provider
one request however many workers and tokens notice it. A failed fetch keeps the previous keys.

The HTTP client is the standard library's, run in a worker thread under a deadline: bounded in time
(connect, each read and the whole fetch) and size, no redirects, TLS verified, and no dependency the
runtime image lacks.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio

from shared.logging import get_logger

log = get_logger("controlplane.jwks")

_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class JwksFetchError(Exception):
    """A fetch that produced no usable key set; the message says why (for logs and status)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # urllib then raises HTTPError for the 3xx


def normalize_jwks(body: bytes, *, max_keys: int) -> str:
    """The key set as canonical JSON (sorted keys, no spaces) keeping only public keys.

    Symmetric keys and private members are dropped rather than shipped to every proxy; the data plane
    parses (and judges) the rest. Canonical text makes "did the keys change" a string comparison.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JwksFetchError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchError('not a JWKS (a JSON object with a "keys" array)')
    keys: list[Any] = document["keys"]
    if len(keys) > max_keys:
        raise JwksFetchError(f"{len(keys)} keys, more than {max_keys}")
    public: list[dict[str, Any]] = []
    for jwk in keys:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kty"), str):
            raise JwksFetchError('every key must be an object with a "kty"')
        if jwk["kty"] == "oct":
            continue
        public.append({name: value for name, value in jwk.items() if name not in _PRIVATE_MEMBERS})
    dropped = len(keys) - len(public)
    if dropped:
        log.warning("jwks: symmetric keys dropped", count=dropped)
    return json.dumps({"keys": public}, sort_keys=True, separators=(",", ":"))


@dataclass
class _Source:
    url: str
    jwks: str | None = None
    last_attempt: float | None = None
    next_due: float = 0.0
    error: str = ""
    inflight: anyio.Event | None = None
    ok: bool = False


@dataclass
class JwksFetcher:
    """Keeps the key sets of the watched URLs fresh. Start `run` in a task group; cancel it to stop.

    ``on_change(url, jwks_json)`` is called (on the event loop) whenever a URL's keys change, so the
    control plane can rebuild and publish the snapshots that embed them.
    """

    refresh_interval: float = 300.0
    min_refresh_interval: float = 30.0
    timeout: float = 5.0
    max_bytes: int = 512 * 1024
    max_keys: int = 100
    # Plain http lets anyone on the path substitute keys; only for tests and loopback providers.
    allow_http: bool = False
    ssl_context: ssl.SSLContext | None = None
    on_change: Callable[[str, str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _sources: dict[str, _Source] = field(default_factory=dict, init=False)
    _wake: anyio.Event = field(default_factory=anyio.Event, init=False)

    def watch(self, urls: Iterable[str]) -> None:
        """Set the URLs to keep fresh (from the current config). New ones are fetched at once by `run`."""
        wanted = set(urls)
        for url in wanted - self._sources.keys():
            self._check_url(url)
            self._sources[url] = _Source(url)
        for url in self._sources.keys() - wanted:
            del self._sources[url]
        self._wake.set()

    def keys_for(self, url: str) -> str | None:
        """The last good key set for ``url`` as JSON text (ship it as a provider's inline JWKS), or None."""
        source = self._sources.get(url)
        return None if source is None else source.jwks

    def error_for(self, url: str) -> str:
        """Why the last fetch of ``url`` failed ("" after a success), for status reporting."""
        source = self._sources.get(url)
        return "" if source is None else source.error

    async def refresh_now(self, url: str) -> bool:
        """Fetch ``url`` now unless it was tried within ``min_refresh_interval``; join a fetch in
        progress. True when the keys are fresh from this call or the one joined."""
        source = self._sources.get(url)
        if source is None:
            return False  # not a configured URL: a worker cannot make us fetch arbitrary addresses
        if source.inflight is not None:
            await source.inflight.wait()
            return source.ok
        if source.last_attempt is not None and self.clock() - source.last_attempt < self.min_refresh_interval:
            return False
        return await self._refresh(source)

    async def run(self) -> None:
        """Refresh every watched URL when due, forever."""
        while True:
            self._wake = anyio.Event()
            now = self.clock()
            due = [source for source in self._sources.values() if source.next_due <= now and source.inflight is None]
            if due:
                async with anyio.create_task_group() as group:
                    for source in due:
                        group.start_soon(self._refresh, source)
                continue
            delay = min((source.next_due for source in self._sources.values()), default=now + 3600.0) - now
            with anyio.move_on_after(max(delay, 0.0)):
                await self._wake.wait()

    async def _refresh(self, source: _Source) -> bool:
        source.last_attempt = self.clock()
        source.inflight = event = anyio.Event()
        try:
            with anyio.fail_after(self.timeout):
                body = await anyio.to_thread.run_sync(self._get, source.url, abandon_on_cancel=True)
            jwks = normalize_jwks(body, max_keys=self.max_keys)
        except (JwksFetchError, TimeoutError) as exc:
            source.error = str(exc) or "timed out"
            source.ok = False
            # Retry sooner than the regular interval, but never faster than the throttle.
            source.next_due = self.clock() + min(self.refresh_interval, max(self.min_refresh_interval, 1.0))
            log.warning("jwks fetch failed; keeping previous keys", url=source.url, error=source.error)
            return False
        finally:
            source.inflight = None
            event.set()
        source.error = ""
        source.ok = True
        source.next_due = self.clock() + self.refresh_interval
        changed = jwks != source.jwks
        source.jwks = jwks
        if changed:
            log.info("jwks updated", url=source.url)
            if self.on_change is not None and self._sources.get(source.url) is source:
                self.on_change(source.url, jwks)
        return True

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"JWKS URL must be absolute http(s): {url!r}")
        if parts.scheme == "http" and not self.allow_http:
            raise ValueError(f"JWKS URL must use https: {url!r}")

    def _get(self, url: str) -> bytes:
        """Blocking GET bounded in size and time (runs in a worker thread)."""
        deadline = time.monotonic() + self.timeout
        handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
        if self.ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.ssl_context))
        opener = urllib.request.build_opener(*handlers)
        request = urllib.request.Request(
            url, headers={"Accept": "application/jwk-set+json, application/json", "User-Agent": "agentgate-jwks"}
        )
        try:
            with opener.open(request, timeout=self.timeout) as response:
                if response.status != 200:
                    raise JwksFetchError(f"HTTP {response.status}")
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    raise JwksFetchError(f"body of {length} bytes, more than {self.max_bytes}")
                chunks: list[bytes] = []
                size = 0
                while True:
                    if time.monotonic() > deadline:
                        raise JwksFetchError("timed out reading the body")
                    chunk = response.read1(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise JwksFetchError(f"body larger than {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            raise JwksFetchError(f"HTTP {exc.code}") from None
        except (TimeoutError, urllib.error.URLError) as exc:
            # The socket's timeout and the caller's deadline are the same length: either may fire
            # first, and both mean the same thing.
            if isinstance(exc, TimeoutError) or isinstance(exc.reason, TimeoutError):
                raise JwksFetchError("timed out") from None
            raise JwksFetchError(f"cannot fetch: {exc}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise JwksFetchError(f"cannot fetch: {exc}") from None


__all__ = ["JwksFetchError", "JwksFetcher", "normalize_jwks"]
