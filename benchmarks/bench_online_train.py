"""Online training end to end against extract + train (shards) on the same tokens: wall time
and bytes written, ratios from one run (not a timed test).

    PYTHONPATH=. python benchmarks/bench_online_train.py experiment=smoke train.epochs=1
    PYTHONPATH=. python benchmarks/bench_online_train.py experiment=cpu train.epochs=1  # ~30 min

Each side runs in a fresh cache folder (so nothing is reused) with the same overrides; the
shards side is `lessctl extract` then `lessctl train train.source=shards`, the online side
`lessctl train train.source=online`. Bytes written: the size of the activations and kernels folders
afterwards (shards + checkpoints, or checkpoints only; model files the cache builds are left
out).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    overrides = sys.argv[1:] or ["experiment=smoke", "train.epochs=1"]
    from lessctl import extract as E
    from lessctl import train as T
    from lessctl.config import load_config

    quiet = {"log": lambda *_: None}
    out: dict[str, tuple[float, int]] = {}
    for side in ("shards", "online"):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["LESSCTL_CACHE"] = tmp
            cfg = load_config([*overrides, f"train.source={side}"])
            t0 = time.perf_counter()
            if side == "shards":
                E.run(cfg, **quiet)
            T.run(cfg, **quiet)
            written = sum(_size(Path(tmp) / d) for d in ("activations", "kernels"))
            out[side] = (time.perf_counter() - t0, written)
    (ts, bs), (to, bo) = out["shards"], out["online"]
    print(f"overrides: {' '.join(overrides)}")
    print(f"  extract + train (shards): {ts:8.1f} s, {bs / 2**20:10.1f} MiB written")
    print(f"  online:                   {to:8.1f} s, {bo / 2**20:10.1f} MiB written")
    print(f"  online / shards: time {to / ts:.2f}x, disk {bo / max(bs, 1):.4f}x")


if __name__ == "__main__":
    main()
