"""MCP servers the tests start as upstream targets (official `mcp` SDK)."""
