"""``full``: nothing evicted (transformers' own SDPA path), the reference."""

from __future__ import annotations

from lessctl.methods.base import Method
from lessctl.methods.registry import MethodContext, register_method


@register_method("full", "Full", 0, bench=True)
def build(ctx: MethodContext) -> Method:
    return Method("full", ctx.full)
