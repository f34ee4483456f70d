# `make test` and `make demo` bootstrap .venv on a fresh machine, the pinned torch first (an
# open-ended torch requirement installed first would pull a multi-GB CUDA build). The pin alone does
# not pick the CPU build: the project's machines get it from pip's local find-links; elsewhere
# choose it with TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv test test-all test-deep demo lint check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n auto

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

# the property tests (hypothesis) with 10x their examples, drawn at random: new examples every run
test-deep: $(STAMP)
	HYMBA_TEST_DEEP=10 $(BIN)/python -m pytest -q -m "not slow" -n auto $$(grep -l "@given" tests/test_*.py)

check: $(STAMP)
	$(BIN)/hymba check configs/

demo: $(STAMP)
	$(BIN)/python -m hymba_plus.demo

lint: $(STAMP)
	$(BIN)/ruff check hymba_plus tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
