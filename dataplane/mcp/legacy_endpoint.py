"""The legacy HTTP+SSE downstream (2024-11-05 basic/transports, "HTTP with SSE").

GET ``<prefix>/sse`` opens the stream; its first event, ``endpoint``, carries
``<prefix>/message?sessionId=<id>``, where the client POSTs each JSON-RPC message (202, no body).
Every response, notification and server-to-client request goes out on the stream as a
``message`` event. The session is a ``FederatedSession`` like the streamable ones (same
federation, same targets), made when the stream opens; the client's initialize negotiates its
version, 2024-11-05 included, while each target channel negotiates its own, so targets of newer
eras serve it too. The stream ending (the client went, or the session closed) ends the session
and its upstream sessions: this transport has no session id to resume with. A comment goes out
every ``keepalive`` seconds, so a dead connection is noticed and its session freed.

McpEndpoint (endpoint.py) does the HTTP checks (Origin, Accept, Content-Type, body size, JSON)
and calls this module with what passed them.

Workers: the session lives in the worker holding its stream, and nothing carries a POST across
workers. The session id starts with this worker's random tag, so a POST that lands on another
worker of the same port (SO_REUSEPORT) is answered 421 Misdirected Request with a JSON-RPC error
saying so (HTTP lets a client retry that on a new connection), never a hang or a silent drop; an
unknown id bearing this worker's tag gets 404. To serve legacy clients reliably behind several
workers, run one worker per port or put connection affinity in front.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

import anyio

from dataplane.config.model import UpstreamCluster
from dataplane.config.policy import ResilienceSettings
from dataplane.http.messages import ResponseSink
from dataplane.mcp.jsonrpc import ErrorCode, Message, Request, error_response
from dataplane.mcp.sessions import EventStream, FederatedSession, McpSessions, RequestIdInUse
from shared.logging import get_logger

log = get_logger("dataplane.mcp.legacy")

# Seconds between keep-alive comments on an idle stream.
KEEPALIVE_INTERVAL: Final = 20.0
_TAG_BYTES: Final = 4
_SESSION_ID: Final = re.compile(f"[0-9a-f]{{{2 * (_TAG_BYTES + 16)}}}")
_SSE = (b"content-type", b"text/event-stream")
_NO_CACHE = (b"cache-control", b"no-cache")


class LegacyRefusal(Exception):
    """A message POST naming no session this worker holds: the HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, eq=False)
class LegacyLink:
    """One open HTTP+SSE stream and its session."""

    backend: str
    session: FederatedSession
    stream: EventStream


class LegacySseEndpoint:
    """The HTTP+SSE sessions of one worker, by session id."""

    def __init__(self, sessions: McpSessions, keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self.sessions = sessions
        self.keepalive = keepalive
        self.worker_tag = secrets.token_hex(_TAG_BYTES)
        self._links: dict[str, LegacyLink] = {}

    def __len__(self) -> int:
        return len(self._links)

    async def stream(self, sink: ResponseSink, cluster: UpstreamCluster, message_path: str) -> None:
        """Serve one GET: announce the message endpoint, then relay the session's messages until the
        client goes or the session closes; the session closes with the stream."""
        session = await self.sessions.create(cluster, legacy=True)
        stream = session.open_funnel()
        session_id = self.worker_tag + secrets.token_hex(16)
        self._links[session_id] = LegacyLink(cluster.name, session, stream)
        reader = session.attach(stream)
        log.info("mcp_legacy_session_opened", backend=cluster.name)
        try:
            endpoint = f"{message_path}?sessionId={session_id}".encode("latin-1")
            await sink.start(200, [_SSE, _NO_CACHE], None, b"event: endpoint\ndata: " + endpoint + b"\n\n", False)
            cursor = 0
            while True:
                batch = None
                with anyio.move_on_after(self.keepalive):
                    batch = await stream.next(cursor, reader)
                if batch is None:
                    await sink.write(b": keepalive\n\n")
                    continue
                if not batch:
                    break
                cursor = batch[-1].seq
                await sink.write(b"".join(b"event: message\ndata: " + event.data + b"\n\n" for event in batch))
            await sink.end([])
        finally:
            self._links.pop(session_id, None)
            log.info("mcp_legacy_session_closed", backend=cluster.name)
            await session.aclose()

    def find(self, cluster: UpstreamCluster, session_id: str) -> LegacyLink:
        """The open stream of ``session_id``; LegacyRefusal (404, or 421 for another worker's id) if none."""
        link = self._links.get(session_id)
        if link is not None and link.backend == cluster.name:
            return link
        if _SESSION_ID.fullmatch(session_id) and not session_id.startswith(self.worker_tag):
            message = (
                "Misdirected Request: this HTTP+SSE session's stream is held by another worker process of the "
                "gateway (or has ended); the legacy transport needs every request of a session on the worker "
                "holding its stream"
            )
            raise LegacyRefusal(421, message)
        raise LegacyRefusal(404, "Not Found: no such HTTP+SSE session (it ended, or never existed)")

    async def submit(
        self, link: LegacyLink, parsed: Message, bound: float, resilience: ResilienceSettings | None = None
    ) -> None:
        """Hand one client message to the session; answers go out on the stream (a request's within
        ``bound`` s, its upstream attempts per the caller's ``resilience``)."""
        session = link.session
        if isinstance(parsed, Request):
            params = parsed.params if isinstance(parsed.params, dict) else {}
            meta = params.get("_meta")
            progress_token = meta.get("progressToken") if isinstance(meta, dict) else None
            try:
                session.open_request(parsed.id, progress_token, bound)
            except RequestIdInUse as exc:
                link.stream.append(error_response(parsed.id, ErrorCode.INVALID_REQUEST, str(exc)))
                return
        await session.submit(parsed.raw, resilience)

    def end_streams(self) -> None:
        """Draining: end the streams of sessions with nothing in flight (the client reconnects, on
        another worker); a session still answering keeps its stream until its requests finish or the
        drain deadline."""
        for link in self._links.values():
            if link.session.requests_pending == 0:
                link.stream.close()

    async def aclose(self) -> None:
        """Close every session (worker shutdown); their streams end."""
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.session.aclose()


__all__ = ["KEEPALIVE_INTERVAL", "LegacyLink", "LegacyRefusal", "LegacySseEndpoint"]
