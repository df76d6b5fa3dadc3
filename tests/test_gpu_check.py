"""benchmarks/gpu_check.sh's plumbing without a GPU: the --cpu dry run (tiny model, the Triton
step under Triton's interpreter) runs every step, exits 0 and writes the row layout the GPU run
writes; and the GPU run's own config composes and validates here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = ("device", "torch", "cuda", "triton", "commit", "dry_run")


def test_gpu_check_dry_run_writes_every_step(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("TRITON_INTERPRET", None)  # the dry run sets it in its own process
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--contexts", "24"]
    done = subprocess.run(
        [*cmd, "--steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    for r in rows:
        assert {"check", "metric", "value", *PROVENANCE} <= set(r), r
        assert r["dry_run"] is True and r["torch"] and r["commit"]
    got = {(r["check"], r["metric"]) for r in rows}
    assert not [r for r in rows if r["metric"] == "error"], [r["value"] for r in rows]
    by = {(r["check"], r["metric"]): r["value"] for r in rows}
    assert by[("pytest", "failures")] == by[("pytest", "errors")] == 0
    assert by[("pytest", "tests")] >= 10 and by[("pytest", "exit_code")] == 0
    bench = [r for r in rows if r["check"] == "bench" and "method" in r]
    for metric in ("latency_ms", "paired_ms", "cache_bytes", "peak_mem_bytes"):
        assert {r["method"] for r in bench if r["metric"] == metric} == {"full", "baseline", "less"}
    assert {r["method"] for r in bench if r["metric"] == "equal_memory_tokens_per_s"} >= {"less"}
    less = [r for r in bench if r["method"] == "less" and r["metric"] == "latency_ms"]
    assert less and all(r["triton_step"] is True for r in less)  # the Triton step, interpreted
    assert ("prefill", "peak_mem_ratio_96_over_24") in got
    paths = {(r["path"], r["metric"]) for r in rows if r["check"] == "step"}
    assert {("triton", "state_us"), ("torch", "features_us"), ("torch", "total_us")} <= paths
    assert ("train", "skipped") in got and ("done", "wall_s") in got
    for step in ("pytest", "bench", "triton", "train"):
        assert (step, "step_s") in got


def test_gpu_run_config_composes():
    """The GPU run's overrides (7B geometry, bf16, 1k/8k/32k, a 32k prefill) compose and pass
    the schema here, so no GPU minute goes to a typo."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    cfg, ctx, lo = gpu_check.bench_config(gpu_check.parse_args([]), cuda=True)
    assert ctx == [1024, 8192, 32768] and lo == 1024
    assert list(cfg.bench.paired_contexts) == ctx and list(cfg.bench.throughput_contexts) == [8192]
    assert list(cfg.bench.prefill_contexts) == [32768] and cfg.dtype == "bfloat16"
    assert cfg.model.hidden_size == 4096 and cfg.model.num_hidden_layers == 32
    assert cfg.device == "cuda" and cfg.model.max_position_embeddings >= 32768
    # one context at a time: the big prefill with the least, equal memory at the middle one
    one = {c: gpu_check.bench_config(gpu_check.parse_args([]), True, only=c)[0] for c in ctx}
    assert [list(one[c].bench.paired_contexts) for c in ctx] == [[c] for c in ctx]
    assert [list(one[c].bench.prefill_contexts) for c in ctx] == [[32768], [], []]
    assert [list(one[c].bench.throughput_contexts) for c in ctx] == [[], [8192], []]
