"""``recent``: sliding window of the last ``budget`` tokens (the current one included).

Closed form: ``evict_at[j] = min(j + budget, S)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lessctl.policies.base import Policy, register
from lessctl.policies.lambda_mask import window_evict_at, window_scores


@register
@dataclass(frozen=True)
class Recent(Policy):
    """Keep the last ``budget`` tokens."""

    budget: int = 64  # type: ignore[misc]
    name: ClassVar[str] = "recent"

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"recent needs budget >= 1, got {self.budget}")

    def evict_at(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S] (closed form)."""
        return window_evict_at(k, 0, self.budget)

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        return window_scores(positions, 0)

    def with_extra(self, extra: int) -> Recent:
        return Recent(self.budget + extra)
