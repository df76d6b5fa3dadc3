"""LESS from log features: finite where exp features over/underflow fp32, equal to float64
references computed directly, recurrent = parallel, and = the linear path where that is finite."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.less import (
    KernelConfig,
    LayerKernels,
    LowRankState,
    low_rank_attention_log,
    masked_attention,
    parallel_attention,
    step_attention,
)
from lessctl.methods import ParallelAttention
from lessctl.policies import H2O, TOVA, LambdaMask

S, D, R = 40, 8, 4
SHAPES = [(2, 4, 4), (1, 6, 2)]  # (B, H, Hkv): MHA and GQA
POLICIES = [H2O(6, 6), LambdaMask(2, 8), TOVA(10)]
NEG = float("-inf")


def qkv(b, h, hkv, d=D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(b, h, S, d, generator=g)
    k = scale * torch.randn(b, hkv, S, d, generator=g)
    return q, k, torch.randn(b, hkv, S, d, generator=g)


def huge_log_features(b, h, hkv, seed=0):
    """log phi ~ +1e3, log psi ~ -1e3 (exp: inf and 0), spread 3 per token so the running max
    of each feature keeps growing; feature 0 of psi is exactly zero (-inf)."""
    g = torch.Generator().manual_seed(seed + 100)
    log_phi = 1e3 + 3 * torch.randn(b, h, S, R, generator=g)
    log_psi = -1e3 + 3 * torch.randn(b, hkv, S, R, generator=g)
    log_psi[..., 0] = NEG
    return log_phi, log_psi


def performer_overflow_inputs(kern, b, h, hkv, seed=0):
    """q, k near d^(1/4) * a * w_r (a in [0.5, 1.5]): log features up to |w_r|^2 / 2 ~ d / 2,
    so phi . psi ~ exp(d) overflows fp32 at d = 128 (as with real models' large |q|, |k|)."""
    g = torch.Generator().manual_seed(seed)
    d = kern.cfg.head_dim
    w = kern.net.omega.transpose(1, 2)  # [Hkv,R,d]

    def aligned(n):
        heads = torch.arange(n) * hkv // n
        r = torch.randint(0, R, (b, n, S), generator=g)
        a = 0.5 + torch.rand(b, n, S, 1, generator=g)
        dirs = w[heads[None, :, None], r]  # [b,n,S,d]
        return dirs * d**0.25 * a + 0.1 * torch.randn(b, n, S, d, generator=g)

    return aligned(h), aligned(hkv), torch.randn(b, hkv, S, d, generator=g)


def pair_logits(log_phi, log_psi):
    """float64 logsumexp_r(log phi[t, r] + log psi[j, r]) -> [B,H,S,S]."""
    g = log_phi.shape[1] // log_psi.shape[1]
    lpsi = log_psi.double().repeat_interleave(g, 1)
    return torch.logsumexp(log_phi.double()[..., :, None, :] + lpsi[..., None, :, :], -1)


def masks(evict_at, h, window=None):
    """(kept, in_state) [B,H,S,S] from evict_at directly: row t keeps j <= t < evict_at[j];
    the state holds evict_at[j] <= t < j + window."""
    e = evict_at.repeat_interleave(h // evict_at.shape[1], 1)[..., None, :]  # [B,H,1,S]
    t, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    end = S if window is None else j + window
    return (j <= t) & (t < e), (e <= t) & (t < end)


def log_reference(q, k, v, evict_at, log_phi, log_psi, window=None):
    """LESS in float64 with every weight as a logit: q.k / sqrt d for kept keys,
    logsumexp_r(log phi + log psi) for keys in the state, one softmax."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    kept, held = masks(evict_at, q.shape[1], window)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = torch.where(kept, s, torch.where(held, pair_logits(log_phi, log_psi), NEG))
    return torch.softmax(logits, -1) @ vv


def state_reference(log_phi, log_psi, v, evict_at, window=None):
    """float64 (H/z weighted mean [B,H,S,d] (0 if empty), log(phi z) [B,H,S])."""
    g = log_phi.shape[1] // log_psi.shape[1]
    held = masks(evict_at, log_phi.shape[1], window)[1]
    logits = torch.where(held, pair_logits(log_phi, log_psi), NEG)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v.double().repeat_interleave(g, 1), lse


def close(a, b, tol):
    return (a.double() - b.double()).abs().max().item() < tol


def clipped(evict_at, window):
    """A layer's own evict_at with a sliding window: no key stays past j + window."""
    return evict_at if window is None else torch.minimum(evict_at, torch.arange(S) + window)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@pytest.mark.parametrize("window", [None, 13, 29])  # 29: whole key blocks held by later chunks
def test_huge_log_features_equal_float64_reference(shape, policy, window):
    q, k, v = qkv(*shape, seed=1)
    log_phi, log_psi = huge_log_features(*shape, seed=1)
    e = clipped(policy.evict_at(q, k), window)
    want = log_reference(q, k, v, e, log_phi, log_psi, window)
    assert not close(want, log_reference(q, k, v, e, log_phi, log_psi - 50, window), 0.1)
    feats = {"log_phi_q": log_phi, "log_psi_k": log_psi, "window": window}
    for chunk in (1, 7, 16, 64):
        got = parallel_attention(q, k, v, e, chunk=chunk, **feats)
        assert torch.isfinite(got).all()
        assert close(got, want, 1e-4), chunk
    assert close(masked_attention(q, k, v, e, **feats), want, 1e-4)
    # the same features through exp: inf * 0, the failure this path exists for
    lin = parallel_attention(q, k, v, e, log_phi.exp(), log_psi.exp(), window=window)
    assert not torch.isfinite(lin).all()


@pytest.mark.parametrize("window", [None, 13])
def test_performer_scaled_inputs_state_part_equals_float64_reference(window):
    """q, k x 30: every exp feature underflows to 0 (the performer row silently became the
    plain policy); log features and the state part stay exact."""
    kern = LayerKernels(KernelConfig(6, 2, D, rank=R, kind="performer", seed=2))
    q, k, v = qkv(1, 6, 2, seed=2, scale=30.0)
    assert kern.phi(q).max() == 0 and kern.psi(k).max() == 0
    log_phi, log_psi = kern.log_phi(q), kern.log_psi(k)
    w = kern.net.omega.double().repeat_interleave(3, 0)
    x = q.double() * D**-0.25  # phi's exponent, directly, in float64
    direct = torch.einsum("bhsd,hdr->bhsr", x, w) - 0.5 * x.square().sum(-1, keepdim=True)
    assert close(log_phi, direct - 0.5 * math.log(R), 1e-3)
    e = clipped(H2O(6, 6).evict_at(q, k), window)
    want_mean, want_lse = state_reference(log_phi, log_psi, v, e, window)
    mean, lse = low_rank_attention_log(log_phi, log_psi, v, e, chunk=16, window=window)
    held = torch.isfinite(want_lse)
    assert held[..., 13:].all() and torch.equal(torch.isfinite(lse), held)
    assert want_lse[held].max() < -200  # exp(log(phi z)) == 0 in fp32
    assert ((lse - want_lse)[held].abs() <= 1e-5 * want_lse[held].abs()).all()
    assert close(mean, want_mean, 1e-4)
    out = parallel_attention(q, k, v, e, log_phi_q=log_phi, log_psi_k=log_psi, window=window)
    assert close(out, log_reference(q, k, v, e, log_phi, log_psi, window), 1e-3)


def test_performer_overflow_parallel_and_method_equal_float64_reference():
    """d = 128, q, k along the random features: phi . psi overflows fp32 (linear path nan);
    the performer method attends in log space and equals the float64 reference."""
    kern = LayerKernels(KernelConfig(4, 2, 128, rank=R, kind="performer", seed=3)).eval()
    q, k, v = performer_overflow_inputs(kern, 1, 4, 2, seed=3)
    policy = H2O(6, 6)
    e = policy.evict_at(q, k)
    log_phi, log_psi = kern.log_phi(q), kern.log_psi(k)
    assert not torch.isfinite(parallel_attention(q, k, v, e, kern.phi(q), kern.psi(k))).all()
    want = log_reference(q, k, v, e, log_phi, log_psi)
    assert not close(want, parallel_attention(q, k, v, e), 0.1)  # the state matters here
    module = torch.nn.Module()
    module.layer_idx = 0
    out, _ = ParallelAttention(policy, {0: kern})(module, q, k, v, None)
    assert torch.isfinite(out).all()
    assert close(out.transpose(1, 2), want, 1e-3)


def _features(kind, shape, seed):
    """(q, k, v, log phi, log psi) that overflow/underflow fp32 through exp."""
    if kind == "huge":
        return (*qkv(*shape, seed=seed), *huge_log_features(*shape, seed=seed))
    kern = LayerKernels(KernelConfig(shape[1], shape[2], 128, rank=R, kind="performer"))
    q, k, v = performer_overflow_inputs(kern, *shape, seed=seed)
    return q, k, v, kern.log_phi(q), kern.log_psi(k)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize(
    "kind, window",
    # release_log subtracts: exact only while what leaves does not dwarf what stays (spread 3
    # here; the overflowing Performer's log psi spans ~300, the parallel form never subtracts)
    [("huge", None), ("huge", 13), ("performer", None)],
)
def test_recurrent_state_equals_parallel_row_by_row(shape, kind, window):
    q, k, v, log_phi, log_psi = _features(kind, shape, seed=4)
    b, _, hkv = shape
    e = clipped(H2O(6, 6).evict_at(q, k), window)
    par = parallel_attention(q, k, v, e, log_phi_q=log_phi, log_psi_k=log_psi, window=window)
    j = torch.arange(S)
    state = LowRankState.zeros(b, hkv, R, q.shape[-1])
    for t in range(S):
        state.absorb_log(log_psi, v, mask=(e == t) & (e < j + (window or S + 1)))
        if window is not None:  # folded earlier, now outside the window
            state.release_log(log_psi, v, mask=(e < j + window) & (j + window == t))
        kept = ((j <= t) & (t < e))[:, :, None]  # [B,Hkv,1,S]
        o = step_attention(
            q[:, :, t : t + 1], k, v, state=state, mask=kept, log_phi_q=log_phi[:, :, t : t + 1]
        )
        assert torch.isfinite(o).all()
        assert close(o[:, :, 0], par[:, :, t], 1e-3), t


def test_learned_kernels_log_path_equals_linear_path():
    cfg = KernelConfig(6, 2, D, rank=R, hidden=16, init_scale=1.0, seed=5)
    kern = LayerKernels(cfg).eval()
    q, k, v = qkv(1, 6, 2, seed=5)
    phi, psi, log_phi, log_psi = kern.phi(q), kern.psi(k), kern.log_phi(q), kern.log_psi(k)
    assert not kern.log_features and close(log_phi.exp(), phi, 1e-6)
    for window in (None, 13):
        e = clipped(LambdaMask(2, 8).evict_at(q, k), window)
        lin = parallel_attention(q, k, v, e, phi, psi, window=window, chunk=16)
        assert not close(lin, parallel_attention(q, k, v, e), 1e-2)  # the state matters
        log = parallel_attention(q, k, v, e, window=window, chunk=16, **_log(log_phi, log_psi))
        assert close(log, lin, 1e-5)
        masked = masked_attention(q, k, v, e, window=window, **_log(log_phi, log_psi))
        assert close(masked, lin, 1e-5)
    e = LambdaMask(2, 8).evict_at(q, k)
    lin_state, log_state = LowRankState.zeros(1, 2, R, D), LowRankState.zeros(1, 2, R, D)
    for t in range(S):
        lin_state.absorb(psi, v, e == t)
        log_state.absorb_log(log_psi, v, e == t)
        kept = ((torch.arange(S) <= t) & (t < e))[:, :, None]
        qt = q[:, :, t : t + 1]
        want = step_attention(qt, k, v, phi[:, :, t : t + 1], lin_state, mask=kept)
        got = step_attention(
            qt, k, v, state=log_state, mask=kept, log_phi_q=log_phi[:, :, t : t + 1]
        )
        assert close(got, want, 1e-5), t


def _log(log_phi, log_psi):
    return {"log_phi_q": log_phi, "log_psi_k": log_psi}


def state_of(log_psi, v):
    """float64 (log z [B,Hkv,R], H / z [B,Hkv,R,d]) of tokens log_psi [B,Hkv,n,R], v."""
    log_z = torch.logsumexp(log_psi.double(), 2)
    p = torch.exp(log_psi.double() - log_z.nan_to_num(neginf=0.0)[:, :, None])
    return log_z, torch.einsum("bknr,bknd->bkrd", p, v.double())


def test_absorb_log_rescales_to_the_running_max():
    """Tokens one at a time with growing (then falling) log features around +-1e3: the offset
    must follow the max and the held sums be rescaled to it."""
    g = torch.Generator().manual_seed(6)
    n = 12
    ramp = torch.cat([torch.arange(n // 2), torch.arange(n // 2, 0, -1)]).float()
    for base in (1e3, -1e3):
        log_psi = base + 4 * ramp[None, None, :, None] + torch.randn(2, 3, n, R, generator=g)
        v = torch.randn(2, 3, n, D, generator=g)
        state = LowRankState.zeros(2, 3, R, D)
        for i in range(n):
            state.absorb_log(log_psi[:, :, i : i + 1], v[:, :, i : i + 1])
        want_log_z, want_mean = state_of(log_psi, v)
        assert ((state.log_z() - want_log_z).abs() <= 1e-6 * abs(base)).all()
        assert close(state.mean_values(), want_mean, 1e-5)
        assert (state.offset - log_psi.amax(2)).abs().max() < 1e-3  # stored terms <= 1


def test_release_log_inverts_absorb_log():
    g = torch.Generator().manual_seed(7)
    log_psi = 1e3 + torch.randn(1, 2, 10, R, generator=g)
    log_psi[:, :, 6:] += 2.0  # released tokens raised the offset
    log_psi[:, 1, :, 0] = NEG  # a feature never held
    v = torch.randn(1, 2, 10, D, generator=g)
    first = torch.arange(10) < 6
    state = LowRankState.zeros(1, 2, R, D).absorb_log(log_psi, v, first.expand(1, 2, 10))
    before = state.clone()
    state.absorb_log(log_psi[:, :, 6:], v[:, :, 6:]).release_log(log_psi[:, :, 6:], v[:, :, 6:])
    assert not torch.equal(state.offset, before.offset)
    want_log_z, want_mean = state_of(log_psi[:, :, :6], v[:, :, :6])
    for s in (state, before):
        assert torch.equal(torch.isfinite(s.log_z()), torch.isfinite(want_log_z))
        held = torch.isfinite(want_log_z)
        assert (s.log_z() - want_log_z)[held].abs().max() < 1e-3
        assert close(s.mean_values(), want_mean, 1e-4)
    # everything released: empty again (log z -inf, values 0), not rounding noise
    state.release_log(log_psi, v, first.expand(1, 2, 10))
    assert torch.isneginf(state.log_z()).all() and not state.H.any()
    # released again (no longer held, log psi >> a new low offset): empty, never inf/nan
    state.absorb_log(log_psi[:, :, :1] - 2e3, v[:, :, :1])
    state.release_log(log_psi, v)
    assert torch.isfinite(state.H).all() and torch.isneginf(state.log_z()).all()


def test_index_batch_clone_and_linear_constructor():
    g = torch.Generator().manual_seed(8)
    log_psi, v = 1e3 + torch.randn(3, 2, 5, R, generator=g), torch.randn(3, 2, 5, D, generator=g)
    state = LowRankState.zeros(3, 2, R, D).absorb_log(log_psi, v)
    idx = torch.tensor([2, 0, 2])
    picked = state.index_batch(idx)
    assert torch.equal(picked.log_z(), state.log_z()[idx])
    assert torch.equal(picked.mean_values(), state.mean_values()[idx])
    copy = state.clone()
    state.absorb_log(log_psi + 5, v)
    assert not torch.equal(copy.log_z(), state.log_z())
    plain = LowRankState(torch.ones(1, 1, R, D), torch.full((1, 1, R), 2.0))
    assert torch.equal(plain.offset, torch.zeros(1, 1, R))
    assert torch.allclose(plain.log_z(), torch.full((1, 1, R), math.log(2.0)))
    assert torch.equal(plain.mean_values(), torch.full((1, 1, R, D), 0.5))
