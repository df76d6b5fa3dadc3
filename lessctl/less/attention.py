"""Attention with a sparse policy plus a low-rank state of the evicted tokens (LESS, §1).

Per query head, with ``D_t`` the keys evicted by row t (``evict_at[j] <= t``) and the kept set
``j <= t < evict_at[j]`` (see :mod:`lessctl.policies.base`)::

    o_t = [phi(q_t) H_t + sum_kept exp(s_tj) v_j] / [phi(q_t) z_t + sum_kept exp(s_tj)]
    H_t = sum_{j in D_t} psi(k_j)^T v_j  (R x d),   z_t = sum_{j in D_t} psi(k_j)  (R)

Numerics (fp32, log space): ``sparse_lse = logsumexp_kept(s)``, ``lr_lse = log(phi . z)``
(exactly ``-inf``, i.e. no contribution, when nothing is evicted), ``norm = logaddexp(sparse_lse,
lr_lse)``, ``o = softmax_kept(s) @ V * exp(sparse_lse - norm) + (phi H / phi z) * exp(lr_lse -
norm)``: both weights lie in [0, 1], so logits of +-1e3 stay finite.

Shapes: q [B,H,S,d]; k, v [B,Hkv,S,d]; evict_at [B,Hkv,S] long; phi_q [B,H,S,R]; psi_k
[B,Hkv,S,R]. GQA: query head h uses KV head h // (H // Hkv) and that KV head's state.

- :func:`sparse_attention`: the kept-set part (independent of phi/psi; compute once per sequence),
  in row chunks over only the keys alive in the chunk: O(S * (n + chunk) * d) for budget n.
- :func:`low_rank_attention`: the state part, O(S * R * d): keys sorted by ``evict_at`` and row
  chunks with a carried [R, d] state per KV head (causal-linear-attention style).
- :func:`parallel_attention`: both, combined; :func:`masked_attention`: the quadratic S x S
  reference (official code's form) for tests and benchmarks.

A layer's own view (:mod:`lessctl.policies.base`): ``softcap`` caps every logit before the
softmax; with a sliding ``window`` w, ``evict_at`` comes from
:func:`~lessctl.policies.base.layer_evict_at` (``evict_at[j] <= j + w``) and the state of row t
holds only the policy-evicted keys still inside the window, ``evict_at[j] <= t < j + w``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lessctl.policies.base import capped, default_scale, keep_mask

F32 = torch.float32


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[B,H,...] -> [B,Hkv,g,...] view."""
    return x.view(x.shape[0], hkv, x.shape[1] // hkv, *x.shape[2:])


def kept_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over given keys, fp32.

    q [B,H,T,d], k/v [B,Hkv,m,d], mask (True = attend) broadcastable to [B,Hkv,T,m]
    -> (out [B,H,T,d] normalised over the attended keys, lse [B,H,T]); a row with no key gets
    out 0 and lse -inf.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bkgtd,bkmd->bkgtm", _grouped(q.to(F32), hkv), k.to(F32))
    s = capped(s * default_scale(d, scale), softcap)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    # max-shifted exp once (torch.logsumexp is several times slower on -inf-masked rows)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    p = torch.exp(s - mx)
    den = p.sum(-1)
    lse = torch.log(den) + mx.squeeze(-1)  # -inf for a row with no key
    out = torch.einsum("bkgtm,bkmd->bkgtd", p, v.to(F32))
    out = out / torch.where(den > 0, den, 1.0).unsqueeze(-1)
    return out.reshape(b, h, t, -1), lse.reshape(b, h, t)


def combine(sparse_out: Tensor, sparse_lse: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """Merge the kept-set and state parts in log space (fp32).

    sparse_out [B,H,T,d], sparse_lse [B,H,T], num = phi H [B,H,T,d], den = phi z [B,H,T]
    -> [B,H,T,d]. ``den == 0`` (nothing evicted) contributes exactly nothing.
    """
    has = den > 0
    safe = torch.where(has, den, 1.0)
    lr_lse = torch.where(has, torch.log(safe), float("-inf"))
    norm = torch.logaddexp(sparse_lse, lr_lse)
    norm = torch.where(torch.isfinite(norm), norm, 0.0)  # a row with nothing at all -> 0
    w_sparse = torch.exp(sparse_lse - norm).unsqueeze(-1)
    w_lr = torch.exp(lr_lse - norm).unsqueeze(-1)
    return sparse_out * w_sparse + num / safe.unsqueeze(-1) * w_lr


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    scale: float | None = None,
    chunk: int = 128,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over each row's kept set, in row chunks (fp32).

    q [B,H,S,d], k/v [B,Hkv,S,d], evict_at [B,Hkv,S] -> (out [B,H,S,d], lse [B,H,S]).
    Each chunk of rows [a, b) only gathers the keys alive in it (``j < b``, ``evict_at[j] > a``).
    """
    s = q.shape[2]
    j = torch.arange(s, device=q.device)
    outs, lses = [], []
    for a in range(0, s, chunk):
        e = min(a + chunk, s)
        alive = (j < e) & (evict_at > a)  # [B,Hkv,S]
        m = int(alive.sum(-1).max())
        idx = torch.sort(alive.to(torch.uint8), dim=-1, descending=True, stable=True).indices[
            ..., :m
        ]
        ok = alive.gather(-1, idx)
        ei = evict_at.gather(-1, idx)
        t = torch.arange(a, e, device=q.device)[:, None]
        mask = ok[..., None, :] & (idx[..., None, :] <= t) & (t < ei[..., None, :])
        gi = idx[..., None].expand(*idx.shape, k.shape[-1])
        o, lse = kept_attention(
            q[:, :, a:e], k.gather(2, gi), v.gather(2, gi), mask, scale, softcap
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def low_rank_attention(
    phi_q: Tensor,
    psi_k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    chunk: int = 128,
    window: int | None = None,
    max_evicted: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The state part ``(phi H_t, phi z_t)`` for every row, O(S * R * d), fp32.

    phi_q [B,H,S,R], psi_k [B,Hkv,S,R], v [B,Hkv,S,d], evict_at [B,Hkv,S]
    -> (num [B,H,S,d], den [B,H,S]). Keys are sorted by ``evict_at``; for row chunk [a, b) the
    carried state holds keys with ``evict_at < a``, keys with ``a <= evict_at < b`` are added
    per row inside the chunk and then folded into the carry. ``window`` w: a key the policy
    evicted (``evict_at[j] < j + w``) leaves the state again at row ``j + w`` (subtracted);
    one that expired (``evict_at[j] == j + w``) never enters it.

    ``max_evicted``: a bound on the keys any row chunk evicts (e.g. from
    :func:`max_evicted_per_chunk`, computed once for fixed ``evict_at``); with it every chunk has
    the same shapes and nothing waits for the device. ``None``: measured per chunk.
    """
    if window is not None:
        s = evict_at.shape[-1]
        end = torch.arange(s, device=evict_at.device) + window
        folded = evict_at < end
        fold_at = torch.where(folded, evict_at, s)
        drop_at = torch.where(folded, end.clamp(max=s), s)
        # each key drops at its own row, so at most `chunk` keys drop per row chunk
        drop_bound = None if max_evicted is None else chunk
        num, den = low_rank_attention(phi_q, psi_k, v, fold_at, chunk, max_evicted=max_evicted)
        num_gone, den_gone = low_rank_attention(
            phi_q, psi_k, v, drop_at, chunk, max_evicted=drop_bound
        )
        return num - num_gone, (den - den_gone).clamp(min=0)
    b, h, s, r = phi_q.shape
    hkv, d = v.shape[1], v.shape[-1]
    order = evict_at.argsort(dim=-1, stable=True)
    e_sorted = evict_at.gather(-1, order)
    edges = torch.arange(0, s + chunk, chunk, device=v.device).clamp(max=s)
    bounds = torch.searchsorted(e_sorted, edges.expand(b, hkv, -1).contiguous())  # #(e < edge)
    carry_h = phi_q.new_zeros(b, hkv, r, d, dtype=F32)
    carry_z = phi_q.new_zeros(b, hkv, r, dtype=F32)
    psi_f, v_f = psi_k.to(F32), v.to(F32)
    nums, dens = [], []
    for ci, a in enumerate(range(0, s, chunk)):
        e = min(a + chunk, s)
        ph = _grouped(phi_q[:, :, a:e].to(F32), hkv)  # [B,Hkv,g,C,R]
        num = torch.einsum("bkgcr,bkrd->bkgcd", ph, carry_h)
        den = torch.einsum("bkgcr,bkr->bkgc", ph, carry_z)
        lo, hi = bounds[..., ci], bounds[..., ci + 1]
        m = int((hi - lo).max()) if max_evicted is None else min(int(max_evicted), s)
        if m > 0:
            i = lo[..., None] + torch.arange(m, device=v.device)
            ok = i < hi[..., None]  # [B,Hkv,m]
            key = order.gather(-1, i.clamp(max=s - 1))
            ps = psi_f.gather(2, key[..., None].expand(b, hkv, m, r)) * ok[..., None]
            vs = v_f.gather(2, key[..., None].expand(b, hkv, m, d))
            t = torch.arange(a, e, device=v.device)[:, None]
            vis = evict_at.gather(-1, key)[..., None, :] <= t  # [B,Hkv,C,m]
            att = torch.einsum("bkgcr,bkmr->bkgcm", ph, ps) * vis.unsqueeze(2)
            num = num + (att.flatten(2, 3) @ vs).view(num.shape)  # [B,Hkv,g*C,m] @ [B,Hkv,m,d]
            den = den + att.sum(-1)
            carry_h = carry_h + torch.einsum("bkmr,bkmd->bkrd", ps, vs)
            carry_z = carry_z + ps.sum(2)
        nums.append(num.reshape(b, h, e - a, d))
        dens.append(den.reshape(b, h, e - a))
    return torch.cat(nums, 2), torch.cat(dens, 2)


def max_evicted_per_chunk(evict_at: Tensor, chunk: int = 128) -> Tensor:
    """The most keys any row chunk ``[a, a + chunk)`` evicts, over every sequence and KV head:
    evict_at [..., S] -> 0-d long tensor (a bound for :func:`low_rank_attention`)."""
    s = evict_at.shape[-1]
    e_sorted = evict_at.flatten(0, -2).sort(dim=-1).values
    edges = torch.arange(0, s + chunk, chunk, device=evict_at.device).clamp(max=s)
    bounds = torch.searchsorted(e_sorted, edges.expand(e_sorted.shape[0], -1).contiguous())
    return (bounds[:, 1:] - bounds[:, :-1]).max()


def parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    phi_q: Tensor | None = None,
    psi_k: Tensor | None = None,
    scale: float | None = None,
    sparse: tuple[Tensor, Tensor] | None = None,
    chunk: int = 128,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """LESS attention for all rows at once -> [B,H,S,d] in q's dtype.

    ``phi_q=None``: no state (the plain sparse policy). ``sparse``: a precomputed
    :func:`sparse_attention` result to reuse (it does not depend on phi/psi). ``window``,
    ``softcap``: the layer's own view (module doc).
    """
    if sparse is None:
        sparse = sparse_attention(q, k, v, evict_at, scale, chunk, softcap)
    out, lse = sparse
    if phi_q is None:
        return out.to(q.dtype)
    assert psi_k is not None, "phi_q given without psi_k"
    num, den = low_rank_attention(phi_q, psi_k, v, evict_at, chunk, window)
    return combine(out, lse, num, den).to(q.dtype)


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    phi_q: Tensor | None = None,
    psi_k: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Quadratic reference (official code's form): dense S x S logits, keep mask
    ``keep & inside window``, low-rank mask ``causal & ~keep & inside window`` and the phi psi^T
    matrix. Same args as :func:`parallel_attention`; ``evict_at`` may ignore the window."""
    b, h, s, d = q.shape
    g = h // k.shape[1]
    idx = torch.arange(s, device=q.device)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal = causal & (idx[None, :] > idx[:, None] - window)
    keep = keep_mask(evict_at).repeat_interleave(g, 1) & causal  # [B,H,S,S]
    kk, vv = k.to(F32).repeat_interleave(g, 1), v.to(F32).repeat_interleave(g, 1)
    logits = capped(q.to(F32) @ kk.transpose(-1, -2) * default_scale(d, scale), softcap)
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ vv
    if phi_q is None:
        return out.to(q.dtype)
    assert psi_k is not None, "phi_q given without psi_k"
    lr = (phi_q.to(F32) @ psi_k.to(F32).repeat_interleave(g, 1).transpose(-1, -2)) * (
        causal & ~keep
    )
    return combine(out, lse, lr @ vv, lr.sum(-1)).to(q.dtype)
