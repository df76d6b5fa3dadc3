"""Kernel families, one file each, registered by name (``less.kind``): see
:mod:`lessctl.less.kernels.base`. Importing this package imports every family in it."""

from __future__ import annotations

import importlib
import pkgutil

from lessctl.less.kernels.base import (
    KERNELS,
    KernelConfig,
    LayerKernels,
    dropout,
    kernel_config,
    layer_ranks,
    rank_list,
    register_kernel,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

from lessctl.less.kernels.learned import LearnedKernels  # noqa: E402
from lessctl.less.kernels.performer import PerformerKernels  # noqa: E402

__all__ = [
    "KERNELS",
    "KernelConfig",
    "LayerKernels",
    "LearnedKernels",
    "PerformerKernels",
    "dropout",
    "kernel_config",
    "layer_ranks",
    "rank_list",
    "register_kernel",
]
