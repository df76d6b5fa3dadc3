# lessctl: every target sets itself up on a fresh machine; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TORCH   := torch==2.13.0
comma   := ,

.PHONY: install assets test test-slow lint reproduce study clean

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
CPU     := experiment=cpu run_name=reproduce
BUDGETS := 32 64
METHODS := 'eval.methods=[baseline,baseline_plus,less]'
PPL     := eval.window=512 eval.windows=32
SUMM    := eval.samples=100 eval.shots=1 eval.max_new_tokens=32 eval.max_prompt_tokens=1024 \
           policy.budget.size=64 policy.budget.of=sequence
LONGCTX := experiment=longctx 'task.lengths=[256,512]' 'task.depths=[0.1,0.5,0.9]' task.samples=2 policy=h2o policy.budget.size=32

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
	$(LESS) eval $(LONGCTX)
	$(LESS) bench $(CPU)
	$(LESS) report run_name=reproduce

# What moves the gap (not part of reproduce; hours on 2 cores): conf/experiment/study.yaml.
# A smaller grid: make study STUDY_TOKENS="24576 98304 262144" STUDY_EPOCHS=2 STUDY_HIDDEN=128 STUDY_RANK=8
STUDY        := experiment=study
STUDY_TOKENS ?= 24576 98304 262144
STUDY_EPOCHS ?= 2 6
STUDY_HIDDEN ?= 128 512
STUDY_RANK   ?= 4 8
_comma       := ,
_csv          = $(subst $() ,$(_comma),$(strip $(1)))
study: install
	$(LESS) assets
	for t in $(STUDY_TOKENS); do $(LESS) extract $(STUDY) extract.tokens=$$t || exit 1; done
	$(LESS) train -m $(STUDY) extract.tokens=$(call _csv,$(STUDY_TOKENS)) \
	  train.epochs=$(call _csv,$(STUDY_EPOCHS)) less.hidden=$(call _csv,$(STUDY_HIDDEN)) \
	  less.rank=$(call _csv,$(STUDY_RANK))
	for t in $(STUDY_TOKENS); do for e in $(STUDY_EPOCHS); do for h in $(STUDY_HIDDEN); do \
	  for r in $(STUDY_RANK); do $(LESS) eval $(STUDY) task=wikitext2 extract.tokens=$$t \
	    train.epochs=$$e less.hidden=$$h less.rank=$$r || exit 1; done; done; done; done
	$(LESS) report
