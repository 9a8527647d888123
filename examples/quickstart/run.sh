#!/usr/bin/env bash
# Starts the quickstart upstream, then `agentgate run` on this folder; prints what to curl
# once the worker reports ready. Ctrl-C stops everything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${VENV:-$here/../../.venv}"
"$venv/bin/python" "$here/upstream.py" 8081 &
upstream=$!
"$venv/bin/agentgate" run --config "$here" --log-level "${LOG_LEVEL:-info}" &
gateway=$!
trap 'kill -TERM $gateway 2>/dev/null; wait $gateway 2>/dev/null; kill $upstream 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:15021/healthz/ready >/dev/null 2>&1; then break; fi
  kill -0 $gateway 2>/dev/null || { echo "agentgate run exited"; exit 1; }
  sleep 0.1
done
cat <<'MSG'

agentgate is serving examples/quickstart on http://127.0.0.1:8080
  curl -i http://127.0.0.1:8080/hello                    # HTTP/1.1, echoed by the upstream
  curl -i --http2-prior-knowledge http://127.0.0.1:8080/  # HTTP/2 cleartext
  curl -N http://127.0.0.1:8080/events                    # SSE, one event at a time
  curl -s http://127.0.0.1:15000/config_dump              # what the worker applied
  .venv/bin/agentgate status                              # what the control plane sees
Edit examples/quickstart/*.yaml and the change is live without a restart. Ctrl-C stops.
MSG
wait $gateway
