"""Eviction policies: shared semantics, the registry and the sequential driver.

Semantics (every policy, both faces):

- Eviction is permanent. A policy's decision over a sequence of S tokens is
  ``evict_at[b, h_kv, j]`` (int64, ``[B, Hkv, S]``): the first query row at which key ``j`` is
  no longer kept (``S`` = never). Key ``j`` is kept for row ``t`` iff ``j <= t < evict_at[j]``;
  a key is never evicted at its own row (``evict_at[j] >= j + 1``).
- With a budget of ``n`` tokens, rows ``t < n`` keep all ``t + 1`` keys; at every row ``t >= n``
  exactly one key is evicted, so every row past the budget keeps exactly ``n`` keys.
- "Evict, then attend": the decision at row ``t`` is made before row ``t`` attends. It may use
  the current query ``q_t`` (TOVA) and the attention accumulated by rows ``< t`` (H2O), never
  anything after row ``t``.
- Selection is per KV head (TOVA by default chooses for the whole layer: one choice made from
  all KV heads' scores, the same on every head). With grouped-query attention (H query heads,
  Hkv KV heads, group ``g = H // Hkv``; query head ``h`` belongs to KV head ``h // g``)
  attention probabilities are summed over the query heads of the group. Logits are
  ``q_t . k_j * scale``, scale defaults to ``1 / sqrt(d)``. Ties go to the lowest score, then
  to the earliest position.

Two faces that agree exactly:

1. parallel: ``policy.evict_at(q [B,H,S,d], k [B,Hkv,S,d], scale=None) -> [B,Hkv,S]``.
2. online (a real-eviction KV cache, decode row ``t >= budget``): the cache holds ``n = budget``
   kept keys per (b, h_kv) and appends the new key ``t`` as the last candidate, then calls
   ``slot = policy.select_evict(t, positions, acc_scores, probs_now)`` with

   - ``positions [B,Hkv,n+1]`` long: candidate positions, ``positions[..., -1] == t``;
     the order of the other slots is free (ties are broken by position, not slot);
   - ``acc_scores [B,Hkv,n+1]`` (only read when ``policy.accumulates``): the running sum, over
     rows ``< t``, of each candidate's attention probability over that row's kept set (summed
     over the group's query heads); 0 for the new key;
   - ``probs_now [B,Hkv,n+1]`` (only read when ``policy.needs_probs``): the probability of each
     candidate under the current query ``q_t`` over all ``n + 1`` candidates, summed over the
     group's query heads (see :func:`group_probs`);

   (``t``: an int, or a long tensor ``[B,1,1]`` when sequences are at different rows, as in a
   left-padded batch's steady state) and gets ``slot [B,Hkv]`` in ``[0, n)``: the candidate
   to evict (never the new key). Each built-in policy defines ``eviction_scores`` (lowest
   score, then earliest position, leaves first); ``select_evict`` is their arg-min (a policy
   may override it with a cheaper equivalent), and a cache evicting several keys at once sorts
   by them. After row ``t`` attends over the ``n`` remaining keys, a cache for an
   accumulating policy adds that row's probabilities over its kept keys (summed over the
   group) to their ``acc_scores``; the evicted key's score is dropped forever (rows before the
   first eviction go through ``policy.accumulate``, which SnapKV uses for its observation
   window).
   :func:`sequential_evict_at` is exactly this loop.

``keep_mask(evict_at)`` expands a decision to a dense ``[B,Hkv,S,S]`` mask (tests, small S).

What a layer sees (the model's own attention is the reference): logits are
``capped(q . k * scale, softcap)`` (Gemma 2 soft-capping before the softmax, the layer's own
``scaling``), and a sliding-window layer (``window = w``: row ``t`` sees keys ``t - w < j <= t``)
never sees key ``j`` from row ``j + w`` on. :func:`layer_evict_at` applies that window to any
policy: at row ``t`` the key ``t - w`` leaves first (it *expires*: neither kept nor folded into
a LESS state); the policy chooses only among keys inside the window and evicts at a row only
when no key expired there. So ``evict_at[j] <= j + w``; ``evict_at[j] == j + w`` means key ``j``
expired, ``evict_at[j] < j + w`` means the policy evicted it and the state holds it for rows
``evict_at[j] <= t < j + w``. A window no larger than the budget needs no eviction at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from lessctl.errors import InputError
from lessctl.policies.attn import (  # noqa: F401  (re-exported: the names of old)
    argmin_earliest,
    capped,
    default_scale,
    expire,
    group_probs,
    keep_mask,
    never_evicted,
)
from lessctl.schema import Rule

POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: register a policy class under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def get_policy(name: str, **params: object) -> Policy:
    """Build the registered policy ``name`` with ``params`` (e.g. ``get_policy("h2o", heavy=8,
    recent=8)``); unknown names raise a one-line ValueError listing the allowed ones."""
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**params)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A policy config's budget as :func:`lessctl.policies.budget.build_policy` resolved it:
    ``size`` as configured (an int: tokens; a float: a fraction of ``ref``), ``ref`` the length
    it is a fraction of, and the evaluated context ``seq_len``."""

    size: int | float
    ref: int
    seq_len: int

    def share(self, r: float) -> int:
        """Tokens for share ``r`` of the budget (the official LESS code's ``int(size * r *
        ref)`` for fractions, ``int(size * r)`` for token counts)."""
        return int(self.size * r) if isinstance(self.size, int) else int(self.size * r * self.ref)

    @property
    def total(self) -> int:
        return self.share(1.0)


def config_flag(cfg: Mapping[str, object], key: str) -> bool:
    """A boolean policy key (default false); anything else is refused in one line."""
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise InputError(f"policy {key}={v!r} is invalid; allowed: true or false")
    return v


class Policy:
    """Base of all policies (subclasses are small frozen dataclasses).

    ``name``: registry key. ``budget``: total kept tokens ``n`` per (b, h_kv), or ``None`` for
    "never evict" (``full``). ``accumulates``: the online cache must keep ``acc_scores``
    (H2O). ``needs_probs``: ``select_evict`` reads ``probs_now`` (TOVA). ``config_keys``: the
    policy's own keys in ``conf/policy/<name>.yaml`` besides ``name`` and ``budget`` (key ->
    :data:`lessctl.schema.Rule`), checked when the config is loaded.
    """

    name: ClassVar[str]
    config_keys: ClassVar[Mapping[str, Rule]] = {}
    has_budget: ClassVar[bool] = True  # its config has budget.size (all but full)
    accumulates: ClassVar[bool] = False
    needs_probs: ClassVar[bool] = False
    budget: int | None  # a dataclass field or a property in each subclass

    @classmethod
    def budget_tokens(cls, cfg: Mapping[str, object], b: Budget) -> int:
        """The tokens this policy keeps under budget ``b`` (checked against 1 and the context
        by ``build_policy`` before :meth:`from_config`); default ``b.total``."""
        return b.total

    @classmethod
    def from_config(cls, cfg: Mapping[str, object], b: Budget, total: int) -> Policy:
        """The policy of config ``cfg`` (``conf/policy/<name>.yaml``) keeping ``total`` tokens
        (:meth:`budget_tokens`); its own keys are validated here, in one line each.
        Default: ``cls(budget=total)``."""
        return cls(budget=total)  # type: ignore[call-arg]

    def accumulate(
        self, acc: Tensor, probs: Tensor, rows: Tensor, positions: Tensor, first_evict: Tensor
    ) -> Tensor:
        """Add attended rows to ``acc_scores`` (accumulating policies; called after they attend).

        acc [B,Hkv,m]; probs [B,Hkv,R,m]: R rows' probabilities over the m slots, summed over
        the group (0 for padding rows and empty slots); rows [B,R] long: the rows' positions;
        positions [B,Hkv,m]: the slots' key positions (-1 empty); first_evict [B] long: the row
        of the first eviction -> acc [B,Hkv,m]. Default (H2O): ``acc + probs.sum(2)``. Rows
        ``>= first_evict`` must be added this way (the sequential driver relies on it); rows
        before may be weighted or transformed (SnapKV). Written as :meth:`row_weights` and
        :meth:`add_sums`, so that a fused prefill (:mod:`lessctl.cache.scored`), which never
        holds ``probs``, adds the same.
        """
        w = self.row_weights(rows, first_evict).to(probs.dtype)[:, None, :, None]
        return self.add_sums(acc, (probs * w).sum(2), rows, positions, first_evict)

    def row_weights(self, rows: Tensor, first_evict: Tensor) -> Tensor:
        """Each row's weight in :meth:`accumulate`: rows [B,R] long, first_evict [B] long ->
        [B,R] >= 0. Default (H2O): 1 for every row."""
        return torch.ones(rows.shape, device=rows.device)

    def add_sums(
        self, acc: Tensor, sums: Tensor, rows: Tensor, positions: Tensor, first_evict: Tensor
    ) -> Tensor:
        """Add the rows' weighted probabilities summed over rows, sums [B,Hkv,m] fp32, to acc
        [B,Hkv,m] (shapes as :meth:`accumulate`). Default: ``acc + sums``."""
        return acc + sums

    def eviction_scores(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """Scores of the old candidates, candidates [B,Hkv,n+1] -> [B,Hkv,n]: the lowest
        (ties: earliest position) is evicted first. Evicting several at once (a cache that
        shrinks a prompt to the budget) takes them in this order."""
        raise NotImplementedError

    def select_evict(
        self,
        t: int | Tensor,
        positions: Tensor,
        acc_scores: Tensor | None,
        probs_now: Tensor | None,
    ) -> Tensor:
        """Online face (see module doc): candidates [B,Hkv,n+1] -> slot to evict [B,Hkv]."""
        scores = self.eviction_scores(t, positions, acc_scores, probs_now)
        return argmin_earliest(scores, positions[..., :-1])

    def evict_at(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """Parallel face: q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S] long."""
        return sequential_evict_at(self, q, k, scale)

    def with_extra(self, extra: int) -> Policy:
        """The same policy with ``extra`` more budget tokens (Baseline+)."""
        raise NotImplementedError

    def replace(self, **changes: object) -> Policy:
        """dataclasses.replace for policies."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def layer_evict_at(
    policy: Policy,
    q: Tensor,
    k: Tensor,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    v: Tensor | None = None,
    kernels: object | None = None,
) -> Tensor:
    """The policy's decision on a layer with its own window and soft-capping (module doc):
    q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S] with ``evict_at[j] <= j + window``.
    A state-aware policy (``state_aware``, e.g. ``recall``) given the layer's values v
    [B,Hkv,S,d] and ``kernels`` (anything with ``log_psi(k)``) decides with the LESS state
    (:func:`lessctl.policies.recall.recall_evict_at`); without them it decides as its base."""
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    if window is not None and (policy.budget is None or window <= policy.budget):
        return expire(never_evicted(k), window)  # the window is inside the budget
    if getattr(policy, "state_aware", False) and kernels is not None and v is not None:
        from lessctl.policies.recall import recall_evict_at, refuse_window

        refuse_window(policy, window)
        return recall_evict_at(policy, q, k, v, kernels.log_psi, scale, softcap)  # type: ignore[attr-defined, arg-type]
    if window is None and softcap is None:
        return policy.evict_at(q, k, scale)
    return sequential_evict_at(policy, q, k, scale, window, softcap)


def sequential_evict_at(
    policy: Policy,
    q: Tensor,
    k: Tensor,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Run the online face over a whole sequence, vectorised over batch and heads.

    Keeps budget-sized buffers (n kept + 1 new slot) of positions, keys and scores per
    (b, h_kv): O(S * n * d), no S x S mask. q [B,H,S,d], k [B,Hkv,S,d] -> evict_at [B,Hkv,S].
    ``window`` (> budget): at row t the kept key t - window, if any, leaves instead of the
    policy's choice (module doc); ``softcap``: logits are soft-capped before every softmax.
    """
    b, hkv, s, d = k.shape
    n = policy.budget
    out = never_evicted(k)
    if n is None or n >= s:
        return expire(out, window)
    if window is not None and window <= n:
        raise ValueError(f"sliding window {window} <= budget {n}: use layer_evict_at")
    dt = torch.promote_types(k.dtype, torch.float32)
    qg = q.to(dt).view(b, hkv, -1, s, d) * default_scale(d, scale)  # [B,Hkv,g,S,d]
    kt_all = k.to(dt).transpose(-1, -2)  # [B,Hkv,d,S]
    kbuf = kt_all[..., : n + 1].clone(
        memory_format=torch.contiguous_format
    )  # [B,Hkv,d,n+1]; slot n holds the new key
    pos = torch.arange(n + 1, device=k.device).expand(b, hkv, n + 1).contiguous()
    acc = torch.zeros(b, hkv, n + 1, dtype=dt, device=k.device)
    if policy.accumulates:  # rows < n attend causally over the first n keys
        causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
        logits = capped(qg[..., :n, :] @ kbuf[:, :, None, :, :n], softcap)
        logits = logits.masked_fill(~causal, float("-inf"))
        rows = torch.arange(n, device=k.device).expand(b, n)
        acc[..., :n] = policy.accumulate(
            acc[..., :n],
            logits.softmax(-1).sum(2),
            rows,
            pos[..., :n],
            torch.full_like(rows[:, 0], n),
        )
    for t in range(n, s):
        kbuf[..., n] = kt_all[..., t]
        pos[..., n] = t
        acc[..., n] = 0.0
        qt = qg[..., t : t + 1, :]  # [B,Hkv,g,1,d]
        probs = None
        if policy.needs_probs:
            probs = capped(qt @ kbuf[:, :, None], softcap).softmax(-1).sum((2, 3))
        slot = policy.select_evict(t, pos, acc if policy.accumulates else None, probs)[..., None]
        if window is not None and t >= window:  # the key leaving the window goes first
            gone = pos[..., :n] == t - window
            slot = torch.where(
                gone.any(-1, keepdim=True), gone.long().argmax(-1, keepdim=True), slot
            )
        out.scatter_(-1, pos.gather(-1, slot), t)
        pos.scatter_(-1, slot, t)  # the new key takes the evicted slot
        kbuf.scatter_(-1, slot[..., None, :].expand(b, hkv, d, 1), kt_all[..., t : t + 1])
        if policy.accumulates:
            acc.scatter_(-1, slot, 0.0)
            acc[..., :n] += capped(qt @ kbuf[:, :, None, :, :n], softcap).softmax(-1).sum((2, 3))
    return out
