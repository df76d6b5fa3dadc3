"""``baseline_plus``: the policy with the extra tokens that equal the LESS state's bytes at
``less.rank`` in the cached K/V dtype (rows ``extra_tokens``); with a rank per layer, the mean
state's bytes over the layers (every layer keeps as many extra tokens: the same total bytes)."""

from __future__ import annotations

import torch

from lessctl.less.kernels import layer_ranks
from lessctl.methods.base import Method
from lessctl.methods.registry import MethodContext, register_method
from lessctl.policies.budget import baseline_plus, state_tokens


@register_method("baseline_plus", "Baseline+", 2, state_bytes=True)
def build(ctx: MethodContext) -> Method:
    ranks = layer_ranks(ctx.cfg.less.rank, ctx.geo["num_layers"])
    kv_bytes = torch.empty((), dtype=ctx.kv_dtype).element_size()
    extra = state_tokens(ranks, ctx.geo["head_dim"], kv_bytes)
    plus = baseline_plus(ctx.policy, ranks, ctx.geo["head_dim"], kv_bytes)
    return Method(
        "baseline_plus",
        plus,
        extra_tokens=extra if plus.budget is not None else 0,
        state_ranks=ranks,
    )
