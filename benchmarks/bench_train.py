"""Training throughput of one layer: tokens/s of `lessctl train` today against the training loop
of an earlier revision (default: the one before the in-memory rewrite), in the same process,
repetitions interleaved (old, new, old, new, ...) because the machine is shared.

    .venv/bin/python benchmarks/bench_train.py [--sequences 48] [--epochs 2] [--repeats 3]
        [--old-rev b1b78af] [--activations <extraction folder>] [experiment=cpu overrides ...]

Without --activations the shards are synthetic (random fp16 q, k, v with SmolLM2-135M's
geometry: 9 query heads, 3 KV heads, head_dim 64, seq_len 512): the cost of a training step
does not depend on the values. The old implementation is `lessctl/train.py` and
`lessctl/less/kernels.py` at --old-rev, read with `git show` and imported as modules; both run
the same config on the same shards.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lessctl.config import load_config
from lessctl.shards import ShardStore, save_atomic

ROOT = Path(__file__).resolve().parents[1]


def _module_at(rev: str, path: str, name: str):
    """The file `path` at git revision `rev`, imported as module `name`."""
    src = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def old_train_module(rev: str):
    """`lessctl/train.py` at git revision `rev` with that revision's kernels
    (`lessctl/less/kernels.py`, e.g. its dropout), imported as module `lessctl_train_<rev>`."""
    mod = _module_at(rev, "lessctl/train.py", f"lessctl_train_{rev}")
    kernels = _module_at(rev, "lessctl/less/kernels.py", f"lessctl_kernels_{rev}")
    mod.LayerKernels, mod.KernelConfig = kernels.LayerKernels, kernels.KernelConfig
    return mod


def synthetic_store(root: Path, sequences: int, seq_len: int, batch: int) -> ShardStore:
    """An extraction folder of random fp16 activations with SmolLM2-135M's attention geometry."""
    geo = dict(
        num_layers=1,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        hidden_size=576,
        max_position_embeddings=8192,
    )
    gen = torch.Generator().manual_seed(0)
    store = ShardStore(root)
    n_chunks = -(-sequences // batch)
    store.write_manifest(
        {
            "hash": root.name,
            "model": "smollm2-135m",
            "dataset": "synthetic",
            "source": "random",
            "seq_len": seq_len,
            "sequences": sequences,
            "tokens": sequences * seq_len,
            "chunks": n_chunks,
            "dtype": "float16",
            "geometry": geo,
            "scaling": 64**-0.5,
        }
    )
    w = torch.randn(576, 576, generator=gen) / 24
    save_atomic({"layer_0.weight": w}, root / "o_proj.safetensors")
    for c in range(n_chunks):
        n = min(batch, sequences - c * batch)

        def rnd(h: int, n: int = n) -> torch.Tensor:
            return torch.randn(n, h, seq_len, 64, generator=gen).to(torch.float16)

        store.write_chunk(c, {0: {"q": rnd(9), "k": rnd(3), "v": rnd(3)}})
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=48, help="synthetic sequences of 512")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--old-rev", default="b1b78af")
    ap.add_argument("--activations", default=None, help="a real extraction folder")
    ap.add_argument("overrides", nargs="*", help="config overrides (default experiment=cpu)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from lessctl import train as new

    old = old_train_module(args.old_rev)
    with tempfile.TemporaryDirectory() as tmp:
        if args.activations:
            store = ShardStore(args.activations)
        else:
            store = synthetic_store(Path(tmp) / "acts", args.sequences, 512, 4)
        cfg = load_config(
            ["experiment=cpu", "device=cpu", f"train.epochs={args.epochs}", *args.overrides]
        )
        n_seq = store.manifest()["sequences"]
        times: dict[str, list[float]] = {"old": [], "new": []}
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, mod in (("old", old), ("new", new)):
                out = Path(tmp) / f"{name}_{r}"
                out.mkdir()
                t0 = time.perf_counter()
                m = mod.train_layer(cfg, store, args.layer, out, log=lambda *_: None)
                if r:
                    times[name].append(time.perf_counter() - t0)
                    rates[name].append(m["tokens_per_s"])
    print(
        f"layer {args.layer}: {n_seq} sequences × 512, {args.epochs} epochs, "
        f"hidden={cfg.less.hidden} R={cfg.less.rank} batch={cfg.train.batch_size}, "
        f"torch threads={torch.get_num_threads()}, median of {args.repeats} interleaved runs"
    )
    for name in ("old", "new"):
        print(
            f"  {name} ({args.old_rev if name == 'old' else 'working tree'}): "
            f"{statistics.median(rates[name]):9,.0f} tok/s in the epochs; "
            f"whole layer (incl. precompute, validation) {statistics.median(times[name]):6.2f} s"
        )
    epochs = statistics.median(rates["new"]) / statistics.median(rates["old"])
    whole = statistics.median(times["old"]) / statistics.median(times["new"])
    print(f"speed-up new/old: epochs {epochs:.2f}x, whole layer {whole:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
