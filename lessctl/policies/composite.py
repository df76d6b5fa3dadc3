"""``composite``: a union of parts, each with its share of the budget, and a score ensemble for
the part chosen by score (the method's open problem of composite sparse policies)::

    kept = the first ``sink`` keys  ∪  the last ``recent`` keys (the current one included)
         ∪  the ``heavy`` others that score highest,   budget = sink + heavy + recent
    score(j) = w_h2o · acc(j) / Σ acc  +  w_tova · p_t(j) / Σ p_t

``acc``: H2O's accumulated attention (summed over the KV group's query heads, every row that saw
the key); ``p_t``: the current row's attention over the candidates (TOVA's score, per KV head);
each normalised over the old candidates so that the weights compare like with like. At row
``t >= n`` the lowest-scoring candidate outside the sinks and the window is evicted (ties: the
earliest position), as every policy here evicts one key per row.

Special cases, held by tests: ``w_h2o = 1, w_tova = 0, sink = 0`` is ``h2o(heavy, recent)``;
``w_tova = 1, w_h2o = 0, sink = 0, recent = 1`` is ``tova(budget, per_head=true)``; both weights
0 is ``lambda(sink, heavy + recent)`` (the earliest non-sink leaves first).

Parallel face: :func:`~lessctl.policies.base.sequential_evict_at` (it computes both scores
whatever the weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.base import Budget, Policy, register
from lessctl.schema import Rule, int_at_least, number

TINY = 1e-30  # a sum of scores that is 0 (no row attended yet) divides nothing


@register
@dataclass(frozen=True)
class Composite(Policy):
    """Sinks + recent window + heavy keys by a weighted ensemble of H2O's and TOVA's scores."""

    sink: int = 4
    heavy: int = 30
    recent: int = 30
    w_h2o: float = 1.0
    w_tova: float = 1.0
    name: ClassVar[str] = "composite"
    config_keys: ClassVar[Mapping[str, Rule]] = {
        "sink": int_at_least(0),
        "recent_ratio": number(0.0, 1.0),
        "weights.h2o": number(0.0),
        "weights.tova": number(0.0),
    }
    accumulates: ClassVar[bool] = True
    needs_probs: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> Composite:
        """sink, then ``recent = max(1, int((total - sink) * recent_ratio))``, the rest heavy;
        ``weights``: {h2o, tova} (numbers >= 0)."""
        sink, ratio = cfg.get("sink", 4), cfg.get("recent_ratio", 0.5)
        if not isinstance(sink, int) or not 0 <= sink < total:
            raise InputError(f"policy sink={sink!r} is invalid; allowed: an int in [0, {total})")
        if not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            raise InputError(
                f"policy recent_ratio={ratio!r} is invalid; allowed: a number in [0, 1]"
            )
        recent = max(1, int((total - sink) * ratio))
        w = dict(cfg.get("weights") or {})  # type: ignore[call-overload]
        for key in w:
            if key not in ("h2o", "tova"):
                raise InputError(f"policy weights.{key} is not a score; allowed: h2o, tova")
        return cls(
            sink=sink,
            heavy=total - sink - recent,
            recent=recent,
            w_h2o=float(w.get("h2o", 1.0)),
            w_tova=float(w.get("tova", 1.0)),
        )

    def __post_init__(self) -> None:
        if self.sink < 0 or self.heavy < 0 or self.recent < 1:
            raise ValueError(f"composite needs sink, heavy >= 0 and recent >= 1; got {self}")
        if self.w_h2o < 0 or self.w_tova < 0:
            raise ValueError(f"composite needs weights >= 0; got {self}")

    @property
    def budget(self) -> int:  # type: ignore[override]
        return self.sink + self.heavy + self.recent

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """The ensemble score, +inf for sinks and the window: [B,Hkv,n+1] -> [B,Hkv,n]."""
        assert acc_scores is not None and probs_now is not None, "composite needs both scores"
        old = positions[..., :-1]
        acc, now = acc_scores[..., :-1], probs_now[..., :-1]
        score = self.w_h2o * acc / acc.sum(-1, keepdim=True).clamp_min(TINY)
        score = score + self.w_tova * now / now.sum(-1, keepdim=True).clamp_min(TINY)
        protected = (old < self.sink) | (old > t - self.recent)
        return score.masked_fill(protected, torch.inf)

    def with_extra(self, extra: int) -> Composite:
        """Baseline+: the extra tokens go to the part chosen by score."""
        return self.replace(heavy=self.heavy + extra)
