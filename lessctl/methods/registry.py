"""The method registry: every compared method (``eval.methods``, ``bench.methods``) is one small
file in this folder that registers a :class:`MethodSpec` with ``@register_method``.

A spec declares what the method needs and how the report shows it:

- ``label``: its name in tables and figures (``Baseline+``), and ``order``: where it stands in
  them (ascending, Full first; also the order of the allowed values in error messages);
- ``kernels``: ``"trained"`` (a LESS checkpoint, ``less.ckpt=`` or the newest match),
  ``"random"`` (untrained kernels of ``less.rank``) or ``None``;
- ``state_bytes``: it keeps the extra tokens worth the LESS state's bytes (Baseline+);
- ``bench``: ``lessctl bench`` can measure it (``bench.methods``);
- ``build(ctx) -> Method``: the method for one evaluation (:class:`MethodContext`).

The shared test ``tests/test_methods_registry.py`` builds every registered method on the tiny
model, so a newly registered one is exercised with no test of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from lessctl.methods.base import Method
    from lessctl.policies.base import Policy


@dataclass(frozen=True)
class MethodContext:
    """What a builder gets: the config, the model's attention geometry, the evaluated context
    length, the device, the cached K/V dtype, the configured (evicting) policy and Full's."""

    cfg: DictConfig
    geo: dict[str, int]
    seq_len: int
    device: Any
    kv_dtype: torch.dtype
    policy: Policy
    full: Policy


@dataclass(frozen=True)
class MethodSpec:
    """One registered method (module doc)."""

    name: str
    label: str
    order: int
    build: Callable[[MethodContext], Method]
    kernels: Literal["trained", "random"] | None = None
    state_bytes: bool = False
    bench: bool = False


REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    label: str,
    order: int,
    *,
    kernels: Literal["trained", "random"] | None = None,
    state_bytes: bool = False,
    bench: bool = False,
):
    """Decorator of a builder ``build(ctx: MethodContext) -> Method``: registers the method
    ``name`` (module doc); registering another builder under a taken name is an error."""

    def wrap(build: Callable[[MethodContext], Method]) -> Callable[[MethodContext], Method]:
        if name in REGISTRY and REGISTRY[name].build is not build:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(name, label, order, build, kernels, state_bytes, bench)
        return build

    return wrap


def specs() -> list[MethodSpec]:
    """Every registered method, in its ``order``."""
    return sorted(REGISTRY.values(), key=lambda s: (s.order, s.name))


def method_names(*, bench: bool = False) -> tuple[str, ...]:
    """The registered methods in their order (``bench=True``: those ``lessctl bench`` measures)."""
    return tuple(s.name for s in specs() if s.bench or not bench)


def labels() -> dict[str, str]:
    """Method name -> its label (``baseline_plus`` -> ``Baseline+``), in the methods' order."""
    return {s.name: s.label for s in specs()}
