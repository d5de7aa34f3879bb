# One way to do each thing; CI and the README call these targets verbatim.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv/bin
export UV_PYTHON_DOWNLOADS := never

.PHONY: help env up down status test test-unit lint format bench lock image

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

env:  ## install what is missing (uv, PostgreSQL 15, PgBouncer) and sync .venv
	@bash scripts/bootstrap.sh

up: env  ## start the whole local stack (tenantflow-dev) and print its addresses
	@$(VENV)/tenantflow-dev up --main-job

down:  ## stop everything the local stack (and the tests' second stack) started
	@if [ -x $(VENV)/tenantflow-dev ]; then $(VENV)/tenantflow-dev down; fi
	@if [ -x $(VENV)/python ]; then $(VENV)/python -m tests.streams down; fi

status:  ## show each part of the local stack, its port and health
	@$(VENV)/tenantflow-dev status

test:  ## the whole suite, two streams on two stacks at once (brings up what it needs)
	@TENANTFLOW_WITH_BROWSER=1 TENANTFLOW_WITH_IMAGE=1 TENANTFLOW_WITH_HA=1 bash scripts/bootstrap.sh
	@$(VENV)/python -m tests.streams

test-unit: env  ## pure unit tests only (no stack, no database), in seconds
	@$(VENV)/pytest tests/unit

image:  ## build the worker image with podman from the Dockerfile (cached outside the clone)
	@TENANTFLOW_WITH_IMAGE=1 bash scripts/bootstrap.sh
	@$(VENV)/tenantflow-dev image

lint: env  ## ruff, ruff format --check, mypy, hadolint
	@$(VENV)/ruff check .
	@$(VENV)/ruff format --check .
	@$(VENV)/mypy
	@$(VENV)/hadolint --failure-threshold info Dockerfile

format: env  ## apply ruff's fixes and formatting
	@$(VENV)/ruff check --fix .
	@$(VENV)/ruff format .

bench: env  ## benchmarks, printed as ratios against a baseline measured in the same run
	@$(VENV)/python -m bench

lock:  ## re-pin requirements*.lock (versions and hashes, no download addresses)
	uv pip compile pyproject.toml --generate-hashes --universal --python-version 3.11 \
	  --no-header --no-annotate -o requirements.lock
	uv pip compile pyproject.toml --extra dev --generate-hashes --universal \
	  --python-version 3.11 --no-header --no-annotate -o requirements-dev.lock
