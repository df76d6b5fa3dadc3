"""The compared methods: one small file per method in this folder, registered by name
(:mod:`lessctl.methods.registry`), and what they share (:mod:`lessctl.methods.base`: the
``Method`` record, the teacher-forced ``ParallelAttention``, LESS checkpoints and
``build_methods``). Importing this package imports every method in it."""

from __future__ import annotations

import importlib
import pkgutil

from lessctl.methods.base import (
    CHECKPOINT_FORMAT,
    KERNEL_KEYS,
    TRAINED_ON_KEYS,
    Checkpoint,
    CheckpointNotFound,
    Method,
    ParallelAttention,
    _same_training,
    build_methods,
    checkpoint_differences,
    find_checkpoint,
    load_less,
    policy_spec,
    trained_on,
)
from lessctl.methods.registry import (
    REGISTRY,
    MethodContext,
    MethodSpec,
    labels,
    method_names,
    register_method,
    specs,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_mod.name}")

METHODS = method_names()  # what eval.methods may list
BENCH_METHODS = method_names(bench=True)  # what bench.methods may list

__all__ = [
    "BENCH_METHODS",
    "CHECKPOINT_FORMAT",
    "KERNEL_KEYS",
    "METHODS",
    "REGISTRY",
    "TRAINED_ON_KEYS",
    "Checkpoint",
    "CheckpointNotFound",
    "Method",
    "MethodContext",
    "MethodSpec",
    "ParallelAttention",
    "_same_training",
    "build_methods",
    "checkpoint_differences",
    "find_checkpoint",
    "labels",
    "load_less",
    "method_names",
    "policy_spec",
    "register_method",
    "specs",
    "trained_on",
]
