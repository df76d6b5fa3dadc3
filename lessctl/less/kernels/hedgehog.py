"""Hedgehog-style kernels (Zhang et al., 2024): a softmax feature map over learned projections::

    phi(q) = [ softmax(q Wq), softmax(-q Wq) ]              Wq [H,d,R/2]
    psi(k) = |s| * [ softmax(k Wk), softmax(-k Wk) ]        Wk [Hkv,d,R/2], s [Hkv,R]

The softmax over the projections gives spiky, positive, bounded features (Hedgehog's argument:
they mimic softmax attention's low entropy and monotonicity where ELU-style maps do not); the
two signs keep the map from ignoring negative projections. ``less.rank`` must be even
(each layer's, for a per-layer list).
``s = init_scale`` makes an untrained module ~ the plain sparse policy. ``less.hidden`` is unused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lessctl.less.kernels.base import KernelConfig, dropout, rank_list, register_kernel, uniform


@register_kernel("hedgehog")
class HedgehogKernels(nn.Module):
    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        problem = self.config_problem(cfg)
        if problem:
            raise ValueError(problem)
        h, hkv, d, half = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rank // 2
        self.Wq, self.Wk = uniform(h, d, half), uniform(hkv, d, half)
        self.s = nn.Parameter(torch.full((hkv, cfg.rank), cfg.init_scale))
        self.p_drop = cfg.dropout

    @classmethod
    def config_problem(cls, cfg) -> str | None:
        """less.rank must be even (R/2 projections, each with both signs), every layer's entry
        of a per-layer list too."""
        ranks = rank_list(cfg.rank)
        odd = [r for r in ranks or [int(cfg.rank)] if r % 2]
        if not odd:
            return None
        shown = int(cfg.rank) if ranks is None else ranks
        return f"less.rank={shown} with less.kind=hedgehog; allowed: even (every layer's rank)"

    def _features(self, x: Tensor, w: Tensor) -> Tensor:
        """x [B,h,S,d], w [h,d,R/2] -> [softmax(x w), softmax(-x w)] [B,h,S,R] > 0."""
        proj = dropout(torch.einsum("bhsd,hdr->bhsr", x, w), self.p_drop, self.training)
        return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] > 0."""
        return self._features(q, self.Wq)

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R] >= 0."""
        return self.s.abs()[:, None] * self._features(k, self.Wk)
