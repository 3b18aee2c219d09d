# medmesh task runner. `make` lists the recipes; a fresh clone needs only `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.9.5
TOOLS := .tools
UV := $(TOOLS)/uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin
PY_SOURCES := contracts libs services cli tests deploy/triton deploy/drills deploy/training deploy/gpu deploy/observability

.PHONY: help
help: ## list the recipes
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	python3 -m venv $(TOOLS)/uv
	$(TOOLS)/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml */pyproject.toml services/*/pyproject.toml libs/*/pyproject.toml
	$(UV) sync --frozen
	touch $@

.PHONY: venv
venv: $(VENV)/.synced ## create .venv from the lockfile (uv sync --frozen)

.PHONY: deps
deps: venv ## fetch the Kafka broker and HAPI FHIR server jars (Maven), build kustomize (go install), prepare Triton's python backend, install Orthanc + DICOMweb (apt-get, as root)
	$(BIN)/python -m medmesh_cli.devstack.prefetch

.PHONY: run
run: deps ## start Kafka, Triton, Orthanc, a HAPI FHIR server, the services and the console, send the demo events (reports delivered to the FHIR server), stay up until Ctrl-C
	$(BIN)/medmesh up --demo

.PHONY: lint
lint: venv ## ruff (lint and format check)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)

.PHONY: typecheck
typecheck: venv ## mypy --strict with the pydantic plugin (each Triton model.py on its own: all are "model")
	$(BIN)/mypy
	for model in deploy/triton/models/*/*/model.py deploy/drills/*/triton/*/*/model.py; do \
		$(BIN)/mypy "$$model" || exit 1; done

.PHONY: test
test: lint typecheck deps ## lint, type-check, then every test tier (unit, service, conformance, e2e, chaos short form)
	$(BIN)/pytest

.PHONY: test-fast
test-fast: venv ## every tier but the end-to-end tests
	$(BIN)/pytest -m "not e2e"

.PHONY: fuzz
fuzz: venv ## the fuzz suites, long form: 50,000 generated FHIR payloads (resources, Bundles, waveforms) through ingest, and 50,000 mutated DICOM instances through the worker's image_tensor
	MEDMESH_FUZZ_EXAMPLES=$(or $(EXAMPLES),50000) $(BIN)/pytest tests/unit/test_ingest_fuzz.py tests/unit/test_dicom_fuzz.py -p no:cacheprovider

.PHONY: bench
bench: deps ## hops, pipeline, batching, router, ingest, tracing side by side (SERIES=...); docs/benchmarks/
	$(BIN)/medmesh bench $(if $(SERIES),--series $(SERIES))

.PHONY: chaos
chaos: deps ## fault suite, full form: kill -9 each service, restart Triton and Kafka under load (EVENTS=, RATE=); docs/benchmarks/chaos.md
	MEDMESH_CHAOS_EVENTS=$(or $(EVENTS),400) MEDMESH_CHAOS_RATE=$(or $(RATE),10) \
		MEDMESH_CHAOS_DOC=docs/benchmarks/chaos.md $(BIN)/pytest tests/chaos -m chaos -s

.PHONY: soak
soak: deps ## soak at half the measured capacity, memory growth of every process (DURATION=600, RATE=); docs/benchmarks/soak.md
	$(BIN)/python -m medmesh_cli.bench.soak $(if $(DURATION),--duration $(DURATION)) $(if $(RATE),--rate $(RATE))

.PHONY: clean
clean: ## remove run state (var/) and caches; keeps .venv and the Kafka jars
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
