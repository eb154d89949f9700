# opspolish developer commands. Everything installs itself into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install services services-stop test test-reliability lint demo reset-seed worker bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

services:
	@$(PYTHON) scripts/ensure_services.py

services-stop:
	@$(PYTHON) scripts/ensure_services.py --stop

lint: install
	$(BIN)/ruff check src tests scripts migrations
	$(BIN)/mypy

test: install services lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-reliability: install services
	$(BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)

reset-seed: install services
	$(BIN)/opspolish db reset --seed $(ARGS)

demo: install services
	$(BIN)/python scripts/demo.py

worker: install services
	$(BIN)/arq opspolish.worker.WorkerSettings $(ARGS)

bench: install services
	$(BIN)/python scripts/bench.py $(if $(QUICK),--quick,) $(if $(REPEATS),--repeats $(REPEATS),)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
