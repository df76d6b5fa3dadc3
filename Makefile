# lessctl: every target sets itself up on a fresh machine; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TORCH   := torch==2.13.0
# Triton's interpreter runs the GPU kernel's tests on CPU (tests/test_triton_step.py); a CUDA
# torch brings its own triton, so this one is installed only where torch brought none, and
# where it cannot be (no wheel for the platform) those tests skip.
TRITON  := triton==3.9.0

.PHONY: install assets test test-slow lint reproduce study study-million retrieval variants clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q $(TRITON) \
	  || echo "$(TRITON) does not install here: the Triton step's interpreter tests will skip"
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
# within an hour from an empty cache. Every LESS row is budget-matched: kernels are trained for
# each (policy, budget) evaluated, here lambda and h2o at 32 tokens. Perplexity: 32 windows of
# 512 tokens per dataset (Full once per dataset; Performer rows cut for time: add `performer`
# to eval.methods); summarisation: 100 XSum
# examples at the trained budget of 32 tokens (h2o, the paper's summarisation policy); a small
# passkey grid; lm-eval's WikiText measure and a multiple-choice task; the decode bench (1k, 8k,
# 16k tokens; interleaved at 1k: latency ratios and throughput at equal memory). Every run is
# labelled run_name=reproduce and the report holds only those runs. The two policies' kernels
# train side by side (joblib), each job with half the cores: the small kernels' steps use two
# threads poorly.
LESS    := $(BIN)/lessctl
CPU     := experiment=cpu run_name=reproduce
NPROC   := $(shell nproc 2>/dev/null || echo 2)
JOBS    := hydra/launcher=joblib hydra.launcher.n_jobs=2 threads=$(shell echo $$(( $(NPROC) / 2 > 0 ? $(NPROC) / 2 : 1 )))
PPL     := eval.window=512 eval.windows=32 policy.budget.size=32
SUMM    := task=xsum policy=h2o policy.budget.size=32 eval.samples=100 eval.shots=0 \
           eval.max_new_tokens=24 eval.max_prompt_tokens=512 eval.batch_size=8 \
           'eval.methods=[full,baseline,baseline_plus,less]'
LONGCTX := experiment=longctx run_name=reproduce policy=h2o policy.budget.size=32 \
           'task.lengths=[256,512]' 'task.depths=[0.1,0.5,0.9]' task.samples=2
LMEVAL  := task=lm_eval policy=lambda policy.budget.size=32 eval.window=512 lm_eval.limit=4 \
           'eval.methods=[full,baseline,baseline_plus,less]'

reproduce: install
	$(LESS) assets
	$(LESS) extract $(CPU)
	$(LESS) train -m $(CPU) policy=lambda,h2o policy.budget.size=32 $(JOBS)
	for task in wikitext2 pg19; do \
	  $(LESS) eval $(CPU) task=$$task policy=lambda $(PPL) \
	    'eval.methods=[full,baseline,baseline_plus,less]' || exit 1; \
	  $(LESS) eval $(CPU) task=$$task policy=h2o $(PPL) \
	    'eval.methods=[baseline,baseline_plus,less]' || exit 1; \
	done
	$(LESS) eval $(CPU) $(SUMM)
	$(LESS) eval $(LONGCTX)
	$(LESS) eval $(CPU) $(LMEVAL)
	$(LESS) bench $(CPU)
	$(LESS) report run_name=reproduce

# What moves the gap (not part of reproduce; hours on 2 cores): conf/experiment/study.yaml.
# A smaller grid: make study STUDY_TOKENS="24576 98304 262144" STUDY_EPOCHS=2 STUDY_HIDDEN=128 STUDY_RANK=8
# Its runs and report go to results/study/ (REPORT.md, figures/), apart from reproduce's.
STUDY        := experiment=study results_dir=results/study
STUDY_TOKENS ?= 24576 98304 262144
STUDY_EPOCHS ?= 2 6
STUDY_HIDDEN ?= 128 512
STUDY_RANK   ?= 4 8
_comma       := ,
_csv          = $(subst $() ,$(_comma),$(strip $(1)))
study: install
	$(LESS) assets
	for t in $(STUDY_TOKENS); do $(LESS) extract $(STUDY) extract.tokens=$$t || exit 1; done
	$(LESS) train -m $(STUDY) $(JOBS) extract.tokens=$(call _csv,$(STUDY_TOKENS)) \
	  train.epochs=$(call _csv,$(STUDY_EPOCHS)) less.hidden=$(call _csv,$(STUDY_HIDDEN)) \
	  less.rank=$(call _csv,$(STUDY_RANK))
	for t in $(STUDY_TOKENS); do for e in $(STUDY_EPOCHS); do for h in $(STUDY_HIDDEN); do \
	  for r in $(STUDY_RANK); do $(LESS) eval $(STUDY) task=wikitext2 extract.tokens=$$t \
	    train.epochs=$$e less.hidden=$$h less.rank=$$r || exit 1; done; done; done; done
	$(LESS) report results_dir=results/study run_name=study

# The million-token point of the study (issue 23; ~1 h 45 min on 2 cores, resumable: a rerun
# continues from the last of every 100 steps): lambda at 32 tokens trained online (no shards)
# on 1,000,448 tokens of train-large (train-mix + the Python 3.11 manual, fetched with apt-get),
# one epoch, then evaluated as the study's points are; its runs join results/study/.
MILLION := $(STUDY) data=train-large extract.tokens=1000448 train.source=online \
           train.epochs=1 less.hidden=128 less.rank=8 policy=lambda
study-million: install
	$(LESS) assets --all
	$(LESS) train $(MILLION) train.save_every=100
	for t in wikitext2 pg19; do $(LESS) eval $(MILLION) task=$$t || exit 1; done
	$(LESS) report results_dir=results/study run_name=study

# The retrieval study (issue 25; not part of reproduce; ~1 h 30 min on 2 cores): conf/experiment/
# retrieval.yaml. Kernels for every (policy, budget) from the cpu preset's text; then per task
# and budget Full (first budget only), Baseline+ and LESS under h2o, and LESS under each other
# policy. Runs and report in results/retrieval/ (REPORT.md, figures/).
RETR          := experiment=retrieval
RETR_BUDGETS  ?= 32 64 128
RETR_POLICIES ?= h2o recall composite
RETR_PASSKEY  := task=passkey 'task.depths=[0.0,0.5,1.0]'
RETR_NEEDLE   := task=needle task.num_keys=5 'task.depths=[0.0,0.5,1.0]'
RETR_VT       := task=variable_tracking task.samples=3
# a rerun reads back every answer an earlier run here already gave (same model, method, policy,
# budget, kernels, protocol and prompt: lessctl/tasks/reuse.py); RETR_REUSE= computes all anew
RETR_REUSE    ?= $(wildcard results/retrieval/runs/eval/*)
_retr_reuse    = $(if $(strip $(RETR_REUSE)),'eval.reuse_predictions=[$(call _csv,$(RETR_REUSE))]')
# $(1): one task's overrides; each task's evaluations run in their own process with one thread,
# two tasks at a time (the small model's ops use two threads poorly)
define retr_task
	for b in $(RETR_BUDGETS); do \
	  m=baseline_plus,less; [ $$b = $(firstword $(RETR_BUDGETS)) ] && m=full,$$m; \
	  $(LESS) eval $(RETR) threads=1 $(1) policy=h2o policy.budget.size=$$b "eval.methods=[$$m]" \
	    $(_retr_reuse) || exit 1; \
	  for p in $(filter-out h2o,$(RETR_POLICIES)); do \
	    $(LESS) eval $(RETR) threads=1 $(1) policy=$$p policy.budget.size=$$b \
	      'eval.methods=[less]' $(_retr_reuse) || exit 1; \
	  done; \
	done
endef
.PHONY: retrieval-passkey retrieval-needle retrieval-vt
retrieval-passkey: ; $(call retr_task,$(RETR_PASSKEY))
retrieval-needle: ; $(call retr_task,$(RETR_NEEDLE))
retrieval-vt: ; $(call retr_task,$(RETR_VT))
retrieval: install
	$(LESS) assets
	$(LESS) extract experiment=cpu results_dir=results/retrieval
	$(LESS) train -m $(RETR) policy=$(call _csv,$(RETR_POLICIES)) \
	  policy.budget.size=$(call _csv,$(RETR_BUDGETS)) $(JOBS)
	$(MAKE) -j$(NPROC) retrieval-passkey retrieval-needle retrieval-vt
	$(LESS) report results_dir=results/retrieval run_name=retrieval

# The variants study (issue 24; not part of reproduce; ~1 h on 2 cores): conf/experiment/
# variants.yaml. Every sidekick variant of conf/variant/ (VARIANTS) trained on the cpu preset's
# text at rank 8 (equal state bytes) and Λ's budget 32, evaluated on the WikiText and PG-19
# stand-ins; the paper's form last with Full, Baseline+ and Performer (the report's perplexity
# section shows the newest LESS run; its variants section shows them all, paired against the
# paper's form and Baseline+). Runs and report in results/variants/ (REPORT.md, figures/).
VAR       := experiment=variants
VARIANTS  ?= light hedgehog multi2 multi4 paper
variants: install
	$(LESS) assets
	$(LESS) extract $(VAR)
	$(LESS) train -m $(VAR) variant=$(call _csv,$(filter-out paper,$(VARIANTS)) paper) $(JOBS)
	for t in wikitext2 pg19; do for v in $(filter-out paper,$(VARIANTS)) paper; do \
	  m=less; [ $$v = paper ] && m=full,baseline_plus,less,performer; \
	  $(LESS) eval $(VAR) task=$$t variant=$$v "eval.methods=[$$m]" || exit 1; \
	done; done
	$(LESS) report results_dir=results/variants run_name=variants
