# lessctl: every target sets itself up on a fresh machine; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TORCH   := torch==2.13.0
comma   := ,

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

# The whole study on the embedded default (SmolLM2-135M, stand-in corpora) on 2 CPU cores,
# within an hour from an empty cache. Kernels are trained for every evaluated (policy, budget),
# so no row relies on transfer: budgets 32 and 64 tokens of 512-token windows for perplexity
# (32 windows per dataset), and the trained budget 64 as an absolute token count for
# summarisation (100 XSum examples per policy, batched; Full is run once and shared by both
# policies, as it is for perplexity). Every figure gets a bootstrap interval in REPORT.md.
LESS    := $(BIN)/lessctl
CPU     := experiment=cpu
BUDGETS := 32 64
METHODS := 'eval.methods=[baseline,baseline_plus,less]'
PPL     := eval.window=512 eval.windows=32
SUMM    := eval.samples=100 eval.shots=1 eval.max_new_tokens=32 eval.max_prompt_tokens=1024 \
           policy.budget.size=64 policy.budget.of=sequence

reproduce: install
	$(LESS) assets
	$(LESS) extract $(CPU)
	$(LESS) train -m $(CPU) policy=lambda,h2o policy.budget.size=$(subst $() ,$(comma),$(BUDGETS))
	for task in wikitext2 pg19; do \
	  $(LESS) eval $(CPU) task=$$task policy=lambda policy.budget.size=32 $(PPL) \
	    'eval.methods=[full,baseline,baseline_plus,less,performer]' || exit 1; \
	  for pol in lambda h2o; do for b in $(BUDGETS); do \
	    if [ $$pol$$b != lambda32 ]; then \
	      $(LESS) eval $(CPU) task=$$task policy=$$pol policy.budget.size=$$b $(PPL) $(METHODS) \
	        || exit 1; \
	    fi; \
	  done; done; \
	done
	$(LESS) eval $(CPU) task=xsum policy=lambda $(SUMM) 'eval.methods=[full,baseline,baseline_plus,less]'
	$(LESS) eval $(CPU) task=xsum policy=h2o $(SUMM) $(METHODS)
	$(LESS) bench $(CPU)
	$(LESS) report
