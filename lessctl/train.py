"""`lessctl train`'s public names; the code lives in :mod:`lessctl.training`."""

from lessctl.training.checkpoints import checkpoint_dir, load_checkpoint
from lessctl.training.objective import full_attention
from lessctl.training.objective import o_proj as _o_proj
from lessctl.training.objective import rows_mse as _rows_mse
from lessctl.training.runner import run, train_layer
from lessctl.training.sources.shards import LayerData, activations
from lessctl.training.spec import EVAL_ONLY_LESS_KEYS, kernel_config, train_spec
from lessctl.training.spec import select_layers as _layers

__all__ = [
    "EVAL_ONLY_LESS_KEYS",
    "LayerData",
    "activations",
    "checkpoint_dir",
    "full_attention",
    "kernel_config",
    "load_checkpoint",
    "run",
    "train_layer",
    "train_spec",
    "_layers",
    "_o_proj",
    "_rows_mse",
]
