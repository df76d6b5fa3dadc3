# lessctl: every target sets itself up on a fresh machine; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TORCH   := torch==2.13.0

.PHONY: install assets test test-slow lint reproduce clean

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

# The whole study on the embedded default (SmolLM2-135M, stand-in corpora) on 2 CPU cores.
LESS    := $(BIN)/lessctl
CPU     := experiment=cpu run_name=reproduce
PPL     := eval.window=512 eval.windows=4
SUMM    := eval.samples=10 eval.shots=1 eval.max_new_tokens=32 eval.max_prompt_tokens=1024 policy.budget.size=0.2 policy.budget.of=sequence

reproduce: install
	$(LESS) assets
	$(LESS) extract $(CPU)
	$(LESS) train $(CPU) policy=lambda
	$(LESS) train $(CPU) policy=h2o
	for task in wikitext2 pg19; do for pol in lambda h2o; do \
	  $(LESS) eval $(CPU) task=$$task policy=$$pol policy.budget.size=32 $(PPL) || exit 1; \
	  $(LESS) eval $(CPU) task=$$task policy=$$pol policy.budget.size=64 $(PPL) \
	    'eval.methods=[baseline,baseline_plus,less,performer]' || exit 1; \
	done; done
	$(LESS) eval $(CPU) task=xsum policy=lambda $(SUMM)
	$(LESS) eval $(CPU) task=xsum policy=h2o $(SUMM) 'eval.methods=[baseline,baseline_plus,less,performer]'
	$(LESS) bench $(CPU)
	$(LESS) report run_name=reproduce
