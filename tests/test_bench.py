"""bench.run on a tiny random model: every metric, constant cache bytes for evicting methods,
and each method's peak memory measured alone (full's grows with the context, the evicting
caches' does not)."""

from __future__ import annotations

import pytest
import torch

from lessctl import bench
from lessctl.bench.measure import bench_kernels, make_cache
from lessctl.bench.paired import interleaved, ratio
from lessctl.cache import native, prefill, running
from lessctl.models import attention_geometry, load_model
from lessctl.policies.budget import build_policy

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
        "bench.prefill_contexts=[]",
        "bench.throughput_contexts=[]",
        "bench.paired_contexts=[]",
        "bench.breakdown=false",
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
    assert len(rows) == 3 * 2 * len(bench.METRICS)
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
    assert any("less/baseline" in line for line in lines)
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
        "bench.full_max_context=64",
        "bench.prefill_chunk=32",
        "bench.prefill_contexts=[512]",
        "bench.throughput_contexts=[128]",
        "bench.paired_contexts=[64]",
        "bench.memory_cap_mb=0.25",
        "bench.max_batch=64",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.isolate=false",
        "policy=lambda",
        "policy.budget.size=16",
        "less.hidden=32",
    )
    lines: list[str] = []
    rows = bench.run(cfg, model, tok, log=lines.append)
    paired = [r for r in rows if r["metric"] == "paired_ms"]
    assert sorted(r["method"] for r in paired) == ["baseline", "full", "less"]
    assert all(len(r["samples_ms"]) == 2 and r["context"] == 64 for r in paired)
    assert any("context 64 interleaved: less/baseline" in line for line in lines)
    # throughput at equal memory (interleaved): the batch whose cache fits 0.25 MiB
    eq = {r["method"]: r for r in rows if r["metric"] == "equal_memory_tokens_per_s"}
    assert sorted(eq) == ["baseline", "less"] and all(r["context"] == 128 for r in eq.values())
    rows = [r for r in rows if "samples_ms" not in r]
    got = {(r["method"], r["context"], r["metric"]): r["value"] for r in rows}
    # full only up to full_max_context; every decode row has every metric
    assert {(m, c) for m, c, _ in got} == {
        ("full", 64),
        ("baseline", 64),
        ("baseline", 128),
        ("less", 64),
        ("less", 128),
        ("less", 512),
    }
    for m, c in [("full", 64), ("baseline", 128), ("less", 128)]:
        assert all(got[(m, c, k)] > 0 for k in bench.METRICS), (m, c)
    assert ("less", 512, "latency_ms") not in got and got[("less", 512, "prefill_s")] > 0
    # the evicting caches hold the same bytes whatever the context (prefill included)
    assert got[("baseline", 64, "cache_bytes")] == got[("baseline", 128, "cache_bytes")]
    # a 512-token prompt, chunked: at most budget + chunk tokens (16 + 32) plus the state
    per_token = 2 * 2 * 2 * 16 * 4  # layers x K,V x KV heads x dims x fp32
    assert got[("less", 512, "cache_bytes")] < (16 + 32 + 8) * per_token
    assert got[("full", 64, "cache_bytes")] == (64 + 3) * per_token  # + 3 decoded
    for m in ("baseline", "less"):  # a sequence's bytes as the isolated run measured them
        per_seq = got[(m, 128, "cache_bytes")]
        assert eq[m]["batch_size"] == min(64, int(0.25 * 2**20 // per_seq)) > 1, m
        ms = eq[m]["samples_ms"]
        assert len(ms) == 2 and eq[m]["value"] == pytest.approx(eq[m]["batch_size"] * 2e3 / sum(ms))
    assert eq["less"]["batch_size"] < eq["baseline"]["batch_size"]  # the state costs bytes
    assert any("context 128 equal memory: tokens/s less/baseline" in line for line in lines)
    # the step's phases: LESS's state in one C++ call on CPU (native_step=auto; the torch path's
    # three phases: tests/test_native_step.py), none for the baseline
    assert got[("less", 128, "step_state_us")] > 0 and got[("less", 128, "step_total_us")] > 0
    assert ("less", 128, "step_features_us") not in got
    assert not any(k[0] == "baseline" and k[2].startswith("step_state") for k in got)
    less_rows = [r for r in rows if r["method"] == "less" and r["metric"] == "latency_ms"]
    assert less_rows and all(r["native_step"] is True for r in less_rows)
    assert all(r["native_step"] is None for r in rows if r["method"] != "less")
    assert all(r["triton_step"] is False for r in less_rows)  # a CPU run: no Triton step
    assert eq["less"]["native_step"] is (eq["less"]["batch_size"] <= native.MAX_BATCH)
    assert any("less/baseline" in line for line in lines)
    assert any("prefill less context 512" in line for line in lines)


def test_equal_memory_where_no_sequence_fits(compose, tiny_model):
    """A cap below one sequence's cache: batch 0 and no rounds for every method (not a crash),
    and no ratio from them."""
    model, _ = tiny_model
    cfg = compose(
        "model=tiny-random",
        "bench.prefill_chunk=32",
        "bench.memory_cap_mb=0.0001",
        "bench.steps=2",
        "bench.warmup=1",
        "policy=lambda",
        "policy.budget.size=16",
    )
    out = interleaved(cfg, model, ["full", "baseline"], 64, timed=False, equal_memory=True)
    assert all(m["eq_batch"] == 0 and m["eq_ms"] == [] and m["ms"] == [] for m in out.values())
    assert all(len(m["tokens"]) == 1 for m in out.values())  # the warm-up step only
    rows = [
        {"context": 64, "method": n, "metric": "equal_memory_tokens_per_s", "batch_size": 0}
        for n in out
    ]
    assert bench.throughput_ratios(rows) == {}


def test_interleaved_steps_decode_as_each_method_alone(compose, tiny_model):
    """One step of each method in turn: every cache decodes exactly the tokens it decodes alone
    (the methods' caches and attention functions do not leak into each other)."""
    model, _ = tiny_model
    cfg = compose(
        "model=tiny-random",
        "bench.prefill_chunk=32",
        "bench.steps=4",
        "bench.warmup=2",
        "policy=lambda",
        "policy.budget.size=16",
        "less.hidden=32",
        "less.init_scale=1.0",  # a state that changes the answers (LESS is not Baseline)
    )
    names = ["full", "baseline", "less"]
    torch.manual_seed(0)  # the untrained kernels: the same here and alone
    got = interleaved(cfg, model, names, 64)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)
    )
    geo = attention_geometry(model)
    policy = build_policy(
        cfg.policy, seq_len=64, max_position_embeddings=geo["max_position_embeddings"]
    )
    for name in names:
        torch.manual_seed(0)
        kernels = bench_kernels(cfg, geo, "cpu", policy)[0] if name == "less" else None
        cache, chunk = make_cache(model, name, policy, kernels, 32)
        x, alone = prefill(model, cache, ids, chunk).argmax(-1, keepdim=True), []
        with running(model, cache), torch.no_grad():
            for _ in range(6):
                x = model(x, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                alone.append(int(x))
        assert got[name]["tokens"] == alone, name
        assert len(got[name]["ms"]) == 4 and min(got[name]["ms"]) > 0
    assert got["less"]["tokens"] != got["baseline"]["tokens"] != got["full"]["tokens"]
    assert got["full"]["budget"] is None and got["less"]["budget"] == 16
    assert got["less"]["cols"]["kernels"] == "untrained"


def test_paired_ratio_pairs_rounds():
    """A round is a unit: a ratio that holds in every round has a zero-width interval however
    much the rounds differ (an unpaired bootstrap would not)."""
    den = [10.0, 50.0, 12.0, 90.0, 30.0, 11.0]
    e = ratio([1.1 * x for x in den], den)
    assert e.value == pytest.approx(1.1) and e.high - e.low < 1e-9
    e = ratio([10.0, 11.0, 9.0, 10.5], [10.0, 10.0, 10.0, 10.0])
    assert e.low < 1.0 < e.high  # mean 1.0125: not distinguishable from 1
