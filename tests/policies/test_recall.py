"""policy=recall (state-aware eviction): its parallel face with kernels against a naive loop of
the definition, pool 1 = the base policy, no kernels = the base policy, config and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.errors import LessctlError
from lessctl.policies import H2O, TOVA, Composite, Recall, build_policy, get_policy
from lessctl.policies.base import layer_evict_at
from lessctl.policies.recall import recall_error
from tests.policies.test_policy_decisions import SHAPES, D, S, make_qk, row_probs

R = 3


class Kernels:
    """A stand-in for a layer's kernels: log psi(k) = log softplus(k W), W [d,R] fixed."""

    def __init__(self, seed: int = 7):
        self.w = torch.randn(
            D, R, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )

    def log_psi(self, k: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.nn.functional.softplus(k.double() @ self.w))


def make_qkv(b, h, hkv, seed=0):
    q, k = make_qk(b, h, hkv, seed)
    v = torch.randn(
        b, hkv, S, D, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64
    )
    return q, k, v


def naive_recall(policy: Recall, q, k, v, kern: Kernels) -> torch.Tensor:
    """The definition, one (b, h_kv) and one row at a time: the base's scores over kept + {t}
    (h2o, tova per head, composite), its ``pool`` lowest (then earliest), of them the smallest
    ‖v − ψH/ψz‖ (psi = exp(log psi), H and z plain float64 sums), ties to the base's order."""
    base, n = policy.base, policy.budget
    b, hkv = k.shape[:2]
    out = torch.full((b, hkv, S), S, dtype=torch.long)
    psi = torch.exp(kern.log_psi(k))  # [B,Hkv,S,R]
    for bi in range(b):
        for hk in range(hkv):
            kept: list[int] = []
            acc: dict[int, float] = {}
            H = torch.zeros(R, D, dtype=torch.float64)
            z = torch.zeros(R, dtype=torch.float64)
            for t in range(S):
                if len(kept) + 1 > n:
                    now = row_probs(q, k, bi, hk, t, kept + [t])
                    if isinstance(base, H2O):
                        others = [j for j in kept if j <= t - base.recent]
                        score = {j: acc.get(j, 0.0) for j in others}
                    elif isinstance(base, TOVA):
                        others, score = list(kept), {j: now[j] for j in kept}
                    else:  # composite
                        a_sum = sum(acc.get(j, 0.0) for j in kept) or 1e-30
                        n_sum = sum(now[j] for j in kept) or 1e-30
                        others = [j for j in kept if base.sink <= j <= t - base.recent]
                        score = {
                            j: base.w_h2o * acc.get(j, 0.0) / a_sum + base.w_tova * now[j] / n_sum
                            for j in others
                        }
                    ranked = sorted(others, key=lambda j: (score[j], j))[: policy.pool]

                    errs = []
                    for j in ranked:
                        p, den = psi[bi, hk, j], float(psi[bi, hk, j] @ z)
                        e = math.inf if den <= 0 else float((v[bi, hk, j] - p @ H / den).norm())
                        errs.append(e)
                    victim = ranked[errs.index(min(errs))]  # first minimum: the base's order
                    H += torch.outer(psi[bi, hk, victim], v[bi, hk, victim])
                    z += psi[bi, hk, victim]
                    kept.remove(victim)
                    acc.pop(victim, None)
                    out[bi, hk, victim] = t
                kept.append(t)
                if base.accumulates:
                    for j, p in row_probs(q, k, bi, hk, t, kept).items():
                        acc[j] = acc.get(j, 0.0) + p
    return out


BASES = [H2O(6, 5), TOVA(11, per_head=True), Composite(sink=2, heavy=5, recent=4)]


@pytest.mark.parametrize("pool", [2, 5])
@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_parallel_face_matches_naive_definition(shape, base, pool):
    q, k, v = make_qkv(*shape, seed=2)
    policy, kern = Recall(base, pool), Kernels()
    got = layer_evict_at(policy, q, k, v=v, kernels=kern)
    assert torch.equal(got, naive_recall(policy, q, k, v, kern))
    # the state changes decisions (a recall that ignored it would equal the base)
    assert not torch.equal(got, base.evict_at(q, k))


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
def test_pool_one_is_the_base_policy_and_no_kernels_is_the_base(base):
    q, k, v = make_qkv(2, 6, 2, seed=3)
    want = base.evict_at(q, k)
    assert torch.equal(layer_evict_at(Recall(base, 1), q, k, v=v, kernels=Kernels()), want)
    assert torch.equal(layer_evict_at(Recall(base, 4), q, k), want)  # Baseline: no state
    assert torch.equal(Recall(base, 4).evict_at(q, k), want)


def test_recall_error_is_the_definition_and_inf_without_state():
    g = torch.Generator().manual_seed(0)
    H, z = torch.rand(1, 1, R, D, generator=g), torch.rand(1, 1, R, generator=g) + 0.5
    off = torch.tensor([[[0.3, -1.0, 2.0]]])
    lp = torch.randn(1, 1, 4, R, generator=g)
    v = torch.randn(1, 1, 4, D, generator=g)
    psi = lp.exp() * off.exp()[:, :, None]  # the state's true sums are exp(offset) * (H, z)
    want = (v - (psi @ H) / (psi * z[:, :, None]).sum(-1, keepdim=True)).norm(dim=-1)
    assert torch.allclose(recall_error(H, z, off, lp, v), want, rtol=1e-5)
    empty = recall_error(H * 0, z * 0, off * 0, lp, v)
    assert bool(torch.isinf(empty).all())


def test_config_builds_base_and_pool_and_refuses_bad_values():
    kw = dict(seq_len=64, max_position_embeddings=128)
    p = build_policy({"name": "recall", "budget": {"size": 16}, "pool": 3}, **kw)
    assert p == Recall(H2O(8, 8), 3)
    p = build_policy(
        {"name": "recall", "budget": {"size": 12}, "base": "tova", "per_head": True}, **kw
    )
    assert p == Recall(TOVA(12, True), 4) and p.budget == 12
    assert p.with_extra(4) == Recall(TOVA(16, True), 4)
    with pytest.raises(LessctlError, match="base='lambda'.*allowed: composite, h2o, tova"):
        build_policy({"name": "recall", "budget": {"size": 16}, "base": "lambda"}, **kw)
    with pytest.raises(LessctlError, match="pool=0.*an int >= 1"):
        build_policy({"name": "recall", "budget": {"size": 16}, "pool": 0}, **kw)
    assert get_policy("recall").base == H2O(16, 16)


def test_sliding_window_with_kernels_is_refused():
    q, k, v = make_qkv(1, 4, 4)
    with pytest.raises(LessctlError, match="sliding-window layer"):
        layer_evict_at(Recall(H2O(4, 4), 2), q, k, window=20, v=v, kernels=Kernels())
    # a window inside the budget needs no choice at all
    assert layer_evict_at(Recall(H2O(4, 4), 2), q, k, window=8, v=v, kernels=Kernels()) is not None


def test_layer_wide_base_keeps_one_set_for_the_layer():
    """tova's default chooses for the whole layer; recall over it sums the heads' errors, so
    every KV head keeps the same keys (a per-head argmin would break the cache's shared slots)."""
    from lessctl.policies import keep_mask

    q, k, v = make_qkv(2, 6, 2, seed=5)
    policy = Recall(TOVA(11), 4)
    got = layer_evict_at(policy, q, k, v=v, kernels=Kernels())
    assert torch.equal(got[:, 0], got[:, 1])
    assert not torch.equal(got, TOVA(11).evict_at(q, k))
    kept = keep_mask(got).sum(-1)
    assert int(kept.max()) == 11
