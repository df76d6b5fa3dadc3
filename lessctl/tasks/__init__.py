"""Evaluation tasks, one module each, registered by name (see lessctl.tasks.base).

Importing this package imports every module in it, so a new task is one new file here (with
`@register`) plus one `conf/task/<name>.yaml`.
"""

from __future__ import annotations

import importlib
import pkgutil

from lessctl.tasks.base import TASKS, Task, get_task, register, task_name

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["TASKS", "Task", "get_task", "register", "task_name"]
