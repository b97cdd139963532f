# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv lint test test-unit test-e2e test-openwebui test-molecule test-fleet test-real demo demo-down bench bench-proxy clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check router_app tests/openwebui
	$(BIN)/mypy
	$(BIN)/ansible-lint --profile production -q roles playbooks molecule

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-e2e: venv
	$(BIN)/pytest -q tests/e2e

# The real Open-WebUI (its own venv, cached under /var/cache/llm-router) in Debian's Chromium (apt: chromium
# fonts-noto-color-emoji); screenshots in LLM_ROUTER_TEST_RESULTS (default /var/cache/llm-router/test-results/openwebui).
test-openwebui: venv
	scripts/openwebui-venv >/dev/null
	$(BIN)/pytest -q tests/openwebui

# The role in systemd-nspawn boxes with real systemd (needs root): the issue-3 inventory, then several engines at
# once (resources, idle unload, preload, aliases, /models/load|unload through polkit), then a fleet of two boxes
# (playbooks/site.yml, a rolling upgrade while clients stream, a model reload; 3-5 min, see molecule/fleet/README.md).
test-molecule: venv
	$(BIN)/molecule test -s default
	$(BIN)/molecule test -s lifecycle
	$(BIN)/molecule test -s fleet

# The fleet scenario alone.
test-fleet: venv
	$(BIN)/molecule test -s fleet

# A real llama-server through the role-deployed router in the demo box (brought up when it is not running).
test-real: venv
	LLM_ROUTER_TEST_DEMO_UP=1 $(BIN)/pytest -q tests/real_engine

demo: venv
	scripts/demo up

demo-down:
	scripts/demo down

bench: venv
	$(BIN)/python bench/switch_bench.py

# The request-path benchmark (issue 10): direct vs the router vs LiteLLM's proxy (pinned, its own venv made by
# scripts/litellm-venv) on a fast fake llama-server; e.g. BENCH_ARGS='--rounds 5 --profile /tmp/prof --out docs/benchmarks.md'.
bench-proxy: venv
	PYTHONPATH=. $(BIN)/python bench/proxy_bench.py $(BENCH_ARGS)

# The whole suite, what .ci/run calls: lint, molecule, the demo (with its smoke check), Open-WebUI's venv (a few
# minutes once, cached), then one pytest run over unit, end-to-end, Open-WebUI and real-engine tests (the
# real-engine tests use the demo, which stays up: `make demo-down`).
test: lint test-molecule demo
	scripts/openwebui-venv >/dev/null
	$(BIN)/pytest -q tests

clean:
	rm -rf $(VENV) build dist *.egg-info
