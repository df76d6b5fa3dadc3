# lessctl: every target sets itself up on a fresh machine; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TORCH   := torch==2.13.0

.PHONY: install assets test test-slow lint bench reproduce clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(BIN)/lessctl assets

test: install
	$(BIN)/python -m pytest

test-slow: install assets
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check lessctl tests benchmarks
	$(BIN)/ruff format --check lessctl tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
