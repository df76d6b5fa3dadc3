"""Light kernels: one d x R map per head and a positive feature map, no hidden layer::

    phi(q) = ELU(q Wq) + 1                    Wq [H,d,R]
    psi(k) = |s| * (ELU(k Wk) + 1)            Wk [Hkv,d,R], s [Hkv,R]

ELU + 1 is the linear transformer's feature map (Katharopoulos et al., 2020): positive, linear
for large arguments, never 0. ``s = init_scale`` makes an untrained module ~ the plain sparse
policy, as the paper's kernels do. ``less.hidden`` is unused. A decode step costs one [d,R]
product per head instead of two MLP layers ([d,hid], [hid,R]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lessctl.less.kernels.base import KernelConfig, dropout, register_kernel, uniform


@register_kernel("light")
class LightKernels(nn.Module):
    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        h, hkv, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rank
        self.Wq, self.Wk = uniform(h, d, r), uniform(hkv, d, r)
        self.s = nn.Parameter(torch.full((hkv, r), cfg.init_scale))
        self.p_drop = cfg.dropout

    def _features(self, x: Tensor, w: Tensor) -> Tensor:
        """x [B,h,S,d], w [h,d,R] -> ELU(dropout(x w)) + 1 [B,h,S,R] > 0."""
        pre = dropout(torch.einsum("bhsd,hdr->bhsr", x, w), self.p_drop, self.training)
        return F.elu(pre) + 1.0

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] > 0."""
        return self._features(q, self.Wq)

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R] >= 0."""
        return self.s.abs()[:, None] * self._features(k, self.Wk)
