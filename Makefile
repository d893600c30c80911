# Two entry points (see README.md): `make demo` and `make test`.
# Both create .venv on first use. torch is pinned to the CPU build that installs from local disk on
# our machines; override TORCH_SPEC elsewhere (e.g. TORCH_SPEC="torch==2.13.0+cu128").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck layers unit format

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,llm]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tensorwire demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

# Two workers: most of the suite's time is child processes starting and sockets waiting, so two
# halves share the 2 cores well (about 5 min instead of 7 on our machines). Two, not "auto": the
# largest tests hold several GiB each, and a wide machine would run many of them at once.
unit: $(STAMP)
	$(BIN)/pytest -n 2

test: lint typecheck layers unit

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
