"""The CUDA path (`pytest -m cuda`; benchmarks/gpu_check.sh runs it on a GPU): the evicting
cache equals the parallel form in fp32 on CUDA and stays within bf16's tolerance in bf16, the
steady step compiles there, SDPA with enable_gqa equals the repeated heads, the lm-eval model
runs on CUDA, and the Triton LESS step compiled for real equals the torch path. Where there is
no CUDA device every test here is skipped and says so."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lessctl.cache import EvictingCache, native, triton_step
from lessctl.cache.step import steady_step
from lessctl.config import load_config
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import Method
from lessctl.models import load_model
from lessctl.policies import get_policy
from tests.test_cache import parallel_logits, streamed_with_cache, strong_kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: these run on a GPU (pytest -m cuda, benchmarks/gpu_check.sh)",
    ),
]

LAMBDA = get_policy("lambda", sink=2, recent=14)
H2O = get_policy("h2o", heavy=8, recent=8)


def _model(dtype):
    cfg = load_config(["model=tiny-random"])
    model, tok = load_model(cfg.model, "cuda", dtype, seed=0)
    return model.eval(), tok


def _on_cuda(kernels):
    return {i: k.to("cuda") for i, k in kernels.items()}


@pytest.fixture
def fused_modes():
    """Restores native_step's and triton_step's modes and load state after the test."""
    saved = {m: dict(m._state) for m in (native, triton_step)}
    yield
    for m, s in saved.items():
        m._state.clear()
        m._state.update(s)


@pytest.mark.parametrize("name", ["lambda", "h2o"])
def test_cache_equals_parallel_form_fp32_cuda(name):
    model, _ = _model(torch.float32)
    policy = LAMBDA if name == "lambda" else H2O
    kernels = _on_cuda(strong_kernels(model))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3)).cuda()
    ref = parallel_logits(model, ids, policy, kernels)
    got, cache = streamed_with_cache(model, ids, policy, kernels)
    assert cache.layers[0].steady
    # fp32 on a GPU: TF32 is off for matmuls by default; sums in other orders than on CPU
    assert (got - ref).abs().max().item() < 1e-3


def test_cache_within_bf16_tolerance_cuda():
    """A bf16 model and cache against the fp32 parallel form: within bf16's rounding, scaled
    by the logits' size (16 eps: two layers, each rounding its K/V, attention and MLP)."""
    ref_model, _ = _model(torch.float32)
    kernels = _on_cuda(strong_kernels(ref_model))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3)).cuda()
    ref = parallel_logits(ref_model, ids, LAMBDA, kernels)
    model, _ = _model(torch.bfloat16)
    got, _ = streamed_with_cache(model, ids, LAMBDA, kernels)
    eps = torch.finfo(torch.bfloat16).eps
    err = (got - ref).abs().max().item()
    assert err < 16 * eps * max(1.0, ref.abs().max().item()), err


def _steady_layer(policy, dtype, h=4, hkv=2, d=16, window=None, seed=0):
    """A one-layer cache on CUDA driven row by row until steady -> (layer, row maker)."""
    torch.manual_seed(seed)
    kc = KernelConfig(h, hkv, d, rank=4, hidden=32, dropout=0.0, init_scale=1.0)
    kernels = {0: LayerKernels(kc).eval().cuda()}
    layer = EvictingCache(1, policy, kernels, protocol="streaming").layers[0]

    def rows():
        return [torch.randn(2, n, 1, d, device="cuda").to(dtype) for n in (h, hkv, hkv)]

    with torch.no_grad():
        for _ in range(64):
            if layer.steady:
                break
            q, k, v = rows()
            layer.update(k, v)
            layer.attend(q, k, v, None, window, None)
    assert layer.steady
    return layer, rows


def test_compiled_steady_step_cuda(fused_modes):
    """torch.compile(fullgraph) of the steady step on CUDA equals the eager torch path."""
    triton_step.configure("never")  # the torch path's rows (the compiled step traces it)
    layer, rows = _steady_layer(LAMBDA, torch.float32)
    compiled = torch.compile(steady_step, fullgraph=True, dynamic=False)
    eager, comp = layer.store, copy.deepcopy(layer.store)
    for store in (eager, comp):  # views of each copy's own buffers (tests/test_cache_step.py)
        store.pack(None, 2, True)
    args = (LAMBDA, layer.frozen, None, None, None)
    with torch.no_grad():
        for i in range(3):
            q, k, v = rows()
            t = layer.seen + i - layer.pads
            want = steady_step(q, k, v, t, eager, *args)
            got = compiled(q, k, v, t, comp, *args)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(comp.state.H, eager.state.H, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_enable_gqa_cuda(dtype):
    """SDPA with enable_gqa and an additive bias (the steady step's one call) equals the KV
    heads repeated for their query heads."""
    g, hkv, m, d = 4, 2, 40, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, g * hkv, 1, d, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(2, hkv, m, d, device="cuda", generator=gen).to(dtype) for _ in "kv")
    bias = torch.randn(2, g * hkv, 1, m, device="cuda", generator=gen).to(dtype)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias)
    tol = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_lm_eval_model_cuda():
    """The lm-eval backend on CUDA: full attention's log-likelihoods equal the CPU model's."""
    from tests.test_lm_eval import PAIRS, lessctl_lm, ll_requests  # imports lm_eval

    cfg = load_config(["model=tiny-random"])
    cpu_model, tok = load_model(cfg.model, "cpu", torch.float32, seed=0)
    model, _ = _model(torch.float32)
    full = Method("full", get_policy("full"))
    ref = lessctl_lm(cpu_model, tok, full).loglikelihood(ll_requests(PAIRS))
    got = lessctl_lm(model, tok, full).loglikelihood(ll_requests(PAIRS))
    for (a, greedy_a), (b, greedy_b) in zip(ref, got, strict=True):
        assert b == pytest.approx(a, abs=1e-3)
        assert greedy_a == greedy_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lambda", "h2o"])
def test_triton_step_compiled_equals_torch_path_cuda(name, dtype, fused_modes):
    """The Triton kernel compiled for the GPU (not interpreted) equals the torch path step by
    step: outputs, H, z and the virtual keys' values."""
    policy = LAMBDA if name == "lambda" else H2O
    layers = []
    for mode in ("always", "never"):
        triton_step.configure(mode)
        layers.append(_steady_layer(policy, dtype, seed=0))
    (fused, rows), (torch_path, _) = layers
    assert fused.triton is not None and torch_path.triton is None
    tol = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-4
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(8):
            q, k, v = rows()
            outs = []
            for one in (fused, torch_path):
                one.update(k, v)
                outs.append(one.attend(q, k, v, None))
            torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)
    a, b = fused.store, torch_path.store
    torch.testing.assert_close(a.state.H, b.state.H, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.state.z, b.state.z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.views.values, b.views.values, atol=tol, rtol=tol)
    assert float(a.state.z.max()) > 0.1
