"""bench.run on a tiny random model: every metric, constant cache bytes for evicting methods,
and each method's peak memory measured alone (full's grows with the context, the evicting
caches' does not)."""

from __future__ import annotations

import pytest

from lessctl import bench
from lessctl.models import load_model

MiB = 2**20


@pytest.mark.slow  # one spawned process per method and context (~1-3 min on 2 busy cores)
def test_bench_rows_cache_bytes_and_peaks_per_method(compose):
    # wider than tiny-random (8 KV heads x 64 dims) so 4096 tokens of K/V are 32 MiB
    cfg = compose(
        "model=tiny-random",
        "model.hidden_size=512",
        "model.num_attention_heads=8",
        "model.num_key_value_heads=8",
        "bench.contexts=[128,4096]",
        "bench.steps=2",
        "bench.warmup=1",
        "policy=lambda",
        "policy.budget.size=16",
        "less.hidden=32",
        "device=cpu",
    )
    model, tok = load_model(cfg.model, "cpu", seed=0)
    lines: list[str] = []
    rows = bench.run(cfg, model, tok, log=lines.append)
    assert len(rows) == 3 * 2 * 4
    assert {r["metric"] for r in rows} == set(bench.METRICS)
    assert all(r["value"] > 0 and r["task"] == "bench" for r in rows)
    cb = {(r["method"], r["context"]): r["value"] for r in rows if r["metric"] == "cache_bytes"}
    assert cb[("baseline", 128)] == cb[("baseline", 4096)]
    assert cb[("less", 128)] == cb[("less", 4096)] > cb[("baseline", 128)]  # + the state
    # full holds context + decoded tokens: 2 layers x K,V x 8 KV heads x 64 dims x 4 bytes each
    assert cb[("full", 128)] == (128 + 3) * 2 * 2 * 8 * 64 * 4
    assert cb[("full", 4096)] == (4096 + 3) * 2 * 2 * 8 * 64 * 4
    less = [r for r in rows if r["method"] == "less"]
    assert {r["kernels"] for r in less} == {"untrained"} and less[0]["budget"] == 16
    assert {r["trained_budget"] for r in less} == {None}
    assert set(bench.latency_ratios(rows)) == {(128, 1), (4096, 1)}
    assert any("LESS / baseline" in line for line in lines)
    peak = {
        (r["method"], r["context"]): r["value"] for r in rows if r["metric"] == "peak_mem_bytes"
    }
    growth = {m: peak[(m, 4096)] - peak[(m, 128)] for m in ("full", "baseline", "less")}
    assert growth["full"] > 24 * MiB, growth  # ~32 MiB more K/V
    assert abs(growth["baseline"]) < 8 * MiB and abs(growth["less"]) < 8 * MiB, growth


def test_bench_rows_and_cache_bytes_in_one_process(compose, tiny_model):
    model, tok = tiny_model
    cfg = compose(
        "model=tiny-random",
        "bench.contexts=[64,128]",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.isolate=false",
        "policy=lambda",
        "policy.budget.size=16",
        "less.hidden=32",
    )
    rows = bench.run(cfg, model, tok, log=lambda *_: None)
    assert len(rows) == 3 * 2 * 4 and all(r["value"] > 0 for r in rows)
    cb = {(r["method"], r["context"]): r["value"] for r in rows if r["metric"] == "cache_bytes"}
    assert cb[("baseline", 64)] == cb[("baseline", 128)]
    assert cb[("full", 128)] == (128 + 3) * 2 * 2 * 2 * 16 * 4
