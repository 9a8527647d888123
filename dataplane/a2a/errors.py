"""The errors the gateway itself answers on A2A routes, in the shape each binding's clients parse.

One exception type per condition; each knows its JSON-RPC code, its HTTP status and its AIP-193 ``status`` /
``ErrorInfo.reason``, and renders itself as a JSON-RPC error response (JSON-RPC binding), an AIP-193 error
object (the 1.0 HTTP+JSON binding, section 11.6: ``{"error": {"code", "status", "message", "details"}}`` as
``application/json``) or a final SSE ``event: error`` for a stream already under way.

Condition -> class: JSON-RPC code / HTTP status / ErrorInfo reason (domain a2a-protocol.org unless noted):

- body is not JSON -> ``A2aParseError``: -32700 / 400 / INVALID_REQUEST
- not a JSON-RPC request -> ``A2aInvalidRequest``: -32600 / 400 / INVALID_REQUEST
- unknown method or REST path -> ``A2aMethodNotFound``: -32601 / 404 / METHOD_NOT_FOUND
- known REST path, wrong verb -> ``A2aMethodNotAllowed``: -32601 / 405 / METHOD_NOT_FOUND
- a field the gateway reads has a wrong type -> ``A2aInvalidParams``: -32602 / 400 / INVALID_PARAMS
- malformed ``A2A-Version`` -> ``A2aVersionNotSupported``: -32009 / 400 / VERSION_NOT_SUPPORTED
- bad Host / X-Forwarded-* header -> ``A2aBadRequestHeader``: -32600 / 400 / INVALID_REQUEST
- body over the route's limit -> ``A2aPayloadTooLarge``: -32600 / 413 / PAYLOAD_TOO_LARGE (agentgate.dev)
- denied by policy -> ``A2aPolicyDenied``: -32011 / 403 / POLICY_DENIED (agentgate.dev)
- agent unreachable, or died mid-answer -> ``A2aAgentUnavailable``: -32603 / 502 / AGENT_UNAVAILABLE
  (agentgate.dev)
- agent too slow -> ``A2aAgentTimeout``: -32603 / 504 / AGENT_TIMEOUT (agentgate.dev)
- agent answered garbage -> ``A2aInvalidAgentResponse``: -32006 / 502 / INVALID_AGENT_RESPONSE
- agent card unusable or too large -> ``A2aInvalidAgentCard``: -32006 / 502 / INVALID_AGENT_RESPONSE

Choices, and why:

- **Policy denial is -32011 with HTTP 403.** A2A defines no authorization error code: its -32001..-32009
  are task/push/card/version errors (-32003 is PushNotificationNotSupported, so "-32003-ish" would lie to
  clients that map codes to exceptions, as a2a-sdk does). JSON-RPC leaves -32000..-32099 to
  implementations, and A2A's spec puts authorization at the transport layer (401/403). -32011 is the code
  the MCP endpoint already uses for a policy denial (next to -32010 rate limited), so one gateway speaks
  one code for one condition. No rule text is echoed.
- **HTTP status on the JSON-RPC binding.** Errors about the message itself (parse, invalid request,
  unknown method, invalid params, version) are answered with HTTP 200, as an A2A server does (a2a-sdk
  only reads the JSON-RPC error of a 2xx answer, so its client raises the typed A2A error). Errors about
  the exchange (403 policy, 413 size, 502/504 agent) keep their HTTP status, so intermediaries, access
  logs and metrics see them and no client mistakes them for the agent's answer; the body is still a
  JSON-RPC error carrying the request's id. ``jsonrpc_http_status`` is that choice.
- **Gateway conditions A2A does not name** carry an ``ErrorInfo`` in domain ``agentgate.dev``; a2a-sdk
  maps unknown reasons to its generic client error, which is right: they are not the agent's errors.
- Client-supplied text (a method name, a path) is echoed at most ``_ECHO_LIMIT`` characters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Literal

RequestId = str | int
Binding = Literal["jsonrpc", "rest"]

JSONRPC_VERSION: Final = "2.0"
A2A_DOMAIN: Final = "a2a-protocol.org"
GATEWAY_DOMAIN: Final = "agentgate.dev"
ERROR_INFO_TYPE: Final = "type.googleapis.com/google.rpc.ErrorInfo"
CONTENT_TYPE: Final = b"application/json"
_ECHO_LIMIT: Final = 128

# JSON-RPC 2.0 codes, A2A's own, and the gateway's (implementation-defined range, shared with the MCP endpoint).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
INVALID_AGENT_RESPONSE: Final = -32006
VERSION_NOT_SUPPORTED: Final = -32009
POLICY_DENIED: Final = -32011


def echo(text: str) -> str:
    """Client-supplied text, short enough to put in an error message."""
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "..."


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every body this package writes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class A2aError(Exception):
    """A condition the gateway answers itself. Subclasses set the class-level codes.

    ``request_id`` is the JSON-RPC id to echo (None when it could not be read: JSON-RPC then requires
    ``"id": null``); ``allow`` lists the HTTP methods a path accepts (405, for the ``Allow`` header).
    """

    jsonrpc_code: ClassVar[int] = INTERNAL_ERROR
    http_status: ClassVar[int] = 500
    status: ClassVar[str] = "INTERNAL"
    reason: ClassVar[str] = "INTERNAL_ERROR"
    domain: ClassVar[str] = A2A_DOMAIN
    # About the message itself: answered with HTTP 200 on the JSON-RPC binding (see the module docstring).
    message_level: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        request_id: RequestId | None = None,
        metadata: Mapping[str, str] | None = None,
        allow: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.metadata: Mapping[str, str] = metadata or {}
        self.allow = allow

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, request_id={self.request_id!r})"

    def with_request_id(self, request_id: RequestId | None) -> A2aError:
        """The same error answering ``request_id`` (errors found before the id was read get it later)."""
        self.request_id = request_id
        return self

    @property
    def jsonrpc_http_status(self) -> int:
        """The HTTP status of this error's answer on the JSON-RPC binding."""
        return 200 if self.message_level else self.http_status

    def error_info(self) -> dict[str, Any]:
        """The ``google.rpc.ErrorInfo`` detail naming the reason (A2A 1.0 section 3.3.2)."""
        return {"@type": ERROR_INFO_TYPE, "reason": self.reason, "domain": self.domain, "metadata": dict(self.metadata)}

    def jsonrpc_object(self) -> dict[str, Any]:
        """The whole JSON-RPC error response (``data`` carries the ErrorInfo, as a2a-sdk servers do)."""
        return {
            "jsonrpc": JSONRPC_VERSION,
            "id": self.request_id,
            "error": {"code": self.jsonrpc_code, "message": self.message, "data": [self.error_info()]},
        }

    def rest_object(self) -> dict[str, Any]:
        """The AIP-193 error body of the HTTP+JSON binding."""
        return {
            "error": {
                "code": self.http_status,
                "status": self.status,
                "message": self.message,
                "details": [self.error_info()],
            }
        }

    def jsonrpc_body(self) -> bytes:
        return dumps(self.jsonrpc_object())

    def rest_body(self) -> bytes:
        return dumps(self.rest_object())

    def body(self, binding: Binding) -> bytes:
        return self.jsonrpc_body() if binding == "jsonrpc" else self.rest_body()

    def http_status_for(self, binding: Binding) -> int:
        return self.jsonrpc_http_status if binding == "jsonrpc" else self.http_status

    def sse_event(self, binding: Binding) -> bytes:
        """A final ``event: error`` for a stream whose headers are already sent (what a2a-sdk servers emit;
        its clients raise the typed error from it). The JSON is one line, so one ``data:`` field."""
        return b"event: error\ndata: " + self.body(binding) + b"\n\n"


class A2aParseError(A2aError):
    """The body is not JSON (or not UTF-8, or nested too deep)."""

    jsonrpc_code = PARSE_ERROR
    http_status = 400
    status = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"
    message_level = True


class A2aInvalidRequest(A2aError):
    """JSON, but not one JSON-RPC 2.0 request object."""

    jsonrpc_code = INVALID_REQUEST
    http_status = 400
    status = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"
    message_level = True


class A2aMethodNotFound(A2aError):
    """A JSON-RPC method or REST path no A2A version defines (never forwarded: method rules would not see it)."""

    jsonrpc_code = METHOD_NOT_FOUND
    http_status = 404
    status = "NOT_FOUND"
    reason = "METHOD_NOT_FOUND"
    message_level = True


class A2aMethodNotAllowed(A2aMethodNotFound):
    """A REST path A2A defines, with an HTTP method it does not (``allow`` lists the ones it does)."""

    http_status = 405


class A2aInvalidParams(A2aError):
    """A parameter the gateway reads (task id, context id, message) has the wrong type."""

    jsonrpc_code = INVALID_PARAMS
    http_status = 400
    status = "INVALID_ARGUMENT"
    reason = "INVALID_PARAMS"
    message_level = True


class A2aVersionNotSupported(A2aError):
    """An ``A2A-Version`` header that is not a ``major.minor`` version."""

    jsonrpc_code = VERSION_NOT_SUPPORTED
    http_status = 400
    status = "FAILED_PRECONDITION"
    reason = "VERSION_NOT_SUPPORTED"
    message_level = True


class A2aBadRequestHeader(A2aError):
    """A Host or X-Forwarded-* value the gateway cannot build its own address from."""

    jsonrpc_code = INVALID_REQUEST
    http_status = 400
    status = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"


class A2aPayloadTooLarge(A2aError):
    """The request body is over the route's ``max_request_bytes``."""

    jsonrpc_code = INVALID_REQUEST
    http_status = 413
    status = "INVALID_ARGUMENT"
    reason = "PAYLOAD_TOO_LARGE"
    domain = GATEWAY_DOMAIN


class A2aPolicyDenied(A2aError):
    """Authorization denied the call (see the module docstring for the code)."""

    jsonrpc_code = POLICY_DENIED
    http_status = 403
    status = "PERMISSION_DENIED"
    reason = "POLICY_DENIED"
    domain = GATEWAY_DOMAIN


class A2aAgentUnavailable(A2aError):
    """The agent could not be reached, or its connection broke before the answer was complete."""

    jsonrpc_code = INTERNAL_ERROR
    http_status = 502
    status = "UNAVAILABLE"
    reason = "AGENT_UNAVAILABLE"
    domain = GATEWAY_DOMAIN


class A2aAgentTimeout(A2aError):
    """The agent did not answer within the route's timeout."""

    jsonrpc_code = INTERNAL_ERROR
    http_status = 504
    status = "DEADLINE_EXCEEDED"
    reason = "AGENT_TIMEOUT"
    domain = GATEWAY_DOMAIN


class A2aInvalidAgentResponse(A2aError):
    """The agent answered something that is not A2A (not JSON, not a JSON-RPC response, an SSE event too
    large or not JSON)."""

    jsonrpc_code = INVALID_AGENT_RESPONSE
    http_status = 502
    status = "INTERNAL"
    reason = "INVALID_AGENT_RESPONSE"


class A2aInvalidAgentCard(A2aInvalidAgentResponse):
    """The agent's card is not a JSON object, or is larger than the bound."""


# Constructors for the common cases, so messages read the same everywhere.


def policy_denied(request_id: RequestId | None = None) -> A2aPolicyDenied:
    return A2aPolicyDenied("Forbidden: denied by the gateway's authorization policy", request_id=request_id)


def agent_unavailable(agent: str, request_id: RequestId | None = None, *, detail: str = "") -> A2aAgentUnavailable:
    """``detail`` (e.g. "connection refused") is for the client; keep addresses out of it."""
    suffix = f": {detail}" if detail else ""
    return A2aAgentUnavailable(
        f"Agent {agent!r} is unavailable{suffix}", request_id=request_id, metadata={"agent": agent}
    )


def agent_timeout(agent: str, request_id: RequestId | None = None) -> A2aAgentTimeout:
    return A2aAgentTimeout(f"Agent {agent!r} did not answer in time", request_id=request_id, metadata={"agent": agent})


def payload_too_large(limit: int, request_id: RequestId | None = None) -> A2aPayloadTooLarge:
    return A2aPayloadTooLarge(
        f"Request body is larger than {limit} bytes", request_id=request_id, metadata={"limit": str(limit)}
    )


__all__ = [
    "A2A_DOMAIN",
    "CONTENT_TYPE",
    "GATEWAY_DOMAIN",
    "INTERNAL_ERROR",
    "INVALID_AGENT_RESPONSE",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "POLICY_DENIED",
    "VERSION_NOT_SUPPORTED",
    "A2aAgentTimeout",
    "A2aAgentUnavailable",
    "A2aBadRequestHeader",
    "A2aError",
    "A2aInvalidAgentCard",
    "A2aInvalidAgentResponse",
    "A2aInvalidParams",
    "A2aInvalidRequest",
    "A2aMethodNotAllowed",
    "A2aMethodNotFound",
    "A2aParseError",
    "A2aPayloadTooLarge",
    "A2aPolicyDenied",
    "A2aVersionNotSupported",
    "Binding",
    "RequestId",
    "agent_timeout",
    "agent_unavailable",
    "dumps",
    "echo",
    "payload_too_large",
]
