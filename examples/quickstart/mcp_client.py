"""Talk to the quickstart's MCP endpoint with the official `mcp` SDK client.

Lists the federated tools (each prefixed by its server: notes__*, clock__*), then calls one
tool of each server, a tool that reports progress, reads a note as a resource and renders a
prompt, printing what comes back.

    .venv/bin/python examples/quickstart/mcp_client.py [http://127.0.0.1:8080/mcp]
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from mcp import Client
from mcp.types import CallToolResult, TextContent

DEFAULT_URL = "http://127.0.0.1:8080/mcp"


def show(title: str, result: CallToolResult) -> None:
    if result.structured_content is not None:
        body: Any = result.structured_content
    else:
        body = [c.text if isinstance(c, TextContent) else c.model_dump() for c in result.content]
    status = "ERROR " if result.is_error else ""
    print(f"{title}: {status}{json.dumps(body, indent=2)}")


async def main(url: str) -> None:
    # mode="legacy": the initialize handshake with an Mcp-Session-Id, as the gateway's
    # session-era endpoint speaks it.
    async with Client(url, mode="legacy", read_timeout_seconds=30) as client:
        info = client.server_info
        print(f"connected to {info.name if info else '?'} (protocol {client.protocol_version})")

        tools = await client.list_tools()
        print("tools:")
        for tool in tools.tools:
            print(f"  {tool.name:24} {(tool.description or '').splitlines()[0]}")

        show("clock__now", await client.call_tool("clock__now", {"timezone": "Europe/Paris"}))
        show("clock__calculate", await client.call_tool("clock__calculate", {"expression": "(2 + 3) * 7 / 2"}))

        async def progress(done: float, total: float | None, message: str | None) -> None:
            print(f"  progress {done:g}/{total:g}: {message}")

        show(
            "clock__count_primes",
            await client.call_tool("clock__count_primes", {"below": 1_000_000}, progress_callback=progress),
        )

        added = await client.call_tool(
            "notes__add_note", {"title": "Try agentgate", "body": "Federate two MCP servers.", "tags": ["todo"]}
        )
        show("notes__add_note", added)
        show("notes__search_notes", await client.call_tool("notes__search_notes", {"query": "federate"}))

        resources = await client.list_resources()
        for resource in resources.resources:
            contents = await client.read_resource(str(resource.uri))
            text = "".join(getattr(c, "text", "") for c in contents.contents)
            print(f"resource {resource.uri}:\n{text}")

        prompt = await client.get_prompt("notes__review_notes", {"tag": "todo"})
        for message in prompt.messages:
            text = message.content.text if isinstance(message.content, TextContent) else message.content
            print(f"prompt notes__review_notes ({message.role}):\n{text}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else DEFAULT_URL)
