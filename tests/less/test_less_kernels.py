"""phi/psi kernels: architecture, init, save/load, Performer approximation, untrained ~ sparse."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.less import KernelConfig, LayerKernels, parallel_attention
from lessctl.less.frozen import FrozenKernels
from lessctl.policies import H2O
from tests.numerics import assert_features_within, learned_features_with_bound


def test_learned_shapes_init_and_positivity():
    cfg = KernelConfig(num_heads=6, num_kv_heads=2, head_dim=16, rank=4, hidden=32)
    m = LayerKernels(cfg).eval()
    q, k = torch.randn(2, 6, 10, 16), torch.randn(2, 2, 10, 16)
    pq, pk = m.phi(q), m.psi(k)
    assert pq.shape == (2, 6, 10, 4) and pk.shape == (2, 2, 10, 4)
    assert (pq >= 0).all() and (pk >= 0).all()
    assert m.net.W1q.abs().max() <= math.sqrt(6 / (16 + 32))
    assert m.net.W2k.abs().max() <= math.sqrt(6 / (32 + 4))
    assert torch.equal(m.net.s1, torch.full((2, 4), 1e-4))
    # per-head weights: head 0 of phi is a plain two-layer GELU MLP with W1q[0], W2q[0]
    gelu = torch.nn.functional.gelu
    want = gelu(gelu(q[:, 0] @ m.net.W1q[0]) @ m.net.W2q[0]).abs()
    assert torch.allclose(pq[:, 0], want, atol=1e-6)
    p0 = m.net.s1[1].abs() * gelu(gelu(k[:, 1] @ m.net.W1k[1]) @ m.net.W2k[1])
    assert torch.allclose(pk[:, 1], (p0 + (p0 @ m.net.W_int[1]) * m.net.s2[1]).abs(), atol=1e-9)


def test_dropout_only_in_training():
    m = LayerKernels(KernelConfig(4, 4, 8, rank=4, hidden=64, dropout=0.5))
    q = torch.randn(1, 4, 5, 8)
    m.train()
    assert not torch.equal(m.phi(q), m.phi(q))
    m.eval()
    assert torch.equal(m.phi(q), m.phi(q))


def test_fast_dropout_drops_at_rate_p_everywhere_and_rescales():
    """The CPU mask from 16-bit words: each element (and each of the three words of a 64-bit
    draw) dropped with probability p, kept ones scaled by 1/(1-p), the gradient the same mask."""
    from lessctl.less.kernels import dropout

    p, n = 0.3, 3 * 400_000
    x = torch.ones(n, requires_grad=True)
    y = dropout(x, p, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    for word in range(3):  # a word of the draw left out or taken twice would skew its position
        rate = 1 - kept[word::3].float().mean().item()
        assert abs(rate - p) < 0.004, (word, rate)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(5)
    a = dropout(torch.ones(7, 11), p, training=True)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(torch.ones(7, 11), p, training=True))
    assert dropout(x, p, training=False) is x and dropout(x, 0.0, training=True) is x
    for tiny in (1e-6, 1 - 1e-6):  # p rounds to 0 or 2^16 words: torch's dropout, not a wrap
        y = dropout(torch.ones(100_000), tiny, training=True)
        assert abs((y == 0).float().mean().item() - tiny) < 0.01


def test_save_load_round_trip(tmp_path):
    for kind in ("learned", "performer"):
        cfg = KernelConfig(6, 3, 8, rank=4, hidden=16, kind=kind, seed=3)
        m = LayerKernels(cfg).eval()
        path = tmp_path / f"{kind}.safetensors"
        m.save(path)
        m2 = LayerKernels.load(path).eval()
        assert m2.cfg == cfg
        q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 3, 5, 8)
        assert torch.equal(m.phi(q), m2.phi(q)) and torch.equal(m.psi(k), m2.psi(k))


def test_performer_approximates_exp_and_shares_group_features():
    d = 16
    m = LayerKernels(KernelConfig(4, 2, d, rank=8192, kind="performer", seed=1))
    q, k = 0.5 * torch.randn(1, 4, 20, d) / math.sqrt(d), 0.5 * torch.randn(1, 2, 20, d)
    approx = m.phi(q) @ m.psi(k).repeat_interleave(2, 1).transpose(-1, -2)
    exact = torch.exp(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(d))
    assert ((approx - exact).abs() / exact).mean() < 0.05
    # query heads 0 and 1 share KV head 0's features
    x = torch.randn(1, 1, 3, d)
    assert torch.allclose(m.phi(x.expand(1, 4, 3, d))[:, 1], m.psi(x.expand(1, 2, 3, d))[:, 0])


def test_untrained_learned_kernels_are_almost_the_sparse_policy():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    m = LayerKernels(KernelConfig(4, 2, 16, rank=8, hidden=64)).eval()
    e = H2O(8, 8).evict_at(q, k)
    sparse = parallel_attention(q, k, v, e)
    less = parallel_attention(q, k, v, e, m.phi(q), m.psi(k))
    diff = (less - sparse).abs().max().item()
    assert 0 < diff < 1e-3


@pytest.mark.parametrize("batch", [3, 256])  # GELU by ATen's kernel, by oneDNN's (frozen.mlp)
@pytest.mark.parametrize("kind", ["learned", "performer"])
def test_frozen_kernels_equal_the_trained_maps(kind, batch):
    """Decode-time phi/psi (constant factors folded, phi's and psi's MLPs in one product) equal
    the module's own maps in eval mode: a wrong fold of |s1|, W_int, s2 or a swapped head fails.

    Learned features are compared, on both sides, with the fp64 features within the forward-error
    bound of an fp32 evaluation (:func:`learned_features_with_bound`): a feature whose sum cancels
    to ~1e-8 has a large relative error on any CPU, so its log is not comparable at a fixed
    tolerance (an AMD EPYC's oneDNN differed there by 0.054 in log phi)."""
    torch.manual_seed(0)
    cfg = KernelConfig(num_heads=6, num_kv_heads=2, head_dim=16, rank=4, hidden=8, kind=kind)
    mod = LayerKernels(cfg).eval()
    if kind == "learned":  # away from the init so that s1, s2 and W_int all matter
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(0.3 * torch.randn_like(p))
    frozen = FrozenKernels(mod)
    q, k = torch.randn(batch, 6, 1, 16), torch.randn(batch, 2, 1, 16)
    with torch.no_grad():
        if kind == "performer":  # frozen delegates to the module's own log features
            torch.testing.assert_close(frozen.log_phi(q), mod.log_phi(q), rtol=0, atol=0)
            torch.testing.assert_close(frozen.log_psi(k), mod.log_psi(k), rtol=0, atol=0)
            return
        phi, dphi = learned_features_with_bound(mod.net, q, query=True)
        psi, dpsi = learned_features_with_bound(mod.net, k, query=False)
        # one decode step's rows, heads first: [H+Hkv,B,R]
        rows = torch.cat([q, k], 1)[:, :, 0].transpose(0, 1)
        out = torch.full((8, batch, 4), float("nan"))
        assert frozen.rows_into(rows, out) is out
        both = torch.cat([phi, psi], 1)[:, :, 0].transpose(0, 1)
        bound = torch.cat([dphi, dpsi], 1)[:, :, 0].transpose(0, 1)
        assert_features_within(out.log(), both, bound)
        for side in (frozen, mod):
            assert_features_within(side.log_phi(q), phi, dphi)
            assert_features_within(side.log_psi(k), psi, dpsi)
