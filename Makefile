# Keel: `make install`, `make test`. See README.md.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.keel-installed
PYTEST := $(BIN)/python -m pytest

.PHONY: install up status down test test-slow test-all lint bench-pii lock clean help
.DEFAULT_GOAL := help

help:
	@echo "make up         install if needed, start the local stack (Ray + gateway, MLflow, Airflow), load the sample"
	@echo "make status     health, PID, memory and URL of each local service"
	@echo "make down       stop everything make up started"
	@echo "make install    create .venv (Python 3.11) and install Keel with its whole default stack"
	@echo "make test       run the default test suite (slow suites excluded)"
	@echo "make test-slow  run the suites marked slow"
	@echo "make lint       ruff, mypy --strict on the runtime packages, import-linter's layering contracts"
	@echo "make bench-pii  PII accuracy benchmark: Keel vs Presidio defaults"
	@echo "make lock       refresh constraints.txt from the installed venv"

install: $(STAMP)

# Re-runs only when the dependency declarations change, so a second `make install` is instant.
# torch goes in first and alone: `torch==2.13.0` is the CPU wheel; anything unpinned pulls CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

up: install
	$(BIN)/keel up

status:
	@$(BIN)/keel status

down:
	@if [ -x $(BIN)/keel ]; then $(BIN)/keel down; fi

test: install
	$(PYTEST) -m "not slow and not gpu"

# pytest exits 5 when nothing is selected; that is not a failure here.
test-slow: install
	$(PYTEST) -m "slow" || [ $$? -eq 5 ]

test-all: test test-slow

# All three run even when one fails, so one run lists every finding; the target fails if any did.
lint: install
	@status=0; \
	echo "ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "mypy (strict: keel, serving, ray_jobs, dags)"; $(BIN)/mypy || status=1; \
	echo "lint-imports"; $(BIN)/lint-imports || status=1; \
	exit $$status

bench-pii: install
	$(BIN)/python benchmarks/pii_accuracy.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^keel' -e '^#' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache .import_linter_cache build *.egg-info
