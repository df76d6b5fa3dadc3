"""One method at one context, alone: prefill, decode latency, memory and the decode step's
phases (module doc of :mod:`lessctl.bench`)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from omegaconf import DictConfig
from transformers.cache_utils import DynamicCache

from lessctl.bench.breakdown import step_breakdown
from lessctl.bench.memory import peak_memory, reset_peak
from lessctl.cache import EvictingCache, cache_nbytes, prefill, running, triton_step
from lessctl.cache.native import less_step_op
from lessctl.errors import LessctlError
from lessctl.hooks import check_supported
from lessctl.less.kernels import LayerKernels, kernel_config
from lessctl.methods import CheckpointNotFound, load_less
from lessctl.models import attention_geometry
from lessctl.policies.base import Policy
from lessctl.policies.budget import build_policy


def bench_kernels(
    cfg: DictConfig, geo: dict[str, int], device, policy: Policy
) -> tuple[dict[int, LayerKernels], dict[str, Any]]:
    """Trained kernels if a checkpoint matches (a mismatched one is refused as in eval), else,
    when none exists at all, untrained ones of the same shape and cost -> (kernels, columns)."""
    try:
        ck = load_less(cfg, geo, device, policy)
        cols = {"kernels": "trained", "trained_budget": ck.trained_budget, "transfer": ck.transfer}
        cols.update(ck.trained_on or {})
        kernels = ck.kernels
    except CheckpointNotFound:
        kernels = {  # seed: KernelConfig's default
            i: LayerKernels(kernel_config(cfg, geo, i, dropout=0.0, seed=0)).to(device).eval()
            for i in range(geo["num_layers"])
        }
        cols = {"kernels": "untrained", "trained_budget": None, "transfer": None}
    return kernels, {**cols, "state_ranks": [kernels[i].cfg.rank for i in sorted(kernels)]}


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a host timer measures its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(
    model, cache, ctx, first: torch.Tensor, warmup: int, steps: int, on_timed=None
) -> list[float]:
    """Greedy single-token steps from ``first`` [B,1]; seconds of each timed step;
    ``on_timed()`` runs once between the warm-up and the timed steps. On CUDA each step is
    timed by the device's events (no synchronisation between steps)."""
    dev = first.device
    cuda = dev.type == "cuda"
    x, marks = first, []
    with ctx, torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup and on_timed is not None:
                on_timed()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
            else:
                t0 = time.perf_counter()
            logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits
            x = logits[:, -1].argmax(-1, keepdim=True)
            if i < warmup:
                continue
            if cuda:
                end.record()
                marks.append((start, end))
            else:
                marks.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / 1e3 for s, e in marks]
    return marks


def chunked_prefill_ok(model, name: str) -> bool:
    """Whether ``name`` can prefill in chunks: not LESS on a model with sliding-window layers
    (the cache refuses that: a folded key may leave the window inside a chunk)."""
    return name != "less" or not any(v["window"] for v in check_supported(model))


def make_cache(model, name: str, policy: Policy, kernels, chunk: int):
    """-> (cache, prefill chunk): full = a library ``DynamicCache`` with the model's own
    attention, prefilled ``chunk`` tokens per forward; baseline/less = the evicting cache,
    chunked protocol (LESS on a sliding-window model: the prompt protocol, one forward)."""
    if name == "full":
        return DynamicCache(config=model.config), chunk
    kern = kernels if name == "less" else None
    if not chunked_prefill_ok(model, name):
        return EvictingCache.for_model(model, policy, kern, protocol="prompt"), None
    cache = EvictingCache.for_model(model, policy, kern, protocol="chunked", chunk=chunk)
    return cache, chunk


def native_used(cache) -> bool:
    """Whether the cache's steady steps ran the C++ LESS step (lessctl/cache/native.py)."""
    return any(getattr(layer, "native", None) is not None for layer in cache.layers)


def triton_used(cache) -> bool:
    """Whether the cache's steady steps ran the Triton LESS step (lessctl/cache/triton_step.py)."""
    return any(getattr(layer, "triton", None) is not None for layer in cache.layers)


def random_prompt(cfg: DictConfig, model, batch: int, context: int) -> torch.Tensor:
    """The bench's prompt: token ids [batch, context] drawn from the vocabulary, seeded by
    ``cfg.seed`` (the same prompt for every method), on the model's device."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(int(cfg.seed))
    return torch.randint(0, vocab, (batch, context), generator=gen).to(model.device)


def measure(
    cfg: DictConfig, model, name: str, context: int, batch: int, decode: bool = True
) -> dict[str, Any]:
    """One method at one context and batch size (module doc of :mod:`lessctl.bench`)
    -> {values, budget, cols}."""
    b = cfg.bench
    geo = attention_geometry(model)
    device = model.device
    policy = build_policy(
        cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
    )
    if policy.budget is None and name != "full":
        raise LessctlError("bench needs an evicting policy (policy.name != full) for baseline/less")
    kernels, cols = (None, {})
    if name == "less":
        kernels, cols = bench_kernels(cfg, geo, device, policy)
    chunk = int(b.prefill_chunk)
    ids = random_prompt(cfg, model, batch, context)
    cache, chunk = make_cache(model, name, policy, kernels, chunk)
    if device.type == "cpu":  # loaded (with its imports) in every method's process alike
        less_step_op()
    elif device.type == "cuda":  # triton imported before anything is measured
        triton_step.less_step_op(device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    first = prefill(model, cache, ids, chunk).argmax(-1, keepdim=True)
    sync(device)
    values: dict[str, float] = {
        "prefill_s": time.perf_counter() - t0,
        "prefill_peak_mem_bytes": peak_memory(device),
    }
    if not decode:
        return {
            "values": {**values, "cache_bytes": cache_nbytes(cache)},
            "cols": cols,
            "budget": None if name == "full" else policy.budget,
        }
    times = decode_steps(
        model,
        cache,
        running(model, cache),
        first,
        int(b.warmup),
        int(b.steps),
        on_timed=lambda: reset_peak(device),
    )
    lat = statistics.median(times) * 1e3
    if name == "less":
        cols = {**cols, "native_step": native_used(cache), "triton_step": triton_used(cache)}
    values |= {
        "latency_ms": lat,
        "tokens_per_s": batch / (lat / 1e3),
        "cache_bytes": cache_nbytes(cache),
        "peak_mem_bytes": peak_memory(device),
    }
    if name != "full" and b.breakdown and batch == 1:
        layer = cache.layers[0]
        phases = step_breakdown(layer, geo["num_heads"])
        values |= {f"step_{k}_us": v for k, v in phases.items() if v is not None}
    return {"values": values, "budget": None if name == "full" else policy.budget, "cols": cols}
