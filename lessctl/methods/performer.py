"""``performer``: the policy plus untrained random-feature kernels (the paper's ablation)."""

from __future__ import annotations

from omegaconf import DictConfig

from lessctl.less.kernels import LayerKernels, kernel_config
from lessctl.methods.base import Method
from lessctl.methods.registry import MethodContext, register_method


def performer_kernels(cfg: DictConfig, geo: dict[str, int], device) -> dict[int, LayerKernels]:
    """Untrained random-feature kernels (the paper's ablation), seeded per layer, each of its
    layer's ``less.rank``."""
    return {
        i: LayerKernels(
            kernel_config(
                cfg,
                geo,
                i,
                kind="performer",
                seed=int(cfg.less.seed) * 1000 + i,
            )
        )
        .to(device)
        .eval()
        for i in range(geo["num_layers"])
    }


@register_method("performer", "Performer", 4, kernels="random")
def build(ctx: MethodContext) -> Method:
    return Method("performer", ctx.policy, performer_kernels(ctx.cfg, ctx.geo, ctx.device))
