# segflow — the two set-up commands: `make demo` (the main job) and `make test`.
# Each creates .venv when missing, upgrades pip, installs torch (pin overridable with
# TORCH_SPEC) and then the project: `make demo` and `make install` what it runs with,
# `make test` the test tooling as well. Nothing else is needed on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist, one test file per process at a time); 1 runs them in order
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
# what segflow runs with; and the test tooling (pytest, linters, moto, playwright, mkdocs)
RUNTIME := $(VENV)/.segflow-runtime
DEV := $(VENV)/.segflow-dev
# `make install` links the segflow command into $(PREFIX)/bin (on most systems' PATH)
PREFIX ?= $(HOME)/.local
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# the runtime is installed without byte-compiling every module (about 300 MB of .pyc files,
# most of them never imported); Python compiles the ones segflow uses on first use
# segflow is installed editable (it runs from this clone); setuptools' notice about that
# ("Editable installation ... be careful") is left out
EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(PIP) install

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DASK_TEMPORARY_DIRECTORY ?= $(CURDIR)/.dask-scratch

.PHONY: install demo test lint format bench clean

$(RUNTIME): pyproject.toml
	@echo "installing PyTorch ($(TORCH_SPEC)) and segflow into $(VENV) (a few minutes, once)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install --no-compile "$(TORCH_SPEC)"
	$(EDITABLE) --no-compile --editable .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	@echo "installing the test tooling into $(VENV)"
	$(EDITABLE) --editable ".[dev]"
	touch $(DEV)

install: $(RUNTIME)
	mkdir -p $(PREFIX)/bin
	ln -sf $(abspath $(BIN))/segflow $(PREFIX)/bin/segflow
	@echo "segflow -> $(PREFIX)/bin/segflow"
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; \
	  *) echo "$(PREFIX)/bin is not on your PATH: add it (e.g. in ~/.profile)";; esac

demo: $(RUNTIME)
	$(BIN)/python -m segflow.demo --out demo-output

test: $(DEV) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
# the guide in docs/: strict turns a broken link into a failure (not with --quiet,
# which hides the warnings that strict counts)
	$(BIN)/mkdocs build --strict --site-dir $(CURDIR)/.mkdocs-site

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(DEV)
	$(EDITABLE) --editable ".[dev,bench]"
	$(BIN)/python -m bench.run_all

clean:
	rm -rf demo-output .prefect .dask-scratch .pytest_cache .mypy_cache .ruff_cache .mkdocs-site
