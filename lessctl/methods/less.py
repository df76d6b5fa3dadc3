"""``less``: the policy plus trained kernels (``less.ckpt=`` or the newest matching checkpoint,
:func:`lessctl.methods.base.load_less`)."""

from __future__ import annotations

from lessctl.methods.base import Method, load_less
from lessctl.methods.registry import MethodContext, register_method


@register_method("less", "LESS", 3, kernels="trained", bench=True)
def build(ctx: MethodContext) -> Method:
    ck = load_less(ctx.cfg, ctx.geo, ctx.device, ctx.policy)
    return Method(
        "less",
        ctx.policy,
        ck.kernels,
        ck.path,
        ck.trained_budget,
        ck.transfer,
        trained_on=ck.trained_on,
    )
