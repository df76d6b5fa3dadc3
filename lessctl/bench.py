"""`lessctl bench`: decode latency, tokens/s, KV-cache bytes and peak memory over contexts.

For every context length (``bench.contexts``) and batch size (``bench.batch_sizes``) a seeded
random prompt is prefilled once through an :class:`~lessctl.cache.EvictingCache` (prompt
protocol: full attention, the whole prompt cached, H2O scores recorded); each method then decodes
from its own copy of that prefilled cache, so the prefill (not timed) is paid once:

- ``full``: a library ``DynamicCache`` holding the same K/V, transformers' own SDPA attention;
- ``baseline``: the configured policy on the evicting cache;
- ``less``: the policy plus phi/psi kernels (trained via ``methods.load_less`` when a checkpoint
  exists, else untrained ones of the configured rank/hidden: the same cost; row ``kernels``).

The first decoded row of an evicting method brings the cache down to the budget (excess folded
into the state), and happens during warm-up; then ``bench.steps`` single-token steps are timed
(median per-token latency). ``cache_bytes`` sums every cache tensor (state included);
``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated`` over the decode steps on CUDA, else the
process's peak resident set so far (``ru_maxrss``: it cannot be reset, so it is monotone).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig

from lessctl.cache import EvictingCache, cache_nbytes
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import CheckpointNotFound, load_less
from lessctl.models import attention_geometry
from lessctl.policies.base import Policy
from lessctl.policies.budget import build_policy

BENCH_METHODS = ("full", "baseline", "less")
METRICS = ("latency_ms", "tokens_per_s", "cache_bytes", "peak_mem_bytes")


def bench_kernels(
    cfg: DictConfig, geo: dict[str, int], device, policy: Policy
) -> tuple[dict[int, LayerKernels], dict[str, Any]]:
    """Trained kernels if a checkpoint matches (a mismatched one is refused as in eval), else,
    when none exists at all, untrained ones of the same shape and cost -> (kernels, columns)."""
    try:
        ck = load_less(cfg, geo, device, policy)
        cols = {"kernels": "trained", "trained_budget": ck.trained_budget, "transfer": ck.transfer}
        return ck.kernels, cols
    except CheckpointNotFound:
        kc = KernelConfig(
            num_heads=geo["num_heads"],
            num_kv_heads=geo["num_kv_heads"],
            head_dim=geo["head_dim"],
            rank=int(cfg.less.rank),
            hidden=int(cfg.less.hidden),
            dropout=0.0,
            init_scale=float(cfg.less.init_scale),
            kind=str(cfg.less.kind),
        )
        kernels = {i: LayerKernels(kc).to(device).eval() for i in range(geo["num_layers"])}
        return kernels, {"kernels": "untrained", "trained_budget": None, "transfer": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def decode_steps(model, cache, ctx, first: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Greedy single-token steps from ``first`` [B,1]; seconds of each timed step."""
    dev = first.device
    x, times = first, []
    with ctx, torch.no_grad():
        for i in range(warmup + steps):
            _sync(dev)
            t0 = time.perf_counter()
            logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits
            x = logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def run(cfg: DictConfig, model, tokenizer, log=print) -> list[dict[str, Any]]:
    """Rows {task: bench, model, method, policy, budget, context, batch_size, kernels, metric,
    value} for every method x context x batch size (see module doc)."""
    b = cfg.bench
    names = list(b.methods)
    bad = [n for n in names if n not in BENCH_METHODS]
    if bad:
        raise LessctlError(
            f"unknown bench.methods entry {bad[0]!r}; allowed: {', '.join(BENCH_METHODS)}"
        )
    geo = attention_geometry(model)
    device = model.device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    rows: list[dict[str, Any]] = []
    table: list[tuple] = []
    for context in [int(c) for c in b.contexts]:
        policy: Policy = build_policy(
            cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
        )
        if policy.budget is None and any(n != "full" for n in names):
            raise LessctlError(
                "bench needs an evicting policy (policy.name != full) for baseline/less"
            )
        kernels, kcols = bench_kernels(cfg, geo, device, policy) if "less" in names else (None, {})
        for batch in [int(x) for x in b.batch_sizes]:
            gen = torch.Generator().manual_seed(int(cfg.seed))
            ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
            template = EvictingCache.for_model(model, policy, None, protocol="prompt")
            t0 = time.perf_counter()
            with template.attached(model), torch.no_grad():
                logits = model(ids, cache=template, use_cache=True, logits_to_keep=1).logits
            first = logits[:, -1].argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - t0
            for name in names:
                if name == "full":
                    cache, ctx = template.to_dynamic(), nullcontext()
                else:
                    cache = template.fork(kernels if name == "less" else None)
                    ctx = cache.attached(model)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = decode_steps(model, cache, ctx, first, int(b.warmup), int(b.steps))
                peak = (
                    torch.cuda.max_memory_allocated(device)
                    if device.type == "cuda"
                    else _peak_rss()
                )
                lat = statistics.median(times) * 1e3
                values = {
                    "latency_ms": lat,
                    "tokens_per_s": batch / (lat / 1e3),
                    "cache_bytes": cache_nbytes(cache),
                    "peak_mem_bytes": peak,
                }
                base = {
                    "task": "bench",
                    "model": cfg.model.name,
                    "method": name,
                    "policy": "full" if name == "full" else cfg.policy.name,
                    "budget": None if name == "full" else policy.budget,
                    "context": context,
                    "batch_size": batch,
                    "kernels": None,
                    "trained_budget": None,
                    "transfer": None,
                    **(kcols if name == "less" else {}),
                }
                rows += [{**base, "metric": k, "value": v} for k, v in values.items()]
                table.append(
                    (
                        context,
                        batch,
                        name,
                        base["budget"],
                        lat,
                        values["tokens_per_s"],
                        values["cache_bytes"],
                        peak,
                    )
                )
                del cache
            log(f"context {context} batch {batch}: prefill {prefill_s:.1f}s (once, untimed)")
            del template
    _log_table(table, log)
    return rows


def latency_ratios(rows: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """LESS latency / baseline latency per (context, batch size) from bench rows."""
    lat = {
        (r["context"], r["batch_size"], r["method"]): r["value"]
        for r in rows
        if r["metric"] == "latency_ms"
    }
    return {
        (c, bs): v / lat[(c, bs, "baseline")]
        for (c, bs, m), v in lat.items()
        if m == "less" and (c, bs, "baseline") in lat
    }


def _log_table(table: list[tuple], log) -> None:
    log(
        f"{'context':>8} {'batch':>5} {'method':>9} {'budget':>6} {'ms/token':>9} "
        f"{'tokens/s':>9} {'cache MiB':>10} {'peak MiB':>9}"
    )
    for c, bs, name, budget, lat, tps, cb, peak in table:
        log(
            f"{c:>8} {bs:>5} {name:>9} {budget if budget is not None else '-':>6} {lat:>9.2f} "
            f"{tps:>9.1f} {cb / 2**20:>10.2f} {peak / 2**20:>9.0f}"
        )
    lat = {(c, bs, name): x for c, bs, name, _, x, *_ in table}
    for (c, bs, name), x in lat.items():
        if name == "less" and (c, bs, "baseline") in lat:
            log(
                f"context {c} batch {bs}: LESS / baseline latency = "
                f"{x / lat[(c, bs, 'baseline')]:.2f}"
            )
