"""Summarisation throughput: examples/s at `eval.batch_size` 8 vs 1 (left-padded batches, similar
prompt lengths together), on the embedded SmolLM2 and the XSum stand-in, as `make reproduce`
runs it (1 shot, prompts up to 1024 tokens, 32 new tokens, budget 64). Prints the ratio.

    .venv/bin/python benchmarks/bench_summarize_batch.py [--samples 16 --methods full,baseline]

`performer` costs what `less` costs (the same state update with untrained kernels) and needs
no trained checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lessctl.config import load_config, resolve_device, resolve_dtype
from lessctl.methods import build_methods
from lessctl.models import attention_geometry, load_model
from lessctl.tasks import summarize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="full,baseline,performer")
    ap.add_argument("--policy", default="h2o")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [
        "experiment=cpu",
        "data=xsum",
        f"policy={args.policy}",
        "policy.budget.size=64",
        f"eval.samples={args.samples}",
        "eval.shots=1",
        "eval.max_new_tokens=32",
        "eval.max_prompt_tokens=1024",
        f"eval.methods=[{args.methods}]",
    ]
    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    methods = build_methods(cfg, attention_geometry(model), 1024 + 32, device, model.dtype)
    per_s = {}
    rouge = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (1, args.batch):
            cfg.eval.batch_size = bs
            t0 = time.perf_counter()
            rows = summarize.run(cfg, model, tok, methods, Path(tmp), log=lambda *_: None)
            dt = time.perf_counter() - t0
            per_s[bs] = args.samples * len(methods) / dt
            rouge[bs] = [r["value"] for r in rows if r["metric"] == "rouge1"]
            print(
                f"batch {bs}: {dt:.1f}s for {args.samples} examples x {len(methods)} methods "
                f"= {dt / args.samples / len(methods):.2f} s per example and method"
            )
    print(f"ROUGE-1 batch 1: {rouge[1]}  batch {args.batch}: {rouge[args.batch]}")
    print(f"throughput batch {args.batch} / batch 1: {per_s[args.batch] / per_s[1]:.2f}x")


if __name__ == "__main__":
    main()
