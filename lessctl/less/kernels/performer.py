"""Performer kernels (positive random features, no training; the paper's ablation)::

    phi(x) = psi(x) = exp(x w d^-1/4 - |x|^2 / (2 sqrt d)) / sqrt(R)

with a seeded Gaussian ``w [Hkv,d,R]`` per KV head shared by its group, so that
``phi(q) . psi(k) ~ exp(q . k / sqrt d)`` in expectation. The exponent is its log feature
(``log_phi``/``log_psi``, no exp): for real models' |q|, |k| (tens) exp overflows or
underflows fp32, so the Performer attends through the log-feature path
(:attr:`lessctl.less.kernels.LayerKernels.log_features`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lessctl.less.kernels.base import KernelConfig, register_kernel


@register_kernel("performer")
class PerformerKernels(nn.Module):
    """Positive random features approximating exp(q . k / sqrt d); nothing to train."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.num_kv_heads, cfg.head_dim, cfg.rank, generator=gen)
        self.register_buffer("omega", w)
        self.group = cfg.num_heads // cfg.num_kv_heads

    def _log_features(self, x: Tensor, omega: Tensor) -> Tensor:
        """x [B,h,S,d], omega [h,d,R] -> log features [B,h,S,R] (finite for any finite x)."""
        d, r = x.shape[-1], omega.shape[-1]
        x = x * d**-0.25
        proj = torch.einsum("bhsd,hdr->bhsr", x, omega)
        return proj - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(r)

    def log_phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> log phi [B,H,S,R] (head h uses KV head h // g's features)."""
        return self._log_features(q, self.omega.repeat_interleave(self.group, 0))

    def log_psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> log psi [B,Hkv,S,R]."""
        return self._log_features(k, self.omega)

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] (exp of :meth:`log_phi`: over/underflows for large |q|)."""
        return torch.exp(self.log_phi(q))

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R]."""
        return torch.exp(self.log_psi(k))
