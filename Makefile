# The two commands of the quick start: `make run` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-slow test-gpu bench figures clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (paper Figs. 5-7: digits_typography); extra overrides via ARGS="key=value ...".
run: $(STAMP)
	$(BIN)/diffsens run $(ARGS)

## The default test suite (CPU, a few minutes).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

bench: $(STAMP)
	$(BIN)/diffsens run experiment=bench_engine $(ARGS)

## Every paper figure this version can make from embedded data (recipes in experiments/).
figures: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash experiments/all.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
