"""MCP federation end to end with real peers: YAML folder -> control plane -> worker -> MCP servers.

One MCP Backend federates four targets over three transports: the TypeScript reference server
(server-everything) over stdio (the worker spawns it), legacy HTTP+SSE and streamable HTTP (child
processes), and a Python SDK server over streamable HTTP (in this process). Clients are the
TypeScript SDK (speaks 2025-11-25; tests/peers/node/client.mjs), the Python SDK (`mode="legacy"`) and
raw httpx for bad input. Upstream server-everything processes trace what they receive, so the tests
can see what the gateway forwarded (notifications/cancelled with the upstream's own request id).
"""

from __future__ import annotations

import base64
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from mcp import Client

from tests.conftest import free_port
from tests.e2e.harness import (
    GATEWAY_CLASS,
    LoggedProcess,
    WorkerPorts,
    controlplane_command,
    dataplane_command,
    event,
    logged_process,
    write_documents,
)
from tests.peers.everything import Everything, everything, everything_command
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.node_client import ELICITED, SAMPLED_TEXT, ensure_node_packages, require_node, run_ts_client

pytestmark = pytest.mark.anyio

SESSION_KEY = base64.b64encode(bytes(range(32))).decode()
MAX_BODY = 65536
ACCEPT_BOTH = "application/json, text/event-stream"
POST_HEADERS = {"accept": ACCEPT_BOTH, "content-type": "application/json"}
VERSION = "2025-11-25"
STDIO_TOOLS_SERVER = str(Path(__file__).parents[1] / "peers" / "mcp_servers" / "stdio_tools_server.py")
# Every target of the main backend offers these (prefixed) tools.
EVERYTHING_TARGETS = ("ev-stdio", "ev-sse", "ev-http")


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def loopback_gateway_yaml(port: int) -> str:
    """The Gateway, its listener bound to 127.0.0.1 (spec.addresses) rather than every interface."""
    return _dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "default"},
            "spec": {
                "gatewayClassName": "agentgate",
                "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                "listeners": [{"name": "http", "protocol": "HTTP", "port": port}],
            },
        }
    )


def secret_yaml() -> str:
    return _dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "mcp-keys", "namespace": "default"},
            "stringData": {"current": SESSION_KEY},
        }
    )


def everything_target(name: str, server: Everything) -> dict[str, Any]:
    """A target reaching a running server-everything over its transport (legacy SSE or streamable HTTP)."""
    host, port = server.address
    protocol = "SSE" if server.transport == "sse" else "StreamableHTTP"
    return {"name": name, "protocol": protocol, "static": {"host": host, "port": port, "path": server.path}}


def python_sdk_target(name: str, port: int) -> dict[str, Any]:
    """A target reaching the in-process Python SDK server (tests/peers/mcp_servers/http_sdk.py)."""
    return {"name": name, "protocol": "StreamableHTTP", "static": {"host": "127.0.0.1", "port": port, "path": "/mcp"}}


def mcp_backend_yaml(name: str, targets: list[dict[str, Any]]) -> str:
    return _dump(
        {
            "apiVersion": "agentgate.dev/v1alpha1",
            "kind": "Backend",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "mcp": {
                    "failureMode": "FailOpen",
                    "maxBodyBytes": MAX_BODY,
                    "sessionKeyRef": {"name": "mcp-keys", "key": "current"},
                    "targets": targets,
                }
            },
        }
    )


def mcp_route_yaml(name: str, backend: str, path: str) -> str:
    return _dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                        "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": backend}],
                    }
                ],
            },
        }
    )


def stdio_everything_target(name: str) -> dict[str, Any]:
    command, *args = everything_command("stdio", trace=True)
    return {"name": name, "stdio": {"command": command, "args": args}}


@dataclass
class Federation:
    folder: Path
    gateway_port: int
    worker: LoggedProcess
    sse: Everything
    http: Everything

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/mcp"


@pytest.fixture(scope="module")
async def federation(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Federation]:
    require_node()
    await ensure_node_packages()
    folder = tmp_path_factory.mktemp("mcp-peers")
    gateway_port, xds_port = free_port(), free_port()
    async with (
        everything("sse", name="ev-sse") as sse,
        everything("streamableHttp", name="ev-http") as http,
        serve(build_app(build_server(), "streamable")) as python_port,
    ):
        targets = [
            stdio_everything_target("ev-stdio"),
            everything_target("ev-sse", sse),
            everything_target("ev-http", http),
            python_sdk_target("py", python_port),
        ]
        write_documents(folder / "gateway.yaml", GATEWAY_CLASS, loopback_gateway_yaml(gateway_port))
        write_documents(
            folder / "mcp.yaml",
            secret_yaml(),
            mcp_backend_yaml("tools", targets),
            mcp_route_yaml("mcp", "tools", "/mcp"),
        )
        async with logged_process("controlplane", controlplane_command(folder, xds_port)) as cp:
            await cp.wait_for("control plane serving")
            async with logged_process(
                "worker", dataplane_command(xds_port, "default/gw", WorkerPorts.free())
            ) as worker:
                await worker.wait_for("worker ready")
                assert (await worker.wait_for("listening"))["address"] == "127.0.0.1"
                yield Federation(folder, gateway_port, worker, sse, http)


# --- raw HTTP helpers -------------------------------------------------------------------------


def messages(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a JSON or SSE reply."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return [response.json()]
    # Events without data (the 2025-11-25 priming event that carries only an id) hold no message.
    data = (line[5:].strip() for line in response.text.splitlines() if line.startswith("data:"))
    return [json.loads(payload) for payload in data if payload]


async def initialize(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    """A raw session: initialize, then initialized; the headers later requests carry."""
    params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    response = await client.post(url, json=body, headers=POST_HEADERS)
    assert response.status_code == 200, response.text
    assert messages(response)[-1]["result"]["protocolVersion"] == VERSION
    headers = {**POST_HEADERS, "mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": VERSION}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await client.post(url, json=initialized, headers=headers)).status_code == 202
    return headers


def call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def texts(result: dict[str, Any]) -> str:
    return "\n".join(block.get("text", "") for block in result.get("content", []))


def step_results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each step's result; a failed step fails the test with its error."""
    results = []
    for step in report["steps"]:
        assert "error" not in step, step
        results.append(step["result"])
    return results


# --- 1 and 2: the TypeScript SDK client ------------------------------------------------------


async def ts_client(federation: Federation, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """client.mjs's report; when it fails, the worker's last log lines say why."""
    try:
        return await run_ts_client(federation.url, plan)
    except AssertionError as exc:
        tail = "\n".join(federation.worker.raw[-20:])
        raise AssertionError(f"{exc}\nworker log tail:\n{tail}") from None


async def test_ts_client_lists_and_calls_tools_of_four_targets_over_three_transports(federation: Federation) -> None:
    plan = [
        {"op": "listTools"},
        *(
            {"op": "callTool", "name": f"{target}__echo", "arguments": {"message": f"via {target}"}}
            for target in EVERYTHING_TARGETS
        ),
        {"op": "callTool", "name": "py__add", "arguments": {"a": 2, "b": 3}},
        {
            "op": "callTool",
            "name": "ev-http__trigger-long-running-operation",
            "arguments": {"duration": 0.3, "steps": 3},
        },
        {"op": "callTool", "name": "py__count", "arguments": {"n": 2}},
    ]
    with anyio.fail_after(30):
        report = await ts_client(federation, plan)
    assert report["protocolVersion"] == VERSION
    assert report["serverInfo"]["name"] == "agentgate"
    # The merged capabilities: only what the gateway routes (server-everything's tasks are dropped).
    assert {"tools", "prompts", "resources"} <= report["capabilities"].keys()
    assert "tasks" not in report["capabilities"]
    assert "[ev-stdio]" in report["instructions"] and "[py]" in report["instructions"]
    listed, *calls, long_run, counted = step_results(report)
    tools = set(listed["tools"])
    for target in EVERYTHING_TARGETS:
        assert {f"{target}__echo", f"{target}__get-sum", f"{target}__trigger-long-running-operation"} <= tools
    assert {"py__add", "py__count", "py__ask"} <= tools
    assert not [name for name in tools if "__" not in name], "with four targets every name is prefixed"
    assert [texts(result) for result in calls] == [*(f"Echo: via {t}" for t in EVERYTHING_TARGETS), "5"]
    assert [p["progress"] for p in long_run["progress"]] == [1, 2, 3]
    assert texts(long_run).startswith("Long running operation completed")
    assert [p["progress"] for p in counted["progress"]] == [1, 2] and texts(counted) == "counted 2"


async def test_ts_client_reads_prefixed_resources_and_gets_prompts(federation: Federation) -> None:
    document = "mcp-target://ev-http/demo://resource/static/document/architecture.md"
    dynamic = "mcp-target://ev-stdio/demo://resource/dynamic/text/7"
    plan = [
        {"op": "listResources"},
        {"op": "readResource", "uri": document},
        {"op": "readResource", "uri": dynamic},
        {"op": "listPrompts"},
        {"op": "getPrompt", "name": "ev-sse__simple-prompt"},
        {"op": "getPrompt", "name": "ev-stdio__args-prompt", "arguments": {"city": "Paris", "state": "Texas"}},
    ]
    with anyio.fail_after(30):
        report = await ts_client(federation, plan)
    resources, read, read_dynamic, prompts, simple, with_args = step_results(report)
    assert document in resources["resources"]
    assert all(uri.startswith("mcp-target://") for uri in resources["resources"])
    # URIs in results are mapped back to the gateway's form, so the client can read them again.
    assert read["contents"][0]["uri"] == document and "Architecture" in read["contents"][0]["text"]
    assert read_dynamic["contents"][0]["uri"] == dynamic
    assert read_dynamic["contents"][0]["text"].startswith("Resource 7:")
    assert {f"{t}__simple-prompt" for t in EVERYTHING_TARGETS} <= set(prompts["prompts"])
    assert simple["messages"][0]["content"]["text"] == "This is a simple prompt without arguments."
    assert "Paris" in json.dumps(with_args["messages"])


async def test_ts_client_answers_sampling_and_elicitation_through_the_gateway(federation: Federation) -> None:
    plan = [
        {
            "op": "callTool",
            "name": "ev-sse__trigger-sampling-request",
            "arguments": {"prompt": "hello", "maxTokens": 9},
        },
        {"op": "callTool", "name": "ev-stdio__trigger-elicitation-request"},
        {"op": "callTool", "name": "ev-http__trigger-sampling-request", "arguments": {"prompt": "again"}},
    ]
    with anyio.fail_after(30):
        report = await ts_client(federation, plan)
    sampled_sse, elicited, sampled_http = step_results(report)
    asked = report["serverRequests"]
    assert [r["method"] for r in asked] == ["sampling/createMessage", "elicitation/create", "sampling/createMessage"]
    # Server-to-client ids are the gateway's own, so answers find their way back to the right target.
    assert all(str(r["id"]).startswith("gw-") for r in asked), asked
    assert len({r["id"] for r in asked}) == 3
    assert asked[0]["params"]["maxTokens"] == 9 and "hello" in json.dumps(asked[0]["params"]["messages"])
    for result in (sampled_sse, sampled_http):
        assert SAMPLED_TEXT in texts(result) and "agentgate-test-model" in texts(result)
    assert f"Name: {ELICITED['name']}" in texts(elicited)


async def test_ts_client_cancels_a_long_call_then_keeps_using_and_deletes_the_session(
    federation: Federation,
) -> None:
    long_call = {"duration": 4, "steps": 40}
    plan = [
        {
            "op": "cancelTool",
            "name": "ev-http__trigger-long-running-operation",
            "arguments": long_call,
            "afterProgress": 2,
        },
        {"op": "callTool", "name": "ev-http__echo", "arguments": {"message": "still here"}},
        {"op": "callTool", "name": "ev-stdio__get-sum", "arguments": {"a": 40, "b": 2}},
        {"op": "ping"},
        {"op": "terminate"},
    ]
    mark = federation.http.process.mark()
    with anyio.fail_after(30):
        report = await ts_client(federation, plan)
        cancelled, echoed, summed, _, terminated = step_results(report)
        # The client gave up after two progress notifications, long before the call would have ended.
        assert cancelled["cancelled"] is True and len(cancelled["progress"]) == 2, cancelled
        assert cancelled["elapsedMs"] < 3000
        # Upstream got notifications/cancelled naming the id the gateway had given the call there.
        forwarded = await federation.http.wait_received("tools/call", start=mark, name="trigger-long-running-operation")
        cancel = await federation.http.wait_received("notifications/cancelled", start=mark, requestId=forwarded["id"])
        assert cancel["params"]["reason"] == "the test client gave up"
    assert texts(echoed) == "Echo: still here"
    assert "42" in texts(summed)
    session = terminated["sessionId"]
    assert session == report["sessionId"] and terminated["after"] is None
    # DELETE ended the session: the gateway no longer knows it.
    async with httpx.AsyncClient(timeout=10) as client:
        headers = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": VERSION}
        gone = await client.post(federation.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers)
    assert gone.status_code == 404




async def test_a_cancelled_request_stream_ends_without_a_response(federation: Federation) -> None:
    url = federation.url
    body = call(10, "ev-http__trigger-long-running-operation", {"duration": 4, "steps": 40})
    body["params"]["_meta"] = {"progressToken": "p-10"}
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 10, "reason": "bye"}}
    after_cancel: list[str] = []
    with anyio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as client:
            headers = await initialize(client, url)
            async with client.stream("POST", url, json=body, headers=headers) as stream:
                assert stream.headers["content-type"] == "text/event-stream"
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {") and json.loads(line[6:]).get("method") == "notifications/progress":
                        break
                assert (await client.post(url, json=cancel, headers=headers)).status_code == 202
                # The gateway should end the stream at once; two seconds is ample on a loaded machine.
                with anyio.move_on_after(2) as waiting:
                    async for line in lines:
                        after_cancel.append(line)
            assert (await client.delete(url, headers=headers)).status_code == 204
    assert not waiting.cancelled_caught, "the cancelled request's stream stayed open"
    answered = [json.loads(line[6:]) for line in after_cancel if line.startswith("data: {")]
    assert not [message for message in answered if message.get("id") == 10], answered


# --- 3: the Python SDK client ----------------------------------------------------------------


async def test_python_sdk_client_lists_and_calls_across_the_federation(federation: Federation) -> None:
    with anyio.fail_after(30):
        async with Client(federation.url, mode="legacy") as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert {"ev-stdio__echo", "ev-sse__get-sum", "ev-http__echo", "py__add"} <= tools
            echoed = await client.call_tool("ev-stdio__echo", {"message": "from python"})
            summed = await client.call_tool("ev-sse__get-sum", {"a": 19, "b": 23})
            added = await client.call_tool("py__add", {"a": 20, "b": 22})
            over_http = await client.call_tool("ev-http__echo", {"message": "over http"})
    assert echoed.content[0].text == "Echo: from python"
    assert "42" in summed.content[0].text
    assert added.content[0].text == "42"
    assert over_http.content[0].text == "Echo: over http"


# --- 4: bad input and a dead target ----------------------------------------------------------


async def test_bad_input_through_the_real_gateway_gets_protocol_errors(federation: Federation) -> None:
    url = federation.url
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=10) as client:
            headers = await initialize(client, url)

            malformed = await client.post(url, content=b'{"jsonrpc": "2.0", "id": 1, "method": ', headers=headers)
            assert malformed.status_code == 400 and malformed.json()["error"]["code"] == -32700
            no_method = await client.post(url, json={"jsonrpc": "2.0", "id": 2}, headers=headers)
            assert no_method.json()["error"]["code"] == -32600
            unknown = await client.post(url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/nope"}, headers=headers)
            assert unknown.json()["error"]["code"] == -32601 and unknown.json()["id"] == 3
            # A tool its target does not have, and a target that does not exist: the same answer.
            for request_id, name in ((4, "ev-http__no-such-tool"), (5, "nowhere__echo")):
                reply = messages(await client.post(url, json=call(request_id, name, {}), headers=headers))[-1]
                assert reply["id"] == request_id and reply["error"]["code"] == -32602, reply
            huge = call(6, "ev-http__echo", {"message": "x" * (MAX_BODY + 1)})
            assert (await client.post(url, json=huge, headers=headers)).status_code == 413
            echo = call(7, "ev-http__echo", {"message": "hi"})
            wrong_accept = await client.post(url, json=echo, headers={**headers, "accept": "application/json"})
            assert wrong_accept.status_code == 406
            no_session = {k: v for k, v in headers.items() if k != "mcp-session-id"}
            missing = await client.post(url, json=echo, headers=no_session)
            assert missing.status_code == 400 and missing.json()["error"]["code"] == -32600
            unknown_session = await client.post(url, json=echo, headers={**headers, "mcp-session-id": "A" * 64})
            assert unknown_session.status_code == 404
            # None of that hurt the session.
            answer = messages(await client.post(url, json=echo, headers=headers))[-1]
            assert texts(answer["result"]) == "Echo: hi"
            assert (await client.delete(url, headers=headers)).status_code == 204


async def test_a_target_that_dies_under_fail_open_leaves_the_others_answering(federation: Federation) -> None:
    """A second backend whose streamable-HTTP target is stopped mid-session, then is down for new sessions."""
    url = f"http://127.0.0.1:{federation.gateway_port}/fragile"
    async with everything("streamableHttp", name="doomed") as doomed:
        mark = federation.worker.mark()
        targets = [
            everything_target("doomed", doomed),
            everything_target("ev-sse", federation.sse),
            {"name": "py", "stdio": {"command": sys.executable, "args": [STDIO_TOOLS_SERVER]}},
        ]
        write_documents(
            federation.folder / "fragile.yaml",
            mcp_backend_yaml("fragile", targets),
            mcp_route_yaml("fragile", "fragile", "/fragile"),
        )
        await federation.worker.wait_for(event("config applied", type="Route"), start=mark)
        with anyio.fail_after(30):
            async with httpx.AsyncClient(timeout=10) as client:
                headers = await initialize(client, url)
                listed = messages(
                    await client.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)
                )[-1]
                names = {tool["name"] for tool in listed["result"]["tools"]}
                assert {"doomed__echo", "ev-sse__echo", "py__echo"} <= names
                reply = messages(
                    await client.post(url, json=call(3, "doomed__echo", {"message": "a"}), headers=headers)
                )[-1]
                assert texts(reply["result"]) == "Echo: a"

                doomed.process.signal(signal.SIGKILL)
                await doomed.process.process.wait()

                # The same session: a list skips the dead target, calls to the others still answer.
                listed = messages(
                    await client.post(url, json={"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, headers=headers)
                )[-1]
                names = {tool["name"] for tool in listed["result"]["tools"]}
                assert "ev-sse__echo" in names and "py__echo" in names
                assert not [name for name in names if name.startswith("doomed__")]
                reply = messages(
                    await client.post(url, json=call(5, "ev-sse__echo", {"message": "b"}), headers=headers)
                )[-1]
                assert texts(reply["result"]) == "Echo: b"
                reply = messages(await client.post(url, json=call(6, "py__echo", {"text": "c"}), headers=headers))[-1]
                assert texts(reply["result"]) == "c"
                dead = messages(
                    await client.post(url, json=call(7, "doomed__echo", {"message": "d"}), headers=headers)
                )[-1]
                assert dead["id"] == 7 and dead["error"]["code"] == -32603, dead

                # A new session starts without the dead target.
                fresh = await initialize(client, url)
                listed = messages(
                    await client.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=fresh)
                )[-1]
                names = {tool["name"] for tool in listed["result"]["tools"]}
                assert "ev-sse__echo" in names and not [name for name in names if name.startswith("doomed__")]
                reply = messages(await client.post(url, json=call(3, "ev-sse__echo", {"message": "e"}), headers=fresh))[
                    -1
                ]
                assert texts(reply["result"]) == "Echo: e"
