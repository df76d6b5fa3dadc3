"""``random``: a seeded lower bound. At row ``t >= n`` evict, among ``kept(t-1)``, the key with
the lowest priority ``u(seed, h_kv, j)``: a deterministic 32-bit integer hash of (seed, KV head,
position), so the online and parallel faces agree without knowing S in advance (ties: earliest
position; the batch index does not enter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lessctl.policies.base import Budget, Policy, register
from lessctl.schema import Rule, int_at_least

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash (C. Wellons) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def priority(seed: int, positions: Tensor) -> Tensor:
    """u(seed, h_kv, j): positions [B,Hkv,m] long -> int64 priorities in [0, 2**32)."""
    h = torch.arange(positions.shape[1], device=positions.device).view(1, -1, 1)
    x = hash32(torch.full_like(h, seed & _M32))
    x = hash32((x + h) & _M32)
    return hash32((x + positions) & _M32)


@register
@dataclass(frozen=True)
class RandomPolicy(Policy):
    """Evict a seeded pseudo-random old key at every row past the budget."""

    budget: int = 64  # type: ignore[misc]
    seed: int = 0
    name: ClassVar[str] = "random"
    config_keys: ClassVar[Mapping[str, Rule]] = {"seed": int_at_least(0)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> RandomPolicy:
        return cls(budget=total, seed=int(cfg.get("seed", 0)))  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"random needs budget >= 1, got {self.budget}")

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """Seeded pseudo-random priority of each old candidate: [B,Hkv,n+1] -> [B,Hkv,n]."""
        return priority(self.seed, positions[..., :-1])

    def with_extra(self, extra: int) -> RandomPolicy:
        return RandomPolicy(self.budget + extra, self.seed)
