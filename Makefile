# opspolish developer commands. Everything installs itself into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PY311 := import sys; sys.exit(sys.version_info < (3, 11))
# A venv whose interpreter is gone, older than 3.11 or without pip is built again: the stamp alone kept such a venv
# "up to date", and every later target failed in it (a 3.10 venv left by PYTHON=python3.10 stayed after the fix).
VENV_OK := $(shell $(BIN)/python -c 'import pip; $(PY311)' >/dev/null 2>&1 && echo yes)
ifneq ($(VENV_OK),yes)
$(shell rm -f $(VENV)/.installed-*)
endif

.PHONY: install services services-stop test test-reliability lint demo reset-seed worker bench clean

$(STAMP): pyproject.toml
	@if [ "$(VENV_OK)" != yes ]; then \
	  $(PYTHON) -c '$(PY311)' 2>/dev/null || { \
	    echo "make: $(PYTHON) is not Python 3.11 or newer: run make PYTHON=python3.11 (or a newer one)" >&2; exit 1; }; \
	  $(PYTHON) -m venv --clear $(VENV) && $(BIN)/python -c 'import pip' 2>/dev/null || { \
	    echo "make: $(PYTHON) -m venv made no usable venv (on Debian: apt-get install python3-venv)" >&2; exit 1; }; \
	fi
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
