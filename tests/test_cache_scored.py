"""The fused prefill's attention and key scores (lessctl/cache/scored.py) against the explicit
probabilities they replace (lessctl/cache/attend.py:rows_attention): the same output and the
same weighted column sums, causal and masked, with and without a state, on ATen's flash kernel
and on the row-block fallback other devices take."""

from __future__ import annotations

import pytest
import torch

from lessctl.cache import scored
from lessctl.cache.attend import rows_attention
from lessctl.cache.scored import scored_attention
from lessctl.less.state import LowRankState

B, H, HKV, T, D, R = 2, 6, 2, 70, 16, 4


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, D, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, HKV, T, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, HKV, T, D, generator=g).to(dtype)
    return q, k, v


def _causal():
    pos = torch.arange(T)
    return (pos[None, :] <= pos[:, None]).expand(B, HKV, T, T)


def _reference(q, k, v, visible, weights, log_phi=None, state=None):
    out, probs = rows_attention(q, k, v, visible, None, None, log_phi, state, want_probs=True)
    return out.float(), (probs * weights[:, None, :, None]).sum(2)


def _rel(a, b):
    """Largest error relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(params=["flash", "blocks"])
def path(request, monkeypatch):
    if request.param == "blocks":  # the fallback of devices without ATen's CPU flash kernel
        monkeypatch.setattr(scored, "_FLASH_CPU", None)
    return request.param


def test_causal_prompt_equals_explicit_probabilities(path):
    """H2O (every row weight 1) and SnapKV (only its last rows count) on a causal prompt; a
    wrong transposition, a missing row or an off-by-one in the reversed order changes sums."""
    q, k, v = _inputs(torch.float32)
    for weights in (torch.ones(B, T), (torch.arange(T) >= T - 9).float().expand(B, T)):
        out, sums = scored_attention(q, k, v, None, None, weights, block=32)
        ref_out, ref_sums = _reference(q, k, v, _causal(), weights)
        assert _rel(out, ref_out) < 1e-5
        assert _rel(sums, ref_sums) < 1e-5  # fp32: rounding of sums of ~T terms


def test_masked_rows_padding_and_unseen_keys_equal_explicit_probabilities(path):
    """Kept-key masks per KV head, a padding row that sees nothing (out 0, adds nothing), a key
    no counted row sees (score 0) and fractional weights."""
    q, k, v = _inputs(torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    visible = _causal() & (torch.rand(B, HKV, 1, T, generator=g) > 0.4)
    visible = visible | torch.eye(T, dtype=torch.bool)
    visible[0, :, 3] = False  # row 3 of sequence 0 sees nothing
    visible[1, :, :, 5] = False  # key 5 of sequence 1 is seen by no row
    weights = torch.rand(B, T, generator=g)
    weights[:, :4] = 0.0
    out, sums = scored_attention(q, k, v, visible, None, weights, block=16)
    ref_out, ref_sums = _reference(q, k, v, visible, weights)
    assert _rel(out, ref_out) < 1e-5 and _rel(sums, ref_sums) < 1e-5
    assert out[0, :, 3].abs().max().item() == 0.0
    assert sums[1, :, 5].abs().max().item() == 0.0


def test_with_a_state_the_output_folds_it_and_the_scores_do_not(path):
    """A later chunk: the rows also read the state's R virtual keys, whose weight the scores
    leave out (they are over the kept keys alone)."""
    q, k, v = _inputs(torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    state = LowRankState(
        torch.randn(B, HKV, R, D, generator=g), torch.rand(B, HKV, R, generator=g) + 0.5
    )
    log_phi = torch.randn(B, H, T, R, generator=g)
    visible = _causal()
    weights = torch.ones(B, T)
    out, sums = scored_attention(q, k, v, visible, None, weights, log_phi, state)
    ref_out, ref_sums = _reference(q, k, v, visible, weights, log_phi, state)
    assert _rel(out, ref_out) < 1e-5 and _rel(sums, ref_sums) < 1e-5
    plain, _ = scored_attention(q, k, v, visible, None, weights)
    assert _rel(plain, ref_out) > 1e-2  # the state changed the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_within_their_rounding(dtype):
    """Logits from half-precision q, k in both paths (fp32 accumulation); the fused path's
    row bias (log w - lse) / scale enters as a high and a low half, so the scores keep about
    16 bits: relative error ~ |lse| * 2^-16, far inside 2^-8 (one half-precision ulp)."""
    q, k, v = _inputs(dtype, seed=5)
    weights = torch.ones(B, T)
    out, sums = scored_attention(q, k, v, None, None, weights)
    ref_out, ref_sums = _reference(q, k, v, _causal(), weights)
    assert _rel(sums, ref_sums) < 2**-8
    assert _rel(out, ref_out) < 2**-6  # the output itself is rounded to the half type
