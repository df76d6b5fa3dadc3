"""lessctl's earlier SnapKV variant (``pool_across_window=True``) in the real-eviction cache's
prompt protocol: the first decoded row keeps the top scores pooled across the window's edge plus
the last ``window`` keys counting the decoded one; a prompt no longer than the budget decides
exactly as the parallel form. The default (SnapKV's own code) is tested against an independent
reference in tests/policies/test_reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from lessctl.cache import EvictingLayer
from lessctl.policies import SnapKV, keep_mask

B, H, HKV, D = 2, 4, 2, 8


def qkv(s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, s, D, generator=g)
    k = torch.randn(B, HKV, s, D, generator=g)
    return q, k, torch.randn(B, HKV, s, D, generator=g)


def run_layer(policy, q, k, v, prompt: int) -> list[torch.Tensor]:
    """Prompt protocol: one forward of ``prompt`` rows, then one row at a time; returns the kept
    positions (sorted, [B,Hkv,m]) after each forward."""
    layer = EvictingLayer(policy, protocol="prompt")
    kept = []
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, q.shape[2])]
    for a, e in spans:
        layer.update(k[:, :, a:e], v[:, :, a:e])
        layer.attend(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], None)
        kept.append(layer.positions.sort(-1).values)
    return kept


def snapkv_by_definition(policy: SnapKV, q, k, prompt: int) -> list[list[list[int]]]:
    """Kept positions after the first decoded row, computed from the variant's definition with
    loops: rows prompt-w..prompt-1 of full causal attention, summed over the group, pooled over
    every prompt key (across the window's edge)."""
    g, w, r = H // HKV, policy.window, policy.kernel // 2
    out = []
    for b in range(B):
        per_head = []
        for hk in range(HKV):
            score = [0.0] * prompt
            for hq in range(hk * g, (hk + 1) * g):
                for row in range(prompt - w, prompt):
                    logits = [
                        float(q[b, hq, row] @ k[b, hk, j]) / math.sqrt(D) for j in range(row + 1)
                    ]
                    z = sum(math.exp(x) for x in logits)
                    for j, x in enumerate(logits):
                        score[j] += math.exp(x) / z
            near = [score[max(0, j - r) : j + r + 1] for j in range(prompt)]
            pooled = [max(x) if policy.pooling == "max" else sum(x) / policy.kernel for x in near]
            prefix = sorted(range(prompt - w + 1), key=lambda j: (-pooled[j], -j))
            window = list(range(prompt - w + 1, prompt + 1))  # the new key `prompt` included
            per_head.append(sorted(prefix[: policy.heavy] + window))
        out.append(per_head)
    return out


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_prompt_protocol_first_row_is_snapkv_compression(pooling):
    policy, prompt = (
        SnapKV(heavy=7, window=4, kernel=5, pooling=pooling, pool_across_window=True),
        30,
    )
    q, k, v = qkv(prompt + 3, seed=11)
    kept = run_layer(policy, q, k, v, prompt)
    assert kept[0].shape[-1] == prompt  # the prompt is cached whole
    assert kept[1].tolist() == snapkv_by_definition(policy, q, k, prompt)
    assert all(x.shape[-1] == policy.budget for x in kept[1:])
    # pooling matters here: without it (kernel 1) other keys are kept
    plain = run_layer(policy.replace(kernel=1), q, k, v, prompt)
    assert plain[1].tolist() != kept[1].tolist()


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("prompt", [1, 6, 11])
def test_prompt_no_longer_than_budget_equals_parallel_form(prompt, across):
    policy = SnapKV(7, 4, 3, "max", pool_across_window=across)  # budget 12 (across: 11)
    q, k, v = qkv(40, seed=12)
    kept = run_layer(policy, q, k, v, prompt)
    mask = keep_mask(policy.evict_at(q, k))  # [B,Hkv,S(row),S(key)]
    for i, t in enumerate([prompt - 1, *range(prompt, 40)]):
        want = torch.stack([torch.stack([m.nonzero()[:, 0] for m in row]) for row in mask[:, :, t]])
        assert torch.equal(kept[i], want), t


@pytest.mark.parametrize("across", [False, True])
def test_padded_batch_with_prompts_both_sides_of_the_budget_equals_each_alone(across):
    """One prompt longer than the budget (first eviction at its end), one shorter (first eviction
    at the budget), left-padded into one batch: each decides and attends as it would alone."""
    policy, steps, pad = SnapKV(9, 6, 3, pool_across_window=across), 12, 8  # budget 16 (15)
    q, k, v = qkv(20 + steps, seed=13)
    pads = torch.tensor([0, pad])

    def run(qq, kk, vv, prompt, pads=None):
        layer = EvictingLayer(policy, protocol="prompt", pads=pads)
        outs, kept = [], []
        for a, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, qq.shape[2])]:
            layer.update(kk[:, :, a:e], vv[:, :, a:e])
            outs.append(layer.attend(qq[:, :, a:e], kk[:, :, a:e], vv[:, :, a:e], None))
            kept.append(layer.positions.sort(-1).values)
        return torch.cat(outs, 2), kept

    batch, kept_b = run(q, k, v, 20, pads)
    long, kept_l = run(q[:1], k[:1], v[:1], 20)
    short, kept_s = run(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], 12)
    assert (batch[0] - long[0]).abs().max() < 1e-5
    assert (batch[1, :, pad:] - short[0]).abs().max() < 1e-5
    assert kept_b[-1][0].tolist() == kept_l[-1][0].tolist()
    assert kept_b[-1][1].tolist() == kept_s[-1][0].tolist()
    assert kept_l[-1].shape[-1] == kept_s[-1].shape[-1] == policy.budget
