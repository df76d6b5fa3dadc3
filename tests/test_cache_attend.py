"""The general path's attention (`lessctl.cache.attend`): asking for the policy's probabilities
(one shared softmax when there is no state) changes nothing in the output, and the
probabilities are each row's softmax over its visible kept keys summed over the group."""

from __future__ import annotations

import torch

from lessctl.cache.attend import rows_attention
from lessctl.less.attention import kept_attention

B, H, HKV, T, M, D = 2, 6, 2, 5, 9, 8


def inputs():
    torch.manual_seed(0)
    q, keys, values = torch.randn(B, H, T, D), torch.randn(B, HKV, M, D), torch.randn(B, HKV, M, D)
    visible = torch.rand(B, HKV, T, M) < 0.6
    visible[0, 1, 2] = False  # a row that sees nothing: out 0, probs 0
    return q, keys, values, visible


def test_probs_do_not_change_the_output_and_are_the_grouped_softmax():
    q, keys, values, visible = inputs()
    out_plain, none = rows_attention(q, keys, values, visible, block=2)
    out, probs = rows_attention(q, keys, values, visible, want_probs=True, block=2)
    assert none is None
    torch.testing.assert_close(out, out_plain)
    torch.testing.assert_close(out, kept_attention(q, keys, values, visible)[0])
    assert (out[0, 3:6, 2] == 0).all() and (probs[0, 1, 2] == 0).all()

    g = H // HKV
    s = torch.einsum("bkgtd,bkmd->bkgtm", q.view(B, HKV, g, T, D), keys) / D**0.5
    s = s.masked_fill(~visible[:, :, None], float("-inf"))
    want = torch.nan_to_num(s.softmax(-1)).sum(2)
    torch.testing.assert_close(probs, want)
    # group-summed rows that see a key add up to g (the group's heads, each a distribution)
    sees = visible.any(-1)
    torch.testing.assert_close(probs.sum(-1)[sees], torch.full((int(sees.sum()),), float(g)))
