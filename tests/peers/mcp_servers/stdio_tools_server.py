"""A real MCP server over stdio, built with the official SDK (`MCPServer`), for the stdio channel tests.

Tools: `echo` (returns its text), `work` (reports progress and logs before answering) and
`crash` (writes to stderr and exits with the given code mid-call).
"""

from __future__ import annotations

import os
import sys
import warnings

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

# Logging is deprecated in 2026-07-28 but still spoken in the session era these tests use.
warnings.filterwarnings("ignore", message="The logging capability is deprecated")

server = MCPServer("stdio-tools")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
async def work(steps: int, ctx: Context) -> str:
    """Report progress once per step and log a line, then finish."""
    await ctx.log("info", f"working {steps} steps", logger_name="stdio-tools")
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    return f"done {steps}"


@server.tool()
def crash(code: int) -> str:
    """Die mid-call, leaving a last word on stderr."""
    sys.stderr.write(f"fatal: crashing on purpose with {code}\n")
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    print("stdio-tools server starting", file=sys.stderr, flush=True)
    server.run("stdio")
