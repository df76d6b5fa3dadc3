"""`lessctl eval`: load the model once, build the methods, run the task's protocol, save rows."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lessctl.config import resolve_device, resolve_dtype
from lessctl.errors import LessctlError
from lessctl.methods import build_methods
from lessctl.models import attention_geometry, load_model
from lessctl.runs import Run


def run(cfg: DictConfig, run: Run, log=print) -> list[dict[str, Any]]:
    """Evaluate every method of `eval.methods` on `data`; rows are appended to `run`."""
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    geo = attention_geometry(model)
    max_pos = geo["max_position_embeddings"]
    if cfg.data.kind == "text":
        from lessctl import perplexity

        window = int(cfg.eval.window or max_pos)
        if max_pos and window > max_pos:
            raise LessctlError(f"eval.window={window} exceeds max_position_embeddings={max_pos}")
        methods = build_methods(cfg, geo, window, device, model.dtype)
        if cfg.eval.mode == "parallel":
            stage = perplexity.run
        elif cfg.eval.mode == "streaming":
            from lessctl.streaming import run as stage
        else:
            raise LessctlError(f"eval.mode={cfg.eval.mode!r}; allowed: parallel, streaming")
        rows = stage(cfg, model, tok, methods, log=log)
    else:
        from lessctl import summarize

        prompt_max = int(cfg.eval.max_prompt_tokens or (max_pos - int(cfg.eval.max_new_tokens)))
        methods = build_methods(
            cfg, geo, prompt_max + int(cfg.eval.max_new_tokens), device, model.dtype
        )
        rows = summarize.run(cfg, model, tok, methods, run.path, log=log)
    by_name = {m.name: m.columns() for m in methods}
    rows = [{**r, **by_name.get(r.get("method"), {})} for r in rows]
    run.add_rows(rows)
    return rows
