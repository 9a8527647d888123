"""A clock and math MCP server over streamable HTTP, written with the official `mcp` SDK.

Tools: `now` (the time in any IANA zone), `calculate` (safe arithmetic on numbers: no names,
calls or attributes, bounded size) and `count_primes` (a segmented sieve that reports
progress per segment, to show notifications/progress flowing through a gateway).

The listening socket is bound before the server starts and a JSON line
{"event": "mcp server listening", "port": N, ...} goes to stderr once clients can connect, so
a supervisor (or test) waits on that line instead of polling; `--port 0` picks a free port.

    .venv/bin/python examples/mcp-servers/clock_server.py --port 8082   # http://127.0.0.1:8082/mcp
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import socket
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1024
MAX_INT_BITS = 16_384
MAX_PRIME_LIMIT = 50_000_000
PRIME_SEGMENTS = 10


class TimeReport(BaseModel):
    timezone: str
    iso: str
    unix: float
    weekday: str
    utc_offset: str


class PrimeCount(BaseModel):
    below: int
    count: int
    largest: int | None


# --- pure cores ---------------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> float | int:
    """Evaluate + - * / // % ** and parentheses over number literals; ValueError says what is refused."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(right) > MAX_EXPONENT:
                    raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
                if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > MAX_INT_BITS:
                    raise ValueError(f"result would exceed {MAX_INT_BITS} bits")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:
                raise ValueError("result too large") from None
            if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
                raise ValueError(f"result would exceed {MAX_INT_BITS} bits")
            if isinstance(value, complex):
                raise ValueError("result is not a real number")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("result too large")
            return value
        raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, got {type(node).__name__}")

    return walk(tree.body)


def now(timezone: str) -> TimeReport:
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r} (use an IANA name such as Europe/Paris)") from None
    moment = datetime.now(zone)
    return TimeReport(
        timezone=timezone,
        iso=moment.isoformat(timespec="seconds"),
        unix=round(moment.timestamp(), 3),
        weekday=moment.strftime("%A"),
        utc_offset=moment.strftime("%z"),
    )


def prime_segments(below: int, segments: int = PRIME_SEGMENTS) -> list[tuple[int, int]]:
    """Split [2, below) into at most `segments` half-open ranges of similar size."""
    if below <= 2:
        return []
    step = max(1, math.ceil((below - 2) / segments))
    return [(start, min(start + step, below)) for start in range(2, below, step)]


def primes_in(low: int, high: int) -> list[int]:
    """Primes in [low, high), by a sieve of the segment with the primes up to sqrt(high)."""
    if high <= 2:
        return []
    low = max(low, 2)
    root = math.isqrt(high - 1)
    small = bytearray([1]) * (root + 1)
    small[:2] = b"\0\0"
    for p in range(2, math.isqrt(root) + 1):
        if small[p]:
            small[p * p :: p] = bytes(len(range(p * p, root + 1, p)))
    segment = bytearray([1]) * (high - low)
    for p in (i for i, flag in enumerate(small) if flag):
        first = max(p * p, (low + p - 1) // p * p)
        segment[first - low :: p] = bytes(len(range(first, high, p)))
    return [low + i for i, flag in enumerate(segment) if flag]


# --- the MCP server -----------------------------------------------------------------------------


def build_server() -> MCPServer:
    server = MCPServer(
        "clock",
        instructions="Time in any zone (now), arithmetic (calculate) and a prime counter that reports progress.",
        version="1.0.0",
        log_level="WARNING",
    )

    @server.tool(name="now")
    def now_tool(timezone: Annotated[str, Field(description="IANA zone, e.g. Asia/Tokyo")] = "UTC") -> TimeReport:
        """The current time in a time zone."""
        try:
            return now(timezone)
        except ValueError as exc:
            raise ToolError(str(exc)) from None

    @server.tool(name="calculate")
    def calculate_tool(expression: Annotated[str, Field(min_length=1, max_length=MAX_EXPRESSION_CHARS)]) -> int | float:
        """Evaluate an arithmetic expression, e.g. (2 + 3) * 7 / 2 or 2 ** 10."""
        try:
            return calculate(expression)
        except ValueError as exc:
            raise ToolError(str(exc)) from None

    @server.tool()
    async def count_primes(below: Annotated[int, Field(ge=0, le=MAX_PRIME_LIMIT)], ctx: Context) -> PrimeCount:
        """Count the primes below a limit, reporting progress once per tenth of the range."""
        count, largest = 0, None
        parts = prime_segments(below)
        for done, (low, high) in enumerate(parts, start=1):
            found = await anyio.to_thread.run_sync(primes_in, low, high)
            count += len(found)
            largest = found[-1] if found else largest
            await ctx.report_progress(done, len(parts), f"checked up to {high - 1}: {count} primes")
        return PrimeCount(below=below, count=count, largest=largest)

    return server


async def serve(server: MCPServer, host: str, port: int) -> None:
    """Listen first, then announce, then serve: whoever waits for the line can connect at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    http = uvicorn.Server(config)
    line = {"event": "mcp server listening", "server": server.name, "port": bound, "url": f"http://{host}:{bound}/mcp"}
    print(json.dumps(line), file=sys.stderr, flush=True)
    try:
        await http.serve([sock])
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082, help="0 picks a free port (printed on stderr)")
    args = parser.parse_args()
    anyio.run(serve, build_server(), args.host, args.port)


if __name__ == "__main__":
    main()
