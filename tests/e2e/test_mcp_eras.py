"""Every MCP client era through the real gateway processes, and one session served by two workers.

The same federation as test_mcp_peers.py (server-everything over stdio, legacy SSE and streamable
HTTP, plus the Python SDK server), behind a control plane and two dataplane workers. Each worker
serves its own Gateway (gw-a, gw-b, each on its own 127.0.0.1 port) and both Gateways route /mcp to
the one MCP Backend, so both workers seal and open session ids with the same key: that is how a
test reaches a chosen worker. (Workers of one Gateway share its port through SO_REUSEPORT, which
lets the kernel, not the test, pick the worker; the CLI has no per-worker listener port.)

Clients: the Python SDK in its default mode (it probes ``server/discover`` and speaks 2026-07-28,
sessionless, so the gateway bridges the session-era targets' server-to-client requests into
``input_required`` rounds), the Python SDK's legacy ``sse_client`` (2024-11-05 HTTP+SSE at
``/mcp/sse``), and raw httpx for the session era across workers and for a bad 2026-07-28 request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
import yaml
from mcp import Client
from mcp.client.sse import sse_client
from mcp.types import CreateMessageRequest, CreateMessageResult, ElicitResult, InputRequiredResult, TextContent

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
from tests.e2e.test_mcp_peers import (
    EVERYTHING_TARGETS,
    POST_HEADERS,
    call,
    everything_target,
    initialize,
    mcp_backend_yaml,
    messages,
    python_sdk_target,
    secret_yaml,
    stdio_everything_target,
    texts,
)
from tests.peers.everything import RECEIVED, Everything, everything
from tests.peers.mcp_servers.http_sdk import build_app, build_server, serve
from tests.peers.node_client import ensure_node_packages, require_node

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
LEGACY_SSE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
ELICITED = {"name": "Grace Hopper", "check": True}
SAMPLED = "sampled by the Python SDK client"
GATEWAYS = ("gw-a", "gw-b")
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def gateway_yaml(name: str, port: int) -> str:
    """A Gateway whose one listener binds 127.0.0.1:``port``."""
    return _dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "gatewayClassName": "agentgate",
                "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                "listeners": [{"name": "http", "protocol": "HTTP", "port": port}],
            },
        }
    )


def shared_route_yaml(backend: str, path: str) -> str:
    """One HTTPRoute attaching an MCP backend at a path prefix (so ``<prefix>/sse`` matches) to both Gateways."""
    return _dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": backend, "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": gateway} for gateway in GATEWAYS],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                        "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": backend}],
                    }
                ],
            },
        }
    )


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    """The routing headers a 2026-07-28 POST mirrors from its body."""
    headers = {**POST_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": method}
    return headers if name is None else {**headers, "mcp-name": name}


def modern_call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments, "_meta": MODERN_META}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


@dataclass
class Worker:
    process: LoggedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bridge"


@dataclass
class Stack:
    a: Worker
    b: Worker
    sse: Everything
    http: Everything


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    require_node()
    await ensure_node_packages()
    folder = tmp_path_factory.mktemp("mcp-eras")
    port_a, port_b, xds_port = free_port(), free_port(), free_port()
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
        write_documents(
            folder / "gateways.yaml", GATEWAY_CLASS, gateway_yaml("gw-a", port_a), gateway_yaml("gw-b", port_b)
        )
        write_documents(
            folder / "mcp.yaml",
            secret_yaml(),
            mcp_backend_yaml("tools", targets),
            shared_route_yaml("tools", "/mcp"),
            # Only the roots-race test uses this backend, so its shared upstream sessions start fresh there.
            mcp_backend_yaml("bridge", targets[1:3]),
            shared_route_yaml("bridge", "/bridge"),
        )
        async with logged_process("controlplane", controlplane_command(folder, xds_port)) as cp:
            await cp.wait_for("control plane serving")
            async with (
                logged_process("worker-a", dataplane_command(xds_port, "default/gw-a", WorkerPorts.free())) as a,
                logged_process("worker-b", dataplane_command(xds_port, "default/gw-b", WorkerPorts.free())) as b,
            ):
                for worker in (a, b):
                    await worker.wait_for("worker ready")
                stack = Stack(Worker(a, port_a), Worker(b, port_b), sse, http)
                yield stack


# --- 1: the Python SDK client in its default (auto) mode: 2026-07-28 -------------------------


async def test_python_sdk_default_mode_speaks_2026_07_28_to_every_target(stack: Stack) -> None:
    progress: dict[str, list[float]] = {"ev-http": [], "py": []}
    elicited: list[str] = []
    sampled: list[str] = []

    def on_progress(target: str) -> Any:
        async def record(done: float, total: float | None, message: str | None) -> None:
            progress[target].append(done)

        return record

    async def elicit(context: Any, params: Any) -> ElicitResult:
        elicited.append(params.message)
        return ElicitResult(action="accept", content=ELICITED)

    async def sample(context: Any, params: Any) -> CreateMessageResult:
        sampled.append(json.dumps(params.model_dump(mode="json", by_alias=True)))
        return CreateMessageResult(
            role="assistant", model="agentgate-test-model", content=TextContent(type="text", text=SAMPLED)
        )

    with anyio.fail_after(30):
        async with Client(stack.a.url, elicitation_callback=elicit, sampling_callback=sample) as client:
            # The default mode probed server/discover and took the newest version the gateway offers.
            assert client.protocol_version == MODERN
            tools = {tool.name for tool in (await client.list_tools()).tools}
            for target in EVERYTHING_TARGETS:
                assert {f"{target}__echo", f"{target}__trigger-long-running-operation"} <= tools
            assert {"py__add", "py__count", "py__ask"} <= tools
            assert not [name for name in tools if "__" not in name], "with four targets every name is prefixed"
            echoed = [
                texts((await client.call_tool(f"{t}__echo", {"message": f"via {t}"})).model_dump())
                for t in EVERYTHING_TARGETS
            ]
            added = await client.call_tool("py__add", {"a": 20, "b": 22})
            long_run = await client.call_tool(
                "ev-http__trigger-long-running-operation",
                {"duration": 0.3, "steps": 3},
                progress_callback=on_progress("ev-http"),
            )
            counted = await client.call_tool("py__count", {"n": 2}, progress_callback=on_progress("py"))
            # server-everything (session era) asks through the worker's shared upstream session. A
            # 2026-07-28 client has no channel for server-to-client requests, so the gateway parks the
            # upstream call and answers input_required; the SDK answers with its callback and retries.
            elicitation = await client.call_tool("ev-stdio__trigger-elicitation-request", {})
            # The same round by hand, to see it: the target's sampling/createMessage, then the retry.
            sampling_tool, sampling_args = "ev-sse__trigger-sampling-request", {"prompt": "hello", "maxTokens": 9}
            first = await client.session.call_tool(sampling_tool, sampling_args, allow_input_required=True)
            assert isinstance(first, InputRequiredResult), first
            ((key, asked),) = first.input_requests.items()
            assert isinstance(asked, CreateMessageRequest) and first.request_state
            sampling = await client.call_tool(
                sampling_tool,
                sampling_args,
                input_responses={key: await sample(None, asked.params)},
                request_state=first.request_state,
            )
    assert echoed == [f"Echo: via {t}" for t in EVERYTHING_TARGETS]
    assert texts(added.model_dump()) == "42"
    assert progress["ev-http"] == [1, 2, 3] and texts(long_run.model_dump()).startswith("Long running operation")
    assert progress["py"] == [1, 2] and texts(counted.model_dump()) == "counted 2"
    assert elicited == ["Please provide inputs for the following fields:"]
    assert f"Name: {ELICITED['name']}" in texts(elicitation.model_dump()), elicitation
    assert len(sampled) == 1 and "hello" in sampled[0] and '"maxTokens": 9' in sampled[0]
    assert SAMPLED in texts(sampling.model_dump()) and "agentgate-test-model" in texts(sampling.model_dump())


# --- 2: the Python SDK's legacy HTTP+SSE client (2024-11-05 transport) -----------------------


async def test_python_sdk_sse_client_lists_calls_and_gets_progress_over_http_sse(stack: Stack) -> None:
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    worker = stack.a.process
    mark = worker.mark()
    with anyio.fail_after(30):
        async with Client(sse_client(f"{stack.a.url}/sse"), mode="legacy") as client:
            assert client.protocol_version in LEGACY_SSE_VERSIONS
            opened = await worker.wait_for("mcp_legacy_session_opened", start=mark)
            tools = {tool.name for tool in (await client.list_tools()).tools}
            echoed = [
                texts((await client.call_tool(f"{t}__echo", {"message": f"old {t}"})).model_dump())
                for t in EVERYTHING_TARGETS
            ]
            added = await client.call_tool("py__add", {"a": 1, "b": 2})
            long_run = await client.call_tool(
                "ev-stdio__trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
            )
        # The client closed its stream: the session (and its upstream sessions) ended with it.
        await worker.wait_for("mcp_legacy_session_closed", start=mark)
    assert opened["backend"] == "default/tools"
    assert {f"{t}__echo" for t in EVERYTHING_TARGETS} | {"py__add", "py__count"} <= tools
    assert echoed == [f"Echo: old {t}" for t in EVERYTHING_TARGETS]
    assert texts(added.model_dump()) == "3"
    assert progress == [1, 2, 3] and texts(long_run.model_dump()).startswith("Long running operation completed")


# --- 3: one session-era session, two worker processes -----------------------------------------


def ping(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "ping"}


async def test_a_session_opened_on_one_worker_is_served_and_deleted_on_another(stack: Stack) -> None:
    a, b = stack.a, stack.b
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=10) as client:
            a_mark = a.process.mark()
            headers = await initialize(client, a.url)
            on_a = messages(
                await client.post(a.url, json=call(2, "ev-stdio__echo", {"message": "on a"}), headers=headers)
            )
            assert texts(on_a[-1]["result"]) == "Echo: on a"
            a_stdio = await a.process.wait_for(event("mcp_stdio_started", target="ev-stdio"), start=a_mark)

            # Worker B never saw the session: it opens the token and resumes the session.
            b_mark, http_mark = b.process.mark(), stack.http.process.mark()
            stdio_on_b = messages(
                await client.post(b.url, json=call(3, "ev-stdio__echo", {"message": "on b"}), headers=headers)
            )
            http_on_b = messages(
                await client.post(b.url, json=call(4, "ev-http__echo", {"message": "http on b"}), headers=headers)
            )
            resumed = await b.process.wait_for("mcp_session_resumed", start=b_mark)
            b_stdio = await b.process.wait_for(event("mcp_stdio_started", target="ev-stdio"), start=b_mark)
            # ev-http saw B prove the upstream session named in the token alive (a ping), then the call.
            await stack.http.wait_received("ping", start=http_mark)
            await stack.http.wait_received("tools/call", start=http_mark, name="echo")

            assert (await client.delete(b.url, headers=headers)).status_code == 204
            after_delete = await client.post(b.url, json=ping(5), headers=headers)
    assert resumed["backend"] == "default/tools"
    assert texts(stdio_on_b[-1]["result"]) == "Echo: on b"
    assert texts(http_on_b[-1]["result"]) == "Echo: http on b"
    # The stdio target has no session to carry: B started a process of its own for it ...
    assert b_stdio["pid"] != a_stdio["pid"]
    # ... while ev-http's upstream session travelled in the token: B opened no new one.
    assert stack.http.process.find(event(RECEIVED, method="initialize"), http_mark) is None
    # DELETE ended the upstream sessions; B, resuming the token again, finds ev-http's gone.
    assert after_delete.status_code == 404, after_delete.text


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "known limitation (README, MCP sessions): workers share no state, so a DELETE on one worker ends the "
        "upstream sessions but not another worker's in-memory copy; that copy ends when an upstream answers 404 or "
        "at idle expiry, and server-everything answers an ended session with 400, which is not taken as expiry "
        "(a 400 can also mean a bad request)"
    ),
)
async def test_a_session_deleted_on_one_worker_is_gone_on_the_worker_that_opened_it(stack: Stack) -> None:
    a, b = stack.a, stack.b
    with anyio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as client:
            headers = await initialize(client, a.url)
            on_a = messages(await client.post(a.url, json=call(2, "ev-http__echo", {"message": "a"}), headers=headers))
            assert texts(on_a[-1]["result"]) == "Echo: a"
            assert (await client.delete(b.url, headers=headers)).status_code == 204
            assert (await client.post(b.url, json=ping(3), headers=headers)).status_code == 404
            on_a_after = await client.post(a.url, json=ping(4), headers=headers)
    assert on_a_after.status_code == 404, on_a_after.text


# --- 4: a 2026-07-28 request whose routing header contradicts its body -----------------------


async def test_a_2026_request_whose_mcp_method_header_disagrees_gets_header_mismatch(stack: Stack) -> None:
    body = modern_call(7, "ev-http__echo", {"message": "x"})
    with anyio.fail_after(15):
        async with httpx.AsyncClient(timeout=10) as client:
            agreeing = await client.post(stack.a.url, json=body, headers=modern_headers("tools/call", "ev-http__echo"))
            lying = await client.post(stack.a.url, json=body, headers=modern_headers("tools/list", "ev-http__echo"))
    assert agreeing.status_code == 200, agreeing.text
    assert texts(messages(agreeing)[-1]["result"]) == "Echo: x"
    assert lying.status_code == 400, lying.text
    refusal = lying.json()
    assert refusal["id"] == 7 and refusal["error"]["code"] == -32020, refusal
    assert "Mcp-Method" in refusal["error"]["message"] or "mcp-method" in refusal["error"]["message"].lower()


# --- the input-required bridge and a server-to-client request nobody asked for -----------------


async def test_a_call_in_flight_when_a_target_asks_its_roots_unprompted_still_completes(stack: Stack) -> None:
    # A fresh shared session (the bridge backend on worker B): this one call opens it, then runs 1.2 s.
    name = "ev-http__trigger-long-running-operation"
    body = modern_call(1, name, {"duration": 1.2, "steps": 2})
    with anyio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as client:
            answer = messages(
                await client.post(stack.b.bridge_url, json=body, headers=modern_headers("tools/call", name))
            )
    final = answer[-1]
    assert "error" not in final, final
    assert texts(final["result"]).startswith("Long running operation completed")
