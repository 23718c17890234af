# cachecade: `make serve` and `make test` are the two commands a newcomer runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8080
DATA ?= ../shared/data

# Models come from installed packages, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# llama.cpp is compiled by deploy/llama_wheel.sh (the same script the Dockerfile runs): portable by default
# (GGML_NATIVE=OFF: AVX2 baseline, no AVX-512, no AMX), lean (CPU only, no multimodal library, no TLS), once per
# flag set into ~/.cache/cachecade/wheels. LLAMA_CMAKE_ARGS overrides the flags (README: Supported CPUs).
export LLAMA_CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install install-dev llama-wheel reinstall-llama serve test test-fast lint bench calibrate calibrate-cascade system-deps \
	container-deps lock wheelhouse image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# Installs the wheel built with the current flags whenever it is not the one installed (a changed flag set
# builds and installs another); pip never compiles llama-cpp-python itself (--only-binary).
llama-wheel: | $(BIN)/python
	@wheel=$$(PYTHON=$(BIN)/python deploy/llama_wheel.sh) && \
	if [ "$$(cat $(VENV)/.llama-wheel 2>/dev/null)" != "$$wheel" ]; then \
	  echo "installing $$wheel" && $(BIN)/pip install -q --force-reinstall --no-deps "$$wheel" && \
	  echo "$$wheel" > $(VENV)/.llama-wheel; fi

# After something else replaced the llama-cpp-python in the venv (the proxy's self-check says so at start).
reinstall-llama:
	rm -f $(VENV)/.llama-wheel
	$(MAKE) llama-wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python llama-wheel
	$(BIN)/pip install --only-binary llama-cpp-python -e '.[local,export]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --only-binary llama-cpp-python -e '.[dev]'
	touch $@

install: llama-wheel $(VENV)/.installed
install-dev: llama-wheel $(VENV)/.installed-dev

serve: install
	$(BIN)/cachecade serve --host $(HOST) --port $(PORT)

# Debian's packages, with sudo unless root.
apt_install = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(1)

# Debian's redis-server, for the tests that start their own Redis (installed only when missing).
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "redis-server missing: installing Debian's package"; \
	  $(call apt_install,redis-server); }

# Podman, runc and mmdebstrap from Debian's packages, for `make image` and the container tests (only when missing).
# Podman reads the project's own settings (deploy/podman/containers.conf) through CONTAINERS_CONF.
export CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
container-deps:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
	  echo "podman/runc/mmdebstrap missing: installing Debian's packages"; \
	  $(call apt_install,podman runc mmdebstrap); }

# requirements/*.txt: every package pinned with its hash, in layers (deploy/lock.py says how to install them).
lock: install-dev
	$(BIN)/python deploy/lock.py

# build/wheelhouse: every wheel the image installs, checked against the lock (deploy/wheelhouse.py).
wheelhouse: llama-wheel $(VENV)/.installed
	$(BIN)/python deploy/wheelhouse.py "$$(PYTHON=$(BIN)/python deploy/llama_wheel.sh)"

# The sidecar images, built with no network: localhost/cachecade:latest (both local models) and
# localhost/cachecade:cache-only. ENGINE=docker BASE_IMAGE=python:3.11-slim-bookworm builds them with Docker.
ENGINE ?= podman
BASE_IMAGE ?= $(if $(filter podman,$(ENGINE)),localhost/cachecade-base:bookworm,python:3.11-slim-bookworm)
IMAGE ?= localhost/cachecade
PODMAN_ONLY = $(if $(filter podman,$(ENGINE)),$(1))
# --format docker: Podman's default OCI format drops HEALTHCHECK. With Podman the build has no network at all; with
# Docker on a python:*-slim base the runtime stage apt-installs libgomp1 (Debian's base has it), the rest is offline.
BUILD = $(ENGINE) build $(call PODMAN_ONLY,--network=none --format docker) -f deploy/Dockerfile \
	--build-arg BASE_IMAGE=$(BASE_IMAGE)
image: wheelhouse $(call PODMAN_ONLY,container-deps)
	$(call PODMAN_ONLY,deploy/podman/base.sh $(BASE_IMAGE))
	$(BUILD) --target cache-only -t $(IMAGE):cache-only .
	$(BUILD) --target full -t $(IMAGE):latest .
	$(ENGINE) image ls $(IMAGE)

test: install-dev system-deps container-deps
	$(BIN)/python -m pytest -q

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not e2e"

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install-dev
	$(BIN)/python -m bench.cache_quality --data $(DATA)
	$(BIN)/python -m bench.verifier --data $(DATA)
	$(BIN)/python -m bench.learning --data $(DATA)
	$(BIN)/python -m bench.learning_cascade --data $(DATA)
	$(BIN)/python -m bench.hardening --data $(DATA)
	$(BIN)/python -m bench.fuzz --requests 5000
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.soak --minutes 30
	@command -v wrk >/dev/null || { $(call apt_install,wrk); }
	$(BIN)/python -m bench.responses
	$(BIN)/python -m bench.latency --data $(DATA)
	$(BIN)/python -m bench.local_tier
	$(BIN)/python -m bench.llama_builds --threads 1 2
	$(BIN)/python -m bench.embedder_int8 --data $(DATA)
	$(BIN)/python -m bench.cascade --data $(DATA)
	$(BIN)/python -m bench.budget_overhead
	$(BIN)/python -m bench.budget --data $(DATA)
	$(BIN)/python -m bench.shared_load --data $(DATA) --restart-redis-at 30
	$(BIN)/python -m bench.index_scale
	$(MAKE) image
	$(BIN)/python -m bench.image --build

calibrate: install
	$(BIN)/cachecade calibrate --pairs $(DATA)/qqp_pairs/pairs.json --max-false-hit 0.02

calibrate-cascade: install
	$(BIN)/cachecade calibrate-cascade --qa $(DATA)/nq_open/NQ-open.dev.jsonl --qa $(DATA)/svamp/SVAMP.json \
	  --target-precision 0.8 --limit 300

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
