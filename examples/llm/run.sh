#!/usr/bin/env bash
# Serves examples/llm with `agentgate run`: an OpenAI-compatible /v1 on http://127.0.0.1:8080 in front
# of OpenAI, failing over to Anthropic. Needs OPENAI_API_KEY (and ANTHROPIC_API_KEY for the failover).
# Writes the keys as Secrets next to this script (never committed), then prints what to try once the
# worker reports ready. Ctrl-C stops.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$(cd "${VENV:-$repo/.venv}" && pwd)"
python="$venv/bin/python"
cd "$repo"

: "${OPENAI_API_KEY:?set OPENAI_API_KEY (and ANTHROPIC_API_KEY for failover to Anthropic)}"
if [ -z "${ANTHROPIC_API_KEY:-}" ]; then
  echo "ANTHROPIC_API_KEY is not set: requests failing over to Anthropic will get a 502 (it refuses the gateway's key)" >&2
fi

# The providers' keys, from the environment on every start.
(umask 077 && "$python" - "$here/provider-keys.yaml" <<'PY'
import json, os, sys
keys = {"openai": os.environ["OPENAI_API_KEY"], "anthropic": os.environ.get("ANTHROPIC_API_KEY") or "unset"}
lines = [f"  {name}: {json.dumps(value.strip())}" for name, value in keys.items()]
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write("# Written by run.sh from OPENAI_API_KEY and ANTHROPIC_API_KEY (not committed).\n"
              "apiVersion: v1\nkind: Secret\nmetadata:\n  name: provider-keys\n  namespace: default\n"
              "stringData:\n" + "\n".join(lines) + "\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PY
)

# The callers' gateway keys: made once per checkout (a key published with the example would let
# anyone in). Delete caller-keys.yaml for new ones.
if [ ! -s "$here/caller-keys.yaml" ]; then
  (umask 077 && "$python" - "$here/caller-keys.yaml" <<'PY'
import os, secrets, sys
lines = [f'  {namespace}: "{secrets.token_urlsafe(32)}"' for namespace in ("tenant-a", "tenant-b")]
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write("# Written by run.sh: this checkout's caller keys, one per calling namespace (not committed).\n"
              "apiVersion: v1\nkind: Secret\nmetadata:\n  name: llm-callers\n  namespace: default\n"
              "stringData:\n" + "\n".join(lines) + "\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
PY
  )
fi
key="$(sed -n 's/^  tenant-a: "\(.*\)"$/\1/p' "$here/caller-keys.yaml")"

pid=""
stop() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
trap stop EXIT
trap 'exit 130' INT TERM

"$venv/bin/agentgate" run --config "$here" --log-level "${LOG_LEVEL:-info}" &
pid=$!
for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:15021/healthz/ready >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || { echo "agentgate run exited"; exit 1; }
  sleep 0.1
done
cat <<MSG

agentgate is serving examples/llm: OpenAI's API on http://127.0.0.1:8080/v1 (OpenAI, then Anthropic)
  KEY=$key    # tenant-a's gateway key (caller-keys.yaml)
  curl -s -H "Authorization: Bearer \$KEY" http://127.0.0.1:8080/v1/models
  curl -s -H "Authorization: Bearer \$KEY" -H 'content-type: application/json' http://127.0.0.1:8080/v1/chat/completions \\
    -d '{"model": "smart", "messages": [{"role": "user", "content": "Say hello"}]}'
  curl -sN -H "Authorization: Bearer \$KEY" -H 'content-type: application/json' http://127.0.0.1:8080/v1/chat/completions \\
    -d '{"model": "fast", "stream": true, "messages": [{"role": "user", "content": "Count to five"}]}'
  # 403: only the aliases smart and fast are allowed (policy.yaml)
  curl -s -H "Authorization: Bearer \$KEY" -H 'content-type: application/json' http://127.0.0.1:8080/v1/chat/completions \\
    -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
  # Python: openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=KEY), model "smart"
Each request logs one JSON access line here, with an "llm" section: provider, model, token counts.
MSG
wait "$pid"
