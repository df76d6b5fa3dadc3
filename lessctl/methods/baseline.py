"""``baseline``: the configured sparse policy alone."""

from __future__ import annotations

from lessctl.methods.base import Method
from lessctl.methods.registry import MethodContext, register_method


@register_method("baseline", "Baseline", 1, bench=True)
def build(ctx: MethodContext) -> Method:
    return Method("baseline", ctx.policy)
