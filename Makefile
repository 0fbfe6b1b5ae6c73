# stockade: the two commands a newcomer needs are `make sandbox` (set up, then start the sandbox)
# and `make check` (set up, then lint and run every test tier). Everything else is a step of those.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup system-deps venv toolchain lint test check demo sandbox sandbox-down bench conformance-services clean chart-crds

## setup: Debian packages, the Python environment and the Go-built toolchain (idempotent)
setup: system-deps venv toolchain

system-deps:
	bash hack/system-deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[bench,dev]'
	touch $@

toolchain: venv
	$(PY) -m stockade.sandbox.toolchain
	$(PY) -m stockade.sandbox.upstream

## lint: ruff (check + format), mypy strict, import-linter
lint: venv
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	bash hack/chart-crds.sh --check
	$(PY) hack/values-table.py --check

## test: every tier (unit, compile, bpf, apiserver, node, e2e, conformance, chart); needs root
test: venv
	$(PY) -m pytest tests

## check: the one command that sets everything up and runs lint and every test tier
check: setup lint test

## demo: set up, then start the sandbox with the conformance model and show enforcement
demo: setup
	$(VENV)/bin/stockade demo

## sandbox: set up, then start a 2-node sandbox cluster and print its kubeconfig path
sandbox: setup
	$(VENV)/bin/stockade sandbox up --nodes 2

sandbox-down:
	$(VENV)/bin/stockade sandbox down

## chart-crds: copy crds/ (the single source of truth) into the Helm chart
chart-crds:
	bash hack/chart-crds.sh

bench: setup
	$(PY) bench/datapath.py

## conformance-services: the shared suites through Services in every Service mode (outside CI: hours)
conformance-services: setup
	$(PY) bench/conformance_services.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
