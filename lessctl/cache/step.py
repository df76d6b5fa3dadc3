"""The steady-state decode step: every sequence's cache is full and each row evicts one key.

A fixed sequence of tensor operations on the packed buffers of a
:class:`~lessctl.cache.store.KeptStore`: no host synchronisation, no data-dependent Python
branch (only static ones: the policy's kind, the layer's window and soft-capping), no
reallocation, no concatenation of the cache; ``torch.compile(fullgraph=True)`` compiles it
(tests/test_cache_step.py). Same semantics as the general path (module doc of
:mod:`lessctl.cache`), row ``t`` per sequence:

1. on a sliding layer with a state, the folded key ``t - w`` leaves the state;
2. the slot to free: the kept key ``t - w`` where it is kept (it expires), else the policy's
   choice over the kept keys plus the new one (TOVA: probabilities from one logits pass over
   the ``n + 1`` candidates); a key the policy evicts is folded into the state through psi;
3. the new K/V and position are written into that slot;
4. the row attends: the state's ``R`` virtual keys (key 0, value ``H_r / z_r``, additive logit
   ``log phi_r(q) + log z_r``) sit after the kept keys in the same buffers, so a policy that
   needs no probabilities takes one ``scaled_dot_product_attention`` call over ``n + R`` keys
   (the group's query heads as the rows of their KV head); an accumulating policy (H2O, SnapKV)
   or a soft-capped layer takes one logits pass, and its scores come from the same
   probabilities (renormalised over the kept keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.cache.attend import state_logits
from lessctl.cache.driver import absorb, unfold
from lessctl.cache.store import KeptStore
from lessctl.less.frozen import FrozenKernels
from lessctl.policies.base import Policy, capped, default_scale


def _gather_slot(x: Tensor, slot: Tensor) -> Tensor:
    """x [B,Hkv,m,d] at slot [B,Hkv,1] -> [B,Hkv,1,d]."""
    return x.gather(2, slot[..., None].expand(*slot.shape, x.shape[-1]))


def _put(x: Tensor, slot: Tensor, new: Tensor, where: Tensor | None = None) -> None:
    """Write new [B,Hkv,1,(d)] into x [B,Hkv,m,(d)] at slot [B,Hkv,1] (only where ``where``)."""
    if x.dim() == 4:
        if where is not None:
            new = torch.where(where[..., None], new, _gather_slot(x, slot))
        x.scatter_(2, slot[..., None].expand(*slot.shape, x.shape[-1]), new)
    else:
        if where is not None:
            new = torch.where(where, new, x.gather(-1, slot))
        x.scatter_(-1, slot, new)


def steady_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t: Tensor,
    s: KeptStore,
    policy: Policy,
    kernels: FrozenKernels | None,
    scale: float | None,
    window: int | None,
    softcap: float | None,
) -> Tensor:
    """One decode row (module doc): q [B,H,1,d], k/v [B,Hkv,1,d], t [B] long (the row's
    position in each sequence), ``s`` packed -> out [B,H,1,d] in q's dtype; ``s`` is updated
    in place."""
    b, h, _, d = q.shape
    hkv, cap = s.positions.shape[1:]
    g = h // hkv
    sc = default_scale(d, scale)
    tt = t.view(b, 1, 1)
    qg = q.view(b, hkv, g, d)
    state, n = s.state, policy.budget
    lo = ln = None
    folded = None  # [B,Hkv,1]: the freed key goes into the state (None: always)
    fits = window is not None and window <= n  # the window fits the budget: keys only expire
    if fits:
        slot = (s.positions == tt - window).long().argmax(-1, keepdim=True)
    else:
        probs = None
        if policy.needs_probs:
            lo = capped(torch.einsum("bkgd,bkmd->bkgm", qg, s.keys).float() * sc, softcap)
            ln = capped((qg * k.view(b, hkv, 1, d)).sum(-1, keepdim=True).float() * sc, softcap)
            probs = torch.cat([lo, ln], -1).softmax(-1).sum(2)
        pos = torch.cat([s.positions, tt.expand(b, hkv, 1)], -1)
        acc = None if s.acc is None else F.pad(s.acc, (0, 1))
        slot = policy.select_evict(tt, pos, acc, probs)[..., None]
        if window is not None:
            gone = s.positions == tt - window
            has = gone.any(-1, keepdim=True)
            slot = torch.where(has, gone.long().argmax(-1, keepdim=True), slot)
            folded = ~has
    if state is not None and not fits:
        assert kernels is not None
        if window is not None and s.fpos is not None:  # 1. the folded key t - w leaves
            gone_f = (s.fpos == tt - window) & (s.fpos >= 0)
            rel = gone_f.long().argmax(-1, keepdim=True)
            has_rel = gone_f.any(-1, keepdim=True)
            k_rel, v_rel = _gather_slot(s.fkeys, rel), _gather_slot(s.fvalues, rel)
            unfold(state, kernels, k_rel, v_rel, has_rel)
            _put(s.fpos, rel, torch.full_like(rel, -1), has_rel)
        k_ev, v_ev = _gather_slot(s.keys, slot), _gather_slot(s.values, slot)
        absorb(state, kernels, k_ev, v_ev, folded)
        if window is not None and s.fpos is not None:  # remember it until it leaves the window
            free = (s.fpos < 0).long().argmax(-1, keepdim=True)
            _put(s.fkeys, free, k_ev, folded)
            _put(s.fvalues, free, v_ev, folded)
            _put(s.fpos, free, s.positions.gather(-1, slot), folded)
        s.vbuf[:, :, cap:] = state.mean_values().to(s.vbuf.dtype)
    _put(s.keys, slot, k)  # 3. the new key takes the slot
    _put(s.values, slot, v)
    _put(s.positions, slot, tt.expand(b, hkv, 1))
    if s.acc is not None:
        _put(s.acc, slot, torch.zeros_like(slot, dtype=s.acc.dtype))
    keys = s.keys if state is None else s.kbuf
    values = s.values if state is None else s.vbuf
    lr = None
    if state is not None:
        assert kernels is not None
        lr = state_logits(kernels.log_phi(q), state, hkv)[:, :, :, 0]  # [B,Hkv,g,R]
    if not (policy.accumulates or softcap is not None or lo is not None):  # 4. one SDPA call
        bias = None
        if lr is not None:
            bias = torch.cat([lr.new_zeros(b, hkv, g, cap), lr], -1).to(q.dtype)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, scale=sc)
        return out.view(b, h, 1, -1)
    if lo is not None:  # TOVA: the candidates' logits with the evicted one replaced
        lo = lo.scatter(-1, slot[:, :, None].expand(b, hkv, g, 1), ln)
    else:
        lo = capped(torch.einsum("bkgd,bkmd->bkgm", qg, s.keys).float() * sc, softcap)
    logits = lo if lr is None else torch.cat([lo, lr], -1)
    p = logits.softmax(-1)
    out = torch.einsum("bkgm,bkmd->bkgd", p.to(values.dtype), values)
    if s.acc is not None:
        pk = p[..., :cap]
        s.acc.add_((pk / pk.sum(-1, keepdim=True)).sum(2))
    return out.reshape(b, h, 1, -1).to(q.dtype)
