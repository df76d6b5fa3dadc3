"""`lessctl eval`: load the model once, build the methods, run the chosen task, save rows.

The task comes from the registry (lessctl.tasks): `task=<name>` (conf/task/<name>.yaml), or,
without one, the data kind (text: perplexity, summarization: ROUGE).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lessctl.config import resolve_device, resolve_dtype
from lessctl.methods import build_methods
from lessctl.models import attention_geometry, load_model
from lessctl.runs import Run
from lessctl.tasks import get_task, task_name


def run(cfg: DictConfig, run: Run, log=print) -> list[dict[str, Any]]:
    """Evaluate every method of `eval.methods` on the task; rows are appended to `run`."""
    task = get_task(task_name(cfg))  # an unknown name fails before the model loads
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    geo = attention_geometry(model)
    seq_len = task.context_tokens(cfg, geo["max_position_embeddings"])
    methods = build_methods(cfg, geo, seq_len, device, model.dtype)
    rows = task.run(cfg, model, tok, methods, run.path, log=log)
    by_name = {m.name: m.columns() for m in methods}
    rows = [{**r, **by_name.get(r.get("method"), {})} for r in rows]
    run.add_rows(rows)
    return rows
