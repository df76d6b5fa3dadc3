"""Generic attention helpers of the policies, on the ground floor: torch only, nothing of
lessctl (re-exported by :mod:`lessctl.policies.base`, where their semantics are described).

Logit scale and soft-capping, a KV group's summed softmax, the dense keep mask of a decision,
"never evicted", the lowest score with ties to the earliest position, a sliding window's
expiry. Shapes as in :mod:`lessctl.policies.base`: q [B,H,T,d], k [B,Hkv,n,d], evict_at
[B,Hkv,S].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(d: int, scale: float | None) -> float:
    """The logit scale: ``scale`` or ``1 / sqrt(d)``."""
    return 1.0 / math.sqrt(d) if scale is None else scale


def capped(s: Tensor, softcap: float | None) -> Tensor:
    """Logit soft-capping ``softcap * tanh(s / softcap)`` (identity for ``None``)."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def group_probs(
    q: Tensor,
    k: Tensor,
    scale: float | None = None,
    mask: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Softmax of ``q`` over keys ``k``, summed over each KV group's query heads (fp32 or wider).

    q [B,H,T,d], k [B,Hkv,n,d], mask (True = attend) broadcastable to [B,Hkv,1,T,n]
    -> [B,Hkv,T,n].
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).view(b, hkv, h // hkv, t, d)
    s = capped(torch.einsum("bkgtd,bknd->bkgtn", qg, k.to(dt)) * default_scale(d, scale), softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1).sum(2)


def keep_mask(evict_at: Tensor) -> Tensor:
    """Dense keep mask: evict_at [B,Hkv,S] -> bool [B,Hkv,S(row t),S(key j)], j <= t < evict_at."""
    s = evict_at.shape[-1]
    t = torch.arange(s, device=evict_at.device)
    return (t[None, :] <= t[:, None]) & (t[:, None] < evict_at[..., None, :])


def never_evicted(k: Tensor) -> Tensor:
    """evict_at for "keep everything": k [B,Hkv,S,d] -> [B,Hkv,S] filled with S."""
    b, hkv, s = k.shape[:3]
    return torch.full((b, hkv, s), s, dtype=torch.long, device=k.device)


def argmin_earliest(scores: Tensor, positions: Tensor) -> Tensor:
    """Slot of the lowest score, ties to the earliest position: [...,m], [...,m] -> [...] long."""
    low = scores == scores.min(-1, keepdim=True).values
    return torch.where(low, positions, torch.iinfo(torch.long).max).argmin(-1)


def expire(evict_at: Tensor, window: int | None) -> Tensor:
    """Clamp a decision to a sliding window: evict_at [B,Hkv,S] -> min(evict_at, j + w, S)."""
    if window is None:
        return evict_at
    s = evict_at.shape[-1]
    j = torch.arange(s, device=evict_at.device)
    return torch.minimum(evict_at, (j + window).clamp(max=s))


def recent_window_scores(t: int | Tensor, positions: Tensor, acc: Tensor, recent: int) -> Tensor:
    """Accumulated scores of the old keys, +inf for the last ``recent`` positions up to ``t``.

    t: the row, positions [B,Hkv,n+1], acc [B,Hkv,n+1] -> [B,Hkv,n] (the new key is dropped).
    """
    in_window = positions[..., :-1] > t - recent
    return acc[..., :-1].masked_fill(in_window, torch.inf)
