"""What one layer of the evicting cache holds: kept K/V, their positions and scores, the LESS
state, and (sliding-window layers with a state) the folded keys still inside the window.

Per (b, h_kv): ``keys``/``values`` ``[B,Hkv,m,d]`` (post-RoPE keys, the model's dtype),
``positions [B,Hkv,m]`` (each kept token's index in its own sequence, ``-1`` = empty slot),
``acc [B,Hkv,m]`` (fp32 running scores of an accumulating policy), ``state`` (H, z of the
evicted tokens) and ``fkeys``/``fvalues``/``fpos`` (tokens the policy folded into the state while
they are still inside the layer's window; they leave it again at row ``j + w``).

Packed form (the steady state, every slot full): ``keys``/``values`` are views of the first
``cap`` slots of ``kbuf``/``vbuf`` ``[B,Hkv,cap+R,d]``, whose last ``R`` slots are the state's
virtual keys (key 0, value ``H_r / z_r``), so a decode step writes in place and attends with one
call; the fold buffer has its fixed capacity ``w - n``. :class:`StateViews` holds, made once,
the views of the packed state that a decode step reads and writes, and the learned kernels'
input and output rows of one step, so that it pays for no reshaping or allocation of them (on
CPU each call costs a decode step several µs, whatever it does).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lessctl.cache.eviction import first_true
from lessctl.less.state import LowRankState

Z_FLOOR = torch.finfo(torch.float32).tiny  # a linear state's least z while packed (pack)
_TENSORS = ("keys", "values", "positions", "acc", "fkeys", "fvalues", "fpos")


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


@dataclass
class StateViews:
    """Views of a packed store with a state (module doc) for ``g`` query heads per KV head,
    and (learned kernels) the kernels' rows of one decode step: ``bias``, ``rows`` and
    ``feats`` own their memory, the rest are views (writes go through); None: not held."""

    bias: Tensor  # [B,Hkv,g,cap+R]: 0 for the kept keys, then the virtual keys' logits
    mask: Tensor  # bias as [B,H,1,cap+R] (query head j reads KV head j // g)
    logits: Tensor  # [B,Hkv,g,R] the virtual keys' logits in bias
    logits_hf: Tensor  # [Hkv,g,B,R] the same, heads first (as the feature maps return phi)
    values: Tensor  # [B,Hkv,R,d] the virtual keys' values in vbuf
    z_col: Tensor  # [B,Hkv,R,1] state.z
    z_row_hf: Tensor  # [Hkv,1,B,R] state.z
    pass_logits: Tensor | None = None  # [B,Hkv,g,R] fp32: the C++ step's logits for a logits
    # pass (the bias's view where it is fp32, else its own)
    rows: Tensor | None = None  # [B,H+Hkv,1,d] fp32: the query's heads, then the freed key's
    rows_hf: Tensor | None = None  # [H+Hkv,B,d] the same, heads first (the kernels' input)
    feats: Tensor | None = None  # [H+Hkv,B,R] fp32: phi(q), then psi(k) (the kernels' output)
    phi: Tensor | None = None  # [Hkv,g,B,R] phi(q) in feats
    psi: Tensor | None = None  # [B,Hkv,R] psi(k) in feats
    psi_col: Tensor | None = None  # [B,Hkv,R,1] the same

    @classmethod
    def of(cls, s: KeptStore, g: int, linear: bool, feature_rows: bool = True) -> StateViews:
        """Views of packed ``s`` (with a state); ``linear``: learned kernels, whose rows it
        holds where ``feature_rows`` (the torch path; the C++ step of
        :mod:`lessctl.cache.native` has its own, and an fp32 ``pass_logits`` instead). Those of
        ``state.z`` hold while the state is updated in place, as the steady step does for
        learned kernels (a log-feature state is replaced each step; the step then uses only
        bias, logits and values)."""
        b, hkv, m, d = s.kbuf.shape
        cap, r = s.positions.shape[-1], s.state.z.shape[-1]
        h = hkv * g
        bias = s.kbuf.new_zeros(b, hkv, g, m)
        dev = bias.device
        z = s.state.z
        views = cls(
            bias=bias,
            mask=bias.view(b, hkv * g, 1, m),
            logits=bias[..., cap:],
            logits_hf=bias[..., cap:].permute(1, 2, 0, 3),
            values=s.vbuf[:, :, cap:],
            z_col=z[..., None],
            z_row_hf=z.transpose(0, 1)[:, None],
        )
        if linear and not feature_rows:
            fp32 = bias.dtype == torch.float32
            views.pass_logits = views.logits if fp32 else torch.zeros(b, hkv, g, r, device=dev)
        elif linear:
            rows = torch.zeros(b, h + hkv, 1, d, device=bias.device)
            feats = torch.zeros(h + hkv, b, r, device=bias.device)
            views.rows, views.rows_hf = rows, rows.view(b, h + hkv, d).transpose(0, 1)
            views.feats, views.phi = feats, feats[:h].view(hkv, g, b, r)
            views.psi = feats[h:].permute(1, 0, 2)
            views.psi_col = views.psi[..., None]
        return views


@dataclass
class KeptStore:
    """One layer's cache tensors (module doc); ``None`` = not held."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    acc: Tensor | None = None
    state: LowRankState | None = None
    fkeys: Tensor | None = None
    fvalues: Tensor | None = None
    fpos: Tensor | None = None
    kbuf: Tensor | None = None  # packed form only
    vbuf: Tensor | None = None
    views: StateViews | None = None  # packed, with a state

    @classmethod
    def empty(
        cls, like_k: Tensor, like_v: Tensor, accumulates: bool, rank: int | None
    ) -> KeptStore:
        """No token yet, shaped after the first K/V [B,Hkv,T,d]; ``rank``: the state's R."""
        b, hkv, _, d = like_k.shape
        dev = like_k.device
        return cls(
            keys=like_k.new_zeros(b, hkv, 0, d),
            values=like_v.new_zeros(b, hkv, 0, like_v.shape[-1]),
            positions=torch.zeros(b, hkv, 0, dtype=torch.long, device=dev),
            acc=torch.zeros(b, hkv, 0, device=dev) if accumulates else None,
            state=None if rank is None else LowRankState.zeros(b, hkv, rank, like_v.shape[-1], dev),
        )

    @property
    def packed(self) -> bool:
        return self.kbuf is not None

    def unpack(self) -> None:
        """Leave the packed form (the general path reallocates freely)."""
        self.kbuf = self.vbuf = self.views = None

    def pack(
        self,
        fold_capacity: int | None,
        group: int,
        linear_state: bool,
        feature_rows: bool = True,
    ) -> None:
        """Enter the packed form (module doc); ``fold_capacity``: the fold buffer's fixed size;
        ``group``: query heads per KV head; ``linear_state``: the state is updated linearly in
        place (learned kernels), and z is floored at the smallest normal float so that a step
        divides H by z unclamped (an empty feature then weighs ``phi * 1.2e-38`` rather than 0,
        with value 0); ``feature_rows``: hold the torch path's rows (:class:`StateViews`)."""
        b, hkv, m, d = self.keys.shape
        r = 0 if self.state is None else self.state.z.shape[-1]
        self.kbuf = self.keys.new_zeros(b, hkv, m + r, d)
        self.vbuf = self.values.new_zeros(b, hkv, m + r, self.values.shape[-1])
        self.kbuf[:, :, :m] = self.keys
        self.vbuf[:, :, :m] = self.values
        self.keys, self.values = self.kbuf[:, :, :m], self.vbuf[:, :, :m]
        self.positions = self.positions.contiguous()
        if self.state is not None:
            if linear_state:
                self.state.z.clamp_(min=Z_FLOOR)
            self.vbuf[:, :, m:] = self.state.mean_values().to(self.vbuf.dtype)
            self.views = StateViews.of(self, group, linear_state, feature_rows)
        if fold_capacity is not None and self.state is not None:
            self.fkeys, self.fvalues, self.fpos = _padded_fold(self, fold_capacity)

    def tensors(self) -> list[Tensor]:
        """Every tensor held (the packed buffers count once, not their views)."""
        held = [getattr(self, n) for n in _TENSORS]
        if self.packed:
            vw = self.views
            own = [] if vw is None else [vw.bias, vw.rows, vw.feats]
            if vw is not None and vw.pass_logits is not None and vw.pass_logits is not vw.logits:
                own.append(vw.pass_logits)
            held = [self.kbuf, self.vbuf, *held[2:], *own]
        out = [x for x in held if x is not None]
        if self.state is not None:
            out += [self.state.H, self.state.z]
        return out

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.tensors())

    def index_batch(self, idx: Tensor) -> KeptStore:
        """Sequences ``idx`` [B'] of the batch (a new, unpacked store)."""
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if f.name in ("kbuf", "vbuf", "views") or x is None:
                continue
            out[f.name] = x.index_batch(idx) if f.name == "state" else x.index_select(0, idx)
        return KeptStore(**out)


def _padded_fold(s: KeptStore, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fold buffer at a fixed ``capacity`` (empty slots: position -1, K/V 0)."""
    b, hkv, _, d = s.keys.shape
    dv = s.values.shape[-1]
    fk = s.keys.new_zeros(b, hkv, capacity, d)
    fv = s.values.new_zeros(b, hkv, capacity, dv)
    fp = torch.full((b, hkv, capacity), -1, dtype=torch.long, device=s.keys.device)
    if s.fpos is not None:
        live = s.fpos >= 0
        size = int(live.sum(-1).max())
        if size > capacity:
            raise RuntimeError(f"{size} folded keys inside the window; capacity {capacity}")
        order = first_true(live, size)
        fk[:, :, :size] = s.fkeys.gather(2, order[..., None].expand(b, hkv, size, d))
        fv[:, :, :size] = s.fvalues.gather(2, order[..., None].expand(b, hkv, size, dv))
        fp[:, :, :size] = s.fpos.gather(-1, order)
    return fk, fv, fp
