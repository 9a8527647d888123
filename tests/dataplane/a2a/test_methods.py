"""dataplane.a2a.methods: requests the a2a-sdk client really sends (recorded from the SDK peers), both name
sets and both bindings, literal bodies for shapes the SDK does not send, and every bad input."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from a2a.client import Client
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    GetTaskPushNotificationConfigRequest,
    GetTaskRequest,
    ListTaskPushNotificationConfigsRequest,
    ListTasksRequest,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)

from dataplane.a2a.errors import (
    A2aError,
    A2aInvalidParams,
    A2aInvalidRequest,
    A2aMethodNotAllowed,
    A2aMethodNotFound,
    A2aParseError,
    A2aPayloadTooLarge,
    A2aVersionNotSupported,
)
from dataplane.a2a.methods import (
    METHODS,
    A2aCall,
    A2aOperation,
    classify_jsonrpc,
    classify_rest,
    protocol_version,
)
from dataplane.policy.authorize import A2A_OPERATIONS, a2a_variables
from tests.dataplane.a2a.test_peers import user_message
from tests.dataplane.a2a.wire import Sent, recording_client
from tests.peers.a2a_agents import Binding, serve_agent

pytestmark = pytest.mark.anyio

Op = A2aOperation


def classify(sent: Sent, binding: Binding) -> A2aCall:
    version = protocol_version(sent.version_header)
    if binding == "JSONRPC":
        assert sent.method == "POST" and sent.path == "/"
        return classify_jsonrpc(sent.body, version=version, max_bytes=1 << 20)
    return classify_rest(sent.method, sent.path, version=version, body=sent.body, max_bytes=1 << 20)


async def run_scenario(client: Client, *, with_list: bool, push_list_delete: bool) -> tuple[str, str]:
    """send (stream), send again in the context, get, [list], push set/get[/list/delete], slow send + cancel
    (the SDK's 0.3 clients have no tasks/list, and its 0.3 REST client no push list or delete)."""
    with anyio.fail_after(15):
        events = [e async for e in client.send_message(user_message("hello"))]
        task_id, context_id = events[0].task.id, events[0].task.context_id
        [e async for e in client.send_message(user_message("again", context_id=context_id))]
        await client.get_task(GetTaskRequest(id=task_id))
        if with_list:
            await client.list_tasks(ListTasksRequest(context_id=context_id))
        await client.create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=task_id, id="hook", url="https://hooks.example.com/a2a")
        )
        await client.get_task_push_notification_config(GetTaskPushNotificationConfigRequest(task_id=task_id, id="hook"))
        if push_list_delete:
            await client.list_task_push_notification_configs(ListTaskPushNotificationConfigsRequest(task_id=task_id))
            await client.delete_task_push_notification_config(
                DeleteTaskPushNotificationConfigRequest(task_id=task_id, id="hook")
            )
        async for event in client.send_message(user_message("slow")):
            if event.HasField("status_update") and event.status_update.status.state == TaskState.TASK_STATE_WORKING:
                await client.cancel_task(CancelTaskRequest(id=event.status_update.task_id))
    return task_id, context_id


EXPECTED_1_0 = [
    Op.SEND_STREAMING_MESSAGE,
    Op.SEND_STREAMING_MESSAGE,
    Op.GET_TASK,
    Op.LIST_TASKS,
    Op.CREATE_PUSH_CONFIG,
    Op.GET_PUSH_CONFIG,
    Op.LIST_PUSH_CONFIGS,
    Op.DELETE_PUSH_CONFIG,
    Op.SEND_STREAMING_MESSAGE,
    Op.CANCEL_TASK,
]


@pytest.mark.parametrize(
    ("binding", "version", "with_list"),
    [("JSONRPC", "1.0", True), ("HTTP+JSON", "1.0", True), ("JSONRPC", "0.3", False), ("HTTP+JSON", "0.3", False)],
)
async def test_sdk_requests_classify_to_the_operations_the_client_called(
    binding: Binding, version: str, with_list: bool
) -> None:
    async with (
        serve_agent(base_path="/a2a") as agent,
        recording_client(agent, binding=binding, version=version) as (client, sent),
    ):
        push_list_delete = (binding, version) != ("HTTP+JSON", "0.3")
        task_id, context_id = await run_scenario(client, with_list=with_list, push_list_delete=push_list_delete)
    calls = [classify(s, binding) for s in sent]
    skipped = set() if with_list else {Op.LIST_TASKS}
    if not push_list_delete:
        skipped |= {Op.LIST_PUSH_CONFIGS, Op.DELETE_PUSH_CONFIG}
    expected = [op for op in EXPECTED_1_0 if op not in skipped]
    assert [c.operation for c in calls] == expected
    assert {c.version for c in calls} == {version}
    assert {c.binding for c in calls} == {"jsonrpc" if binding == "JSONRPC" else "rest"}
    if binding == "JSONRPC":
        # The method as sent is the version's own name; the operation is always the 1.0 name.
        names = [c.method for c in calls]
        assert names == [op.legacy_name if version == "0.3" else op.value for op in expected]
        assert all(c.request_id is not None for c in calls)
    else:
        assert all(c.request_id is None for c in calls)
    first, second, get = calls[0], calls[1], calls[2]
    assert first.streaming and (first.task_id, first.context_id) == ("", "")
    assert second.context_id == context_id
    assert get.task_id == task_id
    pushes = [c for c in calls if c.operation.value.endswith(("PushNotificationConfig", "PushNotificationConfigs"))]
    assert [c.task_id for c in pushes] == [task_id] * (4 if push_list_delete else 2)
    assert calls[-1].operation is Op.CANCEL_TASK and calls[-1].task_id
    if with_list:
        assert calls[3].context_id == context_id


@pytest.mark.parametrize(("binding", "version"), [("JSONRPC", "1.0"), ("HTTP+JSON", "1.0")])
async def test_sdk_subscribe_and_extended_card(binding: Binding, version: str) -> None:
    async with (
        serve_agent() as agent,
        recording_client(agent, binding=binding, version=version) as (client, sent),
    ):
        with anyio.fail_after(10):
            await client.get_extended_agent_card(GetExtendedAgentCardRequest())
            stream = client.send_message(user_message("slow"))
            task_id = (await anext(stream)).task.id
            await stream.aclose()
            await agent.activity.started_event(task_id).wait()
            cancelled = False
            async for _ in client.subscribe(SubscribeToTaskRequest(id=task_id)):
                if not cancelled:
                    cancelled = True
                    await client.cancel_task(CancelTaskRequest(id=task_id))
    calls = [classify(s, binding) for s in sent]
    assert [c.operation for c in calls] == [
        Op.GET_EXTENDED_CARD,
        Op.SEND_STREAMING_MESSAGE,
        Op.SUBSCRIBE_TO_TASK,
        Op.CANCEL_TASK,
    ]
    assert calls[2].streaming and calls[2].task_id == task_id


# Names ---------------------------------------------------------------------------------------------------


def rpc(method: str, params: Any = None, request_id: Any = 7, **extra: Any) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method, **extra}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode()


def test_both_name_sets_map_to_one_operation_and_agree_with_the_policy_layer() -> None:
    for op in A2aOperation:
        legacy = classify_jsonrpc(rpc(op.legacy_name, {}))
        modern = classify_jsonrpc(rpc(op.value, {}), version="1.0")
        assert legacy.operation is modern.operation is op
        assert (legacy.name_set, modern.name_set) == ("0.3", "1.0")
        assert legacy.streaming is modern.streaming is (op in (Op.SEND_STREAMING_MESSAGE, Op.SUBSCRIBE_TO_TASK))
        # The policy layer's table and ours say the same thing about every 0.3 name.
        assert A2A_OPERATIONS[op.legacy_name] == op.value
        variables = legacy.variables("planner", "agents")
        reference = a2a_variables(op.legacy_name, target="planner", namespace="agents")
        assert {k: variables[k] for k in reference} == reference
    assert set(A2A_OPERATIONS) <= set(METHODS)


def test_draft_1_0_spellings_are_accepted() -> None:
    assert classify_jsonrpc(rpc("SetTaskPushNotificationConfig", {"taskId": "t"})).operation is Op.CREATE_PUSH_CONFIG
    assert classify_jsonrpc(rpc("ListTaskPushNotificationConfig", {"taskId": "t"})).task_id == "t"


def test_cel_variables_carry_ids_version_and_both_names() -> None:
    body = rpc("message/stream", {"message": {"role": "user", "taskId": "t1", "contextId": "c1", "parts": []}})
    call = classify_jsonrpc(body, version=protocol_version(""))
    assert call.variables("planner", "agents") == {
        "method": "message/stream",
        "operation": "SendStreamingMessage",
        "target": {"name": "planner", "namespace": "agents"},
        "version": "0.3",
        "taskId": "t1",
        "contextId": "c1",
        "binding": "jsonrpc",
        "streaming": True,
    }
    assert call.log_fields() == {
        "a2a_method": "message/stream",
        "a2a_operation": "SendStreamingMessage",
        "a2a_task_id": "t1",
        "a2a_context_id": "c1",
        "a2a_version": "0.3",
    }


@pytest.mark.parametrize(
    ("method", "params", "task_id", "context_id"),
    [
        ("SendMessage", {"message": {"task_id": "t", "context_id": "c"}}, "t", "c"),  # ProtoJSON snake_case
        ("GetTask", {"name": "tasks/t9"}, "t9", ""),  # 1.0 draft resource name
        ("tasks/get", {"id": "t2", "historyLength": 3}, "t2", ""),
        ("tasks/resubscribe", {"id": "t3"}, "t3", ""),
        ("ListTasks", {"contextId": "c4"}, "", "c4"),
        ("tasks/pushNotificationConfig/set", {"taskId": "t5", "pushNotificationConfig": {"url": "u"}}, "t5", ""),
        ("tasks/pushNotificationConfig/get", {"id": "t6", "pushNotificationConfigId": "p"}, "t6", ""),
        ("tasks/pushNotificationConfig/delete", {"id": "t7", "pushNotificationConfigId": "p"}, "t7", ""),
        ("GetTaskPushNotificationConfig", {"taskId": "t8", "id": "p"}, "t8", ""),
        ("CreateTaskPushNotificationConfig", {"parent": "tasks/t10", "config": {}}, "t10", ""),
        ("GetTaskPushNotificationConfig", {"name": "tasks/t11/pushNotificationConfigs/p"}, "t11", ""),
        ("agent/getAuthenticatedExtendedCard", None, "", ""),
    ],
)
def test_ids_from_literal_params(method: str, params: Any, task_id: str, context_id: str) -> None:
    call = classify_jsonrpc(rpc(method, params))
    assert (call.task_id, call.context_id) == (task_id, context_id)


def test_ids_string_null_and_absent() -> None:
    assert classify_jsonrpc(rpc("GetTask", {}, request_id="abc")).request_id == "abc"
    assert classify_jsonrpc(rpc("GetTask", {}, request_id=None)).request_id is None
    no_id = json.dumps({"jsonrpc": "2.0", "method": "GetTask", "params": {}}).encode()
    assert classify_jsonrpc(no_id).request_id is None


# Bad JSON-RPC input -----------------------------------------------------------------------------------------


def refused(body: bytes, **kwargs: Any) -> A2aError:
    with pytest.raises(A2aError) as caught:
        classify_jsonrpc(body, **kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("body", "kind", "code", "request_id"),
    [
        (b"not json", A2aParseError, -32700, None),
        (b"", A2aParseError, -32700, None),
        (b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "GetTask"}', A2aParseError, -32700, None),
        (b'{"jsonrpc": "2.0", "id": NaN, "method": "GetTask"}', A2aParseError, -32700, None),
        (b"\xff\xfe{}", A2aParseError, -32700, None),
        (b"[" * 200 + b"]" * 200, A2aParseError, -32700, None),
        (b"[]", A2aInvalidRequest, -32600, None),
        (b'"text"', A2aInvalidRequest, -32600, None),
        (b'{"jsonrpc": "1.0", "id": 3, "method": "GetTask"}', A2aInvalidRequest, -32600, 3),
        (b'{"id": 3, "method": "GetTask"}', A2aInvalidRequest, -32600, 3),
        (b'{"jsonrpc": "2.0", "id": true, "method": "GetTask"}', A2aInvalidRequest, -32600, None),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "GetTask"}', A2aInvalidRequest, -32600, None),
        (b'{"jsonrpc": "2.0", "id": {}, "method": "GetTask"}', A2aInvalidRequest, -32600, None),
        (b'{"jsonrpc": "2.0", "id": 4, "method": 5}', A2aInvalidRequest, -32600, 4),
        (b'{"jsonrpc": "2.0", "id": 4, "method": ""}', A2aInvalidRequest, -32600, 4),
        (b'{"jsonrpc": "2.0", "id": 4, "result": {}}', A2aInvalidRequest, -32600, 4),
        (b'{"jsonrpc": "2.0", "id": 4, "method": "GetTask", "error": {}}', A2aInvalidRequest, -32600, 4),
        (b'{"jsonrpc": "2.0", "id": 5, "method": "tasks/send"}', A2aMethodNotFound, -32601, 5),
        (b'{"jsonrpc": "2.0", "id": 5, "method": "sendmessage"}', A2aMethodNotFound, -32601, 5),
        (b'{"jsonrpc": "2.0", "id": 6, "method": "GetTask", "params": [1]}', A2aInvalidParams, -32602, 6),
        (b'{"jsonrpc": "2.0", "id": 6, "method": "GetTask", "params": {"id": 9}}', A2aInvalidParams, -32602, 6),
        (
            b'{"jsonrpc": "2.0", "id": 6, "method": "SendMessage", "params": {"message": "hi"}}',
            A2aInvalidParams,
            -32602,
            6,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 6, "method": "message/send", "params": {"message": {"contextId": []}}}',
            A2aInvalidParams,
            -32602,
            6,
        ),
        (b'{"jsonrpc": "2.0", "id": 6, "method": "ListTasks", "params": {"tenant": 1}}', A2aInvalidParams, -32602, 6),
    ],
)
def test_bad_jsonrpc_bodies(body: bytes, kind: type[A2aError], code: int, request_id: Any) -> None:
    error = refused(body)
    assert type(error) is kind
    assert error.jsonrpc_code == code
    assert error.request_id == request_id
    response = json.loads(error.jsonrpc_body())
    assert response["jsonrpc"] == "2.0" and response["id"] == request_id and response["error"]["code"] == code
    assert error.jsonrpc_http_status == 200  # message-level: answered like an A2A server does


def test_oversized_body_is_413() -> None:
    error = refused(rpc("GetTask", {"id": "x" * 100}), max_bytes=64)
    assert type(error) is A2aPayloadTooLarge
    assert (error.http_status, error.jsonrpc_http_status, error.jsonrpc_code) == (413, 413, -32600)


def test_unknown_method_name_is_echoed_bounded() -> None:
    error = refused(rpc("x" * 5000, {}))
    assert len(error.message) < 200


@pytest.mark.parametrize(
    ("header", "version"), [(None, "0.3"), ("", "0.3"), ("  ", "0.3"), ("1.0", "1.0"), (b"0.3.1", "0.3.1")]
)
def test_version_header(header: str | bytes | None, version: str) -> None:
    assert protocol_version(header) == version


@pytest.mark.parametrize("header", ["one", "1", "1.0-beta", "v1.0", "1.0, 0.3", "1.0.0.0"])
def test_malformed_version_header(header: str) -> None:
    with pytest.raises(A2aVersionNotSupported) as caught:
        protocol_version(header)
    assert caught.value.jsonrpc_code == -32009 and caught.value.http_status == 400


# REST ------------------------------------------------------------------------------------------------------

SEND_BODY = json.dumps({"message": {"role": "ROLE_USER", "taskId": "t1", "contextId": "c1", "parts": []}}).encode()


@pytest.mark.parametrize(
    ("verb", "path", "version", "operation", "task_id", "tenant"),
    [
        ("POST", "/message:send", "1.0", Op.SEND_MESSAGE, "t1", ""),
        ("POST", "/message:stream", "1.0", Op.SEND_STREAMING_MESSAGE, "t1", ""),
        ("GET", "/tasks/abc", "1.0", Op.GET_TASK, "abc", ""),
        ("GET", "/tasks/a%2Fb?historyLength=2", "1.0", Op.GET_TASK, "a/b", ""),
        ("POST", "/tasks/abc:cancel", "1.0", Op.CANCEL_TASK, "abc", ""),
        ("GET", "/tasks/abc:subscribe", "1.0", Op.SUBSCRIBE_TO_TASK, "abc", ""),
        ("POST", "/tasks/abc:subscribe", "1.0", Op.SUBSCRIBE_TO_TASK, "abc", ""),
        ("GET", "/tasks", "1.0", Op.LIST_TASKS, "", ""),
        ("POST", "/tasks/abc/pushNotificationConfigs", "1.0", Op.CREATE_PUSH_CONFIG, "abc", ""),
        ("GET", "/tasks/abc/pushNotificationConfigs", "1.0", Op.LIST_PUSH_CONFIGS, "abc", ""),
        ("GET", "/tasks/abc/pushNotificationConfigs/p1", "1.0", Op.GET_PUSH_CONFIG, "abc", ""),
        ("DELETE", "/tasks/abc/pushNotificationConfigs/p1", "1.0", Op.DELETE_PUSH_CONFIG, "abc", ""),
        ("GET", "/extendedAgentCard", "1.0", Op.GET_EXTENDED_CARD, "", ""),
        ("POST", "/acme/message:send", "1.0", Op.SEND_MESSAGE, "t1", "acme"),
        ("GET", "/acme/tasks/abc", "1.0", Op.GET_TASK, "abc", "acme"),
        ("GET", "/v1/tasks/abc", "1.0", Op.GET_TASK, "abc", "v1"),  # 1.x: "v1" is a tenant
        ("GET", "/v1/tasks/abc", "0.3", Op.GET_TASK, "abc", ""),  # 0.x: the 0.3 REST prefix
        ("GET", "/v1/card", "0.3", Op.GET_EXTENDED_CARD, "", ""),
        ("post", b"/message:send", "1.0", Op.SEND_MESSAGE, "t1", ""),
    ],
)
def test_rest_routes(
    verb: str, path: str | bytes, version: str, operation: A2aOperation, task_id: str, tenant: str
) -> None:
    call = classify_rest(verb, path, version=version, body=SEND_BODY)
    assert (call.operation, call.task_id, call.tenant) == (operation, task_id, tenant)
    assert call.method == operation.value and call.binding == "rest" and call.request_id is None


def test_rest_list_reads_the_context_filter() -> None:
    assert classify_rest("GET", "/tasks?contextId=c9&pageSize=2", version="1.0").context_id == "c9"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/message",
        "/message:sned",
        "/tasks/",
        "/tasks/a/b",
        "/card",
        "/x/y/z",
        "/tasks//pushNotificationConfigs",
        "/a/b/c/d/e/f/g/h",
    ],
)
def test_rest_unknown_path_is_404(path: str) -> None:
    if path == "/tasks/":  # a trailing slash is the collection itself
        assert classify_rest("GET", path, version="1.0").operation is Op.LIST_TASKS
        return
    with pytest.raises(A2aMethodNotFound) as caught:
        classify_rest("GET", path, version="1.0")
    assert type(caught.value) is A2aMethodNotFound and caught.value.http_status == 404
    problem = json.loads(caught.value.rest_body())["error"]
    assert problem["code"] == 404 and problem["status"] == "NOT_FOUND"
    assert problem["details"][0]["reason"] == "METHOD_NOT_FOUND"


@pytest.mark.parametrize(
    ("verb", "path", "allow"),
    [
        ("GET", "/message:send", ("POST",)),
        ("DELETE", "/tasks/abc", ("GET",)),
        ("PUT", "/tasks/abc/pushNotificationConfigs", ("POST", "GET")),
        ("POST", "/tasks/abc/pushNotificationConfigs/p", ("GET", "DELETE")),
        ("HEAD", "/tasks", ("GET",)),
    ],
)
def test_rest_wrong_verb_is_405_with_allow(verb: str, path: str, allow: tuple[str, ...]) -> None:
    with pytest.raises(A2aMethodNotAllowed) as caught:
        classify_rest(verb, path, version="1.0")
    assert caught.value.http_status == 405 and caught.value.allow == allow


@pytest.mark.parametrize(
    ("body", "kind", "status"),
    [
        (b"{", A2aParseError, 400),
        (b"", A2aParseError, 400),
        (b"[1]", A2aInvalidRequest, 400),
        (b'{"message": {"taskId": 1}}', A2aInvalidParams, 400),
        (b'{"message": "hi"}', A2aInvalidParams, 400),
        (b'{"message": {}}' + b" " * 100, A2aPayloadTooLarge, 413),
    ],
)
def test_rest_bad_send_bodies(body: bytes, kind: type[A2aError], status: int) -> None:
    with pytest.raises(A2aError) as caught:
        classify_rest("POST", "/message:send", version="1.0", body=body, max_bytes=64)
    assert type(caught.value) is kind and caught.value.http_status == status
    assert json.loads(caught.value.rest_body())["error"]["code"] == status


def test_rest_oversized_body_on_other_routes_is_413() -> None:
    with pytest.raises(A2aPayloadTooLarge):
        classify_rest("POST", "/tasks/t/pushNotificationConfigs", version="1.0", body=b"x" * 65, max_bytes=64)
