"""``snapkv`` (Li et al., 2024): at the first eviction, score the keys before the observation
window (the last ``window`` rows) by the attention those rows gave them, pooled over neighbouring
keys; keep the top ``heavy`` of them plus the window's keys and the decoded one; from then on
accumulate attention as H2O does.

Budget ``n = heavy + window + 1``: SnapKV's ``max_capacity_prompt = heavy + window`` plus the
decoded token, which lessctl's budget counts (module doc of :mod:`lessctl.policies.base`).
Let ``o`` be the row of the first eviction (the observation point; ``o >= n``):

- parallel face / streaming cache: ``o = n``, the first row past the budget (the "prompt" is the
  first ``n`` tokens, which every row ``< n`` attends to in full);
- prompt protocol of the cache (a prompt of ``T`` tokens, full causal attention, then the
  excess evicted at the first decoded row): ``o = max(T, n)``.

Scores (default, as SnapKV's ``SnapKVCluster.update_kv``). Rows ``r`` in ``[o - window, o)``
(before ``o`` nothing is evicted, so each attends to every key ``<= r``) add their softmax
probabilities, summed over the KV group's query heads; rows before ``o - window`` add nothing.
After row ``o - 1`` the sums of the prefix keys ``0 .. o - window - 1`` are pooled over the
prefix alone, 1-D with ``kernel`` (odd) and stride 1, zero-padded at both ends (the window's
keys do not enter the pooling): ``avg`` (divided by ``kernel``; SnapKV's default, kvpress) or
``max`` (SnapKV's ``maxpool``). The window's keys keep their plain sums. From row ``o`` on
(decoding), every row adds its probabilities over its kept set, exactly as H2O, and an evicted
key's score is gone forever.

Eviction ("evict, then attend"), at every row ``t >= o``: the ``window`` keys before the new
one and the new one (``t - window .. t``) are kept; among the other candidates the lowest score
goes (ties: earliest position). At ``o`` this keeps the top ``heavy`` prefix keys by pooled
score, the observation window ``o - window .. o - 1`` and the decoded key ``o``: SnapKV's prompt
compression of the first ``o`` tokens. After ``o`` it is H2O(heavy, window + 1) seeded with the
observation scores (SnapKV itself compresses once and lets the cache grow).

``pool_across_window=True``: lessctl's earlier variant. Budget ``n = heavy + window``; the
pooling runs over every key ``0 .. o - 1``, across the window's edge; the kept window is the
last ``window`` keys counting the new one (``t - window + 1 .. t``), so at ``o`` it keeps
``o - window + 1 .. o`` and key ``o - window`` competes by its (pooled) score.

GQA: SnapKV's code selects per query head (it repeats K/V before compressing); lessctl, as
kvpress, keeps one set per KV head from the group's summed scores (with ``max`` pooling the max
of the group's sum, not of each head's).

Both faces share :meth:`SnapKV.accumulate`; the parallel face is
:func:`~lessctl.policies.base.sequential_evict_at` (O(S * n * d)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.attn import recent_window_scores
from lessctl.policies.base import Budget, Policy, config_flag, register
from lessctl.schema import BOOL, Rule, any_of, int_at_least, number, odd_int, one_of

POOLINGS = ("avg", "max")


def pool_by_position(scores: Tensor, positions: Tensor, kernel: int, pooling: str) -> Tensor:
    """Pool ``scores`` over neighbouring key positions (stride 1, ``kernel // 2`` padding).

    scores, positions [B,Hkv,m] -> [B,Hkv,m]. Kept keys must be contiguous in position (true
    before the first eviction); empty slots (position -1, score 0) sort first and act as padding,
    as do slots whose score was zeroed (the window's keys, for the prefix-only pooling; scores
    are >= 0, so zeros pad ``max`` as -inf does).
    """
    order = positions.argsort(dim=-1, stable=True)
    s = scores.gather(-1, order)
    flat = s.reshape(-1, 1, s.shape[-1])
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel, 1, kernel // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(flat, kernel, 1, kernel // 2)
    return torch.empty_like(scores).scatter_(-1, order, pooled.view_as(s))


@register
@dataclass(frozen=True)
class SnapKV(Policy):
    """Observation-window scores, pooled, then H2O-style accumulation (module doc).

    ``heavy >= 0`` keys kept by score, ``window >= 1`` observation rows / window keys,
    ``kernel`` odd >= 1, ``pooling`` in ``avg``, ``max``; ``pool_across_window``: lessctl's
    earlier variant (module doc).
    """

    config_keys: ClassVar[Mapping[str, Rule]] = {
        "window": any_of(int_at_least(1), number(0.0, 1.0, lo_open=True, hi_open=True)),
        "kernel": odd_int(),
        "pooling": one_of(*POOLINGS),
        "pool_across_window": BOOL,
    }
    heavy: int = 32
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    pool_across_window: bool = False
    name: ClassVar[str] = "snapkv"
    accumulates: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> SnapKV:
        """``window`` tokens of the budget for the window, one for the decoded token (unless
        ``pool_across_window``), the rest kept by score."""
        across = config_flag(cfg, "pool_across_window")
        top = total if across else total - 1  # the most window tokens the budget holds
        w = cfg.get("window", 0.5)
        ok_int = isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= top
        if not (ok_int or (isinstance(w, float) and 0.0 < w < 1.0)):
            why = "" if across else " (the decoded token takes one token of the budget)"
            raise InputError(
                f"policy window={w!r} is invalid for a budget of {total} tokens; allowed: an int "
                f"in [1, {top}] (tokens of the budget{why}) or a float in (0, 1) (share of the "
                "budget)"
            )
        if isinstance(w, float):
            w = max(1, int(w * total))
            if w > top:
                raise InputError(
                    f"policy budget of {total} token(s) leaves no room for snapkv's window "
                    "beside the decoded token; allowed: a budget of >= 2 tokens, or "
                    "pool_across_window=true"
                )
        return cls(
            heavy=top - w,  # type: ignore[operator]
            window=w,  # type: ignore[arg-type]
            kernel=cfg.get("kernel", 5),  # type: ignore[arg-type]
            pooling=cfg.get("pooling", "avg"),  # type: ignore[arg-type]
            pool_across_window=across,
        )

    def __post_init__(self) -> None:
        if self.heavy < 0 or self.window < 1:
            raise InputError(f"snapkv needs heavy >= 0 and window >= 1; got {self}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise InputError(f"snapkv kernel={self.kernel!r} is invalid; allowed: an odd int >= 1")
        if self.pooling not in POOLINGS:
            raise InputError(
                f"snapkv pooling={self.pooling!r} is invalid; allowed: {', '.join(POOLINGS)}"
            )
        if not isinstance(self.pool_across_window, bool):
            raise InputError(
                f"snapkv pool_across_window={self.pool_across_window!r} is invalid; "
                "allowed: true or false"
            )

    @property
    def recent(self) -> int:
        """Keys kept as the window at every row, the new one included."""
        return self.window if self.pool_across_window else self.window + 1

    @property
    def budget(self) -> int:  # type: ignore[override]
        return self.heavy + self.recent

    def row_weights(self, rows: Tensor, first_evict: Tensor) -> Tensor:
        """1 for the observation rows (the ``window`` rows before ``first_evict``) and every
        row after them, 0 before: rows [B,R], first_evict [B] -> [B,R]."""
        return (rows >= first_evict[:, None] - self.window).float()

    def add_sums(
        self, acc: Tensor, sums: Tensor, rows: Tensor, positions: Tensor, first_evict: Tensor
    ) -> Tensor:
        """Add the observation rows' sums; after row ``o - 1`` pool (module doc).

        acc, sums [B,Hkv,m], rows [B,R], positions [B,Hkv,m], first_evict [B] -> [B,Hkv,m].
        No host sync: the pooled scores are selected with ``where``.
        """
        o = first_evict[:, None]
        acc = acc + sums
        closes = (rows == o - 1).any(-1)[:, None, None]  # [B,1,1]: row o - 1 is in this call
        if self.pool_across_window:
            pooled = pool_by_position(acc, positions, self.kernel, self.pooling)
        else:  # the prefix alone: the window's keys are padding and keep their sums
            window = positions >= (o - self.window)[:, :, None]
            prefix = acc.masked_fill(window, 0.0)
            pooled = pool_by_position(prefix, positions, self.kernel, self.pooling)
            pooled = torch.where(window, acc, pooled)
        return torch.where(closes, pooled, acc)

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """Accumulated (pooled-seeded) scores, +inf in the window: [B,Hkv,n+1] -> [B,Hkv,n]."""
        assert acc_scores is not None, "snapkv needs acc_scores"
        return recent_window_scores(t, positions, acc_scores, self.recent)

    def with_extra(self, extra: int) -> SnapKV:
        """Baseline+: the extra tokens are kept by score (the window is a method setting)."""
        return self.replace(heavy=self.heavy + extra)  # type: ignore[return-value]
