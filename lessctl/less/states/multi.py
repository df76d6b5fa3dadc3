"""Several states per KV head (``less.state=multi``, ``less.states=M``): the state's R rows
(``less.rank``) are M states of R/M rows each, and a learned router on psi(k) writes each
evicted key into them as a soft mix::

    g(k) = softmax_m( softmax_r(log psi(k)) W + b )          W [Hkv,R,M], b [Hkv,M]
    psi~_{m,i}(k) = g_m(k) * psi_{m,i}(k)                     i < R/M (state m's rows)
    phi~(q) = phi(q)                                          (reads every state)

so state m holds ``H_m = sum g_m(k) psi_m(k)^T v``: keys the router sends elsewhere leave it
alone, and phi(q)'s rows of state m read what was written there. The router sees psi's
normalised features (a distribution over the R rows), so psi's scale (``init_scale``) does not
saturate it; W starts Glorot-uniform and b at 0 (a near-even mix). The mix is soft in training
and in evaluation alike (no train/eval mismatch); a key's total weight over the states is at
most psi's, so an untrained module is ~ the plain policy, as the paper's kernels are.

Bytes: exactly the sum state's of rank R (the M states are its rows): ``less.rank=8
less.states=2`` is two rank-4 states at the bytes of one rank-8 state. ``less.rank`` (each
layer's) must be a multiple of M.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lessctl.less.kernels.base import rank_list, uniform
from lessctl.less.states.base import StateVariant, register_state


@register_state("multi")
class MultiState(StateVariant):
    identity = False  # writes are gated; reads are phi's own (StateVariant's identity)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.m = int(cfg.states)
        if self.m < 2 or cfg.rank % self.m:
            raise ValueError(f"less.state=multi: rank {cfg.rank} is not M={self.m} states x rows")
        self.W = uniform(cfg.num_kv_heads, cfg.rank, self.m)
        self.b = nn.Parameter(torch.zeros(cfg.num_kv_heads, self.m))

    def _gates(self, dist: Tensor) -> Tensor:
        """Router logits [B,Hkv,S,M] from psi's normalised features dist [B,Hkv,S,R]."""
        return torch.einsum("bhsr,hrm->bhsm", dist, self.W) + self.b[:, None]

    def _rows(self, x: Tensor, per_state: Tensor, combine) -> Tensor:
        """x [B,Hkv,S,R] with state m's rows combined with per_state[..., m] [B,Hkv,S,M]."""
        b, h, s, r = x.shape
        return combine(x.view(b, h, s, self.m, r // self.m), per_state[..., None]).view(b, h, s, r)

    def write(self, psi_k: Tensor) -> Tensor:
        """psi~(k) = g_m(k) psi(k) on state m's rows: psi_k [B,Hkv,S,R] -> [B,Hkv,S,R]."""
        psi_k = psi_k.float()
        dist = psi_k / psi_k.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return self._rows(psi_k, torch.softmax(self._gates(dist), -1), torch.mul)

    def log_write(self, log_psi_k: Tensor) -> Tensor:
        """log psi~(k) = log psi(k) + log g_m(k) on state m's rows: [B,Hkv,S,R] (-inf = 0)."""
        log_psi_k = log_psi_k.float()
        dist = torch.softmax(log_psi_k, -1).nan_to_num(0.0)  # all-zero features: no weight
        return self._rows(log_psi_k, torch.log_softmax(self._gates(dist), -1), torch.add)

    @classmethod
    def config_problem(cls, less: Any) -> str | None:
        m = int(less.get("states", 1))
        ranks = rank_list(less.rank) or [int(less.rank)]
        if m < 2:
            return f"less.states={m} with less.state=multi; allowed: an int >= 2 (M states)"
        bad = [r for r in ranks if r % m]
        if bad:
            shown = int(less.rank) if rank_list(less.rank) is None else ranks
            return (
                f"less.rank={shown} with less.state=multi less.states={m}; allowed: every "
                f"layer's rank a multiple of {m} (M states of rank/M rows each)"
            )
        return None
