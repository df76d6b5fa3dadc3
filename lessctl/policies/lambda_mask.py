"""``lambda`` (Λ-masking, StreamingLLM / LM-Infinite): keep the first ``sink`` tokens and the
last ``recent`` tokens (the current one included); ``budget = sink + recent``.

Closed form: ``evict_at[j] = S`` for ``j < sink``, else ``min(j + recent, S)``: at row ``t >= n``
the key ``t - recent`` leaves the window.

Against StreamingLLM's code (and kvpress's ``StreamingLLMPress``): the budget counts the decoded
token (row ``t`` attends over ``n`` keys; StreamingLLM's over its ``sink + recent`` cached ones
plus the new one), so ``lambda`` is StreamingLLM with one recent token less; and every key keeps
its own position (StreamingLLM re-positions the keys inside its cache).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.base import Budget, Policy, register
from lessctl.schema import Rule, int_at_least


def window_evict_at(k: Tensor, sink: int, recent: int) -> Tensor:
    """Sink + sliding window decision: k [B,Hkv,S,d] -> evict_at [B,Hkv,S] long."""
    b, hkv, s = k.shape[:3]
    j = torch.arange(s, device=k.device)
    e = torch.where(j < sink, s, (j + recent).clamp(max=s))
    return e.expand(b, hkv, s).contiguous()


def window_scores(positions: Tensor, sink: int) -> Tensor:
    """+inf for sink tokens, 0 otherwise (ties go to the earliest, so the oldest non-sink
    leaves first): positions [B,Hkv,n+1] -> [B,Hkv,n]."""
    old = positions[..., :-1]
    return torch.where(old < sink, torch.inf, 0.0)


@register
@dataclass(frozen=True)
class LambdaMask(Policy):
    """Keep ``sink`` first tokens + ``recent`` last tokens (``recent >= 1``)."""

    sink: int = 4
    recent: int = 64
    name: ClassVar[str] = "lambda"
    config_keys: ClassVar[Mapping[str, Rule]] = {"sink": int_at_least(0)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> LambdaMask:
        sink = cfg.get("sink", 4)
        if not isinstance(sink, int) or not 0 <= sink < total:
            raise InputError(f"policy sink={sink!r} is invalid; allowed: an int in [0, {total})")
        return cls(sink=sink, recent=total - sink)

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"lambda needs sink >= 0 and recent >= 1; got {self}")

    @property
    def budget(self) -> int:  # type: ignore[override]
        return self.sink + self.recent

    def evict_at(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S] (closed form)."""
        return window_evict_at(k, self.sink, self.recent)

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        return window_scores(positions, self.sink)

    def select_evict(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """The earliest non-sink old candidate (the arg-min of :meth:`eviction_scores`, ties to
        the earliest position) in three operations: [B,Hkv,n+1] -> [B,Hkv]."""
        old = positions[..., :-1]
        return torch.where(old < self.sink, torch.iinfo(old.dtype).max, old).argmin(-1)

    def with_extra(self, extra: int) -> LambdaMask:
        return LambdaMask(self.sink, self.recent + extra)
