"""Recurrent form of LESS attention, for a real-eviction KV cache during decoding.

A :class:`LowRankState` holds, per (b, h_kv), ``H = sum psi(k_j)^T v_j`` [R,d] and
``z = sum psi(k_j)`` [R] over the evicted tokens (fp32). :func:`step_attention` attends one or a
few new queries to the kept K/V plus the state, with the same log-space numerics as
:func:`lessctl.less.attention.parallel_attention` (which it equals row by row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lessctl.less.attention import F32, _grouped, combine, kept_attention


@dataclass
class LowRankState:
    """H [B,Hkv,R,d] and z [B,Hkv,R], fp32."""

    H: Tensor
    z: Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        num_kv_heads: int,
        rank: int,
        head_dim: int,
        device: torch.device | str | None = None,
    ) -> LowRankState:
        """An empty state (nothing evicted)."""
        return cls(
            torch.zeros(batch, num_kv_heads, rank, head_dim, dtype=F32, device=device),
            torch.zeros(batch, num_kv_heads, rank, dtype=F32, device=device),
        )

    def absorb(self, psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """Add evicted tokens: psi_k [B,Hkv,n,R], v [B,Hkv,n,d], mask [B,Hkv,n] (True = add)."""
        w = psi_k.to(F32)
        if mask is not None:
            w = w * mask[..., None]
        self.H = self.H + w.transpose(-1, -2) @ v.to(F32)
        self.z = self.z + w.sum(2)
        return self

    def release(self, psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """Take tokens out again (they left a sliding window): the inverse of :meth:`absorb`."""
        w = psi_k.to(F32)
        if mask is not None:
            w = w * mask[..., None]
        self.H = self.H - w.transpose(-1, -2) @ v.to(F32)
        self.z = (self.z - w.sum(2)).clamp(min=0)
        return self

    def absorb_log(self, log_psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """:meth:`absorb` with log features: log_psi_k [B,Hkv,n,R] (-inf for a zero feature)."""
        return self.absorb(torch.exp(log_psi_k.to(F32)), v, mask)

    def release_log(self, log_psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """:meth:`release` with log features (the inverse of :meth:`absorb_log`)."""
        return self.release(torch.exp(log_psi_k.to(F32)), v, mask)

    def log_z(self) -> Tensor:
        """log z [B,Hkv,R] (-inf where nothing is held): with log phi(q), the additive logit of
        the state's R "virtual keys" (key 0, value :meth:`mean_values`)."""
        return torch.log(self.z)

    def mean_values(self) -> Tensor:
        """H / z [B,Hkv,R,d] (0 where z == 0): the values of the R virtual keys, so that
        ``sum_r exp(log phi_r + log z_r) * H_r / z_r = phi H`` and the denominators add
        ``phi z``."""
        return self.H / self.z.clamp(min=torch.finfo(F32).tiny)[..., None]

    def read(self, phi_q: Tensor) -> tuple[Tensor, Tensor]:
        """phi_q [B,H,T,R] -> (phi H [B,H,T,d], phi z [B,H,T])."""
        b, h, t, _ = phi_q.shape
        ph = _grouped(phi_q.to(F32), self.H.shape[1])
        num = torch.einsum("bkgtr,bkrd->bkgtd", ph, self.H).reshape(b, h, t, -1)
        den = torch.einsum("bkgtr,bkr->bkgt", ph, self.z).reshape(b, h, t)
        return num, den


def step_attention(
    q: Tensor,
    k_kept: Tensor,
    v_kept: Tensor,
    phi_q: Tensor | None = None,
    state: LowRankState | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """New queries against kept K/V plus the state -> [B,H,T,d] in q's dtype.

    q [B,H,T,d], k_kept/v_kept [B,Hkv,n,d], phi_q [B,H,T,R] or None (no state),
    mask (True = attend) broadcastable to [B,Hkv,T,n]; softcap: logit soft-capping.
    """
    out, lse = kept_attention(q, k_kept, v_kept, mask, scale, softcap)
    if phi_q is None or state is None:
        return out.to(q.dtype)
    num, den = state.read(phi_q)
    return combine(out, lse, num, den).to(q.dtype)
