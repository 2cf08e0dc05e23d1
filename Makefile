# The two commands a new user types: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo console run test lint bench bench-smoke host-trial clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per extra set; reinstalled whenever pyproject.toml changes. The demo runs on the
# base install alone (SQLite, the bundled emulator); the page and the server use every extra.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/python -m headspace_inference.standalone.demo

# The operator page at http://127.0.0.1:5050/inference, live against the emulator (Ctrl-C).
console: $(VENV)/.installed-all
	$(BIN)/python -m headspace_inference.standalone.console_demo

run: $(VENV)/.installed-all
	$(BIN)/headspace-inference serve

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.report

# CI: every benchmark with few samples, so none of them rots, and BENCHMARKS.md checked
# against the committed results it was written from. Asserts no time.
bench-smoke: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run --quick
	$(BIN)/python -m bench.report quick.json --out bench/results/quick.md
	$(BIN)/python -m bench.report --check

# Claude Headspace, the real host, adopts the library (examples/claude-headspace/README.md):
# its snapshot unpacked, host.patch applied, its tests and an end-to-end run on PostgreSQL,
# in a venv of its own under build/host-trial/. Fails, naming it, without the snapshot.
HOST_SNAPSHOT ?= ../shared/hosts/claude-headspace-a0c3bbc.tar.gz

host-trial:
	HOST_SNAPSHOT="$(HOST_SNAPSHOT)" $(PYTHON) examples/claude-headspace/trial.py

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache
