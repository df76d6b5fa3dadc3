"""Evaluation-time phi/psi: a trained :class:`~lessctl.less.kernels.LayerKernels` with its weights
laid out for batched matrix products and psi's constant factors folded (decode steps call these
once per layer and token, where einsum's planning and six small ops per feature map cost more
than the arithmetic).

For learned kernels ``psi(k) = | psi0 + (psi0 W_int) * s2 |`` with ``psi0 = |s1| * m(k)`` is
``| m(k) M |`` with ``M = diag|s1| (I + W_int diag s2)`` ``[Hkv,R,R]``, computed once. Both maps
are evaluated without dropout, in fp32, whatever the activations' dtype.

On CPU the exact GELU of a few rows is computed by ATen's own kernel rather than oneDNN's,
whose per-call setup costs ~15 µs against ~3 µs for the arithmetic on a decode step's
``[H, 1, hidden]``; from ~8k elements on (a batch of 64 rows) oneDNN's faster loop wins
(:func:`mlp`). The values agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.less.kernels import LayerKernels

_NATIVE_GELU_MAX = 8192  # elements: below, oneDNN's setup costs more than ATen's slower loop


def mlp(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """GELU(GELU(x w1) w2): x [h,N,d], w1 [h,d,hidden], w2 [h,hidden,R] -> [h,N,R]; on CPU in
    eager mode, for a decode step's few rows, with ATen's exact GELU rather than oneDNN's
    (module doc)."""
    small = x.shape[0] * x.shape[1] * w1.shape[-1] <= _NATIVE_GELU_MAX
    if x.device.type != "cpu" or not small or torch.compiler.is_compiling():
        return F.gelu(torch.bmm(F.gelu(torch.bmm(x, w1)), w2))
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.gelu(torch.bmm(F.gelu(torch.bmm(x, w1)), w2))
    finally:
        torch._C._set_mkldnn_enabled(was)


def _heads_first(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """x [B,h,S,d] -> ([h, B*S, d] fp32, (B, S))."""
    b, h, s, d = x.shape
    return x.float().transpose(0, 1).reshape(h, b * s, d), (b, s)


def _heads_back(y: Tensor, bs: tuple[int, int]) -> Tensor:
    """[h, B*S, R] -> [B,h,S,R]."""
    return y.view(y.shape[0], bs[0], bs[1], y.shape[-1]).transpose(0, 1)


class FrozenKernels:
    """``log_phi(q)`` [B,H,S,d] -> [B,H,S,R] and ``psi(k)`` / ``log_psi(k)`` [B,Hkv,S,d] ->
    [B,Hkv,S,R] of ``kernels`` (module doc); ``linear``: the family folds into the fast path
    (``fold()``: the paper's MLPs, under the sum state), whose psi is used directly; any other
    family or state variant goes through its module's (log) features."""

    def __init__(self, kernels: LayerKernels) -> None:
        self.module, self.cfg = kernels, kernels.cfg
        # the paper's MLPs (kernels/learned.py) under the sum state; a state variant that maps
        # the features (lessctl.less.states) goes through the module's own (log) features
        fold = getattr(kernels.net, "fold", None) if kernels.plain_features else None
        self.linear = fold is not None
        if self.linear:
            w = fold()
            self.w1q, self.w2q, self.w1k, self.w2k, self.m = (
                w[n] for n in ("w1q", "w2q", "w1k", "w2k", "m")
            )
            # phi's and psi's MLPs side by side: one decode step evaluates both at once,
            # phi's heads through the identity where psi's go through M (one product)
            self.w1 = torch.cat([self.w1q, self.w1k])
            self.w2 = torch.cat([self.w2q, self.w2k])
            h = self.w1q.shape[0]
            eye = torch.eye(self.cfg.rank, device=self.m.device)
            self.m_rows = torch.cat([eye.expand(h, -1, -1), self.m])

    def _mlp(self, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        xh, bs = _heads_first(x)
        return _heads_back(mlp(xh, w1, w2), bs)

    def log_phi(self, q: Tensor) -> Tensor:
        if not self.linear:
            return self.module.log_phi(q)
        return torch.log(self._mlp(q, self.w1q, self.w2q).abs())

    def psi(self, k: Tensor) -> Tensor:
        if not self.linear:
            return torch.exp(self.module.log_psi(k))
        kh, bs = _heads_first(k)
        hidden = mlp(kh, self.w1k, self.w2k)
        return _heads_back(torch.bmm(hidden, self.m).abs(), bs)

    def rows_into(self, x: Tensor, out: Tensor) -> Tensor:
        """One decode step's rows, learned kernels: x [H+Hkv, B, d] fp32 (the query's heads,
        then the freed key's) -> ``|mlp(x) M|`` written into out [H+Hkv, B, R] fp32 (phi, then
        psi; both MLPs in one pair of products) and returned."""
        torch.bmm(mlp(x, self.w1, self.w2), self.m_rows, out=out)
        return out.abs_()

    def log_psi(self, k: Tensor) -> Tensor:
        if not self.linear:
            return self.module.log_psi(k)
        return torch.log(self.psi(k))
