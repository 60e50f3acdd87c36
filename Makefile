# mailgate — the two commands are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION ?= 0.13.9
TOOLS      := .tools
UV         := $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
VENV       := .venv
PY         := $(VENV)/bin/python
PYTEST_ARGS ?=
# Trust the platform's CA store too (registries may sit behind a TLS-inspecting proxy).
export UV_SYSTEM_CERTS ?= 1

.PHONY: help env system-packages test lint typecheck schemas schemas-check pytest run openapi screenshots bench clean audit chaos

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(TOOLS)/bin/uv:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

env: $(if $(shell command -v uv 2>/dev/null),,$(TOOLS)/bin/uv) ## create .venv from uv.lock
	$(UV) sync --frozen --all-packages --quiet

test: env system-packages lint typecheck schemas-check audit pytest ## lint, type check, schema staleness, audit, whole suite

system-packages: ## Debian tools the suite drives (Chromium, promtool); installed when root
	@tools/system-packages.sh

lint: env ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: env ## mypy strict on libs/, the services and the fakes
	$(VENV)/bin/mypy

schemas: env ## regenerate proto-schemas/ from libs/ event structs
	$(PY) -m mailgate_core.schemagen proto-schemas

schemas-check: env ## fail when proto-schemas/ is stale
	$(PY) -m mailgate_core.schemagen proto-schemas --check

pytest: env ## the pytest suite (real NATS + Postgres from wheels)
	$(PY) -m pytest $(PYTEST_ARGS)

audit: env ## known-vulnerable locked versions (pip-audit online, vendored PyPA advisories offline)
	$(PY) tools/audit.py

chaos: env ## the full fault suite against the real stack (prints the loss/duplicate table)
	MAILGATE_CHAOS=full $(PY) -m pytest tests/chaos -s --timeout=1800 $(PYTEST_ARGS)

run: env ## the whole stack on this machine: NATS, Postgres, Postal sandbox, every service
	$(PY) -m mailgate_fakes.stack

screenshots: env ## regenerate docs/screenshots/*.png of the operator console (system Chromium)
	$(PY) docs/screenshots/capture.py

openapi: env ## regenerate docs/openapi.json (the ledger admin API)
	$(PY) -m mailgate_ledger.openapi docs/openapi.json

bench: env ## benchmarks (printing figures)
	$(PY) bench/run.py $(BENCH_ARGS)

clean: ## remove .venv, .tools and .data
	rm -rf $(VENV) $(TOOLS) .data .pytest_cache .ruff_cache .mypy_cache
