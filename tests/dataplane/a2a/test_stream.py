"""dataplane.a2a.stream: SSE streams recorded from the SDK peer (JSON-RPC 1.0 and 0.3, REST) relayed in
chunks of every size, and streams that end badly (cut, garbage, oversized, no final event)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from dataplane.a2a.errors import A2aAgentTimeout, Binding, agent_unavailable
from dataplane.a2a.stream import A2aStreamRelay, RelayOutput, describe_result, is_event_stream, normal_state
from dataplane.mcp.sse import SseParser
from tests.peers.a2a_agents import RunningAgent, serve_agent

pytestmark = pytest.mark.anyio


def message(text: str, legacy: bool) -> dict[str, Any]:
    if legacy:
        return {"messageId": f"m-{text}", "role": "user", "parts": [{"kind": "text", "text": text}]}
    return {"messageId": f"m-{text}", "role": "ROLE_USER", "parts": [{"text": text}]}


async def record_stream(agent: RunningAgent, binding: Binding, version: str, text: str) -> bytes:
    """The raw SSE bytes the agent answers a streaming send with (what the gateway will relay)."""
    legacy = version == "0.3"
    headers = {"A2A-Version": version, "Accept": "text/event-stream"}
    if binding == "jsonrpc":
        method = "message/stream" if legacy else "SendStreamingMessage"
        url = agent.url
        body: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": "r1",
            "method": method,
            "params": {"message": message(text, legacy)},
        }
    else:
        url = f"{agent.url.rstrip('/')}/message:stream"
        body = {"message": message(text, legacy)}
    chunks: list[bytes] = []
    with anyio.fail_after(10):
        async with httpx.AsyncClient() as http, http.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200 and is_event_stream(response.headers["content-type"])
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
    return b"".join(chunks)


def relay_in_chunks(relay: A2aStreamRelay, data: bytes, size: int) -> tuple[bytes, list[Any], bool]:
    out = bytearray()
    events: list[Any] = []
    closed = False
    for start in range(0, len(data), size):
        step: RelayOutput = relay.feed(data[start : start + size])
        out += step.data
        events.extend(step.events)
        closed = closed or step.closed
    return bytes(out), events, closed


def sse_events(data: bytes) -> list[tuple[str, Any]]:
    return [(e.event, json.loads(e.data)) for e in SseParser().feed(data)]


@pytest.mark.parametrize(("binding", "version"), [("jsonrpc", "1.0"), ("jsonrpc", "0.3"), ("rest", "1.0")])
async def test_recorded_stream_passes_through_unchanged_in_any_chunking(binding: Binding, version: str) -> None:
    async with serve_agent() as agent:
        recorded = await record_stream(agent, binding, version, "countdown 2")
    for size in (1, 2, 7, 64, len(recorded)):
        relay = A2aStreamRelay(binding=binding, agent="echo", request_id="r1")
        out, events, closed = relay_in_chunks(relay, recorded, size)
        assert out == recorded and not closed
        assert [(e.kind, e.state) for e in events] == [
            ("task", "submitted"),
            ("status-update", "working"),
            ("status-update", "working"),
            ("status-update", "working"),
            ("artifact-update", ""),
            ("status-update", "completed"),
        ]
        assert events[-1].final and not any(e.final for e in events[:-1])
        task_id = events[0].task_id
        assert task_id and all(e.task_id == task_id for e in events)
        assert relay.final_seen and relay.last_state == "completed" and relay.event_count == 6
        assert relay.log_fields()["a2a_context_id"] == events[0].context_id != ""
        assert relay.finish() == b""


async def test_cancelled_stream_ends_with_canceled() -> None:
    async with serve_agent() as agent:
        relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=9)
        headers = {"A2A-Version": "1.0"}
        body = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "SendStreamingMessage",
            "params": {"message": message("slow", False)},
        }
        states: list[str] = []
        with anyio.fail_after(10):
            async with (
                httpx.AsyncClient() as http,
                http.stream("POST", agent.url, json=body, headers=headers) as response,
            ):
                async for chunk in response.aiter_raw():
                    for event in relay.feed(chunk).events:
                        states.append(event.state)
                        if event.state == "working":
                            cancel = {
                                "jsonrpc": "2.0",
                                "id": 10,
                                "method": "CancelTask",
                                "params": {"id": event.task_id},
                            }
                            answer = await http.post(agent.url, json=cancel, headers=headers)
                            assert answer.json()["result"]["status"]["state"] == "TASK_STATE_CANCELED"
    assert states[-1] == "canceled" and relay.final_seen
    assert relay.finish() == b""


async def test_agent_dies_mid_event_client_gets_whole_events_then_an_error_event() -> None:
    async with serve_agent() as agent:
        recorded = await record_stream(agent, "jsonrpc", "1.0", "countdown 2")
    cut = recorded.index(b"artifactUpdate")  # inside the fifth event
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id="r1")
    out, events, _ = relay_in_chunks(relay, recorded[:cut], 5)
    assert len(events) == 4
    out += relay.fail()
    assert out.startswith(recorded[: recorded.rindex(b"\r\n\r\n", 0, cut) + 4])
    *forwarded, (kind, last) = sse_events(out)
    assert len(forwarded) == 4 and kind == "error"
    assert last == {
        "jsonrpc": "2.0",
        "id": "r1",
        "error": {
            "code": -32603,
            "message": "Agent 'echo' is unavailable: connection lost",
            "data": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "AGENT_UNAVAILABLE",
                    "domain": "agentgate.dev",
                    "metadata": {"agent": "echo"},
                }
            ],
        },
    }
    assert relay.closed and relay.feed(b"data: {}\n\n") == RelayOutput(b"", closed=True)
    assert relay.finish() == b""


async def test_rest_stream_error_is_an_aip_193_body() -> None:
    async with serve_agent() as agent:
        recorded = await record_stream(agent, "rest", "1.0", "hello")
    first_event_end = recorded.index(b"\r\n\r\n") + 4  # sse-starlette ends lines with CRLF
    relay = A2aStreamRelay(binding="rest", agent="echo")
    out = relay.feed(recorded[:first_event_end]).data
    out += relay.finish(A2aAgentTimeout("Agent 'echo' did not answer in time"))
    (_, first), (kind, error) = sse_events(out)
    assert "task" in first and kind == "error"
    assert error["error"]["code"] == 504 and error["error"]["status"] == "DEADLINE_EXCEEDED"


def test_clean_close_before_a_final_event_still_ends_with_an_error() -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=1)
    working = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"statusUpdate": {"taskId": "t", "status": {"state": "TASK_STATE_WORKING"}}},
    }
    step = relay.feed(b"data: " + json.dumps(working).encode() + b"\n\n")
    assert [e.state for e in step.events] == ["working"]
    ((kind, error),) = sse_events(relay.finish())
    assert kind == "error" and error["id"] == 1 and error["error"]["code"] == -32603
    assert "before the task reached a final state" in error["error"]["message"]


@pytest.mark.parametrize(
    "data",
    [
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"jsonrpc": "2.0", "id": 1}\n\n',  # neither result nor error
        b'data: {"jsonrpc": "2.0", "id": 1, "error": "boom"}\n\n',
    ],
)
def test_garbage_event_closes_the_stream_with_invalid_agent_response(data: bytes) -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=4)
    step = relay.feed(b": ping\n\n" + data)
    assert step.closed and relay.closed
    assert step.data.startswith(b": ping\n\n")  # what came before the bad event was already whole
    ((kind, error),) = sse_events(step.data)
    assert kind == "error" and error["id"] == 4 and error["error"]["code"] == -32006
    assert relay.finish() == b""


def test_oversized_event_closes_the_stream() -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=4, max_event_bytes=64)
    assert relay.feed(b"data: " + b"x" * 40).data == b""
    step = relay.feed(b"y" * 40)
    assert step.closed
    ((kind, error),) = sse_events(step.data)
    assert kind == "error" and "larger than 64 bytes" in error["error"]["message"]


def test_upstream_error_event_is_final_and_forwarded() -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=4)
    error = b'event: error\ndata: {"jsonrpc":"2.0","id":4,"error":{"code":-32001,"message":"Task not found"}}\n\n'
    step = relay.feed(error)
    assert step.data == error and step.events[0].kind == "error" and step.events[0].error_code == -32001
    assert relay.finish() == b""


def test_line_endings_comments_and_split_crlf() -> None:
    final = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"kind": "status-update", "taskId": "t", "final": True, "status": {"state": "working"}},
    }
    payload = json.dumps(final).encode()
    stream = b": keep-alive\r\n\r\n" + b"data: " + payload + b"\r\r" + b"retry: 10\n\n"
    for size in (1, 3, len(stream)):
        relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=1)
        out, events, closed = relay_in_chunks(relay, stream, size)
        assert out == stream and not closed
        assert [(e.kind, e.final) for e in events] == [("status-update", True)]  # 0.3 "final": true
    # A CR at the end of one chunk and the LF of the next are one line end, not an empty line.
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=1)
    assert relay.feed(b"data: " + payload + b"\r").data == b""
    assert relay.feed(b"\n").data == b""
    assert relay.feed(b"\r\n").events[0].final


def test_keepalive_comment_is_forwarded_at_once() -> None:
    relay = A2aStreamRelay(binding="rest", agent="echo")
    assert relay.feed(b": ping - 2024\r\n\r\n").data == b": ping - 2024\r\n\r\n"
    assert relay.event_count == 0


def test_lone_message_is_final() -> None:
    relay = A2aStreamRelay(binding="rest", agent="echo")
    step = relay.feed(b'data: {"message": {"messageId": "m", "contextId": "c", "role": "ROLE_AGENT"}}\n\n')
    assert step.events[0].final and relay.context_id == "c"
    assert relay.finish() == b""


def test_without_inspection_only_a_cut_event_is_an_error() -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=1, inspect=False)
    assert relay.feed(b"data: anything\n\n").data == b"data: anything\n\n"
    assert relay.event_count == 1 and relay.finish() == b""
    cut = A2aStreamRelay(binding="jsonrpc", agent="echo", request_id=1, inspect=False)
    cut.feed(b"data: half")
    assert b"event: error" in cut.finish()


def test_finish_with_an_error_uses_the_request_id() -> None:
    relay = A2aStreamRelay(binding="jsonrpc", agent="billing", request_id="abc")
    ((kind, error),) = sse_events(relay.finish(agent_unavailable("billing", detail="connection refused")))
    assert kind == "error" and error["id"] == "abc"
    assert error["error"]["message"] == "Agent 'billing' is unavailable: connection refused"


def test_states_and_results() -> None:
    assert normal_state("TASK_STATE_INPUT_REQUIRED") == "input-required"
    assert normal_state("auth-required") == "auth-required"
    assert normal_state(None) == ""
    assert describe_result({"task": {"id": "t", "context_id": "c", "status": {"state": "TASK_STATE_REJECTED"}}}) == (
        describe_result({"kind": "task", "id": "t", "contextId": "c", "status": {"state": "rejected"}})
    )
    assert describe_result({"artifact_update": {"task_id": "t"}}).kind == "artifact-update"
    assert describe_result({"other": 1}).kind == "unknown" and describe_result([]).kind == "unknown"
    assert is_event_stream(b"text/event-stream; charset=utf-8") and not is_event_stream("application/json")
    assert not is_event_stream(None)
