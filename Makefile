# Every target sets itself up on a fresh machine that has only Python 3.11+.
# `make help` lists the targets from their `## ` comments.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
# Reinstalled whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-stamp
# The first interpreter that is 3.11 or newer (pyenv shims exist for versions that are not
# installed, so each one is asked, not just looked up).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; \
	done)
T ?=
# Placeholders so `docker-compose config` can render the file; it only validates.
COMPOSE_LINT_ENV := CONVEYOR_TOKEN_PEPPER=lint-placeholder-000000 \
	CONVEYOR_FLOWER_PASSWORD=lint-placeholder-000000 POSTGRES_PASSWORD=lint-placeholder \
	CONVEYOR_METRICS_TOKEN=lint-placeholder-000000

.PHONY: help run test lint bench bench-import bench-load bench-tools clean compose-tool prometheus-tool

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Conveyor needs Python 3.11 or newer on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(STAMP) ## start everything on this machine (API :8000, Flower :5555, embedded services)
	$(BIN)/conveyor run

test: $(STAMP) compose-tool prometheus-tool ## run the tests; T=tests/web runs a subset
	$(BIN)/pytest $(T)

lint: $(STAMP) compose-tool prometheus-tool ## ruff, mypy --strict, docker-compose config, promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@if command -v promtool >/dev/null; then \
		set -e; \
		echo "promtool check config/rules, test rules (deploy/)"; \
		promtool check config --syntax-only deploy/prometheus.yml; \
		promtool check rules deploy/alerts.yml; \
		promtool test rules deploy/alerts_test.yml; \
	fi
	@if command -v docker-compose >/dev/null; then \
		echo "docker-compose config -q"; \
		$(COMPOSE_LINT_ENV) docker-compose config -q; \
	fi

# Debian's docker-compose validates the compose file offline (no Docker engine needed).
compose-tool:
	@if ! command -v docker-compose >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
		else \
			echo "docker-compose is missing and this is not root: its checks are skipped"; \
		fi; \
	fi

# Debian's prometheus package brings promtool (lint: config, rules, alert unit tests) and
# the server the end-to-end metrics test scrapes with.
prometheus-tool:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
		else \
			echo "prometheus/promtool are missing and this is not root: their checks are skipped"; \
		fi; \
	fi

bench: $(STAMP) bench-tools ## run every benchmark in bench/; ARGS="import --rows 10000000" runs one
	$(BIN)/python -m bench $(ARGS)

bench-import: $(STAMP) ## import benchmark: psql COPY vs ORM vs Conveyor; ARGS="--rows 1000000,10000000"
	$(BIN)/python -m bench import $(ARGS)

bench-load: $(STAMP) bench-tools ## the seed's load scenario, cached GET peak, job path; ARGS="--quick"
	$(BIN)/python -m bench load $(ARGS)

# Load generators are tools, not dependencies: wrk and hey from Debian, locust in a venv of its own
# (it brings gevent and its own Flask, which must not meet the project's).
BENCH_TOOLS := .conveyor/bench/tools
LOCUST_VERSION := 2.47.0
bench-tools: | $(BIN)/python
	@if ! command -v hey >/dev/null || ! command -v wrk >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey wrk >/dev/null; \
		else \
			echo "hey or wrk is missing (Debian packages): the load benchmark cannot run" >&2; \
		fi; \
	fi
	@if ! $(BENCH_TOOLS)/bin/locust --version 2>/dev/null | grep -q "$(LOCUST_VERSION)"; then \
		$(PYTHON) -m venv $(BENCH_TOOLS) && \
		$(BENCH_TOOLS)/bin/pip install --quiet "locust==$(LOCUST_VERSION)"; \
	fi

clean: ## remove caches, build output and .venv (never .conveyor: it holds your data)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.conveyor/*' -exec rm -rf {} +
