"""`lessctl bench`: decode latency, tokens/s, KV-cache bytes and peak memory over contexts.

For every context length (``bench.contexts``), batch size (``bench.batch_sizes``) and method,
measured alone (:func:`isolated_measure`: on CUDA in this process with the device's peak counters
reset, elsewhere in a fresh spawned process; ``bench.isolate=false`` measures in this process),
a seeded random prompt is prefilled through an :class:`~lessctl.cache.EvictingCache` (prompt
protocol: full attention, the whole prompt cached, H2O scores recorded, untimed), and only the
method's cache is kept:

- ``full``: a library ``DynamicCache`` holding the same K/V, transformers' own SDPA attention;
- ``baseline``: the configured policy on the evicting cache;
- ``less``: the policy plus phi/psi kernels (trained via ``methods.load_less`` when a checkpoint
  exists, refused like ``eval`` when one of another budget does; untrained ones of the configured
  rank/hidden when there is none: the same cost; rows ``kernels``, ``trained_budget``,
  ``transfer``).

The first decoded row of an evicting method brings the cache down to the budget (excess folded
into the state) during warm-up; then ``bench.steps`` single-token steps are timed (median
per-token latency). ``cache_bytes`` sums every cache tensor (state included);
``peak_mem_bytes`` is the peak over the timed steps: ``torch.cuda.max_memory_allocated`` on
CUDA, else the process's peak resident set (Linux VmHWM, reset after the warm-up; glibc serves
large allocations by mmap in the measuring process so freed tensors leave it), model weights
included. Full's peak grows with the context, the evicting caches' does not.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
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


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: the device's peak counters on CUDA; on CPU freed memory
    goes back to the OS (malloc_trim) and Linux's peak resident set (VmHWM) is reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since `reset_peak`: CUDA allocated, else the process's peak resident set
    (VmHWM; where it cannot be reset, ru_maxrss of this fresh process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


def decode_steps(
    model, cache, ctx, first: torch.Tensor, warmup: int, steps: int, on_timed=None
) -> list[float]:
    """Greedy single-token steps from ``first`` [B,1]; seconds of each timed step;
    ``on_timed()`` runs once between the warm-up and the timed steps."""
    dev = first.device
    x, times = first, []
    with ctx, torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup and on_timed is not None:
                on_timed()
            _sync(dev)
            t0 = time.perf_counter()
            logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits
            x = logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def measure(cfg: DictConfig, model, name: str, context: int, batch: int) -> dict[str, Any]:
    """One method at one context and batch size, alone: prefill a seeded random prompt (prompt
    protocol, untimed), keep only this method's cache, warm up (an evicting cache comes down to
    its budget on the first decoded row), then time ``bench.steps`` steps with the peak memory
    of that window. -> {values, budget, columns}."""
    b = cfg.bench
    geo = attention_geometry(model)
    device = model.device
    policy: Policy = build_policy(
        cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
    )
    if policy.budget is None and name != "full":
        raise LessctlError("bench needs an evicting policy (policy.name != full) for baseline/less")
    kernels, cols = (None, {})
    if name == "less":
        kernels, cols = bench_kernels(cfg, geo, device, policy)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(int(cfg.seed))
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    template = EvictingCache.for_model(model, policy, None, protocol="prompt")
    with template.attached(model), torch.no_grad():
        logits = model(ids, cache=template, use_cache=True, logits_to_keep=1).logits
    first = logits[:, -1].argmax(-1, keepdim=True)
    if name == "full":
        cache, ctx = template.to_dynamic(), nullcontext()
    else:
        cache = template.fork(kernels if name == "less" else None)
        ctx = cache.attached(model)
    # the registered attention function may outlive the block (transformers' registry keeps
    # it), so empty the template's layers explicitly: only this method's cache stays
    for layer in template.layers:
        layer.reset()
    del template, logits
    times = decode_steps(
        model, cache, ctx, first, int(b.warmup), int(b.steps), on_timed=lambda: reset_peak(device)
    )
    lat = statistics.median(times) * 1e3
    values = {
        "latency_ms": lat,
        "tokens_per_s": batch / (lat / 1e3),
        "cache_bytes": cache_nbytes(cache),
        "peak_mem_bytes": peak_memory(device),
    }
    return {"values": values, "budget": None if name == "full" else policy.budget, "cols": cols}


def _return_freed_memory() -> None:
    """glibc: serve every allocation >= 128 KiB by mmap (a fixed threshold), so that a freed
    tensor (the prefill's activations, the evicted prompt) leaves the resident set at once and
    the peak measures what the method holds."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _measure_in_fresh_process(cfg_dict: dict, name: str, context: int, batch: int) -> dict:
    """`measure` in this (spawned) process with its own copy of the model."""
    from omegaconf import OmegaConf

    from lessctl.config import resolve_dtype
    from lessctl.models import load_model

    torch.set_num_threads(int(cfg_dict.pop("_threads")))
    _return_freed_memory()
    cfg = OmegaConf.create(cfg_dict)
    device = torch.device("cpu")
    model, _ = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    return measure(cfg, model, name, context, batch)


def isolated_measure(cfg: DictConfig, model, name: str, context: int, batch: int) -> dict:
    """`measure` with this method's memory alone: on CUDA in this process (peak counters reset
    per method), elsewhere in a fresh spawned process (memory freed by an earlier prefill or
    method stays in a process's resident set). `bench.isolate=false`: all in this process
    (faster; CPU peaks then only grow)."""
    if model.device.type == "cuda" or not cfg.bench.get("isolate", True):
        return measure(cfg, model, name, context, batch)
    from omegaconf import OmegaConf

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    cfg_dict["_threads"] = torch.get_num_threads()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_in_fresh_process, (cfg_dict, name, context, batch))


def run(cfg: DictConfig, model, tokenizer, log=print) -> list[dict[str, Any]]:
    """Rows {task: bench, model, method, policy, budget, context, batch_size, kernels,
    trained_budget, transfer, metric, value} for every method x context x batch size, each
    measured alone (see module doc)."""
    b = cfg.bench
    names = list(b.methods)
    bad = [n for n in names if n not in BENCH_METHODS]
    if bad:
        raise LessctlError(
            f"unknown bench.methods entry {bad[0]!r}; allowed: {', '.join(BENCH_METHODS)}"
        )
    geo = attention_geometry(model)
    rows: list[dict[str, Any]] = []
    table: list[tuple] = []
    for context in [int(c) for c in b.contexts]:
        # refuse a bad budget (or a mismatched checkpoint) here, before any process starts
        policy = build_policy(
            cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
        )
        if policy.budget is None and any(n != "full" for n in names):
            raise LessctlError(
                "bench needs an evicting policy (policy.name != full) for baseline/less"
            )
        if "less" in names:
            bench_kernels(cfg, geo, "cpu", policy)
        for batch in [int(x) for x in b.batch_sizes]:
            t0 = time.perf_counter()
            for name in names:
                got = isolated_measure(cfg, model, name, context, batch)
                values = got["values"]
                base = {
                    "task": "bench",
                    "model": cfg.model.name,
                    "method": name,
                    "policy": "full" if name == "full" else cfg.policy.name,
                    "budget": got["budget"],
                    "context": context,
                    "batch_size": batch,
                    "kernels": None,
                    "trained_budget": None,
                    "transfer": None,
                    **got["cols"],
                }
                rows += [{**base, "metric": k, "value": v} for k, v in values.items()]
                table.append(
                    (
                        context,
                        batch,
                        name,
                        base["budget"],
                        values["latency_ms"],
                        values["tokens_per_s"],
                        values["cache_bytes"],
                        values["peak_mem_bytes"],
                    )
                )
            log(f"context {context} batch {batch}: {time.perf_counter() - t0:.1f}s")
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
