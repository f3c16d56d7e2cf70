# Two commands on a fresh machine: `make demo` and `make test`. Every target installs what it needs
# into .venv on first use (idempotent). The first install compiles llama.cpp (~6 min on 2 cores).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON312 ?= $(shell command -v python3.12 2>/dev/null || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n1)
UV_VERSION := 0.13.9
UV := .tools/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON312)
export UV_LINK_MODE := copy
EXTRAS ?= --extra cpu --extra dev
PYTEST_WORKERS ?= 2

.PHONY: help install system-deps demo test test-fast lint bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install it, e.g. pyenv install 3.12)" >&2; exit 1; }
	$(PYTHON312) -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

.venv/.installed: $(UV) pyproject.toml uv.lock
	@echo "Installing into .venv (first time: llama-cpp-python compiles llama.cpp, ~6 min on 2 cores)"
	$(UV) sync --frozen $(EXTRAS)
	@touch $@

install: .venv/.installed ## Create .venv with every dependency (idempotent)

# The HTML report tests render pages in headless Chromium (Debian's package).
system-deps: ## Install Chromium (report tests) and PostgreSQL (hub store tests) (Debian/Ubuntu, as root)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Chromium (report tests render HTML headless)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "error: /usr/bin/chromium is missing: install Debian's chromium package" >&2; exit 1; fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing PostgreSQL (hub store tests run a private server)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "error: PostgreSQL is missing: install Debian's postgresql package" >&2; exit 1; fi; \
	fi

demo: .venv/.installed ## Run the main job on embedded defaults (local hub, local model, DuckDB)
	.venv/bin/python -m sre_agent.demo

test: .venv/.installed system-deps ## Run every test, slow ones included (what CI runs)
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

test-fast: .venv/.installed system-deps ## Run the tests not marked slow
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

lint: .venv/.installed ## ruff + mypy
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# The serving benchmark compares against a real MLServer; MLServer's pins (fastapi -> starlette < 0.51)
# cannot join our lock, so it lives in its own venv and the benchmark talks to it over HTTP only.
.venv-bench/.installed: $(UV) benchmarks/mlserver-requirements.txt
	$(UV) venv --allow-existing .venv-bench
	$(UV) pip install --python .venv-bench/bin/python -r benchmarks/mlserver-requirements.txt
	@touch $@

bench: .venv/.installed .venv-bench/.installed ## Run every benchmark; each prints one JSON object
	@set -e; for b in benchmarks/[!_]*.py; do echo "== $$b" >&2; .venv/bin/python $$b; done

clean: ## Remove the environments
	rm -rf .venv .venv-bench .tools
