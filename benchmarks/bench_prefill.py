"""Evicting prefill against Full's: an accumulating policy's prompt of `--context` tokens through
the real-eviction cache (its scores fused with the attention, lessctl/cache/scored.py) against
the same prompt through the library's DynamicCache, in one process, interleaved.

    .venv/bin/python benchmarks/bench_prefill.py [--context 4096 --policy h2o --budget 32]

Times the prompt plus the first generated token's forward (the prompt protocol evicts down to
the budget there). Prints per method the median time over `--rounds` interleaved rounds, the
ratio to Full (each round's ratio, median and range), the peak memory of a call (peak resident
set on CPU, reset before each call; `torch.cuda.max_memory_allocated` on CUDA) beside the
memory before it (the model and the prompt), and the bytes its cache holds after. `--unfused`
also times the explicit-probabilities path (lessctl/cache/attend.py:rows_attention) that the
fused one replaces. Ratios come from one run on one machine: compare them, not the seconds,
across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from lessctl.bench.memory import peak_memory, reset_peak, return_freed_memory
from lessctl.cache import EvictingCache, cache_nbytes, prefill, running
from lessctl.cache import layer as cache_layer
from lessctl.config import load_config, resolve_device, resolve_dtype
from lessctl.models import attention_geometry, load_model
from lessctl.policies.budget import build_policy

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--protocol", default="prompt", choices=["prompt", "chunked"])
    ap.add_argument("--chunk", type=int, default=1024, help="chunked protocol's chunk")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unfused", action="store_true", help="also time the unfused path")
    ap.add_argument("overrides", nargs="*", help="lessctl config overrides (e.g. device=cuda)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return_freed_memory()
    cfg = load_config(
        ["experiment=cpu", f"policy={a.policy}", f"policy.budget.size={a.budget}", *a.overrides]
    )
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    geo = attention_geometry(model)
    policy = build_policy(
        cfg.policy, seq_len=a.context, max_position_embeddings=geo["max_position_embeddings"]
    )
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, a.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    chunk = a.chunk if a.protocol == "chunked" else None

    def first_step(cache):
        """The prompt, then the first generated token's forward (where the prompt protocol
        evicts down to the budget), so that the evicting cache ends at its budget."""
        x = prefill(model, cache, ids, chunk).argmax(-1, keepdim=True)
        with running(model, cache):
            model(x, cache=cache, use_cache=True)
        return cache

    def full():
        return first_step(DynamicCache(config=model.config))

    def evicting(fused: bool):
        def go():
            cache_layer.FUSED_SCORES = fused
            cache = EvictingCache.for_model(model, policy, None, protocol=a.protocol, chunk=chunk)
            return first_step(cache)

        return go

    methods = {"full": full, f"{a.policy} (fused)": evicting(True)}
    if a.unfused:
        methods[f"{a.policy} (unfused)"] = evicting(False)
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {n: [] for n in methods}
        peaks: dict[str, list[int]] = {n: [] for n in methods}
        held: dict[str, int] = {}
        reset_peak(device)
        before = peak_memory(device)
        for _ in range(a.rounds):
            for name, fn in methods.items():
                reset_peak(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                cache = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
                peaks[name].append(peak_memory(device))
                held[name] = cache_nbytes(cache)
    cache_layer.FUSED_SCORES = True
    print(
        f"prefill of {a.context} tokens, {policy} ({a.protocol}"
        f"{f', chunk {chunk}' if chunk else ''}), {cfg.model.name}, {device}, {model.dtype}, "
        f"{a.threads} threads, {a.rounds} interleaved rounds; memory before a prefill "
        f"{before / MIB:.0f} MiB"
    )
    print(
        f"{'method':<22}{'median s':>10}{'x full (median, range)':>28}{'peak MiB':>10}"
        f"{'cache MiB':>11}"
    )
    for name in methods:
        ratios = [t / f for t, f in zip(times[name], times["full"], strict=True)]
        rng = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
        print(
            f"{name:<22}{statistics.median(times[name]):>10.2f}{rng:>28}"
            f"{max(peaks[name]) / MIB:>10.0f}{held[name] / MIB:>11.2f}"
        )


if __name__ == "__main__":
    main()
