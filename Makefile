# `make demo` and `make test` are the only two commands a fresh machine needs: each creates the
# virtual environment at .venv (if missing) and installs the project with its test extra first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever the project's metadata changes.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/seed_quickstart.py

# Lint and type checks first (seconds), then every test, slow ones included.
test: lint
	$(BIN)/python -m pytest -q

# The tests not marked slow (no full export, no server process): for the edit-test loop.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/export_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
