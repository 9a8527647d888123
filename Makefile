# agentgate: `make run` (embedded quickstart) and `make test` (the whole suite).
# Both create the virtualenv and install what they need (pip, apt-get) on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# $(call apt_ensure,command:package ...): apt-get install the packages whose command is missing.
define apt_ensure
	@missing=""; for pair in $(1); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi
endef

# xds-protos (Envoy's API, for xDS) ships an older copy of the opentelemetry/proto modules; whichever
# package pip installs last owns those files, and the old copy breaks the OTLP exporters. Reinstall
# opentelemetry-proto (same version, no deps) last so its modules win.
OTEL_PROTO_FIX = $(BIN)/python -m pip install -q --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"

.PHONY: run test install lint protos bench bench-mcp bench-policy bench-a2a bench-llm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(OTEL_PROTO_FIX)
	@touch $@

install: $(STAMP)

# The npm MCP peers of the tests (server-everything, the TypeScript SDK client), reinstalled when the lock changes.
NODE_PEERS := tests/peers/node/node_modules/.installed
$(NODE_PEERS): tests/peers/node/package-lock.json | $(STAMP)
	sh tests/peers/node/install.sh
	@touch $@

run: install
	$(call apt_ensure,curl:curl)
	examples/quickstart/run.sh

test: install
	$(call apt_ensure,curl:curl nginx:nginx-light redis-server:redis-server kubectl:kubernetes-client)
	@$(MAKE) --no-print-directory $(NODE_PEERS)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	cd protos && ../$(BIN)/buf lint

# Regenerate shared/api from protos/ (tests fail when the committed code is stale).
protos: install
	$(BIN)/python protos/generate.py

bench: install
	$(call apt_ensure,wrk:wrk h2load:nghttp2-client nginx:nginx-light)
	$(BIN)/python bench/http_proxy.py

# MCP tools/call through one worker (one target, three federated) vs the server directly vs Envoy.
bench-mcp: install
	$(call apt_ensure,wrk:wrk)
	$(BIN)/python bench/mcp_proxy.py

# GET through Envoy (router only; jwt_authn+RBAC+local_ratelimit) and agentgate (no Policy; JWT+CEL+limit,
# local and through Redis): what a policy chain costs end to end.
bench-policy: install
	$(call apt_ensure,wrk:wrk nginx:nginx-light redis-server:redis-server)
	$(BIN)/python bench/policy_proxy.py

# A2A SendMessage through one worker vs a lean responder directly and through Envoy, and vs an a2a-sdk agent.
bench-a2a: install
	$(call apt_ensure,wrk:wrk)
	$(BIN)/python bench/a2a_proxy.py

# Chat completions (plain, streamed, time to first token) through one worker vs the OpenAI stand-in directly and
# through Envoy, and translated from OpenAI to the Anthropic stand-in.
bench-llm: install
	$(call apt_ensure,wrk:wrk)
	$(BIN)/python bench/llm_proxy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
