"""``recall``: state-aware eviction (LoLA-style): among the keys an underlying score policy would
evict, evict first those whose value the LESS state already recalls best.

At row ``t >= n`` the base policy (``base``: h2o, tova or composite) ranks the old candidates by
its eviction scores (lowest first, ties: earliest position). The ``pool`` lowest form the pool
(a budget policy evicts one key per row, so "the keys the base would evict" needs a pool); of
them the key with the smallest self-recall error is evicted::

    err(j) = ‖v_j − v̂(k_j)‖,   v̂(k) = ψ(k) H / (ψ(k) z)      (H = Σ ψ(k)ᵀv, z = Σ ψ(k) over
                                                               the keys evicted before row t)

and the state then folds it. A base that chooses for the whole layer (tova's default) keeps
doing so: the pool is the layer's, and the errors are summed over the KV heads (the state of
each head reads its own key). Where ``ψ(k) z = 0`` (the state holds nothing the key reads, e.g.
before the first eviction) the error is +inf: the state cannot recall it. Exact ties of the
error (all +inf included) go to the base's order, so ``pool = 1`` is the base policy exactly.
The error is computed from log features, ``log ψ(k) + offset`` (the state's scale,
:class:`~lessctl.less.state.LowRankState`), shifted by its max over the R features: the ratio
is unchanged, and Performer's features do not overflow.

Without kernels (Baseline, Baseline+, or a policy used before any kernels exist) there is no
state to ask: the decisions are the base policy's (``evict_at(q, k)``, ``select_evict`` without
``recall``). With kernels:

- parallel face: :func:`recall_evict_at` (``layer_evict_at(..., v=, kernels=)``), a
  sequential driver like :func:`~lessctl.policies.base.sequential_evict_at` that also carries
  the candidates' values, their log ψ and the state;
- cache face: the evicting cache's general path (``lessctl.cache.driver.evict_row``) passes
  ``recall`` (a function of candidate slots -> errors over its own state); it never enters the
  packed steady state (whose step has no values of candidates at hand), and refuses what it
  cannot do exactly: several evictions at one row (a prompt or chunk past the budget: each
  eviction changes the state the next one reads; use protocol=streaming) and a sliding-window
  layer larger than the budget (keys leaving the state again).

Training (train.source=shards): epoch 1 trains on the base policy's decisions; after each
epoch the decisions are remade with the kernels as they are then (and the fixed parts
recomputed), so epoch e > 1 trains on decisions from the kernels at the end of epoch e − 1 and
the validation after epoch e sees the decisions evaluation would make with those kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lessctl.errors import InputError, LessctlError
from lessctl.policies.base import (
    Budget,
    Policy,
    argmin_earliest,
    capped,
    default_scale,
    never_evicted,
    register,
)
from lessctl.policies.composite import Composite
from lessctl.policies.h2o import H2O
from lessctl.policies.tova import TOVA
from lessctl.schema import Rule, int_at_least, one_of

BASES = ("composite", "h2o", "tova")  # score-based policies with eviction_scores
RecallFn = Callable[[Tensor], Tensor]  # candidate slots [B,Hkv,P] long -> errors [B,Hkv,P]


def recall_error(H: Tensor, z: Tensor, offset: Tensor, log_psi: Tensor, v: Tensor) -> Tensor:
    """Self-recall error ‖v − ψ(k)H / ψ(k)z‖ of keys under a state stored as
    ``exp(offset) * (H, z)``: H [B,Hkv,R,d], z/offset [B,Hkv,R], log_psi [B,Hkv,m,R] (-inf = a
    zero feature), v [B,Hkv,m,d] -> [B,Hkv,m] fp32; +inf where ψ(k)z = 0."""
    lw = log_psi.float() + offset[:, :, None, :]
    top = lw.amax(-1, keepdim=True)
    w = torch.exp(lw - torch.where(torch.isfinite(top), top, 0.0))  # [B,Hkv,m,R]
    den = (w * z[:, :, None, :]).sum(-1)  # [B,Hkv,m]
    num = w @ H  # [B,Hkv,m,d]
    ok = den > 0
    vhat = num / torch.where(ok, den, 1.0)[..., None]
    err = (v.float() - vhat).norm(dim=-1)
    return torch.where(ok, err, torch.inf)


@register
@dataclass(frozen=True)
class Recall(Policy):
    """The ``pool`` keys the base policy would evict first; of them the best recalled goes."""

    base: Policy = H2O(16, 16)
    pool: int = 4
    name: ClassVar[str] = "recall"
    config_keys: ClassVar[Mapping[str, Rule]] = {
        "base": one_of(*BASES),
        "pool": int_at_least(1),
        **H2O.config_keys,
        **TOVA.config_keys,
        **Composite.config_keys,
    }
    state_aware: ClassVar[bool] = True

    @classmethod
    def _base_class(cls, cfg: Mapping[str, object]) -> type[Policy]:
        from lessctl.policies.base import POLICIES

        base = cfg.get("base", "h2o")
        if base not in BASES:
            raise InputError(f"policy base={base!r} is invalid; allowed: {', '.join(BASES)}")
        return POLICIES[base]  # type: ignore[index]

    @classmethod
    def budget_tokens(cls, cfg: Mapping[str, object], b: Budget) -> int:
        return cls._base_class(cfg).budget_tokens(cfg, b)

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> Recall:
        """The ``base`` policy from the same config (its own keys), and ``pool``."""
        base, pool = cls._base_class(cfg), cfg.get("pool", 4)
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            raise InputError(f"policy pool={pool!r} is invalid; allowed: an int >= 1")
        return cls(base.from_config(cfg, b, total), pool)

    def __post_init__(self) -> None:
        if self.base.name not in BASES:
            raise ValueError(f"recall's base must be one of {', '.join(BASES)}; got {self.base}")
        if self.pool < 1:
            raise ValueError(f"recall needs pool >= 1; got {self.pool}")

    @property
    def budget(self) -> int:  # type: ignore[override]
        return self.base.budget  # type: ignore[return-value]

    @property
    def accumulates(self) -> bool:  # type: ignore[override]
        return self.base.accumulates

    @property
    def needs_probs(self) -> bool:  # type: ignore[override]
        return self.base.needs_probs

    @property
    def layer_wide(self) -> bool:
        """The base chooses for the whole layer (tova without per_head): so does recall."""
        return getattr(self.base, "per_head", True) is False

    def accumulate(self, acc, probs, rows, positions, first_evict):
        return self.base.accumulate(acc, probs, rows, positions, first_evict)

    def row_weights(self, rows, first_evict):
        return self.base.row_weights(rows, first_evict)

    def add_sums(self, acc, sums, rows, positions, first_evict):
        return self.base.add_sums(acc, sums, rows, positions, first_evict)

    def eviction_scores(self, t, positions, acc_scores, probs_now):
        """The base's scores (bulk eviction without a state: the base's order)."""
        return self.base.eviction_scores(t, positions, acc_scores, probs_now)

    def pool_slots(self, t, positions, acc_scores, probs_now) -> Tensor:
        """The ``pool`` old candidates the base evicts first, in its order: [B,Hkv,n+1] ->
        [B,Hkv,min(pool, n)] long slots (lowest score, then earliest position)."""
        scores = self.base.eviction_scores(t, positions, acc_scores, probs_now)
        old = positions[..., :-1]
        order = old.argsort(dim=-1, stable=True)
        order = order.gather(-1, scores.gather(-1, order).argsort(dim=-1, stable=True))
        return order[..., : min(self.pool, old.shape[-1])]

    def select_evict(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
        recall: RecallFn | None = None,
    ) -> Tensor:
        """Online face: ``recall`` maps candidate slots [B,Hkv,P] to their recall errors under
        the current state; None (no kernels) or pool 1: the base's choice."""
        if recall is None or self.pool == 1:
            scores = self.base.eviction_scores(t, positions, acc_scores, probs_now)
            return argmin_earliest(scores, positions[..., :-1])
        cand = self.pool_slots(t, positions, acc_scores, probs_now)
        err = recall(cand)  # first minimum: ties keep the base's order
        if self.layer_wide:  # one choice for the layer: the errors summed over its KV heads
            err = err.sum(1, keepdim=True).expand_as(err)
        return cand.gather(-1, err.argmin(-1, keepdim=True))[..., 0]

    def evict_at(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """Without kernels: the base policy's decisions (module doc)."""
        return self.base.evict_at(q, k, scale)

    def with_extra(self, extra: int) -> Recall:
        return self.replace(base=self.base.with_extra(extra))


def recall_evict_at(
    policy: Recall,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_psi: Callable[[Tensor], Tensor],
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Parallel face with kernels: the online face run over the sequence, with the state.

    q [B,H,S,d], k/v [B,Hkv,S,d], ``log_psi``: k [B,Hkv,m,d] -> log ψ(k) [B,Hkv,m,R]
    -> evict_at [B,Hkv,S]. Buffers of n + 1 candidates (keys, values, log ψ, scores);
    the state is a :class:`~lessctl.less.state.LowRankState` folded as the cache folds it.
    """
    from lessctl.less.state import LowRankState  # lessctl.less imports the policies

    b, hkv, s, d = k.shape
    n = policy.budget
    out = never_evicted(k)
    if n >= s:
        return out
    dt = torch.promote_types(k.dtype, torch.float32)
    qg = q.to(dt).view(b, hkv, -1, s, d) * default_scale(d, scale)
    kall, vall = k.to(dt), v.to(torch.float32)
    with torch.no_grad():  # decisions: no gradient through the kernels
        lpall = log_psi(k.float()).to(torch.float32)  # [B,Hkv,S,R]
    state = LowRankState.zeros(b, hkv, lpall.shape[-1], v.shape[-1], k.device)
    kbuf = kall[:, :, : n + 1].clone()  # [B,Hkv,n+1,d]; slot n holds the new key
    vbuf = vall[:, :, : n + 1].clone()
    lpbuf = lpall[:, :, : n + 1].clone()
    pos = torch.arange(n + 1, device=k.device).expand(b, hkv, n + 1).contiguous()
    acc = torch.zeros(b, hkv, n + 1, dtype=dt, device=k.device)
    if policy.accumulates:  # rows < n attend causally over the first n keys
        causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
        logits = capped(qg[..., :n, :] @ kbuf[:, :, None, :n].transpose(-1, -2), softcap)
        rows = torch.arange(n, device=k.device).expand(b, n)
        acc[..., :n] = policy.accumulate(
            acc[..., :n],
            logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(2),
            rows,
            pos[..., :n],
            torch.full_like(rows[:, 0], n),
        )

    def at(x: Tensor, idx: Tensor) -> Tensor:
        return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))

    def recall(idx: Tensor) -> Tensor:
        return recall_error(state.H, state.z, state.offset, at(lpbuf, idx), at(vbuf, idx))

    for t in range(n, s):
        kbuf[:, :, n], vbuf[:, :, n], lpbuf[:, :, n] = kall[:, :, t], vall[:, :, t], lpall[:, :, t]
        pos[..., n] = t
        acc[..., n] = 0.0
        qt = qg[..., t : t + 1, :]  # [B,Hkv,g,1,d]
        probs = None
        if policy.needs_probs:
            probs = capped(qt @ kbuf[:, :, None].transpose(-1, -2), softcap).softmax(-1).sum((2, 3))
        slot = policy.select_evict(t, pos, acc if policy.accumulates else None, probs, recall)
        slot = slot[..., None]  # [B,Hkv,1]
        state.absorb_log(at(lpbuf, slot), at(vbuf, slot))
        out.scatter_(-1, pos.gather(-1, slot), t)
        pos.scatter_(-1, slot, t)  # the new key takes the evicted slot
        for buf, src in ((kbuf, kall), (vbuf, vall), (lpbuf, lpall)):
            buf.scatter_(2, slot[..., None].expand(b, hkv, 1, buf.shape[-1]), src[:, :, t : t + 1])
        if policy.accumulates:
            acc.scatter_(-1, slot, 0.0)
            kt = kbuf[:, :, None, :n].transpose(-1, -2)
            acc[..., :n] += capped(qt @ kt, softcap).softmax(-1).sum((2, 3))
    return out


def refuse_window(policy: Policy, window: int | None) -> None:
    """A state-aware policy with kernels on a sliding layer wider than its budget: refused."""
    if window is not None and policy.budget is not None and window > policy.budget:
        raise LessctlError(
            f"policy={policy.name} with kernels on a sliding-window layer (window {window} > "
            f"budget {policy.budget}) is not supported; allowed: full-attention layers, or a "
            "window within the budget"
        )
