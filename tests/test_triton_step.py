"""The Triton LESS step (lessctl/cache/triton_step.py), run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set here before triton is first imported), computes what the
steady step's torch path computes: outputs, H, z, the virtual keys' values and logits agree
step after step, for Lambda with GQA, a logits-pass policy (H2O), a sliding layer that folds,
and a cache of each dtype; and triton_step's modes do what they say."""

from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch

from lessctl.cache import EvictingCache, native, triton_step
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies import get_policy

try:
    import triton  # noqa: F401
except ImportError:  # triton is in the dev extra
    triton = None

needs_triton = pytest.mark.skipif(
    triton is None, reason="triton is not importable (pip install -e .[dev] installs it)"
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LAMBDA = get_policy("lambda", sink=2, recent=6)
H2O = get_policy("h2o", heavy=4, recent=4)
D, R, HID = 16, 4, 24  # hidden 24: two blocks of the kernel's loop at _BH=16 (a partial one)

CASES = {  # policy, heads, KV heads, window, dtype
    "lambda, GQA 3, fp32": (LAMBDA, 6, 2, None, F32),
    "h2o (logits pass), MHA, fp32": (H2O, 2, 2, None, F32),
    "lambda, sliding layer that folds, fp32": (LAMBDA, 4, 2, 12, F32),
    "lambda, GQA 2, bfloat16": (LAMBDA, 4, 2, None, BF16),
    "h2o, GQA 2, float16": (H2O, 4, 2, None, F16),
}


def interpreted_kernel():
    """A copy of lessctl.cache.triton_kernel decorated under TRITON_INTERPRET=1 (read when a
    kernel is decorated), apart from the module itself, which a CUDA test may compile."""
    spec = importlib.util.find_spec("lessctl.cache.triton_kernel")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.less_step_kernel


@pytest.fixture
def modes(monkeypatch):
    """native_step=never, and triton_step's op the interpreted kernel, for the test (the
    process's modes and build state restored after it)."""
    saved_n, saved_t = dict(native._state), dict(triton_step._state)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_step, "_BH", 16)
    native.configure("never")
    kernel = interpreted_kernel()
    triton_step._state.update(op=lambda *a: triton_step.less_step(kernel, *a), error=None)
    yield triton_step.configure
    for mod, saved in ((native, saved_n), (triton_step, saved_t)):
        mod._state.clear()
        mod._state.update(saved)


def _rows(b, h, hkv, dtype):
    return [torch.randn(b, n, 1, D).to(dtype) for n in (h, hkv, hkv)]


def _steady_pair(policy, h, hkv, window, dtype):
    """Two one-layer caches fed the same rows until steady: the Triton step's (triton_step
    always, read when the cache packs) and the torch path's (never)."""
    torch.manual_seed(0)
    kc = KernelConfig(h, hkv, D, rank=R, hidden=HID, dropout=0.0, init_scale=1.0)
    kernels = {0: LayerKernels(kc).eval()}
    mask = torch.tensor([[0, 0, 1] + [1] * 60, [1] * 63])
    rows = [_rows(2, h, hkv, dtype) for _ in range(40)]
    layers = []
    for m in ("always", "never"):
        triton_step.configure(m)
        kern = copy.deepcopy(kernels)
        cache = EvictingCache(1, policy, kern, protocol="streaming", attention_mask=mask)
        layer = cache.layers[0]
        with torch.no_grad():
            for q, k, v in rows:
                if layer.steady:
                    break
                layer.update(k, v)
                layer.attend(q, k, v, None, window, None)
        assert layer.steady
        layers.append(layer)
    return layers


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_step_equals_the_torch_path(case, modes):
    policy, h, hkv, window, dtype = CASES[case]
    layer, torch_path = _steady_pair(policy, h, hkv, window, dtype)
    assert layer.triton is not None and layer.native is None and torch_path.triton is None
    assert layer.store.views.rows is None and torch_path.store.views.rows is not None
    eps = torch.finfo(dtype).eps
    tol = 4 * eps if dtype != F32 else 2e-5  # fp32: sums in another order, erf's rounding
    a, b = layer.store, torch_path.store
    with torch.no_grad():
        for _ in range(10 if window else 4):  # sliding: past the window, folded keys leave
            q, k, v = _rows(2, h, hkv, dtype)
            outs = []
            for one in (layer, torch_path):
                one.update(k, v)
                outs.append(one.attend(q, k, v, None, window, None))
            torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
            torch.testing.assert_close(a.state.H, b.state.H, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.state.z, b.state.z, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.views.values, b.views.values, atol=tol, rtol=tol)
            if policy.needs_probs or policy.accumulates:  # read in fp32 by the logits pass
                assert a.views.pass_logits.dtype == F32
                torch.testing.assert_close(a.acc, b.acc, atol=tol, rtol=tol)
            else:  # e^logit = phi z weighs a value in the softmax: compared as weights
                wa, wb = a.views.logits.float().exp(), b.views.logits.float().exp()
                torch.testing.assert_close(wa, wb, atol=tol * float(wb.max()), rtol=tol)
            assert torch.equal(a.positions, b.positions)
    assert float(a.state.z.max()) > 0.1  # keys were folded
    if window is not None:
        assert torch.equal(a.fpos, b.fpos) and bool((a.fpos >= 0).any())


@needs_triton
def test_the_logits_pass_reads_fp32_logits_from_the_triton_step(modes):
    """A logits pass (TOVA here) in a bf16 cache reads the virtual keys' logits in fp32 from the
    Triton step, as from the torch path; with absorb false only they are written."""
    from lessctl.cache import step

    tova = get_policy("tova", budget=8)
    layer, torch_path = _steady_pair(tova, 4, 2, None, BF16)
    q, k, _ = _rows(2, 4, 2, BF16)
    got = []
    with torch.no_grad():
        for one in (layer, torch_path):
            s, t, kern = one.store, (one.seen - one.pads).view(2, 1, 1), one.frozen
            qg = q.view(2, 2, 2, D)
            slot, folded, _, _ = step.choose_slot(qg, k, t, s, tova, None, 0.25, None)
            H = s.state.H.clone()
            if one is layer:
                lr = step.native_state(one.triton, q, s, kern, slot, folded, t, None, False, False)
                assert torch.equal(s.state.H, H)  # absorb false: the state is left as it is
            else:
                fq, _, _, _ = step.features(q, s, kern, step.slot_index(slot, s))
                lr = step.read_state(fq, s, kern, False)
            got.append(lr)
    assert got[0].dtype == got[1].dtype == F32
    torch.testing.assert_close(got[0], got[1], atol=2e-5, rtol=2e-5)


def test_triton_step_modes(monkeypatch, caplog):
    """never gives None; on a CPU device auto leaves the step to the C++ op and the torch path,
    always refuses it (outside the interpreter); a failed import warns under auto and is an
    error under always; status says which."""
    saved = dict(triton_step._state)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        with pytest.raises(LessctlError, match="triton_step='fast'; allowed: auto, always, never"):
            triton_step.configure("fast")
        triton_step.configure("never")
        assert triton_step.less_step_op("cuda") is None and triton_step.status() == "disabled"
        triton_step.configure("auto")
        triton_step._state.update(op=None, error=None)
        assert triton_step.less_step_op("cpu") is None and triton_step.status() == "not loaded"
        triton_step.configure("always")
        with pytest.raises(LessctlError, match="triton_step=always needs a CUDA device, not cpu"):
            triton_step.less_step_op("cpu")

        def no_triton():
            raise ModuleNotFoundError("No module named 'triton'")

        monkeypatch.setattr(triton_step, "_load", no_triton)
        with pytest.raises(LessctlError, match="always but Triton is unavailable: .*'triton'"):
            triton_step.less_step_op("cuda")
        triton_step._state.update(op=None, error=None)
        triton_step.configure("auto")
        with caplog.at_level(logging.WARNING):
            assert triton_step.less_step_op("cuda") is None
        assert "the torch path runs" in caplog.text
        assert triton_step.status().startswith("unavailable (ModuleNotFoundError")
    finally:
        triton_step._state.clear()
        triton_step._state.update(saved)


def test_a_stage_records_triton_step_and_refuses_always_on_cpu(compose, tmp_path, capsys):
    """Run meta says triton_step's status; triton_step=always on a CPU device is a one-line
    error at the stage's start, before any run folder; the mode is restored after a stage."""
    import json

    import typer

    from lessctl.cli import _stage_run

    before = triton_step.mode()
    with pytest.raises(LessctlError, match="triton_step='fast' is invalid; allowed: auto, always"):
        compose("triton_step=fast")
    cfg = compose("model=tiny-random", "device=cpu", "triton_step=never", f"results_dir={tmp_path}")
    with _stage_run("eval", [], cfg) as run:
        assert triton_step.mode() == "never"
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["triton_step"] == "disabled" and "native_step" in meta
    cfg = compose(
        "model=tiny-random", "device=cpu", "triton_step=always", f"results_dir={tmp_path}"
    )
    with pytest.raises(typer.Exit) as err, _stage_run("eval", [], cfg):
        pass
    assert err.value.exit_code == 2
    assert triton_step.mode() == before
