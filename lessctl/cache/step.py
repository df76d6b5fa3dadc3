"""The steady-state decode step: every sequence's cache is full and each row evicts one key.

A fixed sequence of tensor operations on the packed buffers of a
:class:`~lessctl.cache.store.KeptStore`: no host synchronisation, no data-dependent Python
branch (only static ones: the policy's kind, the layer's window and soft-capping), no
reallocation, no concatenation of the cache; ``torch.compile(fullgraph=True)`` compiles it
(tests/test_cache_step.py). Same semantics as the general path (module doc of
:mod:`lessctl.cache`), row ``t`` per sequence:

1. on a sliding layer with a state, the folded key ``t - w`` leaves the state
   (:func:`update_state`);
2. the slot to free (:func:`choose_slot`): the kept key ``t - w`` where it is kept (it
   expires), else the policy's choice over the kept keys plus the new one (TOVA: probabilities
   from one logits pass over the ``n + 1`` candidates); a key the policy evicts is folded into
   the state through psi;
3. the new K/V and position are written into that slot (:func:`write_slot`);
4. the row attends (:func:`read_state`, :func:`attend`): the state's ``R`` virtual keys (key
   0, value ``H_r / z_r``, additive logit ``log phi_r(q) + log z_r``) sit after the kept
   keys in the same buffers, so a policy that needs no probabilities takes one
   ``scaled_dot_product_attention`` call over ``n + R`` keys (the group's query heads as the
   rows of their KV head); an accumulating policy (H2O, SnapKV) or a soft-capped layer takes
   one logits pass, and its scores come from the same probabilities (renormalised over the
   kept keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.cache.attend import state_logits
from lessctl.cache.driver import unfold
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


def _logits(qg: Tensor, keys: Tensor, sc: float, softcap: float | None) -> Tensor:
    """qg [B,Hkv,g,d] over keys [B,Hkv,m,d] -> capped logits [B,Hkv,g,m] fp32."""
    return capped((qg @ keys.transpose(-1, -2)).float() * sc, softcap)


def choose_slot(
    qg: Tensor,
    k: Tensor,
    tt: Tensor,
    s: KeptStore,
    policy: Policy,
    window: int | None,
    sc: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Phase 2, the policy: qg [B,Hkv,g,d], k [B,Hkv,1,d], tt [B,1,1] -> (slot [B,Hkv,1],
    folded [B,Hkv,1] or None = always, TOVA's old and new logits or None)."""
    b, hkv = k.shape[:2]
    lo = ln = None
    if window is not None and window <= policy.budget:  # keys only expire
        return (s.positions == tt - window).long().argmax(-1, keepdim=True), None, None, None
    probs = None
    if policy.needs_probs:
        lo = _logits(qg, s.keys, sc, softcap)
        ln = capped((qg * k).sum(-1, keepdim=True).float() * sc, softcap)
        probs = torch.cat([lo, ln], -1).softmax(-1).sum(2)
    pos = torch.cat([s.positions, tt.expand(b, hkv, 1)], -1)
    acc = None if s.acc is None else F.pad(s.acc, (0, 1))
    slot = policy.select_evict(tt, pos, acc, probs)[..., None]
    folded = None
    if window is not None:
        gone = s.positions == tt - window
        has = gone.any(-1, keepdim=True)
        slot = torch.where(has, gone.long().argmax(-1, keepdim=True), slot)
        folded = ~has
    return slot, folded, lo, ln


def features(q: Tensor, s: KeptStore, kernels: FrozenKernels, slot: Tensor):
    """Phase 2b: the row's query features and the features of the key in ``slot``, with its
    K/V -> (phi or log phi [B,H,1,R], psi or log psi [B,Hkv,1,R], k_ev, v_ev [B,Hkv,1,d]):
    linear for learned kernels, logs otherwise (``kernels.linear``)."""
    k_ev, v_ev = _gather_slot(s.keys, slot), _gather_slot(s.values, slot)
    fq, fk = kernels.row_features(q, k_ev)
    return fq, fk, k_ev, v_ev


def _absorb_linear(state, psi: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """H += psi^T v, z += psi in place (one token per sequence): psi [B,Hkv,1,R], v
    [B,Hkv,1,d]. Linear features never move the state's offset (it stays 0), so the stored
    sums are the sums."""
    w = psi if mask is None else psi * mask[..., None]
    b, hkv, _, r = w.shape
    state.H.view(b * hkv, r, -1).baddbmm_(
        w.reshape(b * hkv, 1, r).transpose(1, 2), v.reshape(b * hkv, 1, -1).float()
    )
    state.z.add_(w.reshape(b, hkv, r))


def update_state(
    s: KeptStore,
    kernels: FrozenKernels,
    slot: Tensor,
    folded: Tensor | None,
    tt: Tensor,
    window: int | None,
    freed: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Phases 1-2, the state: the folded key ``t - w`` leaves it, the freed key (``freed`` =
    its features, K, V; where ``folded``) enters it, and the virtual keys' values follow."""
    state, cap = s.state, s.positions.shape[-1]
    if window is not None and s.fpos is not None:  # the folded key t - w leaves
        gone_f = (s.fpos == tt - window) & (s.fpos >= 0)
        rel = gone_f.long().argmax(-1, keepdim=True)
        has_rel = gone_f.any(-1, keepdim=True)
        k_rel, v_rel = _gather_slot(s.fkeys, rel), _gather_slot(s.fvalues, rel)
        unfold(state, kernels, k_rel, v_rel, has_rel)
        _put(s.fpos, rel, torch.full_like(rel, -1), has_rel)
    fk, k_ev, v_ev = freed
    virtual_values = s.vbuf[:, :, cap:]
    if kernels.linear:
        _absorb_linear(state, fk, v_ev, folded)
        z = state.z.clamp(min=torch.finfo(state.z.dtype).tiny)[..., None]
        virtual_values.copy_(state.H / z)  # (a non-contiguous out= would break the graph)
    else:
        state.absorb_log(fk, v_ev, folded)
        virtual_values.copy_(state.mean_values())
    if window is not None and s.fpos is not None:  # remember it until it leaves the window
        free = (s.fpos < 0).long().argmax(-1, keepdim=True)
        _put(s.fkeys, free, k_ev, folded)
        _put(s.fvalues, free, v_ev, folded)
        _put(s.fpos, free, s.positions.gather(-1, slot), folded)


def write_slot(s: KeptStore, slot: Tensor, k: Tensor, v: Tensor, tt: Tensor) -> None:
    """Phase 3: the new key k/v [B,Hkv,1,d] at position tt [B,1,1] takes ``slot``."""
    _put(s.keys, slot, k)
    _put(s.values, slot, v)
    _put(s.positions, slot, tt.expand(*slot.shape))
    if s.acc is not None:
        _put(s.acc, slot, torch.zeros_like(slot, dtype=s.acc.dtype))


def read_state(fq: Tensor, s: KeptStore, kernels: FrozenKernels) -> Tensor:
    """Phase 4a: the virtual keys' logits ``log phi_r(q) + log z_r`` from the query's
    features (:func:`features`) -> [B,Hkv,g,R] fp32."""
    b, h, _, r = fq.shape
    hkv = s.keys.shape[1]
    if kernels.linear:  # log(phi * z): the offset is 0
        return torch.log(fq.view(b, hkv, h // hkv, r) * s.state.z[:, :, None])
    return state_logits(fq, s.state, hkv)[:, :, :, 0]


def attend(
    qg: Tensor,
    s: KeptStore,
    policy: Policy,
    slot: Tensor,
    lo: Tensor | None,
    ln: Tensor | None,
    lr: Tensor | None,
    sc: float,
    softcap: float | None,
) -> Tensor:
    """Phase 4b: qg [B,Hkv,g,d] over the kept keys plus the virtual keys (logits ``lr``)
    -> [B,Hkv,g,d]; an accumulating policy's scores are updated from the same probabilities."""
    b, hkv, g, _ = qg.shape
    cap = s.positions.shape[-1]
    keys = s.keys if lr is None else s.kbuf
    values = s.values if lr is None else s.vbuf
    if not (policy.accumulates or softcap is not None or lo is not None):  # one SDPA call
        bias = None
        if lr is not None:  # zeros for the kept keys, the virtual keys' logits after them
            if s.bias is None or s.bias.shape[2] != g:
                s.bias = qg.new_zeros(b, hkv, g, cap + lr.shape[-1])
            s.bias[..., cap:] = lr
            bias = s.bias
        return F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, scale=sc)
    if lo is not None:  # TOVA: the candidates' logits with the evicted one replaced
        lo = lo.scatter(-1, slot[:, :, None].expand(b, hkv, g, 1), ln)
    else:
        lo = _logits(qg, s.keys, sc, softcap)
    p = (lo if lr is None else torch.cat([lo, lr], -1)).softmax(-1)
    if s.acc is not None:
        pk = p[..., :cap]
        s.acc.add_((pk / pk.sum(-1, keepdim=True)).sum(2))
    return (p.to(values.dtype) @ values).to(qg.dtype)


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
    hkv = k.shape[1]
    sc = default_scale(d, scale)
    tt = t.view(b, 1, 1)
    qg = q.view(b, hkv, h // hkv, d)
    slot, folded, lo, ln = choose_slot(qg, k, tt, s, policy, window, sc, softcap)
    lr = None
    if s.state is not None:
        fq, fk, k_ev, v_ev = features(q, s, kernels, slot)
        if not (window is not None and window <= policy.budget):  # else nothing is folded
            update_state(s, kernels, slot, folded, tt, window, (fk, k_ev, v_ev))
        lr = read_state(fq, s, kernels)
    write_slot(s, slot, k, v, tt)
    return attend(qg, s, policy, slot, lo, ln, lr, sc, softcap).reshape(b, h, 1, -1)
