"""`lessctl eval task=lm_eval`: lm-evaluation-harness tasks (the backend is `lessctl.lm_eval`,
imported only when the task runs: lm-eval is slow to import)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lessctl.tasks.base import register
from lessctl.tasks.perplexity import window_tokens


@register("lm_eval", context_tokens=window_tokens)
def run(cfg: DictConfig, model, tokenizer, methods, run_dir, log=print) -> list[dict[str, Any]]:
    """lm-eval's tasks of `lm_eval.tasks` for every method, windows of `eval.window` tokens."""
    from lessctl.lm_eval.task import run as lm_eval_run

    return lm_eval_run(cfg, model, tokenizer, methods, run_dir, log=log)
