"""Capture overhead of `lessctl extract`: tokens/s of extraction (capture + shard writes) against
a plain forward pass of the same model on the same batches, measured in the same run.

    .venv/bin/python benchmarks/bench_extract.py [--model smollm2-135m] [--batches 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lessctl.config import load_config
from lessctl.data import load_texts, token_windows
from lessctl.extract import Capture
from lessctl.hooks import use_attention
from lessctl.models import load_model
from lessctl.shards import ShardStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config([f"model={args.model}"])
    model, tok = load_model(cfg.model)
    windows = token_windows(
        load_texts(cfg.data).items, tok, args.seq_len, args.seq_len * args.batch_size * args.batches
    )
    batches = list(windows.split(args.batch_size))
    n_tok = windows.numel()

    def plain() -> None:
        for b in batches:
            model(b, use_cache=False)

    def extract(store: ShardStore) -> None:
        cap = Capture(torch.float16)
        with use_attention(model, cap):
            for c, b in enumerate(batches):
                cap.seen.clear()
                model(b, use_cache=False)
                store.write_chunk(c, dict(cap.seen))

    times: dict[str, list[float]] = {"plain forward": [], "extract (capture + write)": []}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        plain()  # warm-up
        for r in range(args.repeats):
            t0 = time.perf_counter()
            plain()
            times["plain forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            extract(ShardStore(f"{tmp}/{r}"))
            times["extract (capture + write)"].append(time.perf_counter() - t0)
    print(
        f"model={args.model} tokens/run={n_tok} (batches of {args.batch_size}×{args.seq_len}), "
        f"median of {args.repeats}"
    )
    rates = {k: n_tok / statistics.median(v) for k, v in times.items()}
    for k, v in rates.items():
        print(f"  {k:28s} {v:10,.0f} tok/s")
    ratio = rates["plain forward"] / rates["extract (capture + write)"]
    print(f"capture overhead (plain / extract time ratio): {ratio:.2f}x")


if __name__ == "__main__":
    main()
