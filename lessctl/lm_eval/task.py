"""`lessctl eval task=lm_eval`: lm-evaluation-harness tasks for every method of `eval.methods`.

Each method is wrapped as a `LessctlLM` over the one loaded model and evaluated with lm-eval's
`simple_evaluate` on `lm_eval.tasks`; lm-eval's results JSON is kept as
`<run>/lm_eval/<method>.json` (per-example values in `<method>.examples.jsonl`) and its metrics
become tidy rows with standard errors: lm-eval's, or, for the metrics it leaves without one
(word/byte perplexity, bits per byte), a bootstrap over its per-example values (`stderr_by`).
Tasks are lessctl's local ones (`taskdefs/`: `lessctl_wikitext`, `lessctl_mc`), lm-eval's own
(`boolq`, `mutual`, `hellaswag`, ..., data from the hub) or YAMLs under `lm_eval.include_path`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lessctl.atomic import write_json_atomic, write_jsonl_atomic
from lessctl.errors import LessctlError
from lessctl.lm_eval.local_data import SOURCES, TASKDEFS
from lessctl.methods import Method


def task_manager(names: list[str], include_path: str | None = None, metadata: dict | None = None):
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
    meta = dict(metadata or {})
    local = TaskManager(include_path=paths, include_defaults=False, metadata=meta)
    if set(names) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths, metadata=meta)


@contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Put datasets and huggingface_hub in offline mode inside the block when the hub does not
    answer (a copy in the local HF cache still loads; a missing one fails at once instead of
    after minutes of retries)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    from lessctl.models import hub_reachable

    if hub_reachable():
        yield
        return
    old = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = old


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
            with offline_unless_reachable():
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


def fill_stderr(results: dict[str, Any], iters: int, seed: int) -> set[tuple[str, str]]:
    """Bootstrap standard errors (over documents/examples, `iters` resamples) for the metrics
    lm-eval leaves without one (its word/byte perplexity and bits per byte), from its own
    per-example values and aggregation functions; returns the filled (task, metric key)s."""
    from lm_eval.api.registry import get_metric_aggregation

    rng = np.random.default_rng(seed)
    filled = set()
    for task, samples in (results.get("samples") or {}).items():
        metrics = results["results"][task]
        for key in list(metrics):
            name, _, filt = key.partition(",")
            err_key = f"{name}_stderr,{filt}"
            if name.endswith("_stderr") or _number(metrics.get(err_key)) is not None:
                continue
            items = [s[name] for s in samples if name in s and s.get("filter") == filt]
            agg = get_metric_aggregation(name)
            if agg is None or len(items) < 2 or iters < 2:
                continue
            draws = rng.integers(0, len(items), size=(iters, len(items)))
            reps = [agg([items[i] for i in row]) for row in draws]
            metrics[err_key] = float(np.std(reps, ddof=1))
            filled.add((task, err_key))
    return filled


def per_example(results: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's per-example metric values (no document text), one row each."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            vals = {m: s[m] for m in s.get("metrics", []) if m in s}
            key = {"lm_eval_task": task, "doc_id": s["doc_id"], "filter": s["filter"]}
            rows.append({**key, **vals})
    return rows


def result_rows(
    results: dict[str, Any], bootstrapped: set[tuple[str, str]] = frozenset()
) -> list[dict[str, Any]]:
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
            name, comma, filt = key.partition(",")
            if not comma or name.endswith("_stderr") or _number(value) is None:
                continue  # metrics are "name,filter"; `sample_len` etc. are not
            stderr = _number(metrics.get(f"{name}_stderr,{filt}"))
            rows.append(
                {
                    "lm_eval_task": task,
                    "source": source,
                    "metric": name if filt in ("", "none") else f"{name}[{filt}]",
                    "value": float(value),
                    "stderr": stderr if stderr is None or math.isfinite(stderr) else None,
                    "stderr_by": (
                        None
                        if stderr is None
                        else "lessctl bootstrap over examples"
                        if (task, f"{name}_stderr,{filt}") in bootstrapped
                        else "lm-eval"
                    ),
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
    meta = le.get("metadata")
    manager = task_manager(
        names, le.get("include_path"), OmegaConf.to_container(meta) if meta else None
    )
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
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        bootstrapped = fill_stderr(res, int(le.bootstrap_iters), seed)
        write_jsonl_atomic(
            out_dir / f"{m.name}.examples.jsonl",
            json.loads(json.dumps(per_example(res), default=handle_non_serializable)),
        )
        res.pop("samples", None)
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
        for r in result_rows(res, bootstrapped):
            rows.append({**base, "dataset": r["lm_eval_task"], **r})
            err = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
            log(
                f"{r['lm_eval_task']:18s} {m.name:14s} budget={m.policy.budget}  "
                f"{r['metric']:16s} {r['value']:10.4f}{err}"
            )
        log(f"lm_eval {m.name}: {time.perf_counter() - t0:.0f}s")
    return rows
