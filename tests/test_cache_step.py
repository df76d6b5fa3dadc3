"""The steady-state decode step compiles as one graph (no host synchronisation, no
data-dependent branch) and the compiled step equals the eager one; the step is what decoding
runs once the cache is full."""

from __future__ import annotations

import copy

import pytest
import torch

from lessctl.cache import EvictingCache
from lessctl.cache.step import steady_step
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies import get_policy

B, H, HKV, D, R = 2, 4, 2, 16, 4

CASES = {  # policy, kernels, window, softcap
    "lambda+less": (get_policy("lambda", sink=2, recent=6), True, None, None),
    "h2o+less, window above the budget": (get_policy("h2o", heavy=4, recent=4), True, 12, None),
    "tova, soft-capped": (get_policy("tova", budget=8), False, None, 30.0),
}


def steady_layer(policy, with_kernels, window, softcap):
    """A one-layer cache driven row by row (padded batch) until it is in the steady state."""
    torch.manual_seed(0)
    kernels = None
    if with_kernels:
        kc = KernelConfig(H, HKV, D, rank=R, hidden=8, dropout=0.0, init_scale=1.0)
        kernels = {0: LayerKernels(kc).eval()}
    mask = torch.tensor([[0, 0, 1] + [1] * 40, [1] * 43])
    cache = EvictingCache(1, policy, kernels, protocol="streaming", attention_mask=mask)
    layer = cache.layers[0]
    with torch.no_grad():
        for _ in range(30):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
            layer.update(k, v)
            layer.attend(q, k, v, None, window, softcap)
    assert layer.steady and layer.store.packed
    return layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_steady_step_equals_eager(case):
    policy, with_kernels, window, softcap = CASES[case]
    layer = steady_layer(policy, with_kernels, window, softcap)
    compiled = torch.compile(steady_step, fullgraph=True, dynamic=False)
    eager_store, compiled_store = layer.store, copy.deepcopy(layer.store)
    for store in (eager_store, compiled_store):  # the torch path's rows (the C++ step has none)
        store.pack(
            None if window is None or not with_kernels else window - policy.budget,
            H // HKV,
            with_kernels,
        )
    torch.manual_seed(1)
    with torch.no_grad():
        for i in range(3):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
            t = layer.seen + i - layer.pads
            args = (policy, layer.frozen, None, window, softcap)
            want = steady_step(q, k, v, t, eager_store, *args)
            got = compiled(q, k, v, t, compiled_store, *args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(eager_store.positions, compiled_store.positions)
    torch.testing.assert_close(compiled_store.keys, eager_store.keys)
    if with_kernels:
        torch.testing.assert_close(compiled_store.state.H, eager_store.state.H, atol=1e-5, rtol=0)


def test_an_empty_feature_adds_nothing_in_the_steady_step():
    """A feature no folded key has reached (z_r = 0; here psi_r = 0 for every key) adds
    nothing in the steady step, as in the general path where z_r stays exactly 0: its virtual
    key's value H_r / z_r must not be 0 / 0 (without z's floor in KeptStore.pack every row is
    NaN), and the floor's weight phi_r * 1.2e-38 must not show."""
    layer = steady_layer(*CASES["lambda+less"])
    with torch.no_grad():
        layer.frozen.m[:, :, 0] = 0  # psi_0 = 0 (the general path's psi)
        layer.frozen.m_rows[H:, :, 0] = 0  # the same in the steady step's one product
        s = layer.store
        s.unpack()
        s.state.H.zero_(), s.state.z.zero_()
        general = copy.deepcopy(layer)  # before the floor; it never packs (nor floors) again
        general.steady = False
        general._check_steady = lambda group: None
        s.pack(None, H // HKV, True)
        torch.manual_seed(2)
        for _ in range(3):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
            outs = []
            for one in (layer, general):
                one.update(k, v)
                outs.append(one.attend(q, k, v, None))
            assert torch.isfinite(outs[0]).all()
            torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert layer.steady and not general.store.packed
    assert float(s.state.z[..., 0].max()) <= torch.finfo(torch.float32).tiny
    assert float(general.store.state.z[..., 0].abs().max()) == 0.0


def test_decode_rows_take_the_steady_step(tiny_model, monkeypatch):
    """Once full, every one-token forward runs steady_step on every layer (and only then)."""
    import lessctl.cache.layer as layer_mod

    calls = []
    real = layer_mod.steady_step

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(layer_mod, "steady_step", counting)
    model, _ = tiny_model
    policy = get_policy("lambda", sink=2, recent=6)
    cache = EvictingCache.for_model(model, policy, protocol="prompt")
    ids = torch.randint(0, 256, (1, 20))
    with cache.attached(model), torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        assert not calls  # the prompt holds more than the budget
        model(ids[:, :1], cache=cache, use_cache=True)  # bulk eviction: general path
        assert not calls
        for _ in range(3):
            model(ids[:, :1], cache=cache, use_cache=True)
    assert len(calls) == 3 * model.config.num_hidden_layers
