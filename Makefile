# patchlife: `make run` serves the embedded default model, `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/patchlife ensure-default
	$(BIN)/patchlife serve

test: $(STAMP) prometheus kubectl chromium
	$(BIN)/python -m pytest -q

# Prometheus + promtool (Debian's `prometheus` package) for tests/ops. Best effort: without root or
# apt-get the tests that need them skip and say why. While installing, a policy-rc.d (unless one
# exists) keeps the package from starting its own Prometheus service.
.PHONY: prometheus
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make prometheus: not root or no apt-get: the Prometheus tests will be SKIPPED"; exit 0; fi; \
	echo "make prometheus: installing Debian's prometheus package (prometheus + promtool)"; \
	policy=/usr/sbin/policy-rc.d; made=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && made=1; fi; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "make prometheus: could not install it: the Prometheus tests will be SKIPPED"; \
	if [ -n "$$made" ]; then rm -f $$policy; fi

# kubectl (its built-in kustomize renders deploy/k8s in tests/ops/test_k8s.py). Best effort, like
# prometheus: a kubectl already on PATH is kept; else, as root, the distribution's `kubectl` package
# where an apt source has it, or Debian's `kubernetes-client`. The tests skip and say why when there
# is none, or when its kustomize is older than v4 (bookworm's kubernetes-client is 1.20: too old).
.PHONY: kubectl
kubectl:
	@if command -v kubectl >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make kubectl: not root or no apt-get: the Kubernetes manifest tests will be SKIPPED"; exit 0; fi; \
	echo "make kubectl: installing kubectl from the distribution's packages"; \
	apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubectl \
	  >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  kubernetes-client >/dev/null; } \
	  || echo "make kubectl: could not install it: the Kubernetes manifest tests will be SKIPPED"

# Chromium (Debian's `chromium` package) for the browser tests in tests/e2e, driven by Playwright from
# the dev extra. Playwright's own browser download is never used. Best effort like `prometheus`:
# without root or apt-get those tests skip and say why.
.PHONY: chromium
chromium:
	@if command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make chromium: not root or no apt-get: the browser tests will be SKIPPED"; exit 0; fi; \
	echo "make chromium: installing Debian's chromium package"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "make chromium: could not install it: the browser tests will be SKIPPED"

lint: $(STAMP)
	$(BIN)/ruff check model service tests
	$(BIN)/mypy model service

bench: $(STAMP)
	$(BIN)/patchlife bench --backbone deit_small_patch16_224 --keep-rate 0.7 --batch-size 32

# On a CUDA machine: the gpu test tier, `patchlife bench --served` at batch 1/16/64/256 and a served load
# test, as one table (about 5 minutes). NO_INSTALL=1 installs nothing and uses $(PYTHON) as it is (a GPU
# machine without registry access): `make gpu-check NO_INSTALL=1 PYTHON=python3`. GPU_CHECK_ARGS passes
# options on (e.g. GPU_CHECK_ARGS="--json" or "--parts bench,loadtest").
ifeq ($(NO_INSTALL),1)
gpu-check:
	PYTHONPATH=. $(PYTHON) -m model.cli gpu-check $(GPU_CHECK_ARGS)
else
gpu-check: $(STAMP)
	$(BIN)/patchlife gpu-check $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
