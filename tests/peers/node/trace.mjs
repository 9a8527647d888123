// Preload (`node --import ./trace.mjs ...`): log every JSON-RPC message an MCP SDK peer receives,
// as one JSON line on stderr: {"event": "mcp message received", "method", "id", "params"}.
//
// Why: a test of a gateway must see what reached the upstream (that a client's cancellation was
// forwarded as notifications/cancelled with the upstream's own request id, for instance) without
// changing the peer. Every SDK server and client connects through Protocol.connect, which keeps a
// transport's existing onmessage and calls it first, so wrapping that hook sees each message once.
import { Protocol } from "@modelcontextprotocol/sdk/shared/protocol.js";

const connect = Protocol.prototype.connect;

Protocol.prototype.connect = function tracedConnect(transport) {
  const previous = transport.onmessage;
  transport.onmessage = (message, extra) => {
    const line = { event: "mcp message received", method: message.method ?? null, id: message.id ?? null };
    if (message.method !== undefined) {
      line.params = message.params ?? null;
    }
    process.stderr.write(`${JSON.stringify(line)}\n`);
    previous?.call(transport, message, extra);
  };
  return connect.call(this, transport);
};
