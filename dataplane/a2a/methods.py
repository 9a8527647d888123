"""What an A2A request asks for: one canonical operation from either binding and either name set.

``classify_jsonrpc`` reads a JSON-RPC body; ``classify_rest`` reads an HTTP+JSON (REST) request line. Both
return an ``A2aCall``: the ``A2aOperation`` (named by its 1.0 name; the 0.3 JSON-RPC names map onto it, so a
rule can use either), the method as sent, the JSON-RPC id, whether the answer is an SSE stream, the task and
context ids where the request names them, the tenant, and the protocol version (``A2A-Version``; an
absent or empty header means 0.3, A2A 1.0 section 3.2.6). ``A2aCall.variables`` is the CEL ``a2a`` variable.

Names accepted (anything else is -32601 and never forwarded, so no call slips past method rules):

- 0.3 (and 0.2): ``message/send``, ``message/stream``, ``tasks/get``, ``tasks/list``, ``tasks/cancel``,
  ``tasks/resubscribe``, ``tasks/pushNotificationConfig/{set,get,list,delete}``,
  ``agent/getAuthenticatedExtendedCard``.
- 1.0: ``SendMessage``, ``SendStreamingMessage``, ``GetTask``, ``ListTasks``, ``CancelTask``,
  ``SubscribeToTask``, ``{Create,Get,Delete}TaskPushNotificationConfig``,
  ``ListTaskPushNotificationConfigs``, ``GetExtendedAgentCard``; plus the 1.0 draft spellings
  ``SetTaskPushNotificationConfig`` and ``ListTaskPushNotificationConfig`` that some SDKs still send.

REST paths (relative to the agent's mount; an optional leading ``/{tenant}`` segment, and for 0.x clients
a leading ``/v1``, the 0.3 REST prefix; a ``/v1`` with a 1.x version header is a tenant named "v1", which
is how a2a-sdk servers route it too): ``POST /message:send``, ``POST /message:stream``, ``GET /tasks``,
``GET /tasks/{id}``, ``POST /tasks/{id}:cancel``, ``GET|POST /tasks/{id}:subscribe``,
``POST|GET /tasks/{id}/pushNotificationConfigs``, ``GET|DELETE /tasks/{id}/pushNotificationConfigs/{cid}``,
``GET /extendedAgentCard`` (0.3: ``GET /v1/card``). An unknown path is 404, a wrong verb 405.

Where the ids are: ``params.message.taskId`` / ``contextId`` for sends; ``params.id`` for get, cancel and
subscribe (or a 1.0 draft resource name ``params.name = "tasks/{id}"``); for push-config calls the task is
``params.taskId`` in 1.0 and 0.3's ``set``, but ``params.id`` in 0.3's get/list/delete (where 1.0's ``id``
is the config id); ``contextId`` filters ``tasks/list``. ProtoJSON readers accept snake_case too
(``task_id``, and 0.3's ``request`` for ``message``: a2a-sdk's 0.3 REST client sends that), so both
spellings are read. A field the gateway reads with the wrong type is -32602: policy
must never see a value the agent would read differently. Everything else about params is the agent's to
validate.

Bodies go through the MCP layer's hostile-input JSON decoder (duplicate keys, NaN, deep nesting and
invalid UTF-8 are parse errors), so the gateway never reads a body differently from the agent.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote

from dataplane.a2a.errors import (
    A2aError,
    A2aInvalidParams,
    A2aInvalidRequest,
    A2aMethodNotAllowed,
    A2aMethodNotFound,
    A2aParseError,
    A2aVersionNotSupported,
    Binding,
    RequestId,
    echo,
    payload_too_large,
)
from dataplane.mcp.jsonrpc import decode_json
from dataplane.policy.authorize import A2A_DEFAULT_VERSION, a2a_variables

VERSION_HEADER: Final = "a2a-version"
DEFAULT_VERSION: Final = A2A_DEFAULT_VERSION  # what an absent or empty A2A-Version means
_VERSION = re.compile(r"(\d{1,4})\.(\d{1,4})(?:\.\d{1,4})?\Z")
_INT64: Final = 2**63


class A2aOperation(enum.Enum):
    """One A2A operation, valued by its 1.0 name (the JSON-RPC and gRPC method name)."""

    SEND_MESSAGE = "SendMessage"
    SEND_STREAMING_MESSAGE = "SendStreamingMessage"
    GET_TASK = "GetTask"
    LIST_TASKS = "ListTasks"
    CANCEL_TASK = "CancelTask"
    SUBSCRIBE_TO_TASK = "SubscribeToTask"
    CREATE_PUSH_CONFIG = "CreateTaskPushNotificationConfig"
    GET_PUSH_CONFIG = "GetTaskPushNotificationConfig"
    LIST_PUSH_CONFIGS = "ListTaskPushNotificationConfigs"
    DELETE_PUSH_CONFIG = "DeleteTaskPushNotificationConfig"
    GET_EXTENDED_CARD = "GetExtendedAgentCard"

    @property
    def streaming(self) -> bool:
        """Whether the answer is an SSE stream."""
        return self in _STREAMING

    @property
    def legacy_name(self) -> str:
        """The 0.3 JSON-RPC method name."""
        return _LEGACY_NAMES[self]


_STREAMING: Final = frozenset({A2aOperation.SEND_STREAMING_MESSAGE, A2aOperation.SUBSCRIBE_TO_TASK})
_LEGACY_NAMES: Final[Mapping[A2aOperation, str]] = MappingProxyType(
    {
        A2aOperation.SEND_MESSAGE: "message/send",
        A2aOperation.SEND_STREAMING_MESSAGE: "message/stream",
        A2aOperation.GET_TASK: "tasks/get",
        A2aOperation.LIST_TASKS: "tasks/list",
        A2aOperation.CANCEL_TASK: "tasks/cancel",
        A2aOperation.SUBSCRIBE_TO_TASK: "tasks/resubscribe",
        A2aOperation.CREATE_PUSH_CONFIG: "tasks/pushNotificationConfig/set",
        A2aOperation.GET_PUSH_CONFIG: "tasks/pushNotificationConfig/get",
        A2aOperation.LIST_PUSH_CONFIGS: "tasks/pushNotificationConfig/list",
        A2aOperation.DELETE_PUSH_CONFIG: "tasks/pushNotificationConfig/delete",
        A2aOperation.GET_EXTENDED_CARD: "agent/getAuthenticatedExtendedCard",
    }
)

NameSet = Literal["0.3", "1.0"]
# Every JSON-RPC method name accepted -> (operation, the name set it belongs to).
METHODS: Final[Mapping[str, tuple[A2aOperation, NameSet]]] = MappingProxyType(
    {
        **{name: (op, "0.3") for op, name in _LEGACY_NAMES.items()},
        **{op.value: (op, "1.0") for op in A2aOperation},
        "SetTaskPushNotificationConfig": (A2aOperation.CREATE_PUSH_CONFIG, "1.0"),
        "ListTaskPushNotificationConfig": (A2aOperation.LIST_PUSH_CONFIGS, "1.0"),
    }
)


@dataclass(frozen=True, slots=True)
class A2aCall:
    """One classified request. ``method`` is the JSON-RPC method as sent; for REST (which has no method
    name) it is the operation's 1.0 name. Absent ids are empty strings."""

    operation: A2aOperation
    method: str
    binding: Binding
    version: str
    name_set: NameSet
    request_id: RequestId | None = None
    task_id: str = ""
    context_id: str = ""
    tenant: str = ""

    @property
    def streaming(self) -> bool:
        return self.operation.streaming

    def variables(self, target: str = "", namespace: str = "") -> dict[str, Any]:
        """The CEL ``a2a`` variable, built by ``dataplane.policy.authorize.a2a_variables`` (its one home): method
        as sent, ``operation`` = 1.0 name, ``target`` {name, namespace}, ``version``, ``taskId``,
        ``contextId``, ``binding`` and ``streaming``."""
        return a2a_variables(
            self.method,
            target=target,
            namespace=namespace,
            operation=self.operation.value,
            version=self.version,
            task_id=self.task_id,
            context_id=self.context_id,
            binding=self.binding,
            streaming=self.operation.streaming,
        )

    def log_fields(self) -> dict[str, Any]:
        """Access-log fields (empty ones left out)."""
        fields: dict[str, Any] = {"a2a_method": self.method, "a2a_operation": self.operation.value}
        if self.task_id:
            fields["a2a_task_id"] = self.task_id
        if self.context_id:
            fields["a2a_context_id"] = self.context_id
        fields["a2a_version"] = self.version
        return fields


# Versions --------------------------------------------------------------------------------------------------


def protocol_version(header: str | bytes | None) -> str:
    """The version an ``A2A-Version`` header asks for: "0.3" when absent or empty; a ``major.minor[.patch]``
    value as sent. Anything else raises ``A2aVersionNotSupported`` (the agent would refuse it too)."""
    if header is None:
        return DEFAULT_VERSION
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    text = text.strip()
    if not text:
        return DEFAULT_VERSION
    if _VERSION.match(text) is None:
        raise A2aVersionNotSupported(f"A2A-Version {echo(text)!r} is not a protocol version (expected e.g. '1.0')")
    return text


def _is_legacy(version: str) -> bool:
    return version.startswith("0.")


# JSON-RPC --------------------------------------------------------------------------------------------------


def _request_id(body: Mapping[str, Any]) -> RequestId | None:
    """The id to echo: a string, or an integer in int64 (JSON-RPC allows null; booleans are not ids)."""
    value = body.get("id")
    if type(value) is str or (type(value) is int and -_INT64 <= value < _INT64):
        return value
    return None


def classify_jsonrpc(body: bytes, *, version: str = DEFAULT_VERSION, max_bytes: int | None = None) -> A2aCall:
    """Classify one JSON-RPC request body. ``version`` is ``protocol_version(A2A-Version)``. Raises an
    ``A2aError`` (parse -32700, invalid request -32600, unknown method -32601, bad params -32602, too large
    413) carrying the request id whenever it could be read."""
    if max_bytes is not None and len(body) > max_bytes:
        raise payload_too_large(max_bytes)
    try:
        message = decode_json(body)
    except ValueError as exc:
        raise A2aParseError(f"Parse error: {exc}") from None
    if type(message) is not dict:
        what = "batches are not supported" if type(message) is list else "expected a JSON object"
        raise A2aInvalidRequest(f"Invalid Request: {what}")
    request_id = _request_id(message)
    if "id" in message and message["id"] is not None and request_id is None:
        raise A2aInvalidRequest('Invalid Request: "id" must be a string, an integer or null')
    if message.get("jsonrpc") != "2.0":
        raise A2aInvalidRequest('Invalid Request: "jsonrpc" must be "2.0"', request_id=request_id)
    method = message.get("method")
    if type(method) is not str or not method:
        raise A2aInvalidRequest('Invalid Request: "method" must be a non-empty string', request_id=request_id)
    if "result" in message or "error" in message:
        raise A2aInvalidRequest('Invalid Request: a request cannot carry "result" or "error"', request_id=request_id)
    known = METHODS.get(method)
    if known is None:
        raise A2aMethodNotFound(f"Method not found: {echo(method)}", request_id=request_id)
    operation, name_set = known
    params = message.get("params", {})
    if type(params) is not dict:
        raise A2aInvalidParams('Invalid params: "params" must be an object', request_id=request_id)
    try:
        task_id, context_id = _jsonrpc_ids(operation, name_set, params)
        tenant = _string(params, "tenant", "params")
    except A2aError as exc:
        raise exc.with_request_id(request_id) from None
    return A2aCall(
        operation=operation,
        method=method,
        binding="jsonrpc",
        version=version,
        name_set=name_set,
        request_id=request_id,
        task_id=task_id,
        context_id=context_id,
        tenant=tenant,
    )


def _string(obj: Mapping[str, Any], key: str, where: str, snake: str | None = None) -> str:
    """``obj[key]`` (or its snake_case spelling) as a string; "" when absent or null; -32602 otherwise."""
    value = obj.get(key)
    if value is None and snake is not None:
        value = obj.get(snake)
        key = snake if value is not None else key
    if value is None:
        return ""
    if type(value) is not str:
        raise A2aInvalidParams(f'Invalid params: "{where}.{key}" must be a string')
    return value


def _task_from_name(params: Mapping[str, Any], key: str, root: str) -> str:
    """A 1.0 draft resource name: ``tasks/{id}`` (or ``tasks/{id}/pushNotificationConfigs/...``)."""
    name = _string(params, key, root)
    if name.startswith("tasks/"):
        return name[6:].partition("/")[0]
    return ""


def _jsonrpc_ids(
    operation: A2aOperation, name_set: NameSet, params: Mapping[str, Any], root: str = "params"
) -> tuple[str, str]:
    """(task id, context id) from a request's params (see the module docstring for where each lives);
    ``root`` names the object in error messages ("params", or "body" for REST)."""
    match operation:
        case A2aOperation.SEND_MESSAGE | A2aOperation.SEND_STREAMING_MESSAGE:
            key = "message" if "message" in params else "request"  # 0.3 proto field name (json_name "message")
            message = params.get(key)
            if message is None:
                return "", ""
            if type(message) is not dict:
                raise A2aInvalidParams(f'Invalid params: "{root}.{key}" must be an object')
            return (
                _string(message, "taskId", f"{root}.{key}", "task_id"),
                _string(message, "contextId", f"{root}.{key}", "context_id"),
            )
        case A2aOperation.GET_TASK | A2aOperation.CANCEL_TASK | A2aOperation.SUBSCRIBE_TO_TASK:
            return _string(params, "id", root) or _task_from_name(params, "name", root), ""
        case A2aOperation.LIST_TASKS:
            return "", _string(params, "contextId", root, "context_id")
        case A2aOperation.GET_EXTENDED_CARD:
            return "", ""
        case _:  # push-notification configs
            if name_set == "0.3" and operation is not A2aOperation.CREATE_PUSH_CONFIG:
                return _string(params, "id", root), ""
            task_id = _string(params, "taskId", root, "task_id")
            return task_id or _task_from_name(params, "parent", root) or _task_from_name(params, "name", root), ""


# HTTP+JSON (REST) ------------------------------------------------------------------------------------------

# Path shapes after the tenant / "/v1" prefix -> {HTTP method: operation}.
_COLLECTION_ROUTES: Final[Mapping[str, Mapping[str, A2aOperation]]] = MappingProxyType(
    {
        "message:send": {"POST": A2aOperation.SEND_MESSAGE},
        "message:stream": {"POST": A2aOperation.SEND_STREAMING_MESSAGE},
        "tasks": {"GET": A2aOperation.LIST_TASKS},
        "extendedAgentCard": {"GET": A2aOperation.GET_EXTENDED_CARD},
        "card": {"GET": A2aOperation.GET_EXTENDED_CARD},  # 0.3: GET /v1/card
    }
)
_TASK_ROUTES: Final[Mapping[str, Mapping[str, A2aOperation]]] = MappingProxyType(
    {
        "": {"GET": A2aOperation.GET_TASK},
        ":cancel": {"POST": A2aOperation.CANCEL_TASK},
        ":subscribe": {"GET": A2aOperation.SUBSCRIBE_TO_TASK, "POST": A2aOperation.SUBSCRIBE_TO_TASK},
    }
)
_CONFIGS_ROUTES: Final[Mapping[str, A2aOperation]] = MappingProxyType(
    {"POST": A2aOperation.CREATE_PUSH_CONFIG, "GET": A2aOperation.LIST_PUSH_CONFIGS}
)
_CONFIG_ROUTES: Final[Mapping[str, A2aOperation]] = MappingProxyType(
    {"GET": A2aOperation.GET_PUSH_CONFIG, "DELETE": A2aOperation.DELETE_PUSH_CONFIG}
)
_BODY_OPERATIONS: Final = frozenset({A2aOperation.SEND_MESSAGE, A2aOperation.SEND_STREAMING_MESSAGE})
_MAX_SEGMENTS: Final = 6


@dataclass(frozen=True, slots=True)
class _Route:
    routes: Mapping[str, A2aOperation]
    task_id: str = ""


def _match_route(segments: list[str], legacy: bool) -> _Route | None:
    """The routes of a path split into segments (the tenant / ``v1`` prefix already removed)."""
    if len(segments) == 1:
        routes = _COLLECTION_ROUTES.get(segments[0])
        if routes is None or (segments[0] == "card" and not legacy):
            return None
        return _Route(routes)
    if not segments or segments[0] != "tasks":
        return None
    if len(segments) == 2:
        raw = segments[1]
        for suffix, routes in _TASK_ROUTES.items():
            if suffix and raw.endswith(suffix):
                task = raw[: -len(suffix)]
                return _Route(routes, unquote(task)) if task else None
        return _Route(_TASK_ROUTES[""], unquote(raw)) if raw and ":" not in raw else None
    if segments[2] != "pushNotificationConfigs" or not segments[1]:
        return None
    if len(segments) == 3:
        return _Route(_CONFIGS_ROUTES, unquote(segments[1]))
    if len(segments) == 4 and segments[3]:
        return _Route(_CONFIG_ROUTES, unquote(segments[1]))
    return None


def classify_rest(
    http_method: str | bytes,
    path: str | bytes,
    *,
    version: str = DEFAULT_VERSION,
    body: bytes = b"",
    max_bytes: int | None = None,
) -> A2aCall:
    """Classify an HTTP+JSON request. ``path`` is relative to the agent's mount and may carry a query.
    Sends read ``message.taskId`` / ``contextId`` from ``body``. Raises ``A2aMethodNotFound`` (404) for an
    unknown path, ``A2aMethodNotAllowed`` (405, ``allow`` set) for a wrong verb, and the body errors of
    ``classify_jsonrpc`` (400 / 413)."""
    verb = (http_method.decode("latin-1") if isinstance(http_method, bytes) else http_method).upper()
    text = path.decode("latin-1") if isinstance(path, bytes) else path
    raw_path, _, query = text.partition("?")
    segments = raw_path.strip("/").split("/") if raw_path.strip("/") else []
    legacy = _is_legacy(version)
    tenant = ""
    route: _Route | None = None
    if len(segments) <= _MAX_SEGMENTS:
        route = _match_route(segments, legacy)
        if route is None and len(segments) > 1:
            # A leading segment is the 0.3 REST prefix "v1" (0.x clients) or a tenant.
            route = _match_route(segments[1:], legacy)
            if route is not None and not (legacy and segments[0] == "v1"):
                tenant = unquote(segments[0])
    if route is None:
        raise A2aMethodNotFound(f"Not found: {verb} {echo(raw_path)} is not an A2A operation")
    operation = route.routes.get(verb)
    if operation is None:
        allow = tuple(route.routes)
        raise A2aMethodNotAllowed(
            f"Method not allowed: {verb} {echo(raw_path)} (allowed: {', '.join(allow)})", allow=allow
        )
    task_id, context_id = route.task_id, ""
    if operation in _BODY_OPERATIONS:
        task_id, context_id = _rest_body_ids(operation, body, max_bytes)
    elif max_bytes is not None and len(body) > max_bytes:
        raise payload_too_large(max_bytes)
    if operation is A2aOperation.LIST_TASKS and query:
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in ("contextId", "context_id"):
                context_id = value
    return A2aCall(
        operation=operation,
        method=operation.value,
        binding="rest",
        version=version,
        name_set="0.3" if legacy else "1.0",
        task_id=task_id,
        context_id=context_id,
        tenant=tenant,
    )


def _rest_body_ids(operation: A2aOperation, body: bytes, max_bytes: int | None) -> tuple[str, str]:
    if max_bytes is not None and len(body) > max_bytes:
        raise payload_too_large(max_bytes)
    try:
        request = decode_json(body)
    except ValueError as exc:
        raise A2aParseError(f"Parse error: {exc}") from None
    if type(request) is not dict:
        raise A2aInvalidRequest("Invalid Request: the body must be a JSON object")
    return _jsonrpc_ids(operation, "1.0", request, "body")


__all__ = [
    "DEFAULT_VERSION",
    "METHODS",
    "VERSION_HEADER",
    "A2aCall",
    "A2aOperation",
    "NameSet",
    "classify_jsonrpc",
    "classify_rest",
    "protocol_version",
]
