"""``full``: nothing is ever evicted (``evict_at == S``); ``budget`` is ``None`` (infinite)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lessctl.policies.base import Policy, never_evicted, register


@register
@dataclass(frozen=True)
class Full(Policy):
    """Keep every token; ``budget`` is ``None``."""

    name: ClassVar[str] = "full"
    has_budget: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg, b, total) -> Full:  # type: ignore[override]
        return cls()

    @property
    def budget(self) -> None:  # type: ignore[override]
        return None

    def evict_at(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """q [B,H,S,d], k [B,Hkv,S,d] -> [B,Hkv,S] filled with S."""
        return never_evicted(k)

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        raise RuntimeError("policy 'full' never evicts; a cache must not ask it to")

    def with_extra(self, extra: int) -> Full:
        return self
