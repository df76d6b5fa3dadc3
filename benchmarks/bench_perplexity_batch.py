"""Perplexity throughput: windows/s at `eval.batch_size` 8 vs 1 on the embedded SmolLM2 (512-token
windows of the WikiText stand-in, as `make reproduce` runs them). Prints the ratio per method.

    .venv/bin/python benchmarks/bench_perplexity_batch.py [--windows 8 --policy h2o]

`performer` costs what `less` costs (untrained kernels, no checkpoint needed).
"""

from __future__ import annotations

import argparse
import time

import torch

from lessctl.config import load_config, resolve_device, resolve_dtype
from lessctl.data import load_texts, token_windows
from lessctl.methods import build_methods
from lessctl.models import attention_geometry, load_model
from lessctl.tasks.perplexity import method_window_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="baseline,performer")
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        [
            "experiment=cpu",
            "data=wikitext2",
            f"policy={args.policy}",
            f"policy.budget.size={args.budget}",
            f"eval.methods=[{args.methods}]",
        ]
    )
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    windows = token_windows(load_texts(cfg.data).items, tok, 512, 512 * args.windows)
    for m in build_methods(cfg, attention_geometry(model), 512, device, model.dtype):
        secs = {}
        vals = {}
        for bs in (1, args.batch):
            t0 = time.perf_counter()
            vals[bs] = method_window_nll(model, windows, m, batch_size=bs)[0]
            secs[bs] = time.perf_counter() - t0
            print(f"{args.policy} {m.name} batch {bs}: {secs[bs] / len(windows):.2f} s/window")
        same = max(abs(a - b) / abs(a) for a, b in zip(vals[1], vals[args.batch], strict=True))
        print(
            f"{args.policy} {m.name}: {secs[1] / len(windows):.2f} s/window at batch 1, "
            f"{secs[args.batch] / len(windows):.2f} at batch {args.batch}: "
            f"{secs[1] / secs[args.batch]:.2f}x (max rel. NLL diff {same:.1e})"
        )


if __name__ == "__main__":
    main()
