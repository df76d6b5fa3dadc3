"""LESS attention: sparse policy + low-rank state (parallel and recurrent forms) and kernels."""

from lessctl.less.attention import (
    combine,
    combine_log,
    kept_attention,
    low_rank_attention,
    low_rank_attention_log,
    masked_attention,
    parallel_attention,
    sparse_attention,
)
from lessctl.less.kernels import KernelConfig, LayerKernels, LearnedKernels, PerformerKernels
from lessctl.less.state import LowRankState, state_logits_attention, step_attention

__all__ = [
    "KernelConfig",
    "LayerKernels",
    "LearnedKernels",
    "LowRankState",
    "PerformerKernels",
    "combine",
    "combine_log",
    "kept_attention",
    "low_rank_attention",
    "low_rank_attention_log",
    "masked_attention",
    "parallel_attention",
    "sparse_attention",
    "state_logits_attention",
    "step_attention",
]
