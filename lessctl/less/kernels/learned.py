"""The paper's kernels: two-layer GELU MLPs, no biases, batched per head with einsum::

    phi(q)  = | GELU( GELU( q W1q ) W2q ) |                  W1q [H,d,hid], W2q [H,hid,R]
    psi0(k) = |s1| * GELU( GELU( k W1k ) W2k )               W1k [Hkv,d,hid], W2k [Hkv,hid,R]
    psi(k)  = | psi0 + (psi0 W_int) * s2 |                   W_int [Hkv,R,R], s1, s2 [Hkv,R]

Dropout on the first layer's pre-activation (training only); weights uniform
+-sqrt(6 / (fan_in + fan_out)); s1 = s2 = ``init_scale`` so an untrained module makes LESS ~ the
plain sparse policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lessctl.less.kernels.base import KernelConfig, dropout, register_kernel, uniform


@register_kernel("learned")
class LearnedKernels(nn.Module):
    """The paper's two-layer GELU kernels."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        h, hkv, d, hid, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden, cfg.rank
        self.W1q, self.W2q = uniform(h, d, hid), uniform(h, hid, r)
        self.W1k, self.W2k = uniform(hkv, d, hid), uniform(hkv, hid, r)
        self.W_int = uniform(hkv, r, r)
        self.s1 = nn.Parameter(torch.full((hkv, r), cfg.init_scale))
        self.s2 = nn.Parameter(torch.full((hkv, r), cfg.init_scale))
        self.p_drop = cfg.dropout

    def _mlp(self, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """x [B,h,S,d] -> GELU(GELU(dropout(x W1)) W2) [B,h,S,R]."""
        x = F.gelu(dropout(torch.einsum("bhsd,hdk->bhsk", x, w1), self.p_drop, self.training))
        return F.gelu(torch.einsum("bhsk,hkr->bhsr", x, w2))

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] >= 0."""
        return self._mlp(q, self.W1q, self.W2q).abs()

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R] >= 0."""
        p0 = self.s1.abs()[:, None] * self._mlp(k, self.W1k, self.W2k)
        return (p0 + torch.einsum("bhsr,hrt->bhst", p0, self.W_int) * self.s2[:, None]).abs()

    def fold(self) -> dict[str, Tensor]:
        """The decode-time form (lessctl.less.frozen): fp32 MLP weights and psi's constant
        factors folded into ``m = diag|s1| (I + W_int diag s2)`` [Hkv,R,R], so that
        ``psi(k) = | GELU(GELU(k W1k) W2k) m |``."""
        with torch.no_grad():
            eye = torch.eye(self.W_int.shape[-1], device=self.W_int.device)
            s1, s2 = self.s1.detach().float().abs(), self.s2.detach().float()
            m = s1[:, :, None] * (eye + self.W_int.detach().float() * s2[:, None, :])
            return {
                "w1q": self.W1q.detach().float(),
                "w2q": self.W2q.detach().float(),
                "w1k": self.W1k.detach().float(),
                "w2k": self.W2k.detach().float(),
                "m": m,
            }
