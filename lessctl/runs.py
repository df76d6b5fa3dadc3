"""Run folders with provenance: `results/runs/<command>/<time>-<name>/`.

Each run folder holds `config.yaml` (resolved), `overrides.yaml`, `meta.json` (git revision,
library versions, device, seed, start/end time) and, from the stages, `rows.jsonl`: tidy result
rows, each carrying the provenance columns of `Run.provenance`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lessctl.atomic import write_json_atomic
from lessctl.errors import LessctlError

TRACKED = ("torch", "transformers", "datasets", "lessctl")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str:
    """Current commit (with `+dirty` if tracked files other than the run outputs under
    `results/` have changes), or `unknown` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in TRACKED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


@dataclass
class Run:
    """A run folder. Create with `start_run`; append rows with `add_rows`; close with `finish`."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def provenance(self) -> dict[str, Any]:
        """Columns that every result row of this run carries."""
        m = self.meta
        return {
            "run": str(self.path),
            "git": m["git"],
            "seed": m["seed"],
            "device": m["device"],
            **{f"v_{k}": v for k, v in m["versions"].items()},
        }

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append tidy rows (provenance added) to `rows.jsonl`, one JSON object a line."""
        with open(self.path / "rows.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**r, **self.provenance}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict[str, Any]]:
        """The saved rows; a file that cannot be read raises RunError (one line)."""
        p = self.path / "rows.jsonl"
        if not p.exists():
            return []
        rows = []
        try:
            for i, line in enumerate(p.read_bytes().decode("utf-8").split("\n"), 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"line {i} is not a JSON object")
        except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError included
            raise RunError(f"{p} cannot be read: {err}") from None
        return rows

    def update_meta(self, **kw: Any) -> None:
        self.meta.update(kw)
        write_json_atomic(self.path / "meta.json", self.meta)

    def finish(self, status: str = "finished") -> None:
        self.update_meta(end=_now(), status=status)


def start_run(cfg: DictConfig, command: str, overrides: list[str], device: str = "cpu") -> Run:
    """Make `<results_dir>/runs/<command>/<UTC time>[-<run_name>]/` and write its provenance."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    name = stamp + (f"-{cfg.run_name}" if cfg.get("run_name") else "")
    path = Path(cfg.results_dir) / "runs" / command / name
    path.mkdir(parents=True, exist_ok=False)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (path / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    run = Run(path)
    run.update_meta(
        command=command,
        overrides=list(overrides),
        git=git_revision(),
        versions=versions(),
        device=device,
        seed=int(cfg.seed),
        run_name=cfg.get("run_name"),
        start=_now(),
        host=platform.node(),
        pid=os.getpid(),
        threads=torch.get_num_threads(),
        status="running",
    )
    return run


class RunError(LessctlError):
    """A run folder that cannot be read (one line naming the file)."""


def process_gone(meta: dict[str, Any]) -> bool:
    """Whether the process that wrote a `running` meta has ended without closing it (kill -9,
    a lost node): only decidable on the host that ran it, from its recorded pid."""
    if meta.get("status") != "running" or meta.get("host") != platform.node():
        return False
    pid = meta.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def load_run(path: str | Path) -> Run:
    """The run folder at `path`; a `running` run whose process is gone (:func:`process_gone`)
    is marked `interrupted` here, the first time it is seen after the kill."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError included
        raise RunError(f"{path / 'meta.json'} cannot be read: {err}") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path / 'meta.json'} is not a JSON object")
    run = Run(path, meta)
    if process_gone(run.meta):
        run.meta.update(status="interrupted", interrupted="its process ended without closing it")
        try:  # best effort: a read-only results folder is still reported
            write_json_atomic(path / "meta.json", run.meta)
        except OSError:
            pass
    return run


def warn(msg: str) -> None:
    """One warning line on stderr."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {msg}", highlight=False)


def list_runs(
    results_dir: str | Path,
    command: str | None = None,
    on_skip: Callable[[str], None] = warn,
) -> list[Run]:
    """Saved runs (oldest first), optionally of one command; a run folder whose meta.json
    cannot be read is skipped with one `on_skip` line naming it."""
    root = Path(results_dir) / "runs"
    pattern = f"{command}/*/meta.json" if command else "*/*/meta.json"
    runs = []
    for p in sorted(root.glob(pattern)):
        try:
            runs.append(load_run(p.parent))
        except RunError as err:
            on_skip(f"skipped a run folder: {err}")
    return runs
