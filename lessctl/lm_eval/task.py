"""`lessctl eval task=lm_eval`: lm-evaluation-harness tasks for every method of `eval.methods`.

Each method is wrapped as a `LessctlLM` over the one loaded model and evaluated with lm-eval's
`simple_evaluate` on `lm_eval.tasks`; lm-eval's results JSON is kept as
`<run>/lm_eval/<method>.json` and its metrics (with lm-eval's standard errors) become tidy rows.
Tasks are lessctl's local ones (`taskdefs/`: `lessctl_wikitext`, `lessctl_mc`), lm-eval's own
(`boolq`, `mutual`, `hellaswag`, ..., data from the hub) or YAMLs under `lm_eval.include_path`.
"""

from __future__ import annotations

import json
import math
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lessctl.atomic import write_json_atomic
from lessctl.errors import LessctlError
from lessctl.lm_eval.local_data import SOURCES, TASKDEFS
from lessctl.methods import Method


def task_manager(names: list[str], include_path: str | None = None):
    """lm-eval's TaskManager over lessctl's `taskdefs/` and `include_path`, plus lm-eval's own
    task folder unless every name is found in those (indexing lm-eval's ~15k task YAMLs takes
    a minute on 2 cores)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKDEFS)]
    if include_path:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise LessctlError(f"lm_eval.include_path={include_path!r} is not a folder")
        paths.append(str(p))
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(names) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths)


def load_tasks(names: list[str], manager) -> None:
    """Refuse unknown task names and tasks whose data cannot be loaded, one line each."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise LessctlError(
                f"unknown lm_eval task {name!r}; list them with `python -m lessctl.lm_eval ls "
                f"tasks`, or put its YAML in a folder and pass lm_eval.include_path=DIR"
            )
        try:
            manager.load([name])
        except LessctlError:
            raise
        except Exception as err:  # datasets raises many kinds (connection, offline, missing)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LessctlError(
                f"lm_eval task {name!r}: its data cannot be loaded ({type(err).__name__}: "
                f"{first[:200]}); with no hub access, copy the dataset into the HF datasets "
                f"cache elsewhere and set HF_DATASETS_OFFLINE=1, or copy the task's YAML with "
                f"dataset_path pointing at a local copy and pass lm_eval.include_path=DIR"
            ) from None


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's `results` section -> rows of (lm_eval_task, metric, value, stderr, n)."""
    rows = []
    for task, metrics in results["results"].items():
        cfg = results.get("configs", {}).get(task, {})
        hub = cfg.get("dataset_path")
        source = SOURCES.get(task) or (
            f"hub:{hub}" + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
        )
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or _number(value) is None:
                continue
            stderr = _number(metrics.get(f"{name}_stderr,{filt}"))
            rows.append(
                {
                    "lm_eval_task": task,
                    "source": source,
                    "metric": name if filt in ("", "none") else f"{name}[{filt}]",
                    "value": float(value),
                    "stderr": stderr if stderr is None or math.isfinite(stderr) else None,
                    "n": n,
                    "num_fewshot": results.get("n-shot", {}).get(task),
                }
            )
    return rows


def run(
    cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print
) -> list[dict[str, Any]]:
    """Rows of every lm-eval metric of every task in `lm_eval.tasks`, per method."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from lessctl.lm_eval.model import LessctlLM

    le = cfg.lm_eval
    names = list(le.tasks)
    if not names:
        raise LessctlError("lm_eval.tasks is empty; e.g. lm_eval.tasks=[lessctl_wikitext]")
    manager = task_manager(names, le.get("include_path"))
    load_tasks(names, manager)
    window = int(cfg.eval.window or model.config.max_position_embeddings)
    out_dir = Path(run_dir) / "lm_eval"
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        lm = LessctlLM(
            pretrained=model,
            tokenizer=tokenizer,
            method=m,
            max_length=window,
            batch_size=int(le.batch_size),
        )
        seed = int(cfg.seed)
        res = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=le.get("num_fewshot"),
            limit=le.get("limit"),
            bootstrap_iters=int(le.bootstrap_iters),
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        write_json_atomic(
            out_dir / f"{m.name}.json", json.loads(json.dumps(res, default=handle_non_serializable))
        )
        base = {
            "task": "lm_eval",
            "model": cfg.model.name,
            "method": m.name,
            "policy": cfg.policy.name,
            "budget": m.policy.budget,
            "window": window,
            "checkpoint": m.checkpoint,
            "limit": le.get("limit"),
            "v_lm_eval": version("lm_eval"),
        }
        for r in result_rows(res):
            rows.append({**base, "dataset": r["lm_eval_task"], **r})
            err = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
            log(
                f"{r['lm_eval_task']:18s} {m.name:14s} budget={m.policy.budget}  "
                f"{r['metric']:16s} {r['value']:10.4f}{err}"
            )
        log(f"lm_eval {m.name}: {time.perf_counter() - t0:.0f}s")
    return rows
