"""``tova`` (Token Omission Via Attention, Oren et al., 2024): at row ``t >= n`` evict, among
``kept(t-1)`` (never the new key ``t``), the key with the lowest attention probability from the
current query ``q_t`` over the candidates ``kept(t-1) + {t}``.

Aggregation (default): the probabilities are averaged over all query heads of the layer and one
key is evicted for the whole layer, so every KV head keeps the same set. This follows TOVA's
authors' code (``TOVACache.reduce`` in schwartz-lab-NLP/TOVA: the mean over heads of the last
row's attention, then one top-k shared by all KV heads), as kvpress's ``TOVAPress`` does.
``per_head=True``: lessctl's earlier variant, one choice per KV head from the probabilities
summed over its group's query heads.

Deviations from the authors' code: the new key is never evicted at its own row (as kvpress;
TOVA's top-k may drop it at once), and lessctl's budget counts the decoded token ("evict, then
attend": row ``t`` attends over ``n`` keys, TOVA's over its ``n`` cached ones plus itself before
it drops one), so the kept sets after each row agree for TOVA's ``cache_size = n``.

The layer-wide choice sums ``probs_now`` over the KV heads slot by slot: a cache must hold the
same position in the same slot on every KV head, which every cache here does (all heads start
alike and take the same decisions; tests check the kept sets across heads).

Parallel face: :func:`~lessctl.policies.base.sequential_evict_at` (O(S * n * d)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.base import Budget, Policy, config_flag, register
from lessctl.schema import BOOL, Rule


@register
@dataclass(frozen=True)
class TOVA(Policy):
    """Keep the ``budget`` keys the current query attends to most (module doc)."""

    budget: int = 64  # type: ignore[misc]
    config_keys: ClassVar[Mapping[str, Rule]] = {"per_head": BOOL}
    per_head: bool = False
    name: ClassVar[str] = "tova"
    needs_probs: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> TOVA:
        return cls(budget=total, per_head=config_flag(cfg, "per_head"))

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"tova needs budget >= 1, got {self.budget}")
        if not isinstance(self.per_head, bool):
            raise InputError(f"tova per_head={self.per_head!r} is invalid; allowed: true or false")

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """The current query's probability of each old candidate, summed over all the layer's
        query heads (``per_head``: over the KV group's): [B,Hkv,n+1] -> [B,Hkv,n]."""
        assert probs_now is not None, "tova needs probs_now"
        old = probs_now[..., :-1]
        return old if self.per_head else old.sum(1, keepdim=True).expand_as(old)

    def with_extra(self, extra: int) -> TOVA:
        return self.replace(budget=self.budget + extra)  # type: ignore[return-value]
