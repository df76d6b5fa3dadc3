"""The C++ LESS step (lessctl/cache/native.py) computes what the steady step's torch path
computes: outputs, H, z, the virtual keys' values and the fold buffer agree step after step, for
every branch of the step (one SDPA call or a logits pass, GQA, padding, sliding layers that fold
or only expire, a low-precision cache); and native_step's modes do what they say."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lessctl.cache import EvictingCache, native
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies import get_policy

D, R = 16, 4

CASES = {  # policy, heads, KV heads, window, dtype
    "lambda, GQA 3": (get_policy("lambda", sink=2, recent=6), 6, 2, None, torch.float32),
    "h2o (logits pass), MHA": (get_policy("h2o", heavy=4, recent=4), 2, 2, None, torch.float32),
    "lambda, sliding layer that folds": (
        get_policy("lambda", sink=2, recent=6),
        4,
        2,
        12,
        torch.float32,
    ),
    "h2o, sliding layer that only expires": (
        get_policy("h2o", heavy=4, recent=4),
        4,
        2,
        6,
        torch.float32,
    ),
    "lambda, bfloat16 cache": (get_policy("lambda", sink=2, recent=6), 4, 2, None, torch.bfloat16),
}


@pytest.fixture
def mode():
    """Restores the process's native_step mode and build state after the test."""
    saved = dict(native._state)
    yield native.configure
    native._state.clear()
    native._state.update(saved)


def _rows(b, h, hkv, dtype):
    return [torch.randn(b, n, 1, D).to(dtype) for n in (h, hkv, hkv)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_step_equals_the_torch_path(case, mode):
    policy, h, hkv, window, dtype = CASES[case]
    mode("always")  # fails here (no skip) where the op does not build
    op = native.less_step_op()
    torch.manual_seed(0)
    kc = KernelConfig(h, hkv, D, rank=R, hidden=8, dropout=0.0, init_scale=1.0)
    kernels = {0: LayerKernels(kc).eval()}
    mask = torch.tensor([[0, 0, 1] + [1] * 60, [1] * 63])
    cache = EvictingCache(1, policy, kernels, protocol="streaming", attention_mask=mask)
    layer = cache.layers[0]
    with torch.no_grad():
        while not layer.steady:
            q, k, v = _rows(2, h, hkv, dtype)
            layer.update(k, v)
            layer.attend(q, k, v, None, window)
        torch_path = copy.deepcopy(layer)
        assert layer.native is op
        torch_path.native = None
        for _ in range(20):  # past the window: folded keys leave the state again
            q, k, v = _rows(2, h, hkv, dtype)
            outs = []
            for one in (layer, torch_path):
                one.update(k, v)
                outs.append(one.attend(q, k, v, None, window))
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
            torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    a, b = layer.store, torch_path.store
    torch.testing.assert_close(a.state.H, b.state.H, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.state.z, b.state.z, atol=1e-4, rtol=1e-4)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(a.views.values, b.views.values, atol=tol, rtol=tol)
    if not (policy.accumulates or policy.needs_probs):  # one SDPA call: the logits in its bias
        torch.testing.assert_close(a.views.logits, b.views.logits, atol=tol, rtol=tol)
    assert torch.equal(a.positions, b.positions)
    if window is not None and window > policy.budget:
        assert torch.equal(a.fpos, b.fpos) and bool((a.fpos >= 0).any())
        torch.testing.assert_close(a.fkeys, b.fkeys)
    if window is not None and window <= policy.budget:  # keys only expire: none is folded
        assert float(a.state.z.max()) == torch.finfo(torch.float32).tiny
    else:
        assert float(a.state.z.max()) > 0.1


def test_the_native_gelu_is_torchs_to_rounding(mode):
    """GELU's erf in the op is a rational approximation: through a whole step, with weights
    that put the hidden units across GELU's range, phi and psi stay within 1e-5."""
    mode("always")
    op = native.less_step_op()
    torch.manual_seed(3)
    b, h, hkv, hid = 2, 4, 2, 64
    q, keys, values = torch.randn(b, h, 1, D), torch.randn(b, hkv, 8, D), torch.randn(b, hkv, 8, D)
    w1, w2 = torch.randn(h + hkv, D, hid), torch.randn(h + hkv, hid, R) / 4
    m = torch.randn(hkv, R, R)
    slot = torch.tensor([[[3], [5]], [[0], [7]]])
    H, z = torch.zeros(b, hkv, R, D), torch.full((b, hkv, R), 1e-3)
    vvals, logits = torch.zeros(b, hkv, R, D), torch.zeros(b, hkv, h // hkv, R)
    op(q, keys, values, slot, None, w1, w2, m, H, z, vvals, logits, True)
    gelu = torch.nn.functional.gelu
    k_ev = keys.gather(2, slot[..., None].expand(b, hkv, 1, D))[:, :, 0]  # [b,hkv,D]
    hk = gelu(torch.einsum("bcd,cdh->bch", k_ev, w1[h:]))
    psi = torch.einsum("bcr,crs->bcs", gelu(torch.einsum("bch,chr->bcr", hk, w2[h:])), m).abs()
    torch.testing.assert_close(z, 1e-3 + psi, atol=1e-5, rtol=1e-5)
    phi = gelu(
        torch.einsum("bjh,jhr->bjr", gelu(torch.einsum("bjd,jdh->bjh", q[:, :, 0], w1[:h])), w2[:h])
    )
    want = phi.abs().view(b, hkv, h // hkv, R) * z[:, :, None]
    torch.testing.assert_close(logits.exp(), want, atol=1e-5, rtol=1e-5)


def test_native_step_modes(mode, monkeypatch, caplog):
    with pytest.raises(LessctlError, match="native_step='fast'; allowed: auto, always, never"):
        mode("fast")
    mode("never")
    assert native.less_step_op() is None and native.status() == "disabled"

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_build", no_compiler)
    native._state.update(op=None, error=None)
    mode("always")
    with pytest.raises(LessctlError, match="native_step=always but .* Ninja is required"):
        native.less_step_op()
    native._state.update(op=None, error=None)
    mode("auto")
    with caplog.at_level(logging.WARNING):
        assert native.less_step_op() is None
    assert "the torch path runs" in caplog.text and native.status() == "unavailable"


def test_step_breakdown_times_the_path_the_layer_takes(mode):
    """The bench's phases: the torch path's features, update and read, or the C++ call."""
    from lessctl.bench.breakdown import step_breakdown

    mode("always")
    policy = get_policy("lambda", sink=2, recent=6)
    kc = KernelConfig(4, 2, D, rank=R, hidden=8, dropout=0.0, init_scale=1.0)
    cache = EvictingCache(1, policy, {0: LayerKernels(kc).eval()}, protocol="streaming")
    layer = cache.layers[0]
    with torch.no_grad():
        while not layer.steady:
            q, k, v = _rows(1, 4, 2, torch.float32)
            layer.update(k, v)
            layer.attend(q, k, v, None)
    native_phases = step_breakdown(layer, 4, reps=3)
    layer.native = None
    torch_phases = step_breakdown(layer, 4, reps=3)
    assert native_phases["state"] > 0 and torch_phases["state"] is None
    for p in ("features", "state_update", "state_read"):
        assert native_phases[p] is None and torch_phases[p] > 0
    assert native_phases["total"] > 0 and torch_phases["total"] > 0
