# The two commands of the quick start: `make run` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install run test lint test-slow test-gpu bench figures clean

## This list of targets.
help:
	@awk '/^## /{doc=substr($$0, 4); next} /^[a-z-]+:/{if (doc) printf "  make %-10s %s\n", substr($$1, 1, length($$1) - 1), doc; doc=""}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

## Create .venv and install diffsens with its test tools (the other targets do this first).
install: $(STAMP)

## The main job on the embedded default (paper Figs. 5-7: digits_typography); extra overrides via ARGS="key=value ...".
run: $(STAMP)
	$(BIN)/diffsens run $(ARGS)

## The default test suite (CPU, a few minutes; a worker per core).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m 'not slow and not gpu' $(ARGS)

## Lint the code (ruff; CI runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff check diffsens_cli tests configs

## The paper-sized checks (tens of minutes).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

## The CUDA checks (needs a GPU).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

## The engine benchmark (sampling, likelihood, sensitivity side by side).
bench: $(STAMP)
	$(BIN)/diffsens run experiment=bench_engine $(ARGS)

## Every paper figure this version makes from embedded data, as one sweep, and report/index.html (ARGS="--paper": paper-sized, local data; ARGS="--resume SWEEP_DIR": finish an interrupted one).
figures: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash experiments/all.sh $(ARGS)

## Remove .venv and build files (outputs/ stays).
clean:
	rm -rf $(VENV) build dist *.egg-info
