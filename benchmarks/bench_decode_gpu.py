"""The decode benchmark on a CUDA device (for a session lent a GPU): `lessctl bench` in this
process with the device's event timers and peak-memory counters, bf16, on a model with a real
model's geometry and random weights (latency and memory do not depend on the values; nothing
is downloaded), or on any model config.

    python benchmarks/bench_decode_gpu.py [--geometry llama2-7b|smollm2-135m] [overrides ...]

Prints the bench table (ms/token, tokens/s, cache and peak MiB, throughput at equal memory),
the latency ratios LESS/baseline, baseline/full, LESS/full per context, layer 0's step
breakdown, and writes every row to $OUT/bench_gpu.jsonl (or ./bench_gpu.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lessctl import bench
from lessctl.config import load_config
from lessctl.models import load_model

GEOMETRIES = {  # model=tiny-random with a real model's shapes (byte vocabulary)
    "llama2-7b": [
        "model.hidden_size=4096",
        "model.num_hidden_layers=32",
        "model.num_attention_heads=32",
        "model.num_key_value_heads=32",
        "model.intermediate_size=11008",
        "model.max_position_embeddings=4096",
    ],
    "smollm2-135m": [
        "model.hidden_size=576",
        "model.num_hidden_layers=30",
        "model.num_attention_heads=9",
        "model.num_key_value_heads=3",
        "model.intermediate_size=1536",
        "model.max_position_embeddings=8192",
    ],
}
DEFAULTS = [
    "device=cuda",
    "dtype=bfloat16",
    "policy=lambda",
    "policy.budget.size=256",
    "bench.contexts=[1024,4096,8192,16384,32768]",
    "bench.full_max_context=32768",
    "bench.prefill_chunk=4096",
    "bench.prefill_contexts=[131072]",
    "bench.throughput_contexts=[4096,16384]",
    "bench.paired_contexts=[1024,8192,32768]",
    "bench.memory_cap_mb=40960",
    "bench.max_batch=256",
    "bench.steps=32",
    "bench.warmup=4",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama2-7b")
    args, overrides = ap.parse_known_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU session (lessctl bench runs on CPU)")
    cfg = load_config(["model=tiny-random", *GEOMETRIES[args.geometry], *DEFAULTS, *overrides])
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.geometry}")
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, "cuda", torch.bfloat16, seed=int(cfg.seed))
    model.eval()
    print(f"model ready in {time.perf_counter() - t0:.0f}s")
    rows = bench.run(cfg, model, tok, log=print)
    for r in rows:
        if r["metric"].startswith("step_") and r["context"] == max(
            int(c) for c in cfg.bench.contexts
        ):
            print(f"{r['method']:>9} {r['metric']:<22} {r['value']:9.1f}")
    out = Path(os.environ.get("OUT", ".")) / "bench_gpu.jsonl"
    out.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
