"""Online training end to end against extract + train (shards) on the same tokens, both
policies of `make reproduce` (lambda and h2o): wall time and bytes written, ratios from one run
(not a timed test).

    PYTHONPATH=. python benchmarks/bench_online_train.py experiment=smoke train.epochs=1
    PYTHONPATH=. python benchmarks/bench_online_train.py experiment=cpu train.epochs=1  # ~30 min

Each side runs the CLI as `make reproduce` runs it, in a fresh cache folder (so nothing is
reused; the model and corpora are linked from the real cache) with the same overrides:

- shards: `lessctl extract`, then `lessctl train -m policy=lambda,h2o` with the joblib launcher
  (two jobs side by side, each with half the cores), as reproduce trained before;
- online: `lessctl train 'train.policies=[lambda,h2o]'`: one process, one forward pass per batch
  feeding both policies' layers.

Bytes written: the size of the activations and kernels folders afterwards (shards +
checkpoints, or checkpoints only). Pass `--json PATH` to write the figures as one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _lessctl(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lessctl", *args], env=env, capture_output=True)
    if proc.returncode != 0:
        tail = proc.stdout.decode()[-2000:] + proc.stderr.decode()[-2000:]
        raise SystemExit(f"lessctl {' '.join(args)} failed:\n{tail}")
    return time.perf_counter() - t0


def main() -> None:
    argv = sys.argv[1:]
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    overrides = argv or ["experiment=smoke", "train.epochs=1"]
    from lessctl.assets import cache_dir

    real = cache_dir()
    cores = os.cpu_count() or 2
    half = max(1, cores // 2)
    out: dict[str, dict[str, float]] = {}
    for side in ("shards", "online"):
        with tempfile.TemporaryDirectory() as tmp:
            for shared in ("models", "corpora", "downloads"):
                if (real / shared).exists():
                    os.symlink(real / shared, Path(tmp) / shared)
            env = {**os.environ, "LESSCTL_CACHE": tmp}
            common = [*overrides, f"train.source={side}", f"results_dir={tmp}/results"]
            times = {}
            if side == "shards":
                times["extract"] = _lessctl(["extract", *common], env)
                times["train"] = _lessctl(
                    [
                        "train",
                        "-m",
                        *common,
                        "policy=lambda,h2o",
                        "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2",
                        f"threads={half}",
                    ],
                    env,
                )
            else:
                times["train"] = _lessctl(["train", *common, "train.policies=[lambda,h2o]"], env)
            written = sum(_size(Path(tmp) / d) for d in ("activations", "kernels"))
            out[side] = {**times, "total_s": sum(times.values()), "bytes_written": written}
    s, o = out["shards"], out["online"]
    ratios = {
        "time_online_over_shards": o["total_s"] / s["total_s"],
        "disk_online_over_shards": o["bytes_written"] / max(s["bytes_written"], 1),
    }
    print(f"overrides: {' '.join(overrides)}; {cores} cores")
    print(
        f"  extract + train (shards, 2 jobs): {s['total_s']:8.1f} s (extract {s['extract']:.1f}"
        f", train {s['train']:.1f}), {s['bytes_written'] / 2**20:10.1f} MiB written"
    )
    print(
        f"  online (one pass, 2 policies):    {o['total_s']:8.1f} s, "
        f"{o['bytes_written'] / 2**20:10.1f} MiB written"
    )
    print(
        f"  online / shards: time {ratios['time_online_over_shards']:.2f}x, "
        f"disk {ratios['disk_online_over_shards']:.4f}x"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        from lessctl.runs import git_revision, versions

        record = {
            "overrides": overrides,
            "cores": cores,
            "git_revision": git_revision(),
            "versions": versions(),
            **out,
            **ratios,
        }
        json_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
