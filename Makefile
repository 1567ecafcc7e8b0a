# patchlife: `make run` serves the embedded default model, `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
# Which torch build goes into .venv (scripts/install_torch.py): auto (the default) takes the CPU-only build from
# PyTorch's CPU wheel index where no NVIDIA driver is present and that index is reachable, else the registry's
# default; cpu forces the CPU-only build (same fallback); cuda the registry's default (CUDA on Linux x86_64).
# It applies when .venv is created: `make clean` first to switch.
TORCH  ?= auto
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench gpu-check gpu-wheels gpu-wheels-install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python scripts/install_torch.py $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/patchlife ensure-default
	$(BIN)/patchlife serve

test: $(STAMP) prometheus kubectl chromium wrk
	$(BIN)/python -m pytest -q

# Optional test tools from Debian's packages, best effort (scripts/apt-best-effort): without root or
# apt-get, or when a package cannot be had, the tests that need the tool skip and say why.
# Prometheus + promtool for tests/ops; kubectl (its built-in kustomize renders deploy/k8s; bookworm's
# kubernetes-client 1.20 is too old, the tests then skip); chromium for the browser tests (driven by
# Playwright from the dev extra; Playwright's own browser download is never used); wrk for the load
# generator tests (patchlife bench-http, loadtest --driver wrk).
.PHONY: prometheus kubectl chromium wrk
prometheus:
	@scripts/apt-best-effort Prometheus "command -v prometheus && command -v promtool" prometheus
kubectl:
	@scripts/apt-best-effort "Kubernetes manifest" "command -v kubectl" kubectl kubernetes-client
chromium:
	@scripts/apt-best-effort browser "command -v chromium" chromium
wrk:
	@scripts/apt-best-effort "wrk load-generator" "command -v wrk" wrk

lint: $(STAMP)
	$(BIN)/ruff check model service bench cli tests
	$(BIN)/mypy model service bench cli

bench: $(STAMP)
	$(BIN)/patchlife bench --backbone deit_small_patch16_224 --keep-rate 0.7 --batch-size 32

# On a CUDA machine: the gpu test tier, a short bf16 training run, eval against the CPU, `patchlife bench --served`
# at batch 1/16/64/256 and a served load test, as one table (about 6 minutes). NO_INSTALL=1 installs nothing and uses $(PYTHON) as it is (a GPU
# machine without registry access): `make gpu-check NO_INSTALL=1 PYTHON=python3`. GPU_CHECK_ARGS passes
# options on (e.g. GPU_CHECK_ARGS="--json" or "--parts bench,loadtest").
ifeq ($(NO_INSTALL),1)
gpu-check:
	PYTHONPATH=. $(PYTHON) -m cli gpu-check $(GPU_CHECK_ARGS)
else
gpu-check: $(STAMP)
	$(BIN)/patchlife gpu-check $(GPU_CHECK_ARGS)
endif

# Wheels for a GPU machine that cannot reach a registry (its python3 is 3.12, with torch, timm, numpy,
# pillow, prometheus-client, httpx, grpcio and others already there): `make gpu-wheels` here, carry .whl/
# there, then `make gpu-wheels-install PYTHON=python3` (what it lacks, from .whl/ only) and
# `make gpu-check NO_INSTALL=1 PYTHON=python3`.
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS = fastapi fastapi-offline uvicorn httptools python-multipart pydantic pydantic-settings simplejpeg \
	msgspec "protobuf>=6.33.5,<7"
gpu-wheels:
	$(PYTHON) -m pip download -q -d .whl --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 $(GPU_WHEELS)

gpu-wheels-install:
	$(PYTHON) -m pip install -q --no-index --find-links .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The gRPC messages of the Open Inference Protocol (service/frontend/grpc/grpc_service.proto), generated once and
# checked in so that installing patchlife needs no protoc (tests/service/frontend/test_grpc_proto.py checks they agree).
.PHONY: grpc-stubs
grpc-stubs: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. service/frontend/grpc/grpc_service.proto
