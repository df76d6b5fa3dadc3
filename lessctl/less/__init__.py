"""LESS attention: sparse policy + low-rank state (parallel and recurrent forms) and kernels."""

from lessctl.less.attention import (
    combine,
    kept_attention,
    low_rank_attention,
    masked_attention,
    parallel_attention,
    sparse_attention,
)
from lessctl.less.kernels import KernelConfig, LayerKernels, LearnedKernels, PerformerKernels
from lessctl.less.state import LowRankState, step_attention

__all__ = [
    "KernelConfig",
    "LayerKernels",
    "LearnedKernels",
    "LowRankState",
    "PerformerKernels",
    "combine",
    "kept_attention",
    "low_rank_attention",
    "masked_attention",
    "parallel_attention",
    "sparse_attention",
    "step_attention",
]
