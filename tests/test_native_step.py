"""The C++ LESS step (lessctl/cache/native.py) computes what the steady step's torch path
computes: outputs, H, z, the virtual keys' values and the fold buffer agree step after step, for
every branch of the step (one SDPA call or a logits pass, GQA, padding, sliding layers that fold
or only expire, a low-precision cache); and native_step's modes do what they say."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lessctl.cache import EvictingCache, native, step
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies import get_policy
from tests.numerics import EPS32, assert_features_within, fold_with_bound, mlp_with_bound

F32 = torch.float32
LAMBDA = get_policy("lambda", sink=2, recent=6)
H2O = get_policy("h2o", heavy=4, recent=4)
TOVA = get_policy("tova", budget=8)

D, R = 16, 4

CASES = {  # policy, heads, KV heads, window, softcap, dtype, value dims
    "lambda, GQA 3": (get_policy("lambda", sink=2, recent=6), 6, 2, None, None, torch.float32, D),
    "h2o (logits pass), MHA": (get_policy("h2o", heavy=4, recent=4), 2, 2, None, None, F32, D),
    "lambda, sliding layer that folds": (LAMBDA, 4, 2, 12, None, F32, D),
    "h2o, sliding layer that only expires": (H2O, 4, 2, 6, None, F32, D),
    "lambda, bfloat16 cache": (LAMBDA, 4, 2, None, None, torch.bfloat16, D),
    "tova, soft-capped, bfloat16 cache": (TOVA, 4, 2, None, 30.0, torch.bfloat16, D),
}


@pytest.fixture
def mode():
    """Restores the process's native_step mode and build state after the test."""
    saved = dict(native._state)
    yield native.configure
    native._state.clear()
    native._state.update(saved)


def _rows(b, h, hkv, dtype, dv=D):
    return [torch.randn(b, n, 1, e).to(dtype) for n, e in ((h, D), (hkv, D), (hkv, dv))]


def _steady_pair(mode, policy, h, hkv, window, softcap, dtype, dv, kind="learned"):
    """Two one-layer caches fed the same rows until steady: the C++ step's (native_step=always,
    read when the cache fills) and the torch path's (never) -> (the two layers)."""
    torch.manual_seed(0)
    kc = KernelConfig(h, hkv, D, rank=R, hidden=8, dropout=0.0, init_scale=1.0, kind=kind)
    kernels = {0: LayerKernels(kc).eval()}
    mask = torch.tensor([[0, 0, 1] + [1] * 60, [1] * 63])
    rows = [_rows(2, h, hkv, dtype, dv) for _ in range(40)]
    layers = []
    for m in ("always", "never"):
        mode(m)
        kern = copy.deepcopy(kernels)
        layer = EvictingCache(1, policy, kern, protocol="streaming", attention_mask=mask).layers[0]
        with torch.no_grad():
            for q, k, v in rows:
                if layer.steady:
                    break
                layer.update(k, v)
                layer.attend(q, k, v, None, window, softcap)
        assert layer.steady
        layers.append(layer)
    assert layers[0].seen == layers[1].seen
    return layers


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_step_equals_the_torch_path(case, mode):
    policy, h, hkv, window, softcap, dtype, dv = CASES[case]
    # native_step=always: fails here (no skip) where the op does not build
    layer, torch_path = _steady_pair(mode, policy, h, hkv, window, softcap, dtype, dv)
    assert layer.native is not None and torch_path.native is None
    assert torch_path.store.views.rows is not None and layer.store.views.rows is None
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    with torch.no_grad():
        for _ in range(20):  # past the window: folded keys leave the state again
            q, k, v = _rows(2, h, hkv, dtype, dv)
            outs = []
            for one in (layer, torch_path):
                one.update(k, v)
                outs.append(one.attend(q, k, v, None, window, softcap))
            torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    a, b = layer.store, torch_path.store
    torch.testing.assert_close(a.state.H, b.state.H, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.state.z, b.state.z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.views.values, b.views.values, atol=tol, rtol=tol)
    if not (policy.accumulates or policy.needs_probs or softcap):  # one call: logits in its bias
        torch.testing.assert_close(a.views.logits, b.views.logits, atol=tol, rtol=tol)
    else:  # a logits pass reads them in fp32 whatever the cache's dtype
        assert a.views.pass_logits.dtype == torch.float32
    assert torch.equal(a.positions, b.positions)
    if window is not None and window > policy.budget:
        assert torch.equal(a.fpos, b.fpos) and bool((a.fpos >= 0).any())
        torch.testing.assert_close(a.fkeys, b.fkeys)
    if window is not None and window <= policy.budget:  # keys only expire: none is folded
        assert float(a.state.z.max()) == torch.finfo(torch.float32).tiny
    else:
        assert float(a.state.z.max()) > 0.1


def test_the_logits_pass_reads_fp32_logits_from_the_native_step(mode):
    """In a bf16 cache, a policy that needs probabilities gets the virtual keys' logits in fp32
    from the C++ step, as from the torch path (not rounded to the bias's bf16)."""
    layer, torch_path = _steady_pair(mode, TOVA, 4, 2, None, None, torch.bfloat16, D)
    q, k, _ = _rows(2, 4, 2, torch.bfloat16)
    got = []
    with torch.no_grad():
        for one in (layer, torch_path):
            s, t, kern = one.store, (one.seen - one.pads).view(2, 1, 1), one.frozen
            slot, folded, _, _ = step.choose_slot(
                q.view(2, 2, 2, D), k, t, s, TOVA, None, 0.25, None
            )
            if one is layer:
                lr = step.native_state(one.native, q, s, kern, slot, folded, t, None, True, False)
            else:
                fq, fk, k_ev, v_ev = step.features(q, s, kern, step.slot_index(slot, s))
                step.update_state(s, kern, slot, folded, t, None, (fk, k_ev, v_ev))
                lr = step.read_state(fq, s, kern, False)
            got.append(lr)
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)


def test_where_the_native_step_does_not_run(mode):
    """Performer kernels, native_step=never and a traced step take the torch path."""
    policy = LAMBDA
    layer, torch_path = _steady_pair(mode, policy, 4, 2, None, None, F32, D, kind="performer")
    assert layer.native is None and torch_path.native is None
    layer, torch_path = _steady_pair(mode, policy, 4, 2, None, None, F32, D)
    assert layer.native is not None and torch_path.native is None
    # compiled with the op handed in, the step traces the torch path (fullgraph: the op would
    # break the graph) and equals it
    native_store = copy.deepcopy(layer.store)
    native_store.pack(None, 2, True, feature_rows=True)  # the torch path's rows
    compiled = torch.compile(step.steady_step, fullgraph=True, dynamic=False)
    q, k, v = _rows(2, 4, 2, F32)
    t = layer.seen - layer.pads
    args = (policy, layer.frozen, None, None, None)
    with torch.no_grad():
        got = compiled(q, k, v, t, native_store, *args, layer.native)
        want = step.steady_step(q, k, v, t, torch_path.store, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_native_gelu_is_torchs_to_rounding(mode):
    """GELU's erf in the op is a rational approximation: through a whole step, with weights
    that put the hidden units across GELU's range, psi (in z) and phi z (in the logits) stay
    within the forward-error bound of an fp32 evaluation (tests/numerics.py)."""
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
    k_ev = keys.gather(2, slot[..., None].expand(b, hkv, 1, D))  # [b,hkv,1,D]
    y, dy = mlp_with_bound(k_ev, w1[h:], w2[h:])
    psi, dpsi = fold_with_bound(y, dy, m, m.abs())
    psi, dpsi = psi[:, :, 0], dpsi[:, :, 0]  # [b,hkv,R]
    want_z = 1e-3 + psi
    assert ((z.double() - want_z).abs() <= dpsi + 2 * EPS32 * want_z).all()
    phi, dphi = mlp_with_bound(q, w1[:h], w2[:h])  # [b,h,1,R]
    phi, dphi = phi.abs().view(b, hkv, h // hkv, R), dphi.view(b, hkv, h // hkv, R)
    zz, dz = want_z[:, :, None], (dpsi + 2 * EPS32 * want_z)[:, :, None]
    assert_features_within(logits, phi * zz, dphi * zz + phi * dz)


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


def test_a_batch_past_max_batch_takes_the_torch_path(mode):
    """The op computes each sequence apart: past native.MAX_BATCH sequences the torch path's
    batched products serve the batch, also after a cache is replicated to it."""
    mode("always")
    kc = KernelConfig(4, 2, D, rank=R, hidden=8, dropout=0.0, init_scale=1.0)
    layers = {}
    for b in (native.MAX_BATCH, native.MAX_BATCH + 1):
        cache = EvictingCache(1, LAMBDA, {0: LayerKernels(kc).eval()}, protocol="streaming")
        layer = layers[b] = cache.layers[0]
        with torch.no_grad():
            while not layer.steady:
                q, k, v = _rows(b, 4, 2, F32)
                layer.update(k, v)
                layer.attend(q, k, v, None)
    assert layers[native.MAX_BATCH].native is not None
    assert layers[native.MAX_BATCH + 1].native is None
    layer = layers[native.MAX_BATCH]
    layer.batch_repeat_interleave(2)  # re-packed at the next row, past MAX_BATCH
    with torch.no_grad():
        q, k, v = _rows(2 * native.MAX_BATCH, 4, 2, F32)
        layer.update(k, v)
        layer.attend(q, k, v, None)
    assert layer.steady and layer.native is None and layer.store.views.rows is not None


def test_step_breakdown_times_the_path_the_layer_takes(mode):
    """The bench's phases: the torch path's features, update and read, or the C++ call."""
    from lessctl.bench.breakdown import step_breakdown

    layer, torch_path = _steady_pair(mode, LAMBDA, 4, 2, None, None, F32, D)
    native_phases = step_breakdown(layer, 4, reps=3)
    torch_phases = step_breakdown(torch_path, 4, reps=3)
    assert native_phases["state"] > 0 and torch_phases["state"] is None
    for p in ("features", "state_update", "state_read"):
        assert native_phases[p] is None and torch_phases[p] > 0
    assert native_phases["total"] > 0 and torch_phases["total"] > 0
