# The two set-up commands (see README.md): `make demo` runs the pipeline on the embedded
# demo data, `make test` runs the tests. Both create/refresh .venv first, so they work
# on a fresh machine with only python3.11 and make.
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install demo test test-fast bench clean

# Reinstall only when pyproject.toml changes; torch's pin takes the CPU build on disk.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dvc repro

# Two workers, whole files each (a file's module fixtures are built once), handed out in the
# order of tests/conftest.py's LONGEST_FIRST: by default xdist sorts files by their number of
# tests, which starts the long one-test end-to-end files last. Each worker gets its share of the
# cores (tests/conftest.py).
PYTEST_XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: install
	$(BIN)/python -m pytest $(PYTEST_XDIST)

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_XDIST) -m "not slow"

bench: install
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .tuneline data/scanned data/ingested data/bucketed metrics/*.json
