"""bench.run on tiny-random: every metric, constant cache bytes for evicting methods."""

from __future__ import annotations

from lessctl import bench


def test_bench_rows_and_cache_bytes(compose, tiny_model):
    model, tok = tiny_model
    cfg = compose(
        "model=tiny-random",
        "bench.contexts=[64,128]",
        "bench.steps=2",
        "bench.warmup=1",
        "policy=lambda",
        "policy.budget.size=16",
        "less.hidden=32",
    )
    lines: list[str] = []
    rows = bench.run(cfg, model, tok, log=lines.append)
    assert len(rows) == 3 * 2 * 4
    assert {r["metric"] for r in rows} == set(bench.METRICS)
    assert all(r["value"] > 0 and r["task"] == "bench" for r in rows)
    cb = {(r["method"], r["context"]): r["value"] for r in rows if r["metric"] == "cache_bytes"}
    assert cb[("baseline", 64)] == cb[("baseline", 128)]
    assert cb[("less", 64)] == cb[("less", 128)] > cb[("baseline", 64)]  # + the state
    # full holds context + decoded tokens: 2 layers x K,V x 2 KV heads x 16 dims x 4 bytes each
    assert cb[("full", 64)] == (64 + 3) * 2 * 2 * 2 * 16 * 4
    assert cb[("full", 128)] == (128 + 3) * 2 * 2 * 2 * 16 * 4
    less = [r for r in rows if r["method"] == "less"]
    assert {r["kernels"] for r in less} == {"untrained"} and less[0]["budget"] == 16
    assert set(bench.latency_ratios(rows)) == {(64, 1), (128, 1)}
    assert any("LESS / baseline" in line for line in lines)
