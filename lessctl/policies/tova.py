"""``tova`` (Token Omission Via Attention): at row ``t >= n`` evict, among ``kept(t-1)`` (never
the new key ``t``), the key with the lowest attention probability from the current query
``q_t`` over the candidates ``kept(t-1) + {t}``, summed over the KV group's query heads.

Parallel face: :func:`~lessctl.policies.base.sequential_evict_at` (O(S * n * d)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lessctl.policies.base import Policy, register


@register
@dataclass(frozen=True)
class TOVA(Policy):
    """Keep the ``budget`` keys the current query attends to most."""

    budget: int = 64  # type: ignore[misc]
    name: ClassVar[str] = "tova"
    needs_probs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"tova needs budget >= 1, got {self.budget}")

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """The current query's probability of each old candidate: [B,Hkv,n+1] -> [B,Hkv,n]."""
        assert probs_now is not None, "tova needs probs_now"
        return probs_now[..., :-1]

    def with_extra(self, extra: int) -> TOVA:
        return TOVA(self.budget + extra)
