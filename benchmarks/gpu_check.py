"""The GPU check (benchmarks/gpu_check.sh sets up the machine, then runs this): every step
writes rows to $OUT/gpu_check.jsonl, each with the device name, torch, CUDA and Triton versions
and the commit; nothing here has run on a GPU yet.

    python benchmarks/gpu_check.py [--cpu] [--budget-s 450] [--contexts 1024,8192,32768]

Steps, each within what is left of the budget (a step that cannot start in time writes a
``skipped`` row saying so; one that fails writes an ``error`` row, the others still run, and
the exit code is 1):

1. ``pytest -m cuda`` (tests/test_cuda.py): counts of passed, failed and skipped tests;
2. the decode bench (benchmarks/bench_decode_gpu.py's config) at a Llama-2-7B geometry with
   random weights in bf16: latency ratios LESS/baseline, baseline/Full, LESS/Full (interleaved,
   with intervals), cache bytes and peak memory, throughput at equal memory against Full; and
   a chunked prefill of 32k tokens (LESS) against a 1k prompt's peak memory;
3. the Triton LESS step against the torch path at the 7B layer's shapes (``step_breakdown``:
   the fused call vs features + update + read, and the whole step; run before the bench);
4. online training throughput: a hook, not wired yet (online training landed after this script
   was written): it writes a ``skipped`` row.

``--cpu``: a dry run through the same plumbing on the tiny random model (small contexts, CPU,
the Triton step under Triton's interpreter), writing the same row layout, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the tiny model, on CPU")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds for all steps")
    ap.add_argument("--contexts", default=None, help="decode contexts (default 1k,8k,32k)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per method")
    ap.add_argument("--skip", default="", help="steps to skip: pytest,bench,triton,train")
    return ap.parse_args(argv)


class Rows:
    """Rows appended to $OUT/gpu_check.jsonl as they come, each with the provenance."""

    def __init__(self, out: Path, prov: dict) -> None:
        self.path, self.prov = out / "gpu_check.jsonl", prov
        out.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def add(self, check: str, metric: str, value, **cols) -> None:
        row = {"check": check, "metric": metric, "value": value, **cols, **self.prov}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"{check:>8} {metric:<34} {value}", flush=True)


def provenance(device) -> dict:
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "commit": commit or None,
        "host": platform.node(),
    }


def run_pytest(rows: Rows, out: Path, limit_s: float) -> None:
    xml = out / "pytest_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", f"--junitxml={xml}"]
    cmd.append(str(ROOT / "tests" / "test_cuda.py"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # compiled for real on a GPU
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s
        )
    except subprocess.TimeoutExpired:
        rows.add("pytest", "timed_out_s", limit_s)
        return
    (out / "pytest_cuda.log").write_text(done.stdout + done.stderr)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    for k, v in counts.items():
        rows.add("pytest", k, v)
    rows.add("pytest", "exit_code", done.returncode)


def bench_contexts(args, cuda: bool) -> list[int]:
    return [int(c) for c in (args.contexts or ("1024,8192,32768" if cuda else "64,128")).split(",")]


def bench_config(args, cuda: bool, only: int | None = None):
    """The bench's config -> (cfg, contexts, the least context); ``only``: the config for that
    context alone (the check runs one context at a time, so that a run cut short by its budget
    keeps the contexts it finished): its decode rows and interleaved ratios, throughput at
    equal memory at the middle context, the big chunked prefill with the least context."""
    from bench_decode_gpu import DEFAULTS, GEOMETRIES

    from lessctl.config import load_config

    ctx = bench_contexts(args, cuda)
    lo, hi = min(ctx), max(ctx)
    mid = sorted(ctx)[len(ctx) // 2]
    big = 32768 if cuda else 4 * hi
    here = ctx if only is None else [only]
    csv = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    over = [*GEOMETRIES["llama2-7b"], *DEFAULTS] if cuda else ["device=cpu", "dtype=float32"]
    over += [
        "policy=lambda",
        f"policy.budget.size={256 if cuda else 16}",
        f"bench.contexts=[{csv(here)}]",
        f"bench.full_max_context={hi}",
        f"bench.paired_contexts=[{csv(here)}]",
        f"bench.throughput_contexts=[{csv([c for c in here if c == mid])}]",
        f"bench.prefill_contexts=[{csv([big] if lo in here else [])}]",
        f"bench.prefill_chunk={4096 if cuda else 32}",
        f"bench.steps={args.steps or (16 if cuda else 2)}",
        f"bench.warmup={3 if cuda else 1}",
        "bench.isolate=false",
        "bench.breakdown=false",
    ]
    if cuda:
        over.append(f"model.max_position_embeddings={max(hi, big)}")
    else:
        over += ["bench.memory_cap_mb=1", "bench.max_batch=2"]
        over.append(f"model.max_position_embeddings={big}")
    return load_config(["model=tiny-random", *over]), ctx, lo


def load_bench_model(cfg, device):
    """The random-weight model built on the device itself (a 7B geometry is not initialised on
    the CPU: minutes, 27 GB)."""
    import torch

    from lessctl.config import resolve_dtype
    from lessctl.models import load_model

    with torch.device(device):
        model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=0)
    return model.eval(), tok


def run_bench(rows: Rows, args, cuda: bool, model, tok, left) -> None:
    """The decode bench one context at a time (:func:`bench_config`), rows written after each;
    a context that cannot start in time gets a ``skipped`` row; then the prefill ratio."""
    from lessctl import bench

    prefill = {}
    ctx = bench_contexts(args, cuda)
    for c in ctx:
        if left() < 30:
            rows.add("bench", "skipped", f"context {c}: {left():.0f}s left of the budget")
            continue
        cfg, _, lo = bench_config(args, cuda, only=c)
        got = bench.run(cfg, model, tok, log=lambda line: print("   bench", line, flush=True))
        for r in got:
            keep = {k: r.get(k) for k in ("method", "context", "batch_size", "native_step")}
            keep |= {"triton_step": r.get("triton_step"), "samples_ms": r.get("samples_ms")}
            rows.add("bench", r["metric"], r["value"], **keep)
            if r["metric"] == "prefill_peak_mem_bytes" and r["method"] == "less":
                prefill[int(r["context"])] = r["value"]
    lo = min(ctx)
    if lo in prefill and max(prefill) > lo:
        big = max(prefill)
        ratio = prefill[big] / prefill[lo]
        rows.add("prefill", f"peak_mem_ratio_{big}_over_{lo}", ratio, method="less", context=big)


def run_triton_vs_torch(rows: Rows, cfg, device, cuda: bool) -> None:
    """One steady layer at the bench model's attention shapes, timed per phase with the
    Triton step and with the torch path (lessctl.bench.breakdown)."""
    import torch

    from lessctl.bench.breakdown import step_breakdown
    from lessctl.cache import EvictingCache, triton_step
    from lessctl.less.kernels import KernelConfig, LayerKernels, rank_list
    from lessctl.policies import get_policy

    m = cfg.model
    h, hkv = int(m.num_attention_heads), int(m.num_key_value_heads)
    d = int(m.hidden_size) // h
    dtype = torch.bfloat16 if cuda else torch.float32
    budget = 256 if cuda else 16
    policy = get_policy("lambda", sink=4, recent=budget - 4)
    rank = (rank_list(cfg.less.rank) or [int(cfg.less.rank)])[0]  # one layer: the first's
    hidden = int(cfg.less.hidden) if cuda else 32
    for batch in (1, 8) if cuda else (1,):
        for mode in ("always", "never"):
            prev = triton_step.configure(mode)
            try:
                torch.manual_seed(0)
                kc = KernelConfig(h, hkv, d, rank=rank, hidden=hidden, dropout=0.0, init_scale=1.0)
                kern = {0: LayerKernels(kc).eval().to(device)}
                layer = EvictingCache(1, policy, kern, protocol="prompt").layers[0]
                with torch.no_grad():
                    for t in (budget + 8, 1, 1):  # a prompt past the budget, then steady rows
                        q = torch.randn(batch, h, t, d, device=device, dtype=dtype)
                        k, v = (
                            torch.randn(batch, hkv, t, d, device=device, dtype=dtype) for _ in "kv"
                        )
                        layer.update(k, v)
                        layer.attend(q, k, v, None)
                used = layer.triton is not None
                phases = step_breakdown(layer, h, reps=50 if cuda else 3)
            finally:
                triton_step.configure(prev)
            path = "triton" if used else "torch"
            for name, us in phases.items():
                if us is not None:
                    rows.add("step", f"{name}_us", us, path=path, batch_size=batch, mode=mode)


def run_training_hook(rows: Rows, cfg, budget_s: float) -> None:
    """Online training throughput: not wired yet, a ``skipped`` row saying so (where the config
    lacks ``train.source``, that instead)."""
    if "source" not in cfg.train:
        rows.add(
            "train", "skipped", "train.source is not in the config (online training not landed)"
        )
        return
    # HOOK: online training of a few layers at the bench model's geometry. Wire the command's
    # tokens/s and peak memory here once `lessctl train train.source=online ...` exists.
    cmd = [sys.executable, "-m", "lessctl", "train", "--help"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    rows.add(
        "train", "skipped", f"train.source exists; hook not wired yet (help rc {done.returncode})"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    t_end = time.monotonic() + args.budget_s
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton step on CPU tensors
    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the dry run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(os.environ.get("OUT", ROOT / "gpu_out"))
    rows = Rows(out, {"dry_run": args.cpu, **provenance(device)})
    skip = set(filter(None, args.skip.split(",")))
    left = lambda: t_end - time.monotonic()  # noqa: E731
    cfg, _, _ = bench_config(args, cuda)
    from lessctl.cache import native, triton_step

    triton_step.configure("auto" if cuda else "always")
    if not cuda:  # the dry run takes the Triton step (interpreted), not the C++ op
        native.configure("never")

    def bench_step() -> None:
        t0 = time.monotonic()
        model, tok = load_bench_model(cfg, device)
        rows.add("bench", "model_load_s", time.monotonic() - t0)
        run_bench(rows, args, cuda, model, tok, left)
        del model
        if cuda:
            torch.cuda.empty_cache()

    steps = {  # the short ones first: the bench takes what is left
        "pytest": lambda: run_pytest(rows, out, max(left() * 0.3, 10.0)),
        "triton": lambda: run_triton_vs_torch(rows, cfg, device, cuda),
        "bench": bench_step,
        "train": lambda: run_training_hook(rows, cfg, max(left(), 10.0)),
    }
    failed = 0
    for name, fn in steps.items():
        if name in skip:
            rows.add(name, "skipped", "--skip")
            continue
        if left() < 15:
            rows.add(name, "skipped", f"{left():.0f}s left of the budget")
            continue
        t0 = time.monotonic()
        try:
            fn()
        except Exception as err:  # the other steps still run; the row says what failed
            failed += 1
            rows.add(name, "error", f"{type(err).__name__}: {err}"[:500])
            traceback.print_exc()
        rows.add(name, "step_s", time.monotonic() - t0)
    rows.add("done", "wall_s", args.budget_s - left())
    print(f"rows -> {rows.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
