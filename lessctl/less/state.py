"""Recurrent form of LESS attention, for a real-eviction KV cache during decoding.

A :class:`LowRankState` holds, per (b, h_kv), ``H = sum psi(k_j)^T v_j`` [R,d] and
``z = sum psi(k_j)`` [R] over the evicted tokens (fp32), stored scaled by a per-(b, h_kv, r)
offset so that log features of +-1e3 neither overflow nor vanish. :func:`step_attention` attends
one or a few new queries to the kept K/V plus the state, with the same log-space numerics as
:func:`lessctl.less.attention.parallel_attention` (which it equals row by row): linearly from
phi(q), or, from log phi(q), as one softmax over the kept keys and the state's R virtual keys
(:func:`state_logits_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lessctl.less.attention import (
    F32,
    _grouped,
    attend,
    combine,
    kept_attention,
    kept_logits,
    rescaled_absorb,
    virtual_keys,
)


def _masked_log(log_w: Tensor, mask: Tensor | None) -> Tensor:
    """log_w [B,Hkv,n,R] fp32 with ``-inf`` where mask [B,Hkv,n] is False."""
    log_w = log_w.to(F32)
    return log_w if mask is None else log_w.masked_fill(~mask[..., None], float("-inf"))


@dataclass
class LowRankState:
    """The evicted tokens' sums, fp32: ``H = exp(offset) * self.H`` [B,Hkv,R,d] and
    ``z = exp(offset) * self.z`` [B,Hkv,R]; ``offset`` [B,Hkv,R] defaults to 0 (then H, z are
    the sums themselves). Read them through :meth:`log_z`, :meth:`mean_values`, :meth:`read`."""

    H: Tensor
    z: Tensor
    offset: Tensor | None = None

    def __post_init__(self) -> None:
        if self.offset is None:
            self.offset = torch.zeros_like(self.z)

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

    def index_batch(self, idx: Tensor) -> LowRankState:
        """The state of the sequences ``idx`` (e.g. a beam reorder): a new state."""
        return LowRankState(self.H[idx], self.z[idx], self.offset[idx])

    def clone(self) -> LowRankState:
        return LowRankState(self.H.clone(), self.z.clone(), self.offset.clone())

    def _add(self, w: Tensor, v: Tensor, sign: float) -> LowRankState:
        """Add (sign 1) or take out (-1) stored-scale weights w [B,Hkv,n,R], v [B,Hkv,n,d]."""
        self.H = self.H + sign * (w.transpose(-1, -2) @ v.to(F32))
        self.z = (self.z + sign * w.sum(2)).clamp(min=0)
        return self

    def absorb(self, psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """Add evicted tokens: psi_k [B,Hkv,n,R], v [B,Hkv,n,d], mask [B,Hkv,n] (True = add),
        at the current offset (linear features over/underflow as they are: prefer
        :meth:`absorb_log`)."""
        w = psi_k.to(F32) * torch.exp(-self.offset).unsqueeze(2)
        return self._add(w if mask is None else w * mask[..., None], v, 1.0)

    def release(self, psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """Take tokens out again (they left a sliding window): the inverse of :meth:`absorb`."""
        w = psi_k.to(F32) * torch.exp(-self.offset).unsqueeze(2)
        return self._add(w if mask is None else w * mask[..., None], v, -1.0)

    def absorb_log(self, log_psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """:meth:`absorb` with log features: log_psi_k [B,Hkv,n,R] (-inf for a zero feature).
        Raises the offset to the largest log feature held and rescales (never overflows)."""
        lw = _masked_log(log_psi_k, mask)
        self.H, self.z, self.offset = rescaled_absorb(self.H, self.z, self.offset, lw, v)
        return self

    def release_log(self, log_psi_k: Tensor, v: Tensor, mask: Tensor | None = None) -> LowRankState:
        """:meth:`release` with log features (the inverse of :meth:`absorb_log`). Subtracting
        cancels: what is left of a feature below 1e-6 of its sum before (rounding noise of the
        tokens released) is dropped, the feature becomes empty rather than noise or inf."""
        w = torch.exp(_masked_log(log_psi_k, mask) - self.offset.unsqueeze(2))
        before = self.z
        self._add(w, v, -1.0)
        left = self.z > 1e-6 * before
        self.H = torch.where(left.unsqueeze(-1), self.H, 0.0)
        self.z = torch.where(left, self.z, 0.0)
        return self

    def log_z(self) -> Tensor:
        """log z [B,Hkv,R] (-inf where nothing is held): with log phi(q), the additive logit of
        the state's R "virtual keys" (key 0, value :meth:`mean_values`)."""
        return virtual_keys(self.H, self.z, self.offset)[0]

    def mean_values(self) -> Tensor:
        """H / z [B,Hkv,R,d] (0 where z == 0): the values of the R virtual keys, so that
        ``sum_r exp(log phi_r + log z_r) * H_r / z_r = phi H`` and the denominators add
        ``phi z``."""
        return virtual_keys(self.H, self.z, self.offset)[1]

    def read(self, phi_q: Tensor) -> tuple[Tensor, Tensor]:
        """phi_q [B,H,T,R] -> (phi H [B,H,T,d], phi z [B,H,T])."""
        b, h, t, _ = phi_q.shape
        ph = _grouped(phi_q.to(F32), self.H.shape[1]) * torch.exp(self.offset)[:, :, None, None]
        num = torch.einsum("bkgtr,bkrd->bkgtd", ph, self.H).reshape(b, h, t, -1)
        den = torch.einsum("bkgtr,bkr->bkgt", ph, self.z).reshape(b, h, t)
        return num, den


def state_logits_attention(
    q: Tensor,
    k_kept: Tensor,
    v_kept: Tensor,
    mask: Tensor | None,
    log_phi_q: Tensor,
    state: LowRankState,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """One softmax over the kept keys and the state's R virtual keys (logits ``log phi_r(q) +
    log z_r``, values ``H_r / z_r``) -> [B,H,T,d] fp32.

    q [B,H,T,d], k_kept/v_kept [B,Hkv,n,d], mask (True = attend) broadcastable to [B,Hkv,T,n],
    log_phi_q [B,H,T,R]; softcap caps the kept keys' logits only (as in the parallel form).
    """
    s = kept_logits(q, k_kept, mask, scale, softcap)  # [B,Hkv,g,T,n]
    log_z, values = virtual_keys(state.H, state.z, state.offset)
    virtual = _grouped(log_phi_q.to(F32), k_kept.shape[1]) + log_z[:, :, None, None]
    return attend(torch.cat([s, virtual], -1), torch.cat([v_kept.to(F32), values], 2))[0]


def step_attention(
    q: Tensor,
    k_kept: Tensor,
    v_kept: Tensor,
    phi_q: Tensor | None = None,
    state: LowRankState | None = None,
    scale: float | None = None,
    mask: Tensor | None = None,
    softcap: float | None = None,
    log_phi_q: Tensor | None = None,
) -> Tensor:
    """New queries against kept K/V plus the state -> [B,H,T,d] in q's dtype.

    q [B,H,T,d], k_kept/v_kept [B,Hkv,n,d], phi_q [B,H,T,R] or None (no state),
    mask (True = attend) broadcastable to [B,Hkv,T,n]; softcap: logit soft-capping;
    log_phi_q [B,H,T,R]: read the state from log features (:func:`state_logits_attention`).
    """
    if log_phi_q is not None and state is not None:
        out = state_logits_attention(q, k_kept, v_kept, mask, log_phi_q, state, scale, softcap)
        return out.to(q.dtype)
    out, lse = kept_attention(q, k_kept, v_kept, mask, scale, softcap)
    if phi_q is None or state is None:
        return out.to(q.dtype)
    num, den = state.read(phi_q)
    return combine(out, lse, num, den).to(q.dtype)
