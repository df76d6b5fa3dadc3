"""Run an unmodified transformers model with our own attention function (no copied model code).

`use_attention(model, fn)` registers `fn` under a fresh name in transformers'
`AttentionInterface`, together with the causal mask function of the same name (without it, a
registered function silently gets `attention_mask=None` and attends to the future), switches
the model to it, and restores the previous implementation on exit.

`fn(module, query [B,H,S,d], key [B,Hkv,S,d], value [B,Hkv,S,d], attention_mask, scaling=...,
**kw) -> (out [B,S,H,d], None)`: q and k arrive after RoPE, k and v per KV head (not
repeated); `module.layer_idx` names the layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

_ids = itertools.count()


def attention_layers(model) -> list[torch.nn.Module]:
    """The decoder's attention modules, in layer order (modules with `layer_idx` and `o_proj`)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def sdpa(module, query, key, value, attention_mask, **kw):
    """transformers' own SDPA attention (the reference path)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


@contextmanager
def use_attention(model, fn: Callable) -> Iterator[str]:
    """Switch `model` to attention function `fn` (with an SDPA causal mask) inside the block."""
    name = f"lessctl_{next(_ids)}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    configs = {id(c): c for c in (model.config, *[m.config for m in attention_layers(model)])}
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield name
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]
