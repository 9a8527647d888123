"""A deliberately misbehaving stdio "MCP server" in plain Python, one behaviour per mode (argv[1]).

- `echo`: answer every request line with `{"result": {"echo": <method>}}`; first print a banner
  and a JSON array to stdout (noise a client must skip), and write a marker line to stderr.
- `ignore-eof`: ignore stdin EOF and SIGTERM; announce readiness on stdout, then never exit by itself.
- `huge-line`: after the first request, write a line of `argv[2]` bytes to stdout and keep running.
- `crash`: write to stderr and exit with code 3 before reading anything.
"""

from __future__ import annotations

import json
import signal
import sys
import threading


def _write(message: object) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def echo() -> None:
    sys.stdout.write("hello from a chatty server, not JSON\n[1, 2, 3]\n\n")
    sys.stdout.flush()
    print("echo server ready", file=sys.stderr, flush=True)
    for line in sys.stdin:
        message = json.loads(line)
        if "id" in message and "method" in message:
            _write({"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message["method"]}})


def ignore_eof() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write({"jsonrpc": "2.0", "method": "notifications/ready"})
    sys.stdin.read()  # returns at EOF; keep running regardless
    threading.Event().wait()


def huge_line(size: int) -> None:
    sys.stdin.readline()
    chunk = b"x" * 65536
    out = sys.stdout.buffer
    out.write(b'{"jsonrpc":"2.0","method":"notifications/huge","params":{"blob":"')
    for _ in range(size // len(chunk) + 1):
        out.write(chunk)
    out.write(b'"}}\n')
    out.flush()
    threading.Event().wait()


def crash() -> None:
    print("boot failed: missing config", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "echo":
        echo()
    elif mode == "ignore-eof":
        ignore_eof()
    elif mode == "huge-line":
        huge_line(int(sys.argv[2]))
    elif mode == "crash":
        crash()
    else:
        sys.exit(f"unknown mode {mode}")
