"""A real-eviction KV cache for a sparse policy plus the LESS low-rank state.

:class:`EvictingCache` is a ``transformers`` :class:`~transformers.cache_utils.Cache` made of one
:class:`EvictingLayer` per decoder layer (as the library's own caches are built). Per layer and
KV head it holds only the kept tokens, physically: ``keys``/``values`` ``[B,Hkv,m,d]`` (post-RoPE
keys), ``positions [B,Hkv,m]`` (each kept token's index in its own sequence, ``-1`` for an empty
slot), the policy's running scores ``acc [B,Hkv,m]`` (H2O) and a
:class:`~lessctl.less.state.LowRankState` (when kernels are given). Past the budget ``m == n``.

Work split: ``update`` (called by the attention module with the new post-RoPE K/V) only hands the
new K/V through; the registered attention function :meth:`EvictingCache.attention` (installed by
:meth:`EvictingCache.attached`) does eviction and attention, because eviction may need the
current query (TOVA) and folds the evicted key into the state through psi. Semantics equal the
parallel form (:mod:`lessctl.policies.base`, "evict, then attend"), row by row:

1. the new key ``t`` is appended as the last candidate;
2. if the row holds more than ``n`` candidates, the policy evicts (``select_evict``); evicted
   tokens are added to the state through ``psi(k)`` and leave memory;
3. row ``t`` attends over the kept K/V plus the state (:func:`~lessctl.less.state.step_attention`);
4. an accumulating policy adds row ``t``'s probabilities over its kept keys to ``acc``.

Protocols (``protocol=``):

- ``"streaming"``: every token, prompt included, is one such row (a forward of T tokens runs the
  T rows in order inside each layer, which is exactly T one-token forwards).
- ``"prompt"`` (the paper's generation protocol): the first forward (the prompt, T tokens) uses
  full causal attention and caches all of it (H2O scores: full-attention probabilities summed
  over the prompt rows, through ``policy.accumulate``; SnapKV counts only its observation
  window, the rows before the first eviction at ``first_evict = max(prompt length, budget)``).
  The first decoded row then evicts the whole excess at once, i.e. the ``T + 1 - n``
  candidates the policy would drop one after another from that candidate set (``select_evict``
  repeated on the shrinking set; :func:`evict_many` uses an equivalent sort for policies with
  ``eviction_scores``), all folded into the state; from then on one token per row.

Sliding windows (the layer's ``sliding_window``, module :mod:`lessctl.policies.base`): before
row ``t`` evicts, a kept key ``t - w`` *expires*: it leaves memory without entering the state and
takes the place of the policy's eviction at that row; a key the policy folded into the state
while inside the window is taken out of it again at row ``j + w`` (the layer keeps such keys'
K/V until then, at most ``w - n`` tokens). Soft-capping (``softcap``) and the layer's
``scaling`` apply to every logit.

Batches: left padding only (``attention_mask`` given to the constructor). Padding tokens are
never cached as candidates, never count towards budgets or scores, and positions are per
sequence, so every sequence decides exactly as it would alone (rows at different positions call
``select_evict`` separately).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from lessctl.hooks import refuse_unknown_kwargs, use_attention
from lessctl.less.attention import kept_attention
from lessctl.less.kernels import LayerKernels
from lessctl.less.state import LowRankState, step_attention
from lessctl.policies.base import Policy, group_probs

PROTOCOLS = ("prompt", "streaming")
_PREFILL_CHUNK = 1024


def _sub(x: Tensor | None, idx: Tensor) -> Tensor | None:
    """Old candidates ``idx`` plus the new (last) one: x [b,h,m+1], idx [b,h,c] -> [b,h,c+1]."""
    if x is None:
        return None
    return torch.cat([x[..., :-1].gather(-1, idx), x[..., -1:]], -1)


def evict_many_sequential(
    policy: Policy,
    t: int,
    positions: Tensor,
    acc_scores: Tensor | None,
    probs_now: Tensor | None,
    count: int,
) -> Tensor:
    """Evict ``count`` old candidates by calling ``select_evict`` on the shrinking set.

    positions/acc_scores/probs_now [b,Hkv,m+1] (last = the new key) -> evicted bool [b,Hkv,m].
    """
    b, h, m1 = positions.shape
    idx = torch.arange(m1 - 1, device=positions.device).expand(b, h, m1 - 1).contiguous()
    out = torch.zeros(b, h, m1 - 1, dtype=torch.bool, device=positions.device)
    for _ in range(count):
        slot = policy.select_evict(
            t, _sub(positions, idx), _sub(acc_scores, idx), _sub(probs_now, idx)
        )[..., None]
        out.scatter_(-1, idx.gather(-1, slot), True)
        keep = torch.ones_like(idx, dtype=torch.bool).scatter_(-1, slot, False)
        idx = idx[keep].view(b, h, -1)
    return out


def evict_many(
    policy: Policy,
    t: int,
    positions: Tensor,
    acc_scores: Tensor | None,
    probs_now: Tensor | None,
    count: int,
) -> Tensor:
    """Evict ``count >= 1`` old candidates at row ``t`` (one = ``select_evict``; more = the
    policy's choice repeated on the shrinking set: a sort by ``policy.eviction_scores`` where
    the policy has them).

    positions/acc_scores/probs_now [b,Hkv,m+1] (last = the new key) -> evicted bool [b,Hkv,m].
    """
    old = positions[..., :-1]
    if count == 1:
        slot = policy.select_evict(t, positions, acc_scores, probs_now)
        return F.one_hot(slot, old.shape[-1]).bool()
    try:
        score = policy.eviction_scores(t, positions, acc_scores, probs_now)
    except NotImplementedError:  # a policy with only select_evict: repeat it
        return evict_many_sequential(policy, t, positions, acc_scores, probs_now, count)
    order = old.argsort(dim=-1, stable=True)
    order = order.gather(-1, score.gather(-1, order).argsort(dim=-1, stable=True))
    out = torch.zeros(old.shape, dtype=torch.bool, device=old.device)
    return out.scatter_(-1, order[..., :count], True)


def left_pad_counts(attention_mask: Tensor | None) -> Tensor | None:
    """Padding tokens per sequence of a left-padded mask [B,T] -> [B] long (None: no mask)."""
    if attention_mask is None:
        return None
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError(
            "EvictingCache supports left padding only: attention_mask rows must be 0..0 1..1"
        )
    return (m == 0).sum(-1)


def _first(mask: Tensor, count: int) -> Tensor:
    """Indices of the first ``count`` True entries per row: mask [...,m] -> [...,count] long."""
    return (~mask).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]


class EvictingLayer(CacheLayerMixin):
    """One layer's kept K/V, positions, policy scores and low-rank state (see module doc)."""

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        policy: Policy,
        kernels: LayerKernels | None = None,
        protocol: str = "prompt",
        pads: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.policy, self.kernels, self.protocol = policy, kernels, protocol
        self.pads = pads
        self.positions: Tensor | None = None
        self.acc: Tensor | None = None
        self.state: LowRankState | None = None
        self.seen = 0
        self.pending = False
        self.first_evict: Tensor | None = None  # [B] row of the first eviction (accumulate)
        self.window: int | None = None
        self.softcap: float | None = None
        # policy-evicted tokens still inside the window: K/V/positions [B,Hkv,f,(d)], -1 empty
        self.fkeys: Tensor | None = None
        self.fvalues: Tensor | None = None
        self.fpos: Tensor | None = None

    # ---- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Empty buffers shaped after the first K [B,Hkv,T,d]."""
        b, hkv, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, hkv, 0, d)
        self.values = value_states.new_zeros(b, hkv, 0, value_states.shape[-1])
        self.positions = torch.zeros(b, hkv, 0, dtype=torch.long, device=self.device)
        if self.policy.accumulates:
            self.acc = torch.zeros(b, hkv, 0, dtype=torch.float32, device=self.device)
        if self.kernels is not None:
            self.kernels = self.kernels.to(self.device)  # kernels follow the layer's device
            r = self.kernels.cfg.rank
            self.state = LowRankState.zeros(b, hkv, r, value_states.shape[-1], self.device)
        if self.pads is None:
            self.pads = torch.zeros(b, dtype=torch.long, device=self.device)
        elif self.pads.shape[0] != b:
            raise ValueError(f"attention_mask has {self.pads.shape[0]} rows, the batch has {b}")
        self.pads = self.pads.to(self.device)
        n = self.policy.budget
        self.first_evict = torch.full_like(
            self.pads, torch.iinfo(torch.long).max if n is None else n
        )
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Hand the new K/V [B,Hkv,T,d] to the attention function, which caches them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError(
                "EvictingCache was updated without its attention function; run the model "
                "inside `with cache.attached(model):`"
            )
        self.pending = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (padding included), not tokens kept: positions stay right."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.acc = self.first_evict = None
        self.fkeys = self.fvalues = self.fpos = None
        self.state = None
        self.seen, self.pending, self.is_initialized = 0, False, False

    def _index_batch(self, idx: Tensor) -> None:
        names = ("keys", "values", "positions", "acc", "pads", "first_evict")
        for name in (*names, "fkeys", "fvalues", "fpos"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x.index_select(0, idx.to(x.device)))
        if self.state is not None:
            self.state = LowRankState(self.state.H[idx], self.state.z[idx])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._index_batch(torch.as_tensor(indices, device=self.device).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._index_batch(torch.arange(b, device=self.device).repeat_interleave(repeats))

    # ---- memory ------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every tensor this layer holds (K, V, positions, scores, state, folded window keys)."""
        held = (
            self.keys,
            self.values,
            self.positions,
            self.acc,
            self.fkeys,
            self.fvalues,
            self.fpos,
        )
        out = [x for x in held if x is not None]
        if self.state is not None:
            out += [self.state.H, self.state.z]
        return out

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.tensors())

    # ---- attention ---------------------------------------------------------------------------
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float | None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> Tensor:
        """Cache the new tokens and attend: q [B,H,T,d], k/v [B,Hkv,T,d] -> [B,H,T,d].
        ``window``, ``softcap``: the layer's sliding window and logit soft-capping."""
        if not self.pending:
            raise RuntimeError("EvictingCache attention called without a cache update")
        self.pending = False
        self.window, self.softcap = window, softcap
        if self.protocol == "prompt" and self.seen == 0:
            return self._prefill(q, k, v, scale)
        outs = [
            self._step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], scale)
            for i in range(q.shape[2])
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """Prompt protocol: full causal attention over the prompt, all of it cached."""
        b, h, s, d = q.shape
        hkv = k.shape[1]
        t = torch.arange(s, device=q.device)[None] - self.pads[:, None]  # [B,S]
        valid = t >= 0
        kk, vv = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        plain = self.window is None and self.softcap is None
        if plain and bool(valid.all()):
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
        else:  # padding keys masked; a padding row attends to itself only (finite, unused)
            outs = []
            for a in range(0, s, _PREFILL_CHUNK):
                e = min(a + _PREFILL_CHUNK, s)
                mask = self._prefill_mask(a, e, valid)
                if plain:
                    outs.append(
                        F.scaled_dot_product_attention(
                            q[:, :, a:e], kk, vv, attn_mask=mask[:, None], scale=scale
                        )
                    )
                else:
                    o, _ = kept_attention(q[:, :, a:e], k, v, mask[:, None], scale, self.softcap)
                    outs.append(o.to(q.dtype))
            out = torch.cat(outs, 2)
        vk = valid[:, None, :, None]
        self.keys = (k * vk).contiguous()
        self.values = (v * vk).contiguous()
        self.positions = torch.where(valid, t, -1)[:, None].expand(b, hkv, s).contiguous()
        if self.policy.accumulates:  # the first eviction comes at max(prompt length, budget)
            self.first_evict = torch.maximum(s - self.pads, self.first_evict)
            acc = torch.zeros(b, hkv, s, dtype=torch.float32, device=q.device)
            for a in range(0, s, _PREFILL_CHUNK):
                e = min(a + _PREFILL_CHUNK, s)
                mask = self._prefill_mask(a, e, valid)[:, None, None]
                p = group_probs(q[:, :, a:e], k, scale, mask, self.softcap)
                p = p * valid[:, None, a:e, None]
                acc = self.policy.accumulate(acc, p, t[:, a:e], self.positions, self.first_evict)
            self.acc = acc
        self.seen = s
        return out

    def _prefill_mask(self, a: int, e: int, valid: Tensor) -> Tensor:
        """Rows [a, e) of the causal (and sliding-window) mask over valid keys (+ diagonal):
        -> bool [B, e-a, S]."""
        s = valid.shape[1]
        r = torch.arange(a, e, device=valid.device)[:, None]
        j = torch.arange(s, device=valid.device)[None]
        seen = j <= r
        if self.window is not None:
            seen = seen & (j > r - self.window)
        return (seen & valid[:, None, :]) | (j == r)

    def _groups(self, t: Tensor, sel: Tensor) -> list[tuple[int, Tensor | None]]:
        """Rows ``sel`` grouped by their position ``t`` [B]; ``None`` = all rows."""
        vals = torch.unique(t[sel]).tolist()
        if len(vals) == 1 and bool(sel.all()):
            return [(int(vals[0]), None)]
        return [(int(x), (sel & (t == x)).nonzero()[:, 0]) for x in vals]

    def _step(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """One row for every sequence: q [B,H,1,d], k/v [B,Hkv,1,d] -> [B,H,1,d]."""
        b, hkv = k.shape[:2]
        n = self.policy.budget
        t = self.seen - self.pads  # [B] this row's position in each sequence
        real = t >= 0
        if self.window is not None and self.fpos is not None:
            self._release(t)
        newpos = torch.where(real, t, -1)[:, None, None].expand(b, hkv, 1)
        m = self.keys.shape[2]
        all_valid = bool((self.positions >= 0).all())
        count = (self.positions[:, 0] >= 0).sum(-1)  # [B] kept tokens before this row
        if n is None:
            need = torch.zeros_like(count)
        else:
            need = torch.where(real, (count + 1 - n).clamp(min=0), 0)
        if all_valid and m == n and bool(real.all()) and bool((need == 1).all()):
            self._evict_one(q, k, v, t, newpos, scale)
        else:
            self._evict_general(q, k, v, t, newpos, need, scale)
        mask = None if bool((self.positions >= 0).all()) else (self.positions >= 0)[:, :, None]
        phi = self.kernels.phi(q.float()) if self.kernels is not None else None
        out = step_attention(q, self.keys, self.values, phi, self.state, scale, mask, self.softcap)
        if self.acc is not None:
            m3 = None if mask is None else mask[:, :, None]
            p = group_probs(q, self.keys, scale, m3, self.softcap)
            p = torch.nan_to_num(p) * real[:, None, None, None]
            self.acc = self.policy.accumulate(
                self.acc, p, t[:, None], self.positions, self.first_evict
            )
        self.seen += 1
        return out

    def _probs(self, q: Tensor, cand: Tensor, scale: float | None) -> Tensor | None:
        """probs_now over candidate keys [b,Hkv,c,d] (TOVA) -> [b,Hkv,c], else None."""
        if not self.policy.needs_probs:
            return None
        return group_probs(q, cand, scale, None, self.softcap)[:, :, 0]

    def _expired(self, pos: Tensor, t: Tensor) -> Tensor:
        """Kept slots outside the window at rows t [B]: pos [B,Hkv,m] -> bool [B,Hkv,m]."""
        if self.window is None:
            return torch.zeros_like(pos, dtype=torch.bool)
        return (pos >= 0) & (pos <= (t - self.window)[:, None, None])

    def _fold(self, k_ev: Tensor, v_ev: Tensor, pos_ev: Tensor, mask: Tensor) -> None:
        """Add policy-evicted tokens [B,Hkv,e,(d)] (where ``mask``) to the state; on a sliding
        layer also remember them until they leave the window."""
        if self.state is None:
            return
        self.state.absorb(self.kernels.psi(k_ev.float()), v_ev, mask)
        if self.window is None:
            return
        pos_ev = torch.where(mask, pos_ev, -1)
        if self.fpos is None:
            self.fkeys, self.fvalues, self.fpos = (
                k_ev * mask[..., None],
                v_ev * mask[..., None],
                pos_ev,
            )
        else:
            self.fkeys = torch.cat([self.fkeys, k_ev * mask[..., None]], 2)
            self.fvalues = torch.cat([self.fvalues, v_ev * mask[..., None]], 2)
            self.fpos = torch.cat([self.fpos, pos_ev], 2)

    def _release(self, t: Tensor) -> None:
        """Take folded tokens that leave the window at rows t [B] out of the state."""
        gone = self._expired(self.fpos, t)
        if bool(gone.any()):
            self.state.release(self.kernels.psi(self.fkeys.float()), self.fvalues, gone)
            self.fpos = torch.where(gone, -1, self.fpos)
        live = self.fpos >= 0
        size = int(live.sum(-1).max())
        if size < self.fpos.shape[-1]:
            order = _first(live, size)
            gi = order[..., None].expand(*order.shape, self.fkeys.shape[-1])
            self.fkeys, self.fvalues = self.fkeys.gather(2, gi), self.fvalues.gather(2, gi)
            self.fpos = self.fpos.gather(-1, order)

    def _evict_one(
        self, q: Tensor, k: Tensor, v: Tensor, t: Tensor, newpos: Tensor, scale: float | None
    ) -> None:
        """Steady state (every slot full, one eviction per sequence): in place, size stays n."""
        b, hkv, _, d = k.shape
        pos = torch.cat([self.positions, newpos], -1)
        acc = None if self.acc is None else F.pad(self.acc, (0, 1))
        probs = self._probs(q, torch.cat([self.keys, k], 2), scale)
        slot = torch.empty(b, hkv, dtype=torch.long, device=k.device)
        for tv, rows in self._groups(t, torch.ones_like(t, dtype=torch.bool)):
            if rows is None:
                slot = self.policy.select_evict(tv, pos, acc, probs)
            else:
                slot[rows] = self.policy.select_evict(
                    tv,
                    pos[rows],
                    None if acc is None else acc[rows],
                    None if probs is None else probs[rows],
                )
        gone = self._expired(self.positions, t)  # the key leaving the window goes first
        has_gone = gone.any(-1)
        slot = torch.where(has_gone, gone.long().argmax(-1), slot)
        idx = slot[:, :, None, None].expand(b, hkv, 1, d)
        if self.state is not None:
            k_ev, v_ev = self.keys.gather(2, idx), self.values.gather(2, idx)
            self._fold(k_ev, v_ev, self.positions.gather(2, slot[..., None]), ~has_gone[..., None])
        self.keys.scatter_(2, idx, k)
        self.values.scatter_(2, idx, v)
        self.positions.scatter_(2, slot[..., None], newpos)
        if self.acc is not None:
            self.acc.scatter_(2, slot[..., None], 0.0)

    def _evict_general(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        t: Tensor,
        newpos: Tensor,
        need: Tensor,
        scale: float | None,
    ) -> None:
        """Growing, padded or bulk (prompt protocol) rows: evict ``need`` [B] per sequence."""
        b, hkv, _, d = k.shape
        K, V = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
        P = torch.cat([self.positions, newpos], -1)
        A = None if self.acc is None else F.pad(self.acc, (0, 1))
        valid = P >= 0
        ev = torch.zeros_like(valid)  # evicted by the policy (folded into the state)
        gone = self._expired(P, t)  # left the window (dropped)
        gone[..., -1] = False
        sel = (need > 0) | gone.any((1, 2))
        if bool(sel.any()):
            for tv, rows in self._groups(t, sel):
                r = slice(None) if rows is None else rows
                cnt = int(need[r].max())
                if int(need[r].min()) != cnt:
                    raise RuntimeError("rows at one position hold different numbers of tokens")
                vo = valid[r][..., :-1]
                go = gone[r][..., :-1]
                ngone = go.sum(-1)  # [b',Hkv]
                x = int(ngone.max())
                if x == int(ngone.min()):  # the same number left the window on every head
                    cand_mask, count = vo & ~go, cnt - x
                elif cnt == 1:  # one drop per head: the expired key where there is one
                    cand_mask, count = vo, 1
                else:
                    raise RuntimeError("heads at one position lost different numbers of tokens")
                if count <= 0:
                    continue
                c = int(cand_mask[0, 0].sum())
                vidx = _first(cand_mask, c)  # candidate old slots [b',Hkv,c]
                pos_s = _sub(P[r], vidx)
                acc_s = None if A is None else _sub(A[r], vidx)
                probs = None
                if self.policy.needs_probs:
                    gi = vidx[..., None].expand(*vidx.shape, d)
                    cand = torch.cat([K[r][:, :, :-1].gather(2, gi), k[r]], 2)
                    probs = self._probs(q[r], cand, scale)
                e = evict_many(self.policy, tv, pos_s, acc_s, probs, count)
                full = torch.zeros_like(valid[r])
                full[..., :-1].scatter_(-1, vidx, e)
                ev[r] = full & ~(ngone > 0)[..., None] if x != int(ngone.min()) else full
            if self.state is not None and bool(ev.any()):
                emax = int(ev.sum(-1).max())
                eidx = _first(ev, emax)
                gi = eidx[..., None].expand(*eidx.shape, d)
                self._fold(
                    K.gather(2, gi), V.gather(2, gi), P.gather(-1, eidx), ev.gather(-1, eidx)
                )
        keep = valid & ~ev & ~gone
        size = int(keep.sum(-1).max())
        order = _first(keep, size)
        kept = keep.gather(-1, order)
        gi = order[..., None].expand(*order.shape, d)
        self.keys = K.gather(2, gi) * kept[..., None]
        self.values = V.gather(2, gi) * kept[..., None]
        self.positions = torch.where(kept, P.gather(-1, order), -1)
        if A is not None:
            self.acc = A.gather(-1, order) * kept


class EvictingCache(Cache):
    """Real-eviction cache: ``policy`` (+ per-layer ``kernels``: the LESS state) on every layer.

    ``protocol``: ``"prompt"`` or ``"streaming"`` (module doc). ``attention_mask`` [B,T]: the
    left-padded prompt mask (None: no padding). Run the model inside :meth:`attached`.
    """

    def __init__(
        self,
        num_layers: int,
        policy: Policy,
        kernels: dict[int, LayerKernels] | None = None,
        *,
        protocol: str = "prompt",
        attention_mask: Tensor | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if kernels is not None and set(range(num_layers)) - set(kernels):
            raise ValueError(f"kernels must cover layers 0..{num_layers - 1}")
        pads = left_pad_counts(attention_mask)
        self.policy, self.protocol = policy, protocol
        layers = [
            EvictingLayer(policy, None if kernels is None else kernels[i], protocol, pads)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)

    @classmethod
    def for_model(
        cls,
        model,
        policy: Policy,
        kernels: dict[int, LayerKernels] | None = None,
        *,
        protocol: str = "prompt",
        attention_mask: Tensor | None = None,
    ) -> EvictingCache:
        """A cache with one layer per decoder layer of ``model``."""
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        return cls(n, policy, kernels, protocol=protocol, attention_mask=attention_mask)

    def attention(
        self,
        module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kw,
    ) -> tuple[Tensor, None]:
        """Registered attention function: query [B,H,T,d] -> (out [B,T,H,d], None)."""
        refuse_unknown_kwargs(module, kw)
        layer = self.layers[module.layer_idx]
        out = layer.attend(query, key, value, scaling, sliding_window, softcap)
        return out.transpose(1, 2).contiguous(), None

    @contextmanager
    def attached(self, model) -> Iterator[EvictingCache]:
        """Run ``model`` with this cache's attention function inside the block."""
        with use_attention(model, self.attention):
            yield self

    def nbytes(self) -> int:
        """Bytes of every cache tensor (K, V, positions, scores, low-rank state)."""
        return sum(layer.nbytes() for layer in self.layers)

    def fork(self, kernels: dict[int, LayerKernels] | None) -> EvictingCache:
        """A copy (own tensors) of a cache that has evicted nothing yet, e.g. right after the
        prompt, with other ``kernels`` (None: no state): one prefill serves several methods."""
        if any(layer.pending for layer in self.layers):
            raise RuntimeError("cannot fork an EvictingCache in the middle of a forward")
        if any(layer.state is not None and bool(layer.state.z.any()) for layer in self.layers):
            raise RuntimeError("cannot fork an EvictingCache whose state already holds tokens")
        out = EvictingCache(len(self.layers), self.policy, kernels, protocol=self.protocol)
        for src, dst in zip(self.layers, out.layers, strict=True):
            if not src.is_initialized:
                continue
            dst.lazy_initialization(src.keys, src.values)
            dst.keys, dst.values = src.keys.clone(), src.values.clone()
            dst.positions, dst.pads = src.positions.clone(), src.pads.clone()
            dst.acc = None if src.acc is None else src.acc.clone()
            dst.first_evict = src.first_evict.clone()
            dst.seen = src.seen
        return out

    def to_dynamic(self) -> DynamicCache:
        """The kept K/V as a library ``DynamicCache`` (all of the prompt before any eviction)."""
        if any(
            layer.keys.shape[2] != layer.seen or bool((layer.positions < 0).any())
            for layer in self.layers
        ):
            raise RuntimeError("to_dynamic needs a cache that holds every token and no padding")
        return DynamicCache(
            ddp_cache_data=[(x.keys.clone(), x.values.clone()) for x in self.layers]
        )


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by any cache: :meth:`EvictingCache.nbytes` or the K/V of a library cache."""
    if isinstance(cache, EvictingCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for x in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(x, Tensor):
                total += x.numel() * x.element_size()
    return total
