# segflow — the two set-up commands: `make demo` (the main job) and `make test`.
# Each creates .venv when missing, upgrades pip, installs torch (pin overridable with
# TORCH_SPEC) and then the project. Nothing else is needed on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist, one test file per process at a time); 1 runs them in order
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.segflow-installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DASK_TEMPORARY_DIRECTORY ?= $(CURDIR)/.dask-scratch

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m segflow.demo --out demo-output

test: $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
# the guide in docs/: strict turns a broken link into a failure (not with --quiet,
# which hides the warnings that strict counts)
	$(BIN)/mkdocs build --strict --site-dir $(CURDIR)/.mkdocs-site

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m pip install -e ".[dev,bench]"
	$(BIN)/python -m bench.run_all

clean:
	rm -rf demo-output .prefect .dask-scratch .pytest_cache .mypy_cache .ruff_cache .mkdocs-site
