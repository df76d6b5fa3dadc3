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

Log features (``log_phi_q``, ``log_psi_k``; Performer's exp features over/underflow fp32 for
real models' |q|, |k|): an evicted key j weighs ``exp(logsumexp_r(log phi_r(q_t) + log
psi_r(k_j)))``, and the state is R "virtual keys" with logits ``log phi_r(q) + log z_r`` and
values ``H_r / z_r`` (:func:`virtual_keys`), stored scaled by a running per-(b, h, r) max offset
(:func:`rescaled_absorb`). :func:`low_rank_attention_log` gives each row's state part as
(normalised values, log-sum-exp), merged by :func:`combine_log`: no exp of a raw feature anywhere.

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


def kept_logits(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """q [B,H,T,d], k [B,Hkv,m,d], mask (True = attend) broadcastable to [B,Hkv,T,m]
    -> scaled, capped logits [B,Hkv,g,T,m] fp32, ``-inf`` where not attended."""
    s = torch.einsum("bkgtd,bkmd->bkgtm", _grouped(q.to(F32), k.shape[1]), k.to(F32))
    s = capped(s * default_scale(q.shape[-1], scale), softcap)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return s


def attend(s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of logits s [B,Hkv,g,T,m] (-inf = no key) over values v [B,Hkv,m,d], fp32
    -> (out [B,H,T,d], lse [B,H,T]); a row with no key gets out 0 and lse -inf."""
    b, hkv, g, t, _ = s.shape
    # torch.softmax, not exp(s - max): on CPU exp is ~3x slower on -inf (every masked logit),
    # torch.logsumexp more so. The top key's weight is exp(0) / den, so lse = max - log p_max.
    mx = s.amax(-1)
    has = mx != float("-inf")  # False: a row with no key (softmax gives NaN there); NaN stays
    p = torch.where(has.unsqueeze(-1), torch.softmax(s, -1), 0.0)
    lse = torch.where(has, mx - torch.log(p.amax(-1)), float("-inf"))
    out = torch.einsum("bkgtm,bkmd->bkgtd", p, v.to(F32))
    return out.reshape(b, hkv * g, t, -1), lse.reshape(b, hkv * g, t)


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
    return attend(kept_logits(q, k, mask, scale, softcap), v)


def combine_log(sparse_out: Tensor, sparse_lse: Tensor, lr_out: Tensor, lr_lse: Tensor) -> Tensor:
    """Merge the kept-set and state parts, each normalised with its log-sum-exp (fp32).

    sparse_out, lr_out [B,H,T,d]; sparse_lse, lr_lse [B,H,T] (``-inf``: the part is empty and
    contributes exactly nothing) -> [B,H,T,d].
    """
    norm = torch.logaddexp(sparse_lse, lr_lse)
    norm = torch.where(torch.isfinite(norm), norm, 0.0)  # a row with nothing at all -> 0
    w_sparse = torch.exp(sparse_lse - norm).unsqueeze(-1)
    w_lr = torch.exp(lr_lse - norm).unsqueeze(-1)
    return sparse_out * w_sparse + lr_out * w_lr


def combine(sparse_out: Tensor, sparse_lse: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """:func:`combine_log` of the state part given linearly: num = phi H [B,H,T,d], den = phi z
    [B,H,T] (``den == 0``, nothing evicted, contributes exactly nothing) -> [B,H,T,d]."""
    has = den > 0
    safe = torch.where(has, den, 1.0)
    lr_lse = torch.where(has, torch.log(safe), float("-inf"))
    return combine_log(sparse_out, sparse_lse, num / safe.unsqueeze(-1), lr_lse)


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


def _window_events(evict_at: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """evict_at [B,Hkv,S] -> (fold_at, drop_at) [B,Hkv,S]: when a key enters the state (the
    policy evicted it, ``evict_at[j] < j + w``) and when it leaves it again (row ``j + w``);
    ``S`` = never (a key that expired at ``j + w`` never enters)."""
    s = evict_at.shape[-1]
    end = torch.arange(s, device=evict_at.device) + window
    folded = evict_at < end
    return torch.where(folded, evict_at, s), torch.where(folded, end.clamp(max=s), s)


def _by_eviction(evict_at: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """evict_at [B,Hkv,S] -> (order [B,Hkv,S]: keys sorted by evict_at, bounds [B,Hkv,C+1]:
    how many keys are evicted before each row chunk edge)."""
    b, hkv, s = evict_at.shape
    order = evict_at.argsort(dim=-1, stable=True)
    edges = torch.arange(0, s + chunk, chunk, device=evict_at.device).clamp(max=s)
    bounds = torch.searchsorted(evict_at.gather(-1, order), edges.expand(b, hkv, -1).contiguous())
    return order, bounds


def _chunk_evictions(
    order: Tensor, bounds: Tensor, ci: int, max_evicted: int | None
) -> tuple[Tensor, Tensor] | None:
    """The keys row chunk ``ci`` evicts: (key [B,Hkv,m] indices, ok [B,Hkv,m] = real, not
    padding), m = ``max_evicted`` or the most of any (b, h); None when m == 0."""
    s = order.shape[-1]
    lo, hi = bounds[..., ci], bounds[..., ci + 1]
    m = int((hi - lo).max()) if max_evicted is None else min(int(max_evicted), s)
    if m == 0:
        return None
    i = lo[..., None] + torch.arange(m, device=order.device)
    return order.gather(-1, i.clamp(max=s - 1)), i < hi[..., None]


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
        fold_at, drop_at = _window_events(evict_at, window)
        # each key drops at its own row, so at most `chunk` keys drop per row chunk
        drop_bound = None if max_evicted is None else chunk
        num, den = low_rank_attention(phi_q, psi_k, v, fold_at, chunk, max_evicted=max_evicted)
        num_gone, den_gone = low_rank_attention(
            phi_q, psi_k, v, drop_at, chunk, max_evicted=drop_bound
        )
        return num - num_gone, (den - den_gone).clamp(min=0)
    b, h, s, r = phi_q.shape
    hkv, d = v.shape[1], v.shape[-1]
    order, bounds = _by_eviction(evict_at, chunk)
    carry_h = phi_q.new_zeros(b, hkv, r, d, dtype=F32)
    carry_z = phi_q.new_zeros(b, hkv, r, dtype=F32)
    psi_f, v_f = psi_k.to(F32), v.to(F32)
    nums, dens = [], []
    for ci, a in enumerate(range(0, s, chunk)):
        e = min(a + chunk, s)
        ph = _grouped(phi_q[:, :, a:e].to(F32), hkv)  # [B,Hkv,g,C,R]
        num = torch.einsum("bkgcr,bkrd->bkgcd", ph, carry_h)
        den = torch.einsum("bkgcr,bkr->bkgc", ph, carry_z)
        evicted = _chunk_evictions(order, bounds, ci, max_evicted)
        if evicted is not None:
            key, ok = evicted  # [B,Hkv,m]
            m = key.shape[-1]
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


def rescaled_absorb(
    h: Tensor, z: Tensor, offset: Tensor, log_w: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Add tokens to a state stored as ``H = exp(offset) h``, ``z = exp(offset) z`` (fp32).

    h [B,Hkv,R,d], z, offset [B,Hkv,R]; log_w [B,Hkv,n,R] log psi (-inf = not added), v
    [B,Hkv,n,d] -> (h, z, offset). The offset becomes the max of the held one (none where
    ``z == 0``) and the new log weights, and h, z are rescaled to it: every stored term is
    ``exp(log w - offset) <= 1``, so log weights of +-1e3 neither overflow nor vanish.
    """
    if log_w.shape[2] == 0:
        return h, z, offset
    held = torch.where(z > 0, offset, float("-inf"))
    new = torch.maximum(held, log_w.to(F32).amax(2))
    new = torch.where(torch.isfinite(new), new, offset)  # nothing held or added: keep it
    shrink = torch.exp(held - new)
    w = torch.exp(log_w.to(F32) - new.unsqueeze(2))
    h = h * shrink.unsqueeze(-1) + torch.einsum("bknr,bknd->bkrd", w, v.to(F32))
    return h, z * shrink + w.sum(2), new


def virtual_keys(h: Tensor, z: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """A scaled state (:func:`rescaled_absorb`) as R virtual keys: (log z [B,Hkv,R], -inf where
    nothing is held; values H / z [B,Hkv,R,d], 0 there). With log phi(q) as the keys' logits
    less log z, ``sum_r exp(log phi_r + log z_r) H_r / z_r = phi H`` and their weights add
    ``phi z`` to the softmax denominator."""
    has = z > 0
    values = h / torch.where(has, z, 1.0).unsqueeze(-1)
    return torch.log(z) + offset, torch.where(has.unsqueeze(-1), values, 0.0)


def _absorb_into_blocks(
    h: Tensor, z: Tensor, offset: Tensor, block: Tensor, log_w: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rescaled_absorb` into one of n separately scaled states per (b, h): h [B,Hkv,n,R,d],
    z, offset [B,Hkv,n,R]; token i [B,Hkv,m] goes to state ``block[..., i]``."""
    idx = block[..., None].expand_as(log_w)  # [B,Hkv,m,R]
    held = torch.where(z > 0, offset, float("-inf"))
    new = held.scatter_reduce(2, idx, log_w, "amax")
    new = torch.where(torch.isfinite(new), new, offset)
    shrink = torch.exp(held - new)
    w = torch.exp(log_w - new.gather(2, idx))
    wv = w.unsqueeze(-1) * v.unsqueeze(-2)  # [B,Hkv,m,R,d]
    h = (h * shrink.unsqueeze(-1)).scatter_add(2, idx.unsqueeze(-1).expand_as(wv), wv)
    return h, (z * shrink).scatter_add(2, idx, w), new


def _merge_blocks(h: Tensor, z: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sum of n scaled states h [B,Hkv,n,R,d], z, offset [B,Hkv,n,R] -> one (h, z, offset)."""
    if z.shape[2] == 0:
        return h.sum(2), z.sum(2), offset.sum(2)
    held = torch.where(z > 0, offset, float("-inf"))
    top = held.amax(2)
    top = torch.where(torch.isfinite(top), top, 0.0)
    shrink = torch.exp(held - top.unsqueeze(2))
    return (h * shrink.unsqueeze(-1)).sum(2), (z * shrink).sum(2), top


def _pair_logits(lph: Tensor, lps: Tensor, vis: Tensor) -> Tensor:
    """logsumexp_r(log phi + log psi): lph [B,Hkv,g,C,R], lps [B,Hkv,m,R], vis [B,Hkv,C,m]
    (False: -inf) -> [B,Hkv,g,C,m]."""
    pair = torch.logsumexp(lph.unsqueeze(-2) + lps[:, :, None, None], -1)
    return pair.masked_fill(~vis.unsqueeze(2), float("-inf"))


def _windowed_low_rank_log(
    log_phi_q: Tensor,
    log_psi_k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    window: int,
    chunk: int,
    max_evicted: int | None,
) -> tuple[Tensor, Tensor]:
    """:func:`low_rank_attention_log` with a sliding window, without subtracting keys that
    leave (that cancels catastrophically in log space once they dominate): keys are summed per
    block of ``chunk`` positions as they are evicted; row chunk [a, b) reads the blocks every
    row of it still holds (``j >= b - window``) as virtual keys and the keys of the partial
    block below them, plus the keys evicted inside the chunk, one by one."""
    b, h, s, r = log_phi_q.shape
    hkv, d = v.shape[1], v.shape[-1]
    fold_at, drop_at = _window_events(evict_at, window)
    order, bounds = _by_eviction(fold_at, chunk)
    nb = -(-s // chunk)
    blk_h = v.new_zeros(b, hkv, nb, r, d, dtype=F32)
    blk_z = v.new_zeros(b, hkv, nb, r, dtype=F32)
    blk_off = v.new_zeros(b, hkv, nb, r, dtype=F32)
    lpsi_f, v_f = log_psi_k.to(F32), v.to(F32)
    outs, lses = [], []
    for ci, a in enumerate(range(0, s, chunk)):
        e = min(a + chunk, s)
        t = torch.arange(a, e, device=v.device)[:, None]
        lph = _grouped(log_phi_q[:, :, a:e].to(F32), hkv)  # [B,Hkv,g,C,R]
        first = min(ci, max(0, -(-(e - window) // chunk)))  # blocks [first, ci): held all chunk
        merged = _merge_blocks(
            blk_h[:, :, first:ci], blk_z[:, :, first:ci], blk_off[:, :, first:ci]
        )
        log_z, values = virtual_keys(*merged)
        logits, vals = [lph + log_z[:, :, None, None]], [values]
        lo, hi = max(0, a - window + 1), first * chunk  # partial block: evicted before a
        if hi > lo:
            lps = lpsi_f[:, :, lo:hi].masked_fill(~(fold_at[..., lo:hi, None] < a), float("-inf"))
            logits.append(_pair_logits(lph, lps, t < drop_at[..., None, lo:hi]))
            vals.append(v_f[:, :, lo:hi])
        evicted = _chunk_evictions(order, bounds, ci, max_evicted)
        if evicted is not None:
            key, ok = evicted  # [B,Hkv,m]
            m = key.shape[-1]
            lps = lpsi_f.gather(2, key[..., None].expand(b, hkv, m, r))
            lps = lps.masked_fill(~ok[..., None], float("-inf"))
            vs = v_f.gather(2, key[..., None].expand(b, hkv, m, d))
            vis = (fold_at.gather(-1, key)[..., None, :] <= t) & (
                t < drop_at.gather(-1, key)[..., None, :]
            )
            logits.append(_pair_logits(lph, lps, vis))
            vals.append(vs)
            blk_h, blk_z, blk_off = _absorb_into_blocks(
                blk_h, blk_z, blk_off, key // chunk, lps, vs
            )
        out, lse = attend(torch.cat(logits, -1), torch.cat(vals, 2))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def low_rank_attention_log(
    log_phi_q: Tensor,
    log_psi_k: Tensor,
    v: Tensor,
    evict_at: Tensor,
    chunk: int = 128,
    window: int | None = None,
    max_evicted: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`low_rank_attention` from log features, finite for any: log_phi_q [B,H,S,R],
    log_psi_k [B,Hkv,S,R] (-inf = a zero feature), v [B,Hkv,S,d], evict_at [B,Hkv,S]
    -> (phi H_t / phi z_t [B,H,S,d] (0 where empty), log(phi z_t) [B,H,S] (-inf there)).

    Per row chunk one softmax over the carried state's R virtual keys (:func:`virtual_keys`) and
    the chunk's newly evicted keys (logit ``logsumexp_r(log phi_r + log psi_r)``); the carry
    absorbs them with :func:`rescaled_absorb`. Same chunking, ``window`` and ``max_evicted`` as
    :func:`low_rank_attention`, but a window never subtracts (:func:`_windowed_low_rank_log`).
    """
    if window is not None:
        return _windowed_low_rank_log(log_phi_q, log_psi_k, v, evict_at, window, chunk, max_evicted)
    b, h, s, r = log_phi_q.shape
    hkv, d = v.shape[1], v.shape[-1]
    order, bounds = _by_eviction(evict_at, chunk)
    carry_h = v.new_zeros(b, hkv, r, d, dtype=F32)
    carry_z = v.new_zeros(b, hkv, r, dtype=F32)
    offset = v.new_zeros(b, hkv, r, dtype=F32)
    lpsi_f, v_f = log_psi_k.to(F32), v.to(F32)
    outs, lses = [], []
    for ci, a in enumerate(range(0, s, chunk)):
        e = min(a + chunk, s)
        lph = _grouped(log_phi_q[:, :, a:e].to(F32), hkv)  # [B,Hkv,g,C,R]
        log_z, values = virtual_keys(carry_h, carry_z, offset)
        logits = lph + log_z[:, :, None, None]  # [B,Hkv,g,C,R]
        evicted = _chunk_evictions(order, bounds, ci, max_evicted)
        if evicted is not None:
            key, ok = evicted  # [B,Hkv,m]
            m = key.shape[-1]
            lps = lpsi_f.gather(2, key[..., None].expand(b, hkv, m, r))
            lps = lps.masked_fill(~ok[..., None], float("-inf"))
            vs = v_f.gather(2, key[..., None].expand(b, hkv, m, d))
            t = torch.arange(a, e, device=v.device)[:, None]
            vis = evict_at.gather(-1, key)[..., None, :] <= t  # [B,Hkv,C,m]
            logits = torch.cat([logits, _pair_logits(lph, lps, vis)], -1)
            values = torch.cat([values, vs], 2)
            carry_h, carry_z, offset = rescaled_absorb(carry_h, carry_z, offset, lps, vs)
        out, lse = attend(logits, values)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


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
    log_phi_q: Tensor | None = None,
    log_psi_k: Tensor | None = None,
) -> Tensor:
    """LESS attention for all rows at once -> [B,H,S,d] in q's dtype.

    ``phi_q=None`` (and no log features): no state (the plain sparse policy). ``log_phi_q``
    [B,H,S,R], ``log_psi_k`` [B,Hkv,S,R]: the state from log features instead, with
    :func:`low_rank_attention_log` (finite where phi, psi over/underflow). ``sparse``: a
    precomputed :func:`sparse_attention` result to reuse (it does not depend on phi/psi).
    ``window``, ``softcap``: the layer's own view (module doc).
    """
    if sparse is None:
        sparse = sparse_attention(q, k, v, evict_at, scale, chunk, softcap)
    out, lse = sparse
    if log_phi_q is not None:
        assert log_psi_k is not None, "log_phi_q given without log_psi_k"
        lr = low_rank_attention_log(log_phi_q, log_psi_k, v, evict_at, chunk, window)
        return combine_log(out, lse, *lr).to(q.dtype)
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
    log_phi_q: Tensor | None = None,
    log_psi_k: Tensor | None = None,
) -> Tensor:
    """Quadratic reference (official code's form): dense S x S logits, keep mask
    ``keep & inside window``, low-rank mask ``causal & ~keep & inside window`` and the phi psi^T
    matrix (with log features: logits ``logsumexp_r(log phi_r + log psi_r)`` there, one softmax
    over both). Same args as :func:`parallel_attention`; ``evict_at`` may ignore the window."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    idx = torch.arange(s, device=q.device)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal = causal & (idx[None, :] > idx[:, None] - window)
    keep = keep_mask(evict_at).repeat_interleave(g, 1) & causal  # [B,H,S,S]
    kk, vv = k.to(F32).repeat_interleave(g, 1), v.to(F32).repeat_interleave(g, 1)
    logits = capped(q.to(F32) @ kk.transpose(-1, -2) * default_scale(d, scale), softcap)
    logits = logits.masked_fill(~keep, float("-inf"))
    if log_phi_q is not None:
        assert log_psi_k is not None, "log_phi_q given without log_psi_k"
        lpsi = log_psi_k.to(F32).repeat_interleave(g, 1)
        pair = torch.logsumexp(log_phi_q.to(F32)[..., :, None, :] + lpsi[..., None, :, :], -1)
        logits = torch.where(causal & ~keep, pair, logits)
        return attend(logits.view(b, hkv, g, s, s), v)[0].to(q.dtype)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ vv
    if phi_q is None:
        return out.to(q.dtype)
    assert psi_k is not None, "phi_q given without psi_k"
    lr = (phi_q.to(F32) @ psi_k.to(F32).repeat_interleave(g, 1).transpose(-1, -2)) * (
        causal & ~keep
    )
    return combine(out, lse, lr @ vv, lr.sum(-1)).to(q.dtype)
