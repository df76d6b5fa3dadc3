"""Evicting several keys at one row (bulk eviction), shared by every protocol's general path.

A cache evicts more than one key at a row when a prompt (or a chunk of it) brought it past the
budget: the policy's choice repeated on the shrinking candidate set. Shapes: ``positions``,
``acc_scores``, ``probs_now`` ``[b, Hkv, m + 1]`` with the new key last (the online face in
:mod:`lessctl.policies.base`); results ``[b, Hkv, m]`` over the old candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.policies.base import Policy


def first_true(mask: Tensor, count: int) -> Tensor:
    """Indices of the first ``count`` True entries per row: mask [...,m] -> [...,count] long
    (then the False ones, in order)."""
    return (~mask).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]


def with_new(x: Tensor | None, idx: Tensor) -> Tensor | None:
    """Old candidates ``idx`` plus the new (last) one: x [b,h,m+1], idx [b,h,c] -> [b,h,c+1]."""
    if x is None:
        return None
    return torch.cat([x[..., :-1].gather(-1, idx), x[..., -1:]], -1)


def evict_many_sequential(
    policy: Policy,
    t: int | Tensor,
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
            t, with_new(positions, idx), with_new(acc_scores, idx), with_new(probs_now, idx)
        )[..., None]
        out.scatter_(-1, idx.gather(-1, slot), True)
        keep = torch.ones_like(idx, dtype=torch.bool).scatter_(-1, slot, False)
        idx = idx[keep].view(b, h, -1)
    return out


def evict_many(
    policy: Policy,
    t: int | Tensor,
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
