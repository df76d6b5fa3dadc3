"""``h2o`` (Heavy-Hitter Oracle): keep the last ``recent`` keys (the current one included) plus
the ``heavy`` keys with the largest accumulated attention; ``budget = heavy + recent``.

Key ``j``'s score at row ``t`` is the sum over rows ``r < t`` of row ``r``'s softmax probability
of ``j`` over row ``r``'s kept set (sparse only, no low-rank state), summed over the KV group's
query heads. At row ``t >= n`` the candidates are ``kept(t-1) + {t}``; the window is keys
``t-recent+1 .. t``; among the other candidates (the heavy set and the key just leaving the
window) the lowest score is evicted (ties: earliest position) and its score is gone forever.

Parallel face: :func:`~lessctl.policies.base.sequential_evict_at` (budget-sized buffer per
(b, h_kv), O(S * n * d), no S x S mask).

The score is H2O's accumulated attention, a sum over rows; kvpress's ``ObservedAttentionPress``
(its H2O-like press) divides each key's sum by the number of rows that saw it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.attn import recent_window_scores
from lessctl.policies.base import Budget, Policy, register
from lessctl.schema import Rule, number


@register
@dataclass(frozen=True)
class H2O(Policy):
    """Heavy hitters + recent window (``heavy, recent >= 0``, ``heavy + recent >= 1``)."""

    heavy: int = 32
    recent: int = 32
    name: ClassVar[str] = "h2o"
    config_keys: ClassVar[Mapping[str, Rule]] = {"heavy_ratio": number(0.0, 1.0)}
    accumulates: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.heavy < 0 or self.recent < 0 or self.heavy + self.recent < 1:
            raise ValueError(f"h2o needs heavy, recent >= 0 and >= 1 in all; got {self}")

    @property
    def budget(self) -> int:  # type: ignore[override]
        return self.heavy + self.recent

    @classmethod
    def _split(cls, cfg: Mapping[str, object], b: Budget) -> tuple[int, int]:
        r = cfg.get("heavy_ratio", 0.5)
        if not isinstance(r, int | float) or not 0.0 <= r <= 1.0:
            raise InputError(f"policy heavy_ratio={r!r} is invalid; allowed: a float in [0, 1]")
        heavy = b.share(r)
        recent = b.total - heavy if isinstance(b.size, int) else b.share(1.0 - r)
        return heavy, recent

    @classmethod
    def budget_tokens(cls, cfg: Mapping[str, object], b: Budget) -> int:
        """Each part resolved separately (``heavy = int(size * heavy_ratio * ref)``, ...)."""
        return sum(cls._split(cfg, b))

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> H2O:
        return cls(*cls._split(cfg, b))

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """Accumulated attention, +inf inside the recent window: [B,Hkv,n+1] -> [B,Hkv,n]."""
        assert acc_scores is not None, "h2o needs acc_scores"
        return recent_window_scores(t, positions, acc_scores, self.recent)

    def with_extra(self, extra: int) -> H2O:
        return H2O(self.heavy + extra // 2, self.recent + extra - extra // 2)
