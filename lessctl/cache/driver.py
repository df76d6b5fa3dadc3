"""The general path of the evicting cache: rows that grow, are padded, or evict in bulk.

:func:`evict_row` applies "evict, then attend"'s first half at one row ``t`` (per sequence) for
any cache: keys that left the layer's sliding window go first (they leave memory without entering
the state), then each sequence evicts ``need`` keys chosen by the policy among the kept keys plus
the new one (several at once: :func:`~lessctl.cache.eviction.evict_many`), folds them into the
LESS state, and the store is compacted with the new key appended. Sequences at different
positions decide separately (a host-side grouping: this path may synchronise; the steady state
takes :func:`~lessctl.cache.step.steady_step`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lessctl.cache.eviction import evict_many, first_true, with_new
from lessctl.cache.store import KeptStore
from lessctl.errors import LessctlError
from lessctl.less.frozen import FrozenKernels
from lessctl.less.state import LowRankState
from lessctl.policies.base import Policy, group_probs


def absorb(
    state: LowRankState, kernels: FrozenKernels, k: Tensor, v: Tensor, mask: Tensor | None
) -> None:
    """Fold keys k/v [B,Hkv,e,d] (where ``mask`` [B,Hkv,e]) into the state through psi."""
    if kernels.linear:
        state.absorb(kernels.psi(k), v, mask)
    else:
        state.absorb_log(kernels.log_psi(k), v, mask)


def unfold(
    state: LowRankState, kernels: FrozenKernels, k: Tensor, v: Tensor, mask: Tensor | None
) -> None:
    """The inverse of :func:`absorb` (keys that left a sliding window)."""
    if kernels.linear:
        state.release(kernels.psi(k), v, mask)
    else:
        state.release_log(kernels.log_psi(k), v, mask)


def expired(pos: Tensor, t: Tensor, window: int | None) -> Tensor:
    """Kept slots outside the window at rows t [B]: pos [B,Hkv,m] -> bool [B,Hkv,m]."""
    if window is None:
        return torch.zeros_like(pos, dtype=torch.bool)
    return (pos >= 0) & (pos <= (t - window)[:, None, None])


def fold(
    s: KeptStore,
    kernels: FrozenKernels,
    k_ev: Tensor,
    v_ev: Tensor,
    pos_ev: Tensor,
    mask: Tensor,
    window: int | None,
) -> None:
    """Add policy-evicted tokens [B,Hkv,e,(d)] (where ``mask``) to the state; on a sliding
    layer also remember them until they leave the window."""
    if s.state is None:
        return
    absorb(s.state, kernels, k_ev, v_ev, mask)
    if window is None:
        return
    pos_ev = torch.where(mask, pos_ev, -1)
    k_ev, v_ev = k_ev * mask[..., None], v_ev * mask[..., None]
    if s.fpos is None:
        s.fkeys, s.fvalues, s.fpos = k_ev, v_ev, pos_ev
    else:
        s.fkeys = torch.cat([s.fkeys, k_ev], 2)
        s.fvalues = torch.cat([s.fvalues, v_ev], 2)
        s.fpos = torch.cat([s.fpos, pos_ev], 2)


def release(s: KeptStore, kernels: FrozenKernels, t: Tensor, window: int) -> None:
    """Take folded tokens that leave the window at rows t [B] out of the state."""
    if s.fpos is None or s.state is None:
        return
    gone = expired(s.fpos, t, window)
    if bool(gone.any()):
        unfold(s.state, kernels, s.fkeys, s.fvalues, gone)
        s.fpos = torch.where(gone, -1, s.fpos)
    live = s.fpos >= 0
    size = int(live.sum(-1).max())
    if size < s.fpos.shape[-1]:
        order = first_true(live, size)
        gi = order[..., None].expand(*order.shape, s.fkeys.shape[-1])
        s.fkeys, s.fvalues = s.fkeys.gather(2, gi), s.fvalues.gather(2, gi)
        s.fpos = s.fpos.gather(-1, order)


def position_groups(t: Tensor, sel: Tensor) -> list[tuple[int, Tensor | None]]:
    """Rows ``sel`` grouped by their position ``t`` [B]; ``None`` = all rows."""
    vals = torch.unique(t[sel]).tolist()
    if len(vals) == 1 and bool(sel.all()):
        return [(int(vals[0]), None)]
    return [(int(x), (sel & (t == x)).nonzero()[:, 0]) for x in vals]


def _evict_recall(s, policy, kernels, r, K, V, P, A, probs, vidx, tv, count) -> Tensor:
    """A state-aware policy (``recall``) with a state: one eviction, the candidates' recall
    errors under this layer's state (rows ``r``) -> evicted bool [b',Hkv,c]."""
    from lessctl.policies.recall import recall_error

    if count != 1:
        raise LessctlError(
            f"policy={policy.name} with kernels evicts one key per row, not {count} at once (a "
            "prompt or chunk past the budget); allowed: protocol=streaming"
        )
    st = s.state if isinstance(r, slice) else s.state.index_batch(r)
    gi = vidx[..., None].expand(*vidx.shape, K.shape[-1])
    kc, vc = K[r][:, :, :-1].gather(2, gi), V[r][:, :, :-1].gather(2, gi)  # [b',Hkv,c,d]

    def recall(idx: Tensor) -> Tensor:
        at = idx[..., None].expand(*idx.shape, kc.shape[-1])
        lp = kernels.log_psi(kc.gather(2, at))
        return recall_error(st.H, st.z, st.offset, lp, vc.gather(2, at))

    slot = policy.select_evict(
        tv,
        with_new(P[r], vidx),
        with_new(A[r], vidx) if A is not None else None,
        probs,
        recall,
    )
    return torch.nn.functional.one_hot(slot, vidx.shape[-1]).bool()


def evict_row(
    s: KeptStore,
    policy: Policy,
    kernels: FrozenKernels | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    t: Tensor,
    scale: float | None,
    window: int | None,
    softcap: float | None,
) -> None:
    """Row ``t`` [B] (negative: a padding row) with new K/V [B,Hkv,1,d] and query q [B,H,1,d]:
    drop expired keys, evict down to the budget (folding into the state), append the new key."""
    b, hkv, _, d = k.shape
    n = policy.budget
    if getattr(policy, "state_aware", False) and s.state is not None:
        from lessctl.policies.recall import refuse_window

        refuse_window(policy, window)
    real = t >= 0
    newpos = torch.where(real, t, -1)[:, None, None].expand(b, hkv, 1)
    count = (s.positions[:, 0] >= 0).sum(-1)  # [B] kept tokens before this row
    need = torch.zeros_like(count) if n is None else torch.where(real, count + 1 - n, 0)
    need = need.clamp(min=0)
    K, V = torch.cat([s.keys, k], 2), torch.cat([s.values, v], 2)
    P = torch.cat([s.positions, newpos], -1)
    A = None if s.acc is None else torch.nn.functional.pad(s.acc, (0, 1))
    valid = P >= 0
    ev = torch.zeros_like(valid)  # evicted by the policy (folded into the state)
    gone = expired(P, t, window)  # left the window (dropped)
    gone[..., -1] = False
    sel = (need > 0) | gone.any((1, 2))
    if bool(sel.any()):
        for tv, rows in position_groups(t, sel):
            r = slice(None) if rows is None else rows
            cnt = int(need[r].max())
            if int(need[r].min()) != cnt:
                raise RuntimeError("rows at one position hold different numbers of tokens")
            vo, go = valid[r][..., :-1], gone[r][..., :-1]
            ngone = go.sum(-1)  # [b',Hkv]
            x = int(ngone.max())
            if x == int(ngone.min()):  # the same number left the window on every head
                cand_mask, count_r = vo & ~go, cnt - x
            elif cnt == 1:  # one drop per head: the expired key where there is one
                cand_mask, count_r = vo, 1
            else:
                raise RuntimeError("heads at one position lost different numbers of tokens")
            if count_r <= 0:
                continue
            c = int(cand_mask[0, 0].sum())
            vidx = first_true(cand_mask, c)  # candidate old slots [b',Hkv,c]
            probs = None
            if policy.needs_probs:
                gi = vidx[..., None].expand(*vidx.shape, d)
                cand = torch.cat([K[r][:, :, :-1].gather(2, gi), k[r]], 2)
                probs = group_probs(q[r], cand, scale, None, softcap)[:, :, 0]
            if getattr(policy, "state_aware", False) and s.state is not None:
                e = _evict_recall(s, policy, kernels, r, K, V, P, A, probs, vidx, tv, count_r)
            else:
                e = evict_many(
                    policy,
                    tv,
                    with_new(P[r], vidx),
                    with_new(A[r], vidx) if A is not None else None,
                    probs,
                    count_r,
                )
            full = torch.zeros_like(valid[r])
            full[..., :-1].scatter_(-1, vidx, e)
            ev[r] = full & ~(ngone > 0)[..., None] if x != int(ngone.min()) else full
        if s.state is not None and bool(ev.any()):
            assert kernels is not None
            emax = int(ev.sum(-1).max())
            eidx = first_true(ev, emax)
            gi = eidx[..., None].expand(*eidx.shape, d)
            fold(
                s,
                kernels,
                K.gather(2, gi),
                V.gather(2, gi),
                P.gather(-1, eidx),
                ev.gather(-1, eidx),
                window,
            )
    keep = valid & ~ev & ~gone
    size = int(keep.sum(-1).max())
    order = first_true(keep, size)
    kept = keep.gather(-1, order)
    gi = order[..., None].expand(*order.shape, d)
    s.keys = K.gather(2, gi) * kept[..., None]
    s.values = V.gather(2, gi) * kept[..., None]
    s.positions = torch.where(kept, P.gather(-1, order), -1)
    if A is not None:
        s.acc = A.gather(-1, order) * kept
