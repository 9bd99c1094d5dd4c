# weir: the commands a newcomer needs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
HARNESS := PYTHONPATH=tests $(PY) -m harness
# Go lives in /usr/local/go on Debian images that install it from the tarball; rustup puts cargo
# in ~/.cargo/bin.
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/.cargo/bin
CACHE := $(or $(WEIR_CACHE),$(HOME)/.cache/weir)
NATIVE := native/Cargo.toml native/Cargo.lock native/pyproject.toml native/weir_native.pyi $(wildcard native/src/*.rs)


.PHONY: help demo bench bench-quick bench-setup setup crds lint servers test-unit test-integration test ci-fresh services-up services-down kube-build kube-up kube-down e2e-kind soak clean

help: ## List the targets and what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}'

demo: setup ## Command 1: start a local Kafka broker and run an example job on generated events (EXAMPLE=revenue)
	$(HARNESS) up kafka
	$(BIN)/weir demo$(if $(EXAMPLE), $(EXAMPLE)) --bootstrap-servers 127.0.0.1:$${WEIR_KAFKA_PORT:-19092}
	@echo "More examples: '$(BIN)/weir demo --list' lists them, 'make demo EXAMPLE=NAME' runs one."

setup: $(STAMP) ## Create .venv and install weir (editable) with the dev tools, pinned by constraints.txt

$(STAMP): pyproject.toml constraints.txt $(NATIVE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@command -v cargo >/dev/null || { echo "setup: the native hot path needs Rust (cargo), e.g. from https://rustup.rs"; exit 1; }
	@echo "setup: building the native hot path (native/, Rust; the first build takes about a minute)"
	CARGO_TARGET_DIR=$(CACHE)/cargo-target PIP_CONSTRAINT=constraints.txt $(BIN)/pip install -q --force-reinstall --no-deps ./native
	touch $@

crds: setup ## Regenerate the StreamJob CRD from the models into crds/ and the Helm chart
	$(PY) -m weir_operator.crd

lint: setup ## ruff, mypy (strict), the import-linter layer contracts and rustfmt on native/
	$(BIN)/ruff check runtime operator tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	@if cargo fmt --version >/dev/null 2>&1; then cd native && cargo fmt --check; \
	else echo "lint: rustfmt is not installed (rustup component add rustfmt): native/ formatting unchecked"; fi

test-unit: setup ## Fast tests of the pure logic; no servers
	$(PY) -m pytest tests/unit -q

servers: setup ## Fetch and build every test server once (Kafka and S3Proxy jars, kube-apiserver, etcd, helm), a line per step
	$(HARNESS) prepare

test-integration: servers ## Tests against real Kafka, S3 and kube-apiserver, which the suite starts; the kind suite skips without docker
	$(PY) -X faulthandler -m pytest tests/integration tests/e2e -q -rs -m 'not slow'

test: lint test-unit test-integration ## Everything: lint, unit and server-backed tests (what CI runs)

ci-fresh: ## Rehearse CI as a new machine: a fresh clone of HEAD, every cache (WEIR_CACHE, Go, pip, ~/.m2) empty
	bash .ci/fresh

services-up: setup ## Start Kafka and S3 for manual work and print how to reach them
	$(HARNESS) up kafka s3

services-down: setup ## Stop the servers started by services-up
	$(HARNESS) down kafka s3

kube-build: setup ## Build kube-apiserver and etcd from Go modules into ~/.cache/weir/kube (once; minutes)
	PYTHONPATH=tests $(PY) -c 'from harness.kube import ensure_built; print(*ensure_built().values(), sep="\n")'

kube-up: setup ## Start a kube-apiserver + etcd (built from Go modules on first use) and print its kubeconfig
	$(HARNESS) up kube

kube-down: setup ## Stop the kube-apiserver and etcd
	$(HARNESS) down kube

soak: setup ## The kill test with random seeds, several rounds (WEIR_SOAK_ROUNDS, default 5; ~10 min)
	$(PY) -X faulthandler -m pytest tests/integration/test_exactly_once.py -m slow -q -s

e2e-kind: setup ## End-to-end on a kind cluster (needs docker, kind, kubectl, helm): image, chart, Kafka, S3, a StreamJob
	bash tests/e2e/kind/run-kind-e2e.sh

bench-setup: setup ## Once: Quix Streams and Bytewax virtualenvs and the Flink job (Maven), cached in ~/.cache/weir/bench
	$(PY) bench/install.py

bench: bench-setup ## weir (1 worker) vs the consume ceiling, Quix Streams, Bytewax, Flink on 2M events + latency + profile, checkpoint, rescale and Nexmark-style figures; rewrites BENCHMARKS.md (~25-30 min)
	$(HARNESS) up kafka s3
	$(PY) bench/checkpoint_bench.py --sizes 10,100,1000
	$(PY) bench/rescale_bench.py
	$(PY) bench/nexmark.py
	$(PY) bench/run.py

bench-quick: bench-setup ## The same on 200,000 events, 2 runs, a 10 s latency run, Nexmark-style queries on 200,000 bids (~5 min)
	$(HARNESS) up kafka s3
	$(PY) bench/checkpoint_bench.py --sizes 10,100 --series 0 --out bench/results/checkpoint-quick.json
	$(PY) bench/rescale_bench.py --quick
	$(PY) bench/nexmark.py --quick
	$(PY) bench/run.py --quick

clean: ## Remove the virtualenv and caches inside the repo (the server cache in ~/.cache/weir stays)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
