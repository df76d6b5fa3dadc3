"""``baseline_plus``: the policy with the extra tokens that equal the LESS state's bytes at
``less.rank`` in the cached K/V dtype (rows ``extra_tokens``)."""

from __future__ import annotations

import torch

from lessctl.methods.base import Method
from lessctl.methods.registry import MethodContext, register_method
from lessctl.policies.budget import baseline_plus, state_tokens


@register_method("baseline_plus", "Baseline+", 2, state_bytes=True)
def build(ctx: MethodContext) -> Method:
    rank = int(ctx.cfg.less.rank)
    kv_bytes = torch.empty((), dtype=ctx.kv_dtype).element_size()
    extra = state_tokens(rank, ctx.geo["head_dim"], kv_bytes)
    plus = baseline_plus(ctx.policy, rank, ctx.geo["head_dim"], kv_bytes)
    return Method("baseline_plus", plus, extra_tokens=extra if plus.budget is not None else 0)
