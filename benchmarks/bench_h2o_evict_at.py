"""H2O decision: our budget-buffer evict_at (O(S n d)) vs a row-by-row S x S-mask reference.

The reference follows the official LESS/H2O simulation: dense logits, and for every row a
softmax over the full (masked) row, a top-k of the accumulated scores and a new mask row.

    .venv/bin/python benchmarks/bench_h2o_evict_at.py [--seq 2048 --kv-heads 9 --budget 0.1]
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import median_time

from lessctl.policies import H2O


def reference_evict_at(q: torch.Tensor, k: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Official-style H2O: q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S] via an S x S mask."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    n = heavy + recent
    logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(d)).view(b, hkv, g, s, s)
    j = torch.arange(s)
    mask = torch.zeros(b, hkv, s, s, dtype=torch.bool)
    mask[..., :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    causal = logits[..., :n, :].masked_fill(~mask[:, :, None, :n], -torch.inf)
    acc = causal.softmax(-1).sum((2, 3))  # [B,Hkv,S]
    for t in range(n, s):
        win = (j > t - recent) & (j <= t)
        pool = mask[..., t - 1, :] & ~win
        top = acc.masked_fill(~pool, -torch.inf).topk(heavy, -1).indices
        row = win.expand(b, hkv, s).clone().scatter_(-1, top, True)
        mask[..., t, :] = row
        p = logits[..., t, :].masked_fill(~row[:, :, None], -torch.inf).softmax(-1).sum(2)
        acc = (acc + p) * row  # evicted scores are gone forever
    dropped = ~mask & (j[:, None] >= j[None, :])  # [.., t, j]: j <= t and not kept
    first = torch.where(dropped, j[:, None], s).min(-2).values
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=9, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=9)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.1, help="fraction of --seq")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, a.heads, a.seq, a.dim, generator=g)
    k = torch.randn(1, a.kv_heads, a.seq, a.dim, generator=g)
    half = int(a.budget * a.seq) // 2
    policy = H2O(heavy=half, recent=half)
    ours = policy.evict_at(q, k)
    ref = reference_evict_at(q, k, half, half)
    t_ours = median_time(lambda: policy.evict_at(q, k), a.reps)
    t_ref = median_time(lambda: reference_evict_at(q, k, half, half), a.reps)
    print(f"H2O evict_at  S={a.seq} H={a.heads} Hkv={a.kv_heads} d={a.dim} {policy}")
    print(f"{'method':<32}{'median s':>10}")
    print(f"{'ours (budget buffer)':<32}{t_ours:>10.3f}")
    print(f"{'reference (S x S mask, per row)':<32}{t_ref:>10.3f}")
    print(f"speed-up: {t_ref / t_ours:.1f}x   identical decisions: {torch.equal(ours, ref)}")


if __name__ == "__main__":
    main()
