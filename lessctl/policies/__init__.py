"""Sparse eviction policies (see :mod:`lessctl.policies.base` for the shared semantics).

Registry: ``POLICIES`` (name -> class), ``register`` (class decorator), ``get_policy(name,
**params)``. Config: :func:`build_policy`, :func:`baseline_plus`.
"""

from lessctl.policies.base import (
    POLICIES,
    Policy,
    get_policy,
    group_probs,
    keep_mask,
    register,
    sequential_evict_at,
)
from lessctl.policies.budget import baseline_plus, build_policy, state_tokens
from lessctl.policies.composite import Composite
from lessctl.policies.full import Full
from lessctl.policies.h2o import H2O
from lessctl.policies.lambda_mask import LambdaMask
from lessctl.policies.random_policy import RandomPolicy
from lessctl.policies.recall import Recall
from lessctl.policies.recent import Recent
from lessctl.policies.snapkv import SnapKV
from lessctl.policies.tova import TOVA

__all__ = [
    "Composite",
    "H2O",
    "POLICIES",
    "TOVA",
    "Full",
    "LambdaMask",
    "Policy",
    "RandomPolicy",
    "Recall",
    "Recent",
    "SnapKV",
    "baseline_plus",
    "state_tokens",
    "build_policy",
    "get_policy",
    "group_probs",
    "keep_mask",
    "register",
    "sequential_evict_at",
]
