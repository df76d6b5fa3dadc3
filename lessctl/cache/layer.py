"""One decoder layer of the evicting cache: transformers' cache-layer protocol and the
protocols that drive eviction (module doc of :mod:`lessctl.cache`).

A forward of ``T`` tokens is split into chunks by the protocol: ``streaming`` one row at a time,
``prompt`` the first forward as one chunk (then one row at a time), ``chunked`` chunks of ``C``.
A chunk of rows ``a .. a+C-1`` first evicts at row ``a`` (kept keys plus key ``a``, down to the
budget, :func:`~lessctl.cache.driver.evict_row`), appends its other keys, then every row attends
causally over the kept keys plus the chunk's keys up to itself, plus the LESS state
(:func:`~lessctl.cache.attend.rows_attention`). Once every sequence's cache is full, a one-row
forward takes :func:`~lessctl.cache.step.steady_step`, which never waits for the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from lessctl.cache import native, triton_step
from lessctl.cache.attend import rows_attention, sdpa_rows
from lessctl.cache.driver import evict_row, release
from lessctl.cache.scored import scored_attention
from lessctl.cache.step import steady_step
from lessctl.cache.store import KeptStore
from lessctl.errors import LessctlError
from lessctl.less.frozen import FrozenKernels
from lessctl.less.kernels import LayerKernels
from lessctl.policies.base import Policy

PROTOCOLS = ("prompt", "streaming", "chunked")
FUSED_SCORES = True  # an accumulating policy's chunk of rows: scores fused with the attention
# (lessctl/cache/scored.py); False: explicit probabilities (rows_attention), for the benchmark


class EvictingLayer(CacheLayerMixin):
    """One layer's :class:`~lessctl.cache.store.KeptStore` and protocol (module doc)."""

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        policy: Policy,
        kernels: LayerKernels | None = None,
        protocol: str = "prompt",
        pads: Tensor | None = None,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.policy, self.kernels, self.protocol, self.chunk = policy, kernels, protocol, chunk
        self.pads = pads
        self.store: KeptStore | None = None
        self.first_evict: Tensor | None = None  # [B] row of the first eviction (accumulate)
        self.seen, self.pending, self.steady = 0, False, False
        self.native = None  # the C++ op of the steady step's state part (lessctl.cache.native)
        self.triton = None  # its Triton counterpart on a GPU (lessctl.cache.triton_step)
        self.window: int | None = None
        self.softcap: float | None = None
        self.scale: float | None = None

    # ---- the store's tensors, by name (read-only: the store owns them; transformers'
    # CacheLayerMixin assigns keys/values = None on construction, which is ignored) -------------
    def _get(self, name: str):
        return None if self.store is None else getattr(self.store, name)

    keys = property(lambda self: self._get("keys"), lambda self, x: None)
    values = property(lambda self: self._get("values"), lambda self, x: None)
    positions = property(lambda self: self._get("positions"))
    acc = property(lambda self: self._get("acc"))
    state = property(lambda self: self._get("state"))

    # ---- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Empty buffers shaped after the first K [B,Hkv,T,d]."""
        b = key_states.shape[0]
        self.device = key_states.device
        self.frozen: FrozenKernels | None = None
        if self.kernels is not None:
            self.kernels = self.kernels.to(self.device)  # kernels follow the layer's device
            self.frozen = FrozenKernels(self.kernels)
        rank = None if self.kernels is None else self.kernels.cfg.rank
        self.store = KeptStore.empty(key_states, value_states, self.policy.accumulates, rank)
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
        self.store = self.first_evict = None
        self.seen, self.pending, self.is_initialized, self.steady = 0, False, False, False

    def _index_batch(self, idx: Tensor) -> None:
        idx = idx.to(self.device)
        self.store = self.store.index_batch(idx)
        self.pads, self.first_evict = self.pads[idx], self.first_evict[idx]
        self.steady = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._index_batch(torch.as_tensor(indices, device=self.device).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.store.keys.shape[0]
            self._index_batch(torch.arange(b, device=self.device).repeat_interleave(repeats))

    # ---- memory ------------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every tensor this layer holds (K, V, positions, scores, state, folded window keys)."""
        return [] if self.store is None else self.store.tensors()

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()

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
        self.window, self.softcap, self.scale = window, softcap, scale
        t = q.shape[2]
        if t == 1 and self.steady:
            out = steady_step(
                q,
                k,
                v,
                self.seen - self.pads,
                self.store,
                self.policy,
                self.frozen,
                scale,
                window,
                softcap,
                self.native if self.native is not None else self.triton,
            )
            self.seen += 1
            return out
        if self.protocol == "prompt":
            size = t if self.seen == 0 else 1
        else:
            size = 1 if self.protocol == "streaming" else int(self.chunk)
        outs = [
            self._chunk(q[:, :, a : a + size], k[:, :, a : a + size], v[:, :, a : a + size], scale)
            for a in range(0, t, size)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """Rows ``seen .. seen+C-1`` (module doc): q [B,H,C,d], k/v [B,Hkv,C,d] -> [B,H,C,d]."""
        s, n, window = self.store, self.policy.budget, self.window
        b, hkv, c, _ = k.shape
        first = self.seen == 0
        if c > 1 and not first and window is not None and s.state is not None:
            raise LessctlError(
                "chunked prefill with a LESS state on a sliding-window layer is not supported "
                "(a folded key may leave the window inside a chunk); use protocol prompt or "
                "streaming"
            )
        s.unpack()
        t0 = self.seen - self.pads  # [B] the chunk's first row in each sequence
        if window is not None and s.state is not None:
            release(s, self.frozen, t0, window)
        evict_row(
            s,
            self.policy,
            self.frozen,
            q[:, :, :1],
            k[:, :, :1],
            v[:, :, :1],
            t0,
            scale,
            window,
            self.softcap,
        )
        rows = t0[:, None] + torch.arange(c, device=t0.device)  # [B,C] positions, <0: padding
        if c > 1:
            newpos = torch.where(rows[:, 1:] >= 0, rows[:, 1:], -1)[:, None].expand(b, hkv, -1)
            real = (newpos >= 0)[..., None]
            s.keys = torch.cat([s.keys, k[:, :, 1:] * real], 2)
            s.values = torch.cat([s.values, v[:, :, 1:] * real], 2)
            s.positions = torch.cat([s.positions, newpos], -1)
            if s.acc is not None:
                s.acc = F.pad(s.acc, (0, c - 1))
        if n is not None:  # no eviction before this chunk: the first comes at its end, or later
            self.first_evict = torch.where(t0 < n, torch.clamp(t0 + c, min=n), self.first_evict)
        out, probs, sums = self._attend_rows(q, rows, scale, first)
        if sums is not None:  # fused: the rows' weighted probabilities, summed
            s.acc = self.policy.add_sums(s.acc, sums, rows, s.positions, self.first_evict)
        elif s.acc is not None:
            probs = probs * (rows >= 0)[:, None, :, None]
            s.acc = self.policy.accumulate(s.acc, probs, rows, s.positions, self.first_evict)
        self.seen += c
        self._check_steady(q.shape[1] // hkv)
        return out

    def _attend_rows(
        self, q: Tensor, rows: Tensor, scale: float | None, first: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The chunk's rows [B,C] over the store (causal, windowed) plus the state -> (out,
        probs [B,Hkv,C,m] or None, sums [B,Hkv,m] or None): an accumulating policy's rows
        get ``sums`` from the fused path (:mod:`lessctl.cache.scored`; several rows, no
        soft-capping, ``FUSED_SCORES``), else ``probs`` (:func:`rows_attention`)."""
        s, window = self.store, self.window
        want = s.acc is not None
        causal = first and window is None and bool((self.pads == 0).all())
        if causal and self.softcap is None and not want:  # a prompt: SDPA, causal
            g = q.shape[1] // s.keys.shape[1]
            kk, vv = s.keys.repeat_interleave(g, 1), s.values.repeat_interleave(g, 1)
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=scale)
            return out, None, None
        log_phi = state = None
        if s.state is not None and not first:  # nothing is folded before the first chunk
            state, log_phi = s.state, self.frozen.log_phi(q)
        fused = want and self.softcap is None and FUSED_SCORES and q.shape[2] > 1
        if fused and causal:  # a prompt: no [C x m] mask at all
            w = self.policy.row_weights(rows, self.first_evict)
            out, sums = scored_attention(q, s.keys, s.values, None, scale, w, log_phi, state)
            return out, None, sums
        P = s.positions[:, :, None, :]  # [B,Hkv,1,m]
        r = rows[:, None, :, None]  # [B,1,C,1]
        visible = (P >= 0) & (P <= r)
        if window is not None:
            visible = visible & (P > r - window)
        if self.softcap is None and not want and bool((rows >= 0).all()):
            return sdpa_rows(q, s.keys, s.values, visible, scale, log_phi, state), None, None
        if fused:
            w = self.policy.row_weights(rows, self.first_evict) * (rows >= 0)
            out, sums = scored_attention(q, s.keys, s.values, visible, scale, w, log_phi, state)
            return out, None, sums
        out, probs = rows_attention(
            q, s.keys, s.values, visible, scale, self.softcap, log_phi, state, want
        )
        return out, probs, None

    def _check_steady(self, group: int) -> None:
        """Enter the packed steady state once every slot of every sequence is full (``group``:
        query heads per KV head)."""
        n, window, s = self.policy.budget, self.window, self.store
        if n is None or (getattr(self.policy, "state_aware", False) and s.state is not None):
            return  # recall with a state decides on the general path (policies/recall.py)
        cap = n if window is None else min(n, window)
        if s.positions.shape[-1] != cap or not bool((s.positions >= 0).all()):
            return
        folds = window is not None and window > n and s.state is not None
        linear = self.frozen is not None and self.frozen.linear
        small = s.keys.device.type == "cpu" and s.keys.shape[0] <= native.MAX_BATCH
        self.native = native.less_step_op() if linear and small else None
        self.triton = None  # CUDA (or Triton's interpreter on CPU where the C++ op does not run)
        if linear and self.native is None:
            self.triton = triton_step.less_step_op(s.keys.device)
        fused = self.native is not None or self.triton is not None
        s.pack(window - n if folds else None, group, linear, feature_rows=not fused)
        self.steady = True
