"""Latency ratios from interleaved steps, so that the machine's load cannot decide them.

Measured alone, each method meets the machine at a different time: on a shared host a ratio of
two such latencies moves by ±0.2 between runs. Here every method's cache is prefilled in this
process (as :func:`lessctl.bench.measure.measure` does) and then decoded one greedy step at a
time in turn, the order rotating every round, so that a change of load falls on all methods
alike. A round is a unit: the ratio of two methods' mean step times comes with a paired
bootstrap interval over rounds (:mod:`lessctl.stats`). Peak memory is not measured here (every
cache lives in one process): that stays with the isolated measurement.

Throughput at equal memory is measured the same way: after the batch-1 rounds each method's
prefilled cache (at its budget by then) is replicated to the largest batch whose cache bytes fit
``bench.memory_cap_mb`` (at most ``bench.max_batch``; :func:`equal_memory_batch`), and the
methods again take one step each in turn, each at its own batch.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from lessctl.bench.measure import (
    bench_kernels,
    make_cache,
    native_used,
    random_prompt,
    sync,
    triton_used,
)
from lessctl.cache import cache_nbytes, prefill, running
from lessctl.models import attention_geometry
from lessctl.policies.budget import build_policy
from lessctl.stats import Estimate, Samples, estimate


def _step(model, cache, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One greedy decode step of ``x`` [B,1] -> (next token [B,1], seconds); on CUDA timed by
    the device's events, as the isolated measurement (each step then waits for the device, so
    one method's step never overlaps another's)."""
    cuda = x.device.type == "cuda"
    with running(model, cache), torch.no_grad():
        sync(x.device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if cuda:
            end.record()
        sync(x.device)
        seconds = time.perf_counter() - t0
        return nxt, (start.elapsed_time(end) / 1e3 if cuda else seconds)


def equal_memory_batch(cfg: DictConfig, cache) -> int:
    """The largest batch of copies of ``cache`` (one sequence) whose cache bytes fit
    ``bench.memory_cap_mb``, at most ``bench.max_batch`` (0: not even one)."""
    cap = float(cfg.bench.memory_cap_mb) * 2**20
    return min(int(cfg.bench.max_batch), int(cap // cache_nbytes(cache)))


def _rounds(
    model, caches: dict, x: dict, out: dict, key: str, warmup: int, steps: int, tokens: bool
) -> None:
    """``warmup`` untimed and ``steps`` timed rounds of one step of every method in ``caches``
    (none: nothing), the order rotating per round; ms per timed step appended to
    ``out[method][key]``, with ``tokens`` the greedy tokens to ``out[method]["tokens"]``."""
    names = list(caches)
    for i in range(warmup + steps if names else 0):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            x[name], seconds = _step(model, caches[name], x[name])
            if tokens:
                out[name]["tokens"].append(int(x[name][0, 0]))
            if i >= warmup:
                out[name][key].append(seconds * 1e3)


def interleaved(
    cfg: DictConfig,
    model,
    names: list[str],
    context: int,
    timed: bool = True,
    equal_memory: bool = False,
) -> dict[str, dict]:
    """Every method in ``names`` at ``context`` (batch 1), prefilled here, then ``bench.warmup``
    untimed and (``timed``) ``bench.steps`` timed rounds of one step each, the order rotating
    per round; with ``equal_memory`` then 2 untimed and ``bench.steps`` timed rounds at each
    method's equal-memory batch (module doc) -> {method: {"ms": [steps] ms per timed step,
    "tokens": [warmup + steps] greedy tokens of the batch-1 rounds, "budget": the policy's
    budget (None: full), "cols": the kernels' columns (less), "eq_batch": the batch (0: not
    one sequence fits, no rounds), "eq_ms": [steps] ms per step at it}}."""
    b = cfg.bench
    geo = attention_geometry(model)
    policy = build_policy(
        cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
    )
    ids = random_prompt(cfg, model, 1, context)
    caches, x = {}, {}
    out = {
        n: {"ms": [], "tokens": [], "budget": policy.budget, "cols": {}, "eq_ms": []} for n in names
    }
    for name in names:
        kernels = None
        if name == "less":
            kernels, out[name]["cols"] = bench_kernels(cfg, geo, model.device, policy)
        if name == "full":
            out[name]["budget"] = None
        caches[name], chunk = make_cache(model, name, policy, kernels, int(b.prefill_chunk))
        x[name] = prefill(model, caches[name], ids, chunk).argmax(-1, keepdim=True)
    _rounds(model, caches, x, out, "ms", int(b.warmup), int(b.steps) if timed else 0, True)
    if "less" in caches:
        out["less"]["cols"]["native_step"] = native_used(caches["less"])
        out["less"]["cols"]["triton_step"] = triton_used(caches["less"])
    if not equal_memory:
        return out
    for name in names:
        fit = out[name]["eq_batch"] = equal_memory_batch(cfg, caches[name])
        if fit < 1:
            del caches[name]
            continue
        caches[name].batch_repeat_interleave(fit)
        x[name] = x[name].repeat_interleave(fit, 0)
    _rounds(model, caches, x, out, "eq_ms", 2, int(b.steps), False)
    if "less" in caches:  # a batch past native.MAX_BATCH takes the torch path
        out["less"]["eq_native_step"] = native_used(caches["less"])
        out["less"]["eq_triton_step"] = triton_used(caches["less"])
    return out


def ratio(num_ms: list[float], den_ms: list[float], seed: int = 0) -> Estimate:
    """Mean step time of one method over another's, paired by round, with its interval."""
    ones = [1.0] * len(num_ms)
    return estimate([Samples(num_ms, ones), Samples(den_ms, ones)], lambda a, b: a / b, seed=seed)


def throughput_ratio(num: tuple[int, list[float]], den: tuple[int, list[float]]) -> Estimate:
    """Tokens/s of one method over another's, each (batch, ms per step of the same rounds):
    ``(B_num / mean ms_num) / (B_den / mean ms_den)``, with its paired interval."""
    e, f = ratio(den[1], num[1]), num[0] / den[0]
    return Estimate(e.value * f, e.low * f, e.high * f)
