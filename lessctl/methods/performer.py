"""``performer``: the policy plus untrained random-feature kernels (the paper's ablation)."""

from __future__ import annotations

from lessctl.methods.base import Method, performer
from lessctl.methods.registry import MethodContext, register_method


@register_method("performer", "Performer", 4, kernels="random")
def build(ctx: MethodContext) -> Method:
    return Method("performer", ctx.policy, performer(ctx.cfg, ctx.geo, ctx.device))
