# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install from the lock file.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
LOCK := requirements.lock
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-fast lint mutate lock bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch alone first, pinned by the lock, so the resolver never swaps in another build
	# (a CPU wheel here; PyPI's CUDA build on GPU hosts).
	$(BIN)/python -m pip install -q -c $(LOCK) torch
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

run: install
	lmcycle run

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Mutation testing of the promotion gate's decision (pyproject [tool.mutmut]): every mutant of `better` and
# `gate_decision` in lmcore/lifecycle/registry/gate.py must be killed by the fast unit tests of tests/test_gate.py.
GATE_MUTANTS := 'lmcore.lifecycle.registry.gate.x_better__mutmut_*' 'lmcore.lifecycle.registry.gate.x_gate_decision__mutmut_*'
mutate: install
	rm -rf mutants
	$(BIN)/mutmut run $(GATE_MUTANTS) | tail -n +2 | grep -v '^🎉'
	@if $(BIN)/mutmut results | grep -E 'x_(better|gate_decision)__mutmut_[0-9]+: '; then \
		echo "error: surviving mutants in the gate's decision (above)"; exit 1; fi
	@echo "all mutants of the gate's decision killed"

# Regenerate the lock from the current environment (local build labels such as +cpu stripped).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' > $(LOCK)

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf data models checkpoints reports/*/ .pytest_cache mutants
