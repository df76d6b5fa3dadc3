"""Each policy's evict_at vs a naive row-by-row loop of its definition; online face vs parallel."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.policies import (
    H2O,
    TOVA,
    Composite,
    Full,
    LambdaMask,
    RandomPolicy,
    Recent,
    SnapKV,
    group_probs,
    keep_mask,
)

S, D = 48, 8
SHAPES = [(2, 4, 4), (2, 6, 2)]  # (B, H, Hkv): MHA and GQA


def make_qk(b: int, h: int, hkv: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, S, D, generator=g, dtype=torch.float64)
    return q, k


def row_probs(q, k, bi, hk, t, keys):
    """Plain softmax of row t over `keys`, summed over the query heads of KV head hk."""
    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    total = [0.0] * len(keys)
    for hq in range(hk * g, (hk + 1) * g):
        logits = [float(q[bi, hq, t] @ k[bi, hk, j]) / math.sqrt(D) for j in keys]
        m = max(logits)
        ex = [math.exp(x - m) for x in logits]
        total = [a + e / sum(ex) for a, e in zip(total, ex, strict=True)]
    return dict(zip(keys, total, strict=True))


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def naive_pool(score: dict[int, float], kernel: int, pooling: str) -> dict[int, float]:
    """1-D pooling over positions 0..m-1 (zero padding; avg divides by the kernel)."""
    r, m = kernel // 2, len(score)
    near = {j: [score[i] for i in range(max(0, j - r), min(m, j + r + 1))] for j in score}
    if pooling == "avg":
        return {j: sum(v) / kernel for j, v in near.items()}
    return {j: max(v) for j, v in near.items()}


def naive(policy, q, k) -> torch.Tensor:
    """The definitions, one (b, h_kv) and one row at a time, with Python lists and dicts."""
    b, hkv = k.shape[:2]
    out = torch.full((b, hkv, S), S, dtype=torch.long)
    n = policy.budget
    for bi in range(b):
        for hk in range(hkv):
            kept: list[int] = []
            score: dict[int, float] = {}
            for t in range(S):
                victim = None
                if n is not None and len(kept) + 1 > n:
                    if isinstance(policy, LambdaMask | Recent):
                        sink = getattr(policy, "sink", 0)
                        victim = min(j for j in kept if j >= sink)
                    elif isinstance(policy, H2O):
                        others = [j for j in kept if j <= t - policy.recent]
                        victim = min(others, key=lambda j: (score[j], j))
                    elif isinstance(policy, SnapKV):  # the window: t-w..t (across: t-w+1..t)
                        edge = t - policy.window + int(policy.pool_across_window)
                        others = [j for j in kept if j < edge]
                        victim = min(others, key=lambda j: (score[j], j))
                    elif isinstance(policy, TOVA):  # layer-wide: every KV head's group summed
                        heads = [hk] if policy.per_head else range(hkv)
                        ps = [row_probs(q, k, bi, h, t, kept + [t]) for h in heads]
                        victim = min(kept, key=lambda j: (sum(p[j] for p in ps), j))
                    elif isinstance(policy, Composite):  # sinks, window, weighted ensemble
                        now = row_probs(q, k, bi, hk, t, kept + [t])
                        acc_sum = sum(score.get(j, 0.0) for j in kept) or 1e-30
                        now_sum = sum(now[j] for j in kept) or 1e-30
                        others = [j for j in kept if policy.sink <= j <= t - policy.recent]
                        mix = {
                            j: policy.w_h2o * score.get(j, 0.0) / acc_sum
                            + policy.w_tova * now[j] / now_sum
                            for j in others
                        }
                        victim = min(others, key=lambda j: (mix[j], j))
                    elif isinstance(policy, RandomPolicy):
                        base = lowbias32((lowbias32(policy.seed) + hk) & 0xFFFFFFFF)
                        u = {j: lowbias32((base + j) & 0xFFFFFFFF) for j in kept}
                        victim = min(kept, key=lambda j: (u[j], j))
                if victim is not None:
                    kept.remove(victim)
                    score.pop(victim, None)
                    out[bi, hk, victim] = t
                kept.append(t)
                if isinstance(policy, H2O | Composite):  # attend, then accumulate
                    for j, p in row_probs(q, k, bi, hk, t, kept).items():
                        score[j] = score.get(j, 0.0) + p
                if isinstance(policy, SnapKV):  # observation rows n-w..n-1, pool, then as H2O
                    if t >= n - policy.window:
                        for j, p in row_probs(q, k, bi, hk, t, kept).items():
                            score[j] = score.get(j, 0.0) + p
                    if t == n - 1:  # pool the prefix 0..n-w-1 alone (across: all n keys)
                        m = n if policy.pool_across_window else n - policy.window
                        part = {j: score.get(j, 0.0) for j in range(m)}
                        score = {**score, **naive_pool(part, policy.kernel, policy.pooling)}
    return out


POLICIES = [
    Full(),
    LambdaMask(sink=3, recent=9),
    Recent(10),
    H2O(heavy=6, recent=5),
    H2O(heavy=9, recent=1),
    H2O(heavy=4, recent=0),
    TOVA(11),
    TOVA(11, per_head=True),
    RandomPolicy(12, seed=7),
    SnapKV(heavy=6, window=5),
    SnapKV(heavy=8, window=3, kernel=7, pooling="max"),
    SnapKV(heavy=9, window=1, kernel=1),
    SnapKV(heavy=0, window=10),
    SnapKV(heavy=6, window=5, pool_across_window=True),
    SnapKV(heavy=8, window=3, kernel=7, pooling="max", pool_across_window=True),
    SnapKV(heavy=9, window=1, kernel=1, pool_across_window=True),
    SnapKV(heavy=0, window=10, pool_across_window=True),
    Composite(sink=2, heavy=5, recent=4, w_h2o=1.0, w_tova=1.0),
    Composite(sink=0, heavy=8, recent=3, w_h2o=0.3, w_tova=2.0),
    Composite(sink=3, heavy=6, recent=1, w_h2o=0.0, w_tova=1.0),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_evict_at_matches_naive_definition(policy, shape):
    q, k = make_qk(*shape)
    assert torch.equal(policy.evict_at(q, k), naive(policy, q, k))


@pytest.mark.parametrize("policy", POLICIES[1:], ids=lambda p: repr(p))
def test_budget_respected_exactly(policy):
    q, k = make_qk(2, 6, 2, seed=1)
    e = policy.evict_at(q.float(), k.float())
    n = policy.budget
    kept = keep_mask(e).sum(-1)  # [B,Hkv,S]
    t = torch.arange(S)
    assert torch.equal(kept, torch.minimum(t + 1, torch.tensor(n)).expand_as(kept))
    assert bool((e >= t + 1).all())  # never evicted at its own row
    evicted_per_row = torch.stack([(e == r).sum(-1) for r in range(S)], -1)
    assert torch.equal(evicted_per_row, (t >= n).long().expand_as(evicted_per_row))


def test_keep_mask_definition():
    e = torch.tensor([[[2, 5, 3, 4, 5]]])
    m = keep_mask(e)[0, 0]
    for t in range(5):
        for j in range(5):
            assert bool(m[t, j]) == (j <= t < int(e[0, 0, j]))


def drive_online(policy, q, k) -> torch.Tensor:
    """A toy real-eviction cache: compacted kept list (evicted slot removed, new key appended
    at the end), its own softmax, and the online face asked at every row past the budget."""
    b, h, _, _ = q.shape
    hkv = k.shape[1]
    n = policy.budget
    evict_at = torch.full((b, hkv, S), S, dtype=torch.long)
    pos = torch.zeros(b, hkv, 0, dtype=torch.long)
    acc = torch.zeros(b, hkv, 0, dtype=q.dtype)

    def probs(t: int, keys: torch.Tensor) -> torch.Tensor:  # [B,Hkv,m] -> [B,Hkv,m]
        kk = torch.stack([k[bi, hk, keys[bi, hk]] for bi in range(b) for hk in range(hkv)])
        kk = kk.view(b, hkv, 1, -1, D).expand(b, hkv, h // hkv, -1, D)
        qq = q[:, :, t].reshape(b, hkv, h // hkv, 1, D)
        return ((qq * kk).sum(-1) / math.sqrt(D)).softmax(-1).sum(2)

    for t in range(S):
        cand = torch.cat([pos, torch.full((b, hkv, 1), t)], -1)
        if n is not None and cand.shape[-1] > n:
            acc_c = torch.cat([acc, torch.zeros(b, hkv, 1, dtype=acc.dtype)], -1)
            p_now = probs(t, cand) if policy.needs_probs else None
            slot = policy.select_evict(t, cand, acc_c if policy.accumulates else None, p_now)
            assert bool((slot < n).all()) and bool((slot >= 0).all())
            evict_at.scatter_(-1, cand.gather(-1, slot[..., None]), t)
            keep = torch.ones_like(cand, dtype=torch.bool).scatter(-1, slot[..., None], False)
            pos = cand[keep].view(b, hkv, n)
            acc = acc_c[keep].view(b, hkv, n)
        else:
            pos = cand
            acc = torch.cat([acc, torch.zeros(b, hkv, 1, dtype=acc.dtype)], -1)
        if policy.accumulates:  # the policy's own rule (a plain sum for h2o)
            rows, first = torch.full((b, 1), t), torch.full((b,), n)
            acc = policy.accumulate(acc, probs(t, pos)[:, :, None], rows, pos, first)
    return evict_at


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_online_face_reproduces_evict_at(policy, shape):
    q, k = make_qk(*shape, seed=2)
    assert torch.equal(drive_online(policy, q, k), policy.evict_at(q, k))


def test_h2o_fp32_matches_fp64_on_random_data():
    q, k = make_qk(1, 4, 2, seed=3)
    p = H2O(heavy=8, recent=4)
    assert torch.equal(p.evict_at(q.float(), k.float()), p.evict_at(q, k))


def test_group_probs_is_the_groups_summed_softmax():
    q, k = make_qk(1, 6, 2, seed=4)
    got = group_probs(q[:, :, 30:31], k[:, :, :12])[:, :, 0]  # [B,Hkv,12]
    for hk in range(2):
        want = row_probs(q, k, 0, hk, 30, list(range(12)))
        assert torch.allclose(
            got[0, hk], torch.tensor([want[j] for j in range(12)], dtype=torch.float64)
        )


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_composite_reduces_to_h2o_tova_and_lambda(shape):
    """The ensemble's special cases are the policies it combines (composite.py's doc): a wrong
    normalisation, a protected part off by one or a swapped weight fails one of them."""
    q, k = make_qk(*shape, seed=4)
    same = lambda a, b: torch.equal(a.evict_at(q, k), b.evict_at(q, k))  # noqa: E731
    assert same(Composite(sink=0, heavy=7, recent=4, w_h2o=1.0, w_tova=0.0), H2O(7, 4))
    assert same(Composite(sink=0, heavy=10, recent=1, w_h2o=0.0, w_tova=1.0), TOVA(11, True))
    assert same(Composite(sink=3, heavy=5, recent=4, w_h2o=0.0, w_tova=0.0), LambdaMask(3, 9))
    both = Composite(sink=0, heavy=7, recent=4, w_h2o=1.0, w_tova=1.0)
    assert not same(both, H2O(7, 4)) and not same(both, TOVA(11, True))
