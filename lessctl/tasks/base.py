"""The task registry: every evaluation task is one module in `lessctl/tasks/` that registers
its `run` under a name, as policies do (lessctl.policies.base).

A task is

- `run(cfg, model, tokenizer, methods, run_dir, log) -> rows`: evaluate every method, write
  per-example files under `run_dir` if it has any, return tidy rows (provenance is added by the
  run folder);
- `context_tokens(cfg, max_position_embeddings) -> int`: the longest sequence the task feeds
  the model (prompt plus generated tokens), which a fractional `policy.budget.of=sequence`
  refers to; it also refuses settings that exceed the model, in one line;
- `keys`: the task's own keys in `conf/task/<name>.yaml` besides `name` (key ->
  `lessctl.schema.Rule`), checked when the config is loaded; the task's code checks what
  depends on several keys or on the model.

`lessctl eval task=<name>` picks a task by its `conf/task/<name>.yaml` (which sets
`task.name` and the task's own keys); without `task`, the data kind decides as before
(text: `perplexity`, or `perplexity_streaming` with `eval.mode=streaming`; summarization:
`summarization`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.schema import Rule

Rows = list[dict[str, Any]]
RunFn = Callable[..., Rows]  # (cfg, model, tokenizer, methods, run_dir, log) -> rows


@dataclass(frozen=True)
class Task:
    name: str
    run: RunFn
    context_tokens: Callable[[DictConfig, int], int]
    keys: Mapping[str, Rule] = field(default_factory=dict)


TASKS: dict[str, Task] = {}


def register(
    name: str,
    context_tokens: Callable[[DictConfig, int], int],
    keys: Mapping[str, Rule] | None = None,
):
    """Decorator: register `run(cfg, model, tokenizer, methods, run_dir, log)` as task `name`
    with its own config `keys` (module doc)."""

    def wrap(fn: RunFn) -> RunFn:
        if name in TASKS and TASKS[name].run is not fn:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = Task(name, fn, context_tokens, dict(keys or {}))
        return fn

    return wrap


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name fails in one line listing the allowed ones."""
    import lessctl.tasks  # noqa: F401  (imports every task module, which registers it)

    if name not in TASKS:
        raise LessctlError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_name(cfg: DictConfig) -> str:
    """The task `cfg` asks for: `task.name`, else by the data kind and `eval.mode`."""
    if cfg.get("task") is not None and cfg.task.get("name"):
        return str(cfg.task.name)
    if cfg.data.kind == "text":
        modes = {"parallel": "perplexity", "streaming": "perplexity_streaming"}
        if cfg.eval.mode not in modes:
            raise LessctlError(f"eval.mode={cfg.eval.mode!r}; allowed: parallel, streaming")
        return modes[cfg.eval.mode]
    return "summarization"
