#!/usr/bin/env bash
# One command for a bare GPU machine (nothing here has run on a GPU yet): a venv with CUDA
# torch of the pinned version (the Makefile's) from the registry and `pip install -e .[dev]`
# (CUDA torch brings its triton), then benchmarks/gpu_check.py within the budget: pytest -m cuda, the decode
# bench at a Llama-2-7B geometry in bf16 at 1k/8k/32k (latency ratios, memory, throughput at
# equal memory), a 32k chunked prefill's peak memory against a 1k prompt's, the Triton LESS
# step against the torch path, and a hook for online training. Rows: $OUT/gpu_check.jsonl.
#
#   benchmarks/gpu_check.sh            # on the GPU machine (OUT defaults to ./gpu_out)
#   benchmarks/gpu_check.sh --cpu      # the dry run: tiny model, CPU, the current python
#
# Knobs (environment): GPU_CHECK_BUDGET_S (default 450: the Python part; setup comes first),
# GPU_CHECK_VENV (default .venv-gpu), PYTHON (the interpreter that makes the venv / runs --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
TORCH="torch==2.13.0"  # as the Makefile pins it
if [[ " $* " == *" --cpu "* ]]; then
  PY="${PYTHON:-python3}"
else
  VENV="${GPU_CHECK_VENV:-.venv-gpu}"
  t0=$(date +%s)
  test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH"  # PyPI's Linux wheel is the CUDA build
  "$VENV/bin/python" -m pip install -q -e ".[dev]" "$TORCH"
  PY="$VENV/bin/python"
  echo "setup: $(( $(date +%s) - t0 ))s" | tee "$OUT/setup.log"
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/setup.log"
fi
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
exec timeout --kill-after=10 "$(( BUDGET + 30 ))" "$PY" benchmarks/gpu_check.py --budget-s "$BUDGET" "$@"
