"""LESS parallel form: our linear-cost state part vs the quadratic S x S masked form.

State part: ``low_rank_attention`` (keys sorted by evict_at, row chunks with a carried state,
O(S R d)) vs ``(phi psi^T * (causal & ~keep)) @ V`` (official code, O(S^2)). Full: our
``parallel_attention`` (chunked sparse part + state) vs ``masked_attention``. Log features
(Performer's path): ``low_rank_attention_log`` vs the linear state part, without and with a
sliding ``--window`` (subtraction-free key blocks). Decisions come from H2O at ``--budget`` of S
(not timed).

    .venv/bin/python benchmarks/bench_parallel_attention.py [--seqs 1024 2048 4096]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_time

from lessctl.less import (
    low_rank_attention,
    low_rank_attention_log,
    masked_attention,
    parallel_attention,
)
from lessctl.policies import H2O, keep_mask


def quadratic_state(phi, psi, v, evict_at):
    """(phi H_t, phi z_t) the official way: dense phi psi^T with the mask causal & ~keep."""
    g = phi.shape[1] // psi.shape[1]
    s = phi.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    lr_mask = (causal & ~keep_mask(evict_at)).repeat_interleave(g, 1)
    a = (phi @ psi.repeat_interleave(g, 1).transpose(-1, -2)) * lr_mask
    return a @ v.repeat_interleave(g, 1), a.sum(-1)


def log_vs_linear(phi, psi, v, e, window, reps):
    """Median seconds of the state part: (linear, log, linear + window, log + window)."""
    lphi, lpsi = phi.log(), psi.log()
    ew = torch.minimum(e, torch.arange(e.shape[-1]) + window)
    return (
        median_time(lambda: low_rank_attention(phi, psi, v, e), reps),
        median_time(lambda: low_rank_attention_log(lphi, lpsi, v, e), reps),
        median_time(lambda: low_rank_attention(phi, psi, v, ew, window=window), reps),
        median_time(lambda: low_rank_attention_log(lphi, lpsi, v, ew, window=window), reps),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--budget", type=float, default=0.1, help="H2O budget, fraction of S")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window", type=float, default=0.25, help="sliding window, fraction of S")
    a = ap.parse_args()
    b, h, hkv, d, r = a.batch, a.heads, a.kv_heads, a.dim, a.rank
    print(f"B={b} H={h} Hkv={hkv} d={d} R={r} H2O budget {a.budget:.0%} of S; median seconds")
    head = f"{'S':>6}{'state ours':>12}{'state S^2':>11}{'ratio':>8}"
    head += f"{'full ours':>11}{'full S^2':>10}{'ratio':>8}{'max|diff|':>11}"
    print(head)
    log_rows = []
    for s in a.seqs:
        g = torch.Generator().manual_seed(s)
        q = torch.randn(b, h, s, d, generator=g)
        k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
        phi, psi = torch.rand(b, h, s, r, generator=g), torch.rand(b, hkv, s, r, generator=g)
        half = max(1, int(a.budget * s) // 2)
        e = H2O(half, half).evict_at(q, k)
        t_lin = median_time(lambda: low_rank_attention(phi, psi, v, e), a.reps)  # noqa: B023
        t_quad = median_time(lambda: quadratic_state(phi, psi, v, e), a.reps)  # noqa: B023
        t_par = median_time(lambda: parallel_attention(q, k, v, e, phi, psi), a.reps)  # noqa: B023
        t_mask = median_time(lambda: masked_attention(q, k, v, e, phi, psi), a.reps)  # noqa: B023
        diff = parallel_attention(q, k, v, e, phi, psi) - masked_attention(q, k, v, e, phi, psi)
        row = f"{s:>6}{t_lin:>12.4f}{t_quad:>11.4f}{t_quad / t_lin:>7.1f}x"
        row += f"{t_par:>11.4f}{t_mask:>10.4f}{t_mask / t_par:>7.1f}x{diff.abs().max():>11.2e}"
        print(row)
        log_rows.append(log_vs_linear(phi, psi, v, e, max(1, int(a.window * s)), a.reps))
    print(f"\nlog-feature state part vs linear (window {a.window:.0%} of S); median seconds")
    print(f"{'S':>6}{'linear':>9}{'log':>9}{'ratio':>8}{'lin+win':>9}{'log+win':>9}{'ratio':>8}")
    for s, (t_lin, t_log, t_lin_w, t_log_w) in zip(a.seqs, log_rows, strict=True):
        row = f"{s:>6}{t_lin:>9.4f}{t_log:>9.4f}{t_log / t_lin:>7.1f}x"
        print(row + f"{t_lin_w:>9.4f}{t_log_w:>9.4f}{t_log_w / t_lin_w:>7.1f}x")


if __name__ == "__main__":
    main()
