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

# Reinstall whenever the project's metadata or this recipe changes.
# Second step: Model Garden (tf-models-official), whose real ExponentialMovingAverage optimizer the optimizer-slot
# tests train with. Its declared requirements (tensorflow~=2.20.0, tensorflow-text~=2.20.0, tensorflow-datasets,
# opencv, ...) do not resolve beside TF 2.21, yet official/modeling/optimization/ema_optimizer.py needs only
# tensorflow and tf-keras, which the test extra installs. Only `pip install --no-deps` installs it that way, and a
# pyproject extra cannot say --no-deps (pip would resolve, and fail on, its requirements), so it is a step of its own
# here. gin-config is what importing official.modeling.optimization needs beyond that (optimizer_factory imports gin).
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps tf-models-official==2.20.0 gin-config==0.5.0
	touch $(STAMP)

install: $(STAMP)

# Trains on noisy-label digits, exports, serves in a separate process, A/B-compares, writes demo-out/report.html.
demo: $(STAMP)
	$(BIN)/python examples/digits_noisy_labels.py

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
