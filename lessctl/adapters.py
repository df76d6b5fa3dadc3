"""Attention modules that call SDPA inline, routed through transformers' attention interface.

Most transformers models call the function that ``config._attn_implementation`` names, so
:func:`lessctl.hooks.use_attention` reaches them without touching model code. A few compute
attention inline instead; for those, a :class:`Route` gives a forward that does the module's own
projections and rotary embedding, updates the cache, calls the registered attention function
with the layer's scale and applies the output projection. :func:`routed` swaps it in on each
such module for the duration of a ``use_attention`` block and restores the original after, so
outside the block the model runs its own code (the reference the conformance tests compare
against).

Routed today: ``FalconAttention`` (rotary Falcon: the 7B/40B layouts; ALiBi Falcons are refused
by :func:`lessctl.hooks.check_supported`). Its keys and values reach the attention function per
KV head (one for multi-query, ``num_kv_heads`` for the new decoder architecture), not repeated
to every query head.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Route:
    """How to drive one attention module class: its ``forward`` through the interface, its
    output projection, its softmax scale and its number of KV heads."""

    forward: Callable
    output: Callable[[nn.Module], nn.Module]
    scaling: Callable[[nn.Module], float]
    kv_heads: Callable[[nn.Module], int]


def _falcon_qkv(m: nn.Module, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FalconAttention's fused projection [B,S,*] -> q [B,H,S,d], k and v [B,Hkv,S,d]."""
    b, s, _ = fused.shape
    h, d = m.num_heads, m.head_dim
    if m.new_decoder_architecture:  # per KV head: its g queries, then its key and value
        qkv = fused.view(b, s, m.num_kv_heads, h // m.num_kv_heads + 2, d)
        q, k, v = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif m.multi_query:  # H queries, one key, one value
        qkv = fused.view(b, s, h + 2, d)
        q, k, v = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    else:
        qkv = fused.view(b, s, h, 3, d)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _falcon_forward(
    self,
    hidden_states: Tensor,
    alibi: Tensor | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    **kwargs,
):
    """FalconAttention.forward (rotary path) with the attention itself delegated to the
    registered function."""
    from transformers.cache_utils import Cache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    if alibi is not None:
        raise RuntimeError("ALiBi Falcon reached the routed forward; check_supported refuses it")
    if layer_past is None and any(isinstance(x, Cache) for x in kwargs.values()):
        raise RuntimeError(f"FalconAttention got its cache as {sorted(kwargs)}: update the route")
    q, k, v = _falcon_qkv(self, self.query_key_value(hidden_states))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, _ = attend(self, q, k, v, attention_mask, scaling=self.inv_norm_factor, dropout=0.0)
    b, s = hidden_states.shape[:2]
    return self.dense(out.reshape(b, s, -1)), None


ROUTES: dict[str, Route] = {
    "FalconAttention": Route(
        forward=_falcon_forward,
        output=lambda m: m.dense,
        scaling=lambda m: float(m.inv_norm_factor),
        kv_heads=lambda m: int(m.num_kv_heads),
    ),
}


def route_of(module: nn.Module) -> Route | None:
    """The :class:`Route` of ``module``'s class (or a base class), None if it needs none."""
    for cls in type(module).__mro__:
        if cls.__name__ in ROUTES:
            return ROUTES[cls.__name__]
    return None


def output_projection(module: nn.Module) -> nn.Module:
    """The attention module's output projection (``o_proj``, Falcon's ``dense``)."""
    route = route_of(module)
    return route.output(module) if route else module.o_proj


def layer_scaling(module: nn.Module) -> float:
    """The softmax scale the module applies to q . k."""
    route = route_of(module)
    return route.scaling(module) if route else float(module.scaling)


@contextmanager
def routed(modules: list[nn.Module]) -> Iterator[None]:
    """Give every module with a :class:`Route` its routed forward inside the block, and the
    ``num_key_value_groups`` that attention functions (transformers' SDPA) read to pair query
    heads with KV heads; whatever the module had before (e.g. an accelerate hook's forward, an
    outer block's route) is restored on exit."""
    _missing = object()
    saved: list[tuple[nn.Module, dict[str, object]]] = []
    try:
        for m in modules:
            route = route_of(m)
            if route is None:
                continue
            keys = ("forward", "num_key_value_groups")
            saved.append((m, {k: vars(m).get(k, _missing) for k in keys}))
            m.forward = types.MethodType(route.forward, m)
            m.num_key_value_groups = m.num_heads // route.kv_heads(m)
        yield
    finally:
        for m, old in reversed(saved):
            for key, value in old.items():
                if value is _missing:
                    vars(m).pop(key, None)
                else:
                    setattr(m, key, value)
