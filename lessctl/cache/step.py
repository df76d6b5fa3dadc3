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
   keys in the same buffers, so a policy that needs no probabilities (:func:`one_call`) takes
   one ``scaled_dot_product_attention`` call over ``n + R`` keys (``enable_gqa``: each query
   head reads its KV head; on CPU a third faster with the additive logits than the group's
   heads as rows of their KV head); an accumulating policy (H2O, SnapKV), TOVA or a soft-capped
   layer takes one logits pass, and its scores come from the same probabilities (renormalised
   over the kept keys).

On a CPU each call into torch costs a decode step some microseconds whatever it computes, so
the step makes few. Learned kernels read the query's and the freed key's rows from, and write
phi and psi into, buffers of the store whose views are made once
(:class:`~lessctl.cache.store.StateViews`); a result bound for a view goes there through
``out=`` (:func:`_into`); the slot's index serves both the gathers and the writes; z is kept
at or above a floor while packed, so H / z needs no clamp. With learned kernels a LESS step adds
14 calls per layer to the plain policy's (two gathers, the rows, five products and GELUs, |.|,
H and z, H / z, log(phi z)); on CPU, where the C++ op builds and ``native_step`` allows it, they
are one call of it instead (:func:`native_state`, :mod:`lessctl.cache.native`; a sliding layer's
release and fold buffer stay in torch), which computes the same to rounding
(tests/test_native_step.py); on CUDA, where ``triton_step`` allows it, one launch of its Triton
counterpart with the same signature (:mod:`lessctl.cache.triton_step`; tests/test_triton_step.py
under Triton's interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.cache.attend import state_logits
from lessctl.cache.driver import unfold
from lessctl.cache.store import Z_FLOOR, KeptStore
from lessctl.less.frozen import FrozenKernels
from lessctl.policies.base import Policy, capped, default_scale


def _at(slot: Tensor, x: Tensor) -> Tensor:
    """slot [B,Hkv,1] as an index into x [B,Hkv,m,d] -> [B,Hkv,1,d] (expanded)."""
    return slot.unsqueeze(-1).expand(*slot.shape, x.shape[-1])


def _gather_slot(x: Tensor, slot: Tensor) -> Tensor:
    """x [B,Hkv,m,d] at slot [B,Hkv,1] -> [B,Hkv,1,d]."""
    return x.gather(2, _at(slot, x))


def _put(
    x: Tensor, slot: Tensor, new: Tensor, where: Tensor | None = None, at: Tensor | None = None
) -> None:
    """Write new [B,Hkv,1,(d)] into x [B,Hkv,m,(d)] at slot [B,Hkv,1] (only where ``where``;
    ``at``: the slot already as :func:`_at` gives it)."""
    if x.dim() == 4:
        at = _at(slot, x) if at is None else at
        if where is not None:
            new = torch.where(where[..., None], new, x.gather(2, at))
        x.scatter_(2, at, new)
    else:
        if where is not None:
            new = torch.where(where, new, x.gather(-1, slot))
        x.scatter_(-1, slot, new)


def _into(op, out: Tensor, *args: Tensor) -> None:
    """out[...] = op(*args): eagerly through ``out=`` (one call into torch, not two); compiled
    as a copy (dynamo refuses ``out=`` into a non-contiguous view)."""
    if torch.compiler.is_compiling():
        out.copy_(op(*args))
    else:
        op(*args, out=out)


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


def features(q: Tensor, s: KeptStore, kernels: FrozenKernels, at: tuple[Tensor, Tensor]):
    """Phase 2b: the row's query features and the features of the key in the slot (``at``:
    its index into keys and values, :func:`_at`), with its K/V [B,Hkv,1,d] -> (fq, fk, k_ev,
    v_ev): learned kernels write phi and psi into the store's rows (:class:`StateViews`: fq is
    ``views.phi`` [Hkv,g,B,R], fk ``views.psi`` [B,Hkv,R]), others give log phi [B,H,1,R] and
    log psi [B,Hkv,1,R]."""
    k_ev, v_ev = s.keys.gather(2, at[0]), s.values.gather(2, at[1])
    if not kernels.linear:
        return kernels.log_phi(q), kernels.log_psi(k_ev), k_ev, v_ev
    vw = s.views
    torch.cat([q, k_ev], 1, out=vw.rows)  # in fp32 whatever the model's dtype
    kernels.rows_into(vw.rows_hf, vw.feats)
    return vw.phi, vw.psi, k_ev, v_ev


def _release_linear(state, psi: Tensor, v: Tensor, mask: Tensor) -> None:
    """H -= psi^T v, z -= psi (kept >= its floor, :meth:`KeptStore.pack`) in place where
    ``mask`` [B,Hkv,1]: psi [B,Hkv,1,R], v [B,Hkv,1,d] (in place, as :class:`StateViews` need)."""
    w = psi * mask[..., None]
    state.H.addcmul_(w.transpose(-1, -2), v, value=-1.0)
    state.z.sub_(w.squeeze(2)).clamp_(min=Z_FLOOR)


def release_expired(s: KeptStore, kernels: FrozenKernels, tt: Tensor, window: int) -> None:
    """Phase 1 (a sliding layer whose state holds keys still inside the window): the folded key
    ``t - w`` leaves the state and the fold buffer."""
    gone_f = (s.fpos == tt - window) & (s.fpos >= 0)
    rel = gone_f.long().argmax(-1, keepdim=True)
    has_rel = gone_f.any(-1, keepdim=True)
    k_rel, v_rel = _gather_slot(s.fkeys, rel), _gather_slot(s.fvalues, rel)
    if kernels.linear:
        _release_linear(s.state, kernels.psi(k_rel), v_rel, has_rel)
    else:
        unfold(s.state, kernels, k_rel, v_rel, has_rel)
    _put(s.fpos, rel, torch.full_like(rel, -1), has_rel)


def remember_folded(
    s: KeptStore, slot: Tensor, folded: Tensor | None, k_ev: Tensor, v_ev: Tensor
) -> None:
    """The freed key k_ev/v_ev [B,Hkv,1,d], where ``folded``, joins the fold buffer until it
    leaves the window (before the slot is written: its position is read from it)."""
    free = (s.fpos < 0).long().argmax(-1, keepdim=True)
    _put(s.fkeys, free, k_ev, folded)
    _put(s.fvalues, free, v_ev, folded)
    _put(s.fpos, free, s.positions.gather(-1, slot), folded)


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
    its features, K, V; where ``folded``) enters it, and the virtual keys' values follow.
    Learned kernels update H and z in place: H += psi^T v, z += psi (their offset stays 0, so
    the stored sums are the sums)."""
    state, vw = s.state, s.views
    folds = window is not None and s.fpos is not None
    if folds:
        release_expired(s, kernels, tt, window)
    fk, k_ev, v_ev = freed
    if kernels.linear:  # fk is views.psi: a key not folded weighs 0
        if folded is not None:
            fk.mul_(folded)
        state.H.addcmul_(vw.psi_col, v_ev)
        state.z.add_(fk)
        _into(torch.div, vw.values, state.H, vw.z_col)  # z >= its floor (KeptStore.pack)
    else:
        state.absorb_log(fk, v_ev, folded)
        vw.values.copy_(state.mean_values())
    if folds:
        remember_folded(s, slot, folded, k_ev, v_ev)


def native_state(
    native,
    q: Tensor,
    s: KeptStore,
    kernels: FrozenKernels,
    slot: Tensor,
    folded: Tensor | None,
    tt: Tensor,
    window: int | None,
    absorb: bool,
    into_bias: bool,
) -> Tensor | None:
    """Phases 2b-4a in one call of the C++ op (:mod:`lessctl.cache.native`; learned kernels on
    CPU) or of the Triton kernel (:mod:`lessctl.cache.triton_step`; on CUDA): what
    :func:`features`, :func:`update_state` and :func:`read_state` do, the fold buffer's
    bookkeeping of a sliding layer staying here; the virtual keys' logits go into the
    attention's bias (``into_bias``; -> None), else -> [B,Hkv,g,R] fp32."""
    vw, state = s.views, s.state
    logits = vw.logits if into_bias else vw.pass_logits
    folds = absorb and window is not None and s.fpos is not None
    if folds:
        release_expired(s, kernels, tt, window)
        k_ev, v_ev = _gather_slot(s.keys, slot), _gather_slot(s.values, slot)
    native(
        q,
        s.keys,
        s.values,
        slot,
        folded,
        kernels.w1,
        kernels.w2,
        kernels.m,
        state.H,
        state.z,
        vw.values,
        logits,
        absorb,
    )
    if folds:
        remember_folded(s, slot, folded, k_ev, v_ev)
    return None if into_bias else logits


def slot_index(slot: Tensor, s: KeptStore) -> tuple[Tensor, Tensor]:
    """slot [B,Hkv,1] as indices into the store's keys and values ([B,Hkv,1,d] each)."""
    at = _at(slot, s.keys)
    return at, at if s.values.shape[-1] == s.keys.shape[-1] else _at(slot, s.values)


def write_slot(
    s: KeptStore, slot: Tensor, at: tuple[Tensor, Tensor], k: Tensor, v: Tensor, tt: Tensor
) -> None:
    """Phase 3: the new key k/v [B,Hkv,1,d] at position tt [B,1,1] takes ``slot`` (``at``:
    :func:`slot_index`)."""
    _put(s.keys, slot, k, at=at[0])
    _put(s.values, slot, v, at=at[1])
    _put(s.positions, slot, tt.expand(*slot.shape))
    if s.acc is not None:
        _put(s.acc, slot, torch.zeros_like(slot, dtype=s.acc.dtype))


def read_state(fq: Tensor, s: KeptStore, kernels: FrozenKernels, into_bias: bool) -> Tensor | None:
    """Phase 4a: the virtual keys' logits ``log phi_r(q) + log z_r`` from the query's
    features (:func:`features`): into the attention's bias when it takes one call
    (``into_bias``; -> None), else -> [B,Hkv,g,R] fp32."""
    vw, hkv = s.views, s.keys.shape[1]
    if kernels.linear:  # log(phi * z), the offset being 0 (fq is views.phi: multiplied in place)
        fq.mul_(vw.z_row_hf)
        if not into_bias:
            return fq.log_().permute(2, 0, 1, 3)
        _into(torch.log, vw.logits_hf, fq)
        return None
    lr = state_logits(fq, s.state, hkv)[:, :, :, 0]
    if not into_bias:
        return lr
    vw.logits.copy_(lr)
    return None


def one_call(policy: Policy, softcap: float | None) -> bool:
    """Whether the row attends in one ``scaled_dot_product_attention`` call (module doc)."""
    return not (policy.accumulates or policy.needs_probs or softcap is not None)


def attend(
    q: Tensor,
    s: KeptStore,
    policy: Policy,
    slot: Tensor,
    lo: Tensor | None,
    ln: Tensor | None,
    lr: Tensor | None,
    sc: float,
    softcap: float | None,
) -> Tensor:
    """Phase 4b: q [B,H,1,d] over the kept keys plus the virtual keys -> [B,H,1,d]; in one
    call their logits are in the store's bias, else in ``lr``; an accumulating policy's
    scores are updated from the same probabilities."""
    b, h, _, d = q.shape
    hkv = s.keys.shape[1]
    g, cap = h // hkv, s.positions.shape[-1]
    if one_call(policy, softcap):
        if s.state is None:
            return F.scaled_dot_product_attention(q, s.keys, s.values, scale=sc, enable_gqa=True)
        return F.scaled_dot_product_attention(
            q, s.kbuf, s.vbuf, attn_mask=s.views.mask, scale=sc, enable_gqa=True
        )
    qg = q.view(b, hkv, g, d)
    values = s.values if lr is None else s.vbuf
    if lo is not None:  # TOVA: the candidates' logits with the evicted one replaced
        lo = lo.scatter(-1, slot[:, :, None].expand(b, hkv, g, 1), ln)
    else:
        lo = _logits(qg, s.keys, sc, softcap)
    p = (lo if lr is None else torch.cat([lo, lr], -1)).softmax(-1)
    if s.acc is not None:
        pk = p[..., :cap]
        s.acc.add_((pk / pk.sum(-1, keepdim=True)).sum(2))
    return (p.to(values.dtype) @ values).to(q.dtype).view(b, h, 1, -1)


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
    native=None,
) -> Tensor:
    """One decode row (module doc): q [B,H,1,d], k/v [B,Hkv,1,d], t [B] long (the row's
    position in each sequence), ``s`` packed -> out [B,H,1,d] in q's dtype; ``s`` is updated
    in place. ``native``: the C++ op of :mod:`lessctl.cache.native` (learned kernels on CPU) or
    the Triton one of :mod:`lessctl.cache.triton_step` (CUDA) for the state's part (not while
    traced), None: the torch path."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    sc = default_scale(d, scale)
    tt = t.view(b, 1, 1)
    qg = q.view(b, hkv, h // hkv, d)
    slot, folded, lo, ln = choose_slot(qg, k, tt, s, policy, window, sc, softcap)
    at = slot_index(slot, s)
    lr = None
    if s.state is not None:
        absorb = not (window is not None and window <= policy.budget)  # else nothing is folded
        single = one_call(policy, softcap)
        if native is not None and not torch.compiler.is_compiling():
            lr = native_state(native, q, s, kernels, slot, folded, tt, window, absorb, single)
        else:
            fq, fk, k_ev, v_ev = features(q, s, kernels, at)
            if absorb:
                update_state(s, kernels, slot, folded, tt, window, (fk, k_ev, v_ev))
            lr = read_state(fq, s, kernels, single)
    write_slot(s, slot, at, k, v, tt)
    return attend(q, s, policy, slot, lo, ln, lr, sc, softcap)
