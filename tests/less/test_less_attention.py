"""LESS attention vs plain per-row references, the quadratic form and the recurrent form."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.less import (
    LowRankState,
    masked_attention,
    parallel_attention,
    sparse_attention,
    step_attention,
)
from lessctl.policies import H2O, TOVA, Full, LambdaMask, RandomPolicy, Recent

S, D, R = 40, 8, 4
SHAPES = [(2, 4, 4), (2, 6, 2)]  # (B, H, Hkv): MHA and GQA


def inputs(b, h, hkv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, S, D, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, S, D, generator=g, dtype=dtype)
    phi = torch.rand(b, h, S, R, generator=g, dtype=dtype)
    psi = torch.rand(b, hkv, S, R, generator=g, dtype=dtype)
    return q, k, v, phi, psi


def reference(q, k, v, evict_at, phi=None, psi=None):
    """The LESS formula, literally, one (b, h, t) at a time in float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, s, d = q.shape
    g = h // k.shape[1]
    out = torch.zeros(b, h, s, d, dtype=torch.float64)
    for bi in range(b):
        for hq in range(h):
            hk = hq // g
            for t in range(s):
                num, den = torch.zeros(d, dtype=torch.float64), 0.0
                for j in range(t + 1):
                    if t < int(evict_at[bi, hk, j]):  # kept
                        w = math.exp(float(q[bi, hq, t] @ k[bi, hk, j]) / math.sqrt(d))
                    elif phi is not None:  # evicted: phi(q) . psi(k) stands in for exp(s)
                        w = float(phi[bi, hq, t].double() @ psi[bi, hk, j].double())
                    else:
                        w = 0.0
                    num, den = num + w * v[bi, hk, j], den + w
                out[bi, hq, t] = num / den
    return out


def close(a, b, tol=1e-5):
    return (a.double() - b.double()).abs().max().item() < tol


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_nothing_evicted_is_causal_softmax(shape):
    q, k, v, phi, psi = inputs(*shape)
    e = Full().evict_at(q, k)
    g = shape[1] // shape[2]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = (q @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -torch.inf)
    want = logits.softmax(-1) @ vv
    assert close(parallel_attention(q, k, v, e), want)
    assert close(parallel_attention(q, k, v, e, phi, psi, chunk=16), want)  # empty state


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("policy", [H2O(6, 6), LambdaMask(2, 8), TOVA(10)], ids=repr)
def test_matches_plain_reference(shape, policy):
    q, k, v, phi, psi = inputs(*shape, seed=1)
    e = policy.evict_at(q, k)
    assert close(
        parallel_attention(q, k, v, e, phi, psi, chunk=16), reference(q, k, v, e, phi, psi)
    )
    # phi or psi zero: attention restricted to the kept tokens
    kept_only = reference(q, k, v, e)
    assert close(parallel_attention(q, k, v, e), kept_only)
    assert close(parallel_attention(q, k, v, e, torch.zeros_like(phi), psi, chunk=16), kept_only)
    assert close(parallel_attention(q, k, v, e, phi, torch.zeros_like(psi), chunk=7), kept_only)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize(
    "policy", [H2O(5, 7), LambdaMask(4, 4), TOVA(9), Recent(6), RandomPolicy(8, 1)], ids=repr
)
def test_linear_form_equals_quadratic_masked_form(shape, policy):
    q, k, v, phi, psi = inputs(*shape, seed=2)
    e = policy.evict_at(q, k)
    want = masked_attention(q, k, v, e, phi, psi)
    for chunk in (1, 7, 16, 64):
        assert close(parallel_attention(q, k, v, e, phi, psi, chunk=chunk), want)
    sp = sparse_attention(q, k, v, e, chunk=5)
    assert close(parallel_attention(q, k, v, e, phi, psi, sparse=sp), want)
    assert close(parallel_attention(q, k, v, e), masked_attention(q, k, v, e))


def test_arbitrary_evict_at_many_per_row():
    """Not budget-shaped: several keys evicted at the same row, per-head different counts."""
    q, k, v, phi, psi = inputs(1, 4, 2, seed=3)
    j = torch.arange(S)
    g = torch.Generator().manual_seed(0)
    e = torch.minimum(j + 1 + torch.randint(0, 12, (1, 2, S), generator=g), torch.tensor(S))
    e[..., 5] = S  # some never evicted
    e[..., 20:30] = 31  # ten at once
    want = reference(q, k, v, e, phi, psi)
    assert close(parallel_attention(q, k, v, e, phi, psi, chunk=8), want)
    assert close(masked_attention(q, k, v, e, phi, psi), want)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("policy", [H2O(6, 4), LambdaMask(3, 7), TOVA(10)], ids=repr)
def test_parallel_equals_recurrent_token_by_token(shape, policy):
    q, k, v, phi, psi = inputs(*shape, seed=4)
    b, _, hkv = shape
    e = policy.evict_at(q, k)
    par = parallel_attention(q, k, v, e, phi, psi, chunk=16)
    state = LowRankState.zeros(b, hkv, R, D)
    for t in range(S):
        state.absorb(psi, v, mask=e == t)  # evict, then attend
        keep = (torch.arange(S) <= t) & (t < e)  # [B,Hkv,S], same count per head
        idx = keep.nonzero()[:, -1].view(b, hkv, -1)
        gi = idx[..., None].expand(-1, -1, -1, D)
        o = step_attention(
            q[:, :, t : t + 1], k.gather(2, gi), v.gather(2, gi), phi[:, :, t : t + 1], state
        )
        assert close(o[:, :, 0], par[:, :, t]), t


def test_step_attention_several_queries_with_mask():
    q, k, v, phi, psi = inputs(1, 4, 2, seed=5)
    e = Full().evict_at(q, k)
    mask = torch.ones(4, S, dtype=torch.bool).tril(S - 4)  # last 4 rows, causal among them
    o = step_attention(
        q[:, :, -4:], k, v, phi[:, :, -4:], LowRankState.zeros(1, 2, R, D), None, mask
    )
    assert close(o, parallel_attention(q, k, v, e)[:, :, -4:])


def test_extreme_logits_stay_finite():
    q, k, v, phi, psi = inputs(1, 4, 2, seed=6)
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(1, 2, S, D, generator=g), dim=-1)
    sign = torch.where(torch.rand(1, 2, S, generator=g) < 0.5, -1.0, 1.0)[..., None]
    k = u * math.sqrt(1e3) * sign
    qs = [u.repeat_interleave(2, 1) * math.sqrt(1e3), -u.repeat_interleave(2, 1) * math.sqrt(1e3)]
    for qq in qs:  # logits up to +-1e3 (scale 1)
        for pol in (H2O(4, 4), Full()):
            e = pol.evict_at(qq, k, scale=1.0)
            for ph, ps in ((None, None), (phi, psi), (phi * 1e-30, psi)):
                out = parallel_attention(qq, k, v, e, ph, ps, scale=1.0, chunk=16)
                assert torch.isfinite(out).all()
                # fp32 logits of size 1e3 carry ~1e-4 rounding, hence the looser tolerance
                assert close(out, masked_attention(qq, k, v, e, ph, ps, scale=1.0), 1e-3)
        o = step_attention(qq[:, :, -1:], k, v, phi[:, :, -1:], LowRankState.zeros(1, 2, R, D), 1.0)
        assert torch.isfinite(o).all()


def test_gradients_finite_with_empty_state_rows():
    q, k, v, phi, psi = inputs(1, 4, 2, seed=7)
    e = H2O(8, 8).evict_at(q, k)
    phi, psi = phi.requires_grad_(), psi.requires_grad_()
    out = parallel_attention(q, k, v, e, phi, psi, chunk=16)
    out.square().sum().backward()
    assert torch.isfinite(phi.grad).all() and torch.isfinite(psi.grad).all()
    assert phi.grad[:, :, :16].abs().max() == 0  # rows before the budget see no state
    assert psi.grad.abs().max() > 0


@pytest.mark.parametrize("policy", [H2O(6, 6), LambdaMask(2, 8), RandomPolicy(8, 3)], ids=repr)
def test_static_max_evicted_bound_gives_the_same_state(policy):
    """Training passes one bound for every chunk (no host sync per chunk): the bound from
    max_evicted_per_chunk must equal the largest per-chunk count (a bound one short would drop
    an evicted key), and padding up to it must change nothing."""
    from lessctl.less.attention import low_rank_attention, max_evicted_per_chunk

    q, k, v, phi, psi = inputs(2, 6, 2, seed=4)
    e = policy.evict_at(q, k)
    bound = int(max_evicted_per_chunk(e, chunk=16))
    per_chunk = [int(((e >= a) & (e < min(a + 16, S))).sum(-1).max()) for a in range(0, S, 16)]
    assert bound == max(per_chunk) > 0
    want = low_rank_attention(phi, psi, v, e, chunk=16)
    for m in (bound, bound + 7):
        got = low_rank_attention(phi, psi, v, e, chunk=16, max_evicted=m)
        assert all(close(a, b) for a, b in zip(got, want, strict=True))
    short = low_rank_attention(phi, psi, v, e, chunk=16, max_evicted=bound - 1)
    assert not close(short[0], want[0])


def test_attend_rows_without_keys_are_empty_and_nan_is_not_hidden():
    """A row whose keys are all masked gets out 0 and lse -inf; a NaN logit stays NaN (a
    numerical blow-up must not pass for a row with no key)."""
    from lessctl.less.attention import attend

    s = torch.randn(1, 1, 2, 3, 4)
    v = torch.randn(1, 1, 4, 5)
    s[0, 0, 0, 1] = float("-inf")  # query head 0, row 1: no key
    s[0, 0, 1, 2, 0] = float("nan")  # query head 1, row 2: a NaN logit
    out, lse = attend(s, v)
    assert torch.equal(out[0, 0, 1], torch.zeros(5)) and lse[0, 0, 1] == float("-inf")
    assert out[0, 1, 2].isnan().all() and lse[0, 1, 2].isnan()
    p = torch.softmax(s[0, 0, 0, 0], -1)
    assert torch.allclose(out[0, 0, 0], p @ v[0, 0], atol=1e-6)
    assert torch.allclose(lse[0, 0, 0], torch.logsumexp(s[0, 0, 0, 0], -1), atol=1e-6)
