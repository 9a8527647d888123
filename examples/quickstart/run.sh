#!/usr/bin/env bash
# Starts the quickstart upstreams (an HTTP echo server and the clock MCP server), then
# `agentgate run` on this folder; prints what to try once the worker reports ready.
# Ctrl-C stops everything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$(cd "${VENV:-$repo/.venv}" && pwd)"
# The notes MCP server (stdio) is started by the worker as `python examples/mcp-servers/...`
# (see mcp.yaml): run from the repository root, with the virtualenv's python first on PATH.
cd "$repo"
export PATH="$venv/bin:$PATH"

# MCP session ids are sealed with a key from a Secret. Each checkout makes its own on first
# start: a key published with the example would let anyone forge sessions.
key_file="$here/mcp-session-key.yaml"
if [ ! -s "$key_file" ]; then
  key="$("$venv/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
  (umask 077 && cat >"$key_file.tmp") <<YAML
# Written by run.sh: this checkout's MCP session key (not committed). Delete it for a new one.
apiVersion: v1
kind: Secret
metadata:
  name: mcp-session-key
  namespace: default
stringData:
  current: $key
YAML
  mv "$key_file.tmp" "$key_file"
fi

pids=()
stop() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'exit 130' INT TERM

"$venv/bin/python" "$here/upstream.py" 8081 &
pids+=($!)
"$venv/bin/python" examples/mcp-servers/clock_server.py --port 8082 &
pids+=($!)
"$venv/bin/agentgate" run --config "$here" --log-level "${LOG_LEVEL:-info}" &
gateway=$!
pids+=("$gateway")
for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:15021/healthz/ready >/dev/null 2>&1; then break; fi
  kill -0 "$gateway" 2>/dev/null || { echo "agentgate run exited"; exit 1; }
  sleep 0.1
done
cat <<'MSG'

agentgate is serving examples/quickstart on http://127.0.0.1:8080
  curl -i http://127.0.0.1:8080/hello                    # HTTP/1.1, echoed by the upstream
  curl -i --http2-prior-knowledge http://127.0.0.1:8080/  # HTTP/2 cleartext
  curl -N http://127.0.0.1:8080/events                    # SSE, one event at a time
  curl -s http://127.0.0.1:15000/config_dump              # what the worker applied
  .venv/bin/agentgate status                              # what the control plane sees

MCP: two servers (notes over stdio, clock over streamable HTTP) behind http://127.0.0.1:8080/mcp
  .venv/bin/python examples/quickstart/mcp_client.py      # SDK client: list tools, call some
  # or by hand: initialize, keep the Mcp-Session-Id, then list and call
  H=(-H 'content-type: application/json' -H 'accept: application/json, text/event-stream')
  SID=$(curl -s -D - -o /dev/null "${H[@]}" http://127.0.0.1:8080/mcp -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}' | tr -d '\r' | awk 'tolower($1)=="mcp-session-id:"{print $2}')
  H+=(-H "mcp-session-id: $SID" -H 'mcp-protocol-version: 2025-11-25')
  curl -s "${H[@]}" http://127.0.0.1:8080/mcp -d '{"jsonrpc":"2.0","method":"notifications/initialized"}'
  curl -s "${H[@]}" http://127.0.0.1:8080/mcp -d '{"jsonrpc":"2.0","id":2,"method":"tools/list"}'
  curl -s "${H[@]}" http://127.0.0.1:8080/mcp -d '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"clock__calculate","arguments":{"expression":"6*7"}}}'
  curl -s "${H[@]}" http://127.0.0.1:8080/mcp -d '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"notes__add_note","arguments":{"title":"hi","body":"from curl"}}}'
  curl -s "${H[@]}" -X DELETE http://127.0.0.1:8080/mcp   # end the session (stops its notes process)
Edit examples/quickstart/*.yaml and the change is live without a restart. Ctrl-C stops.
MSG
wait "$gateway"
