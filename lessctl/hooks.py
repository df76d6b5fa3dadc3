"""Run an unmodified transformers model with our own attention function (no copied model code).

`use_attention(model, fn)` registers `fn` under a fresh name in transformers'
`AttentionInterface`, together with the causal mask function of the same name (without it, a
registered function silently gets `attention_mask=None` and attends to the future), switches
the model to it, and restores the previous implementation on exit.

`fn(module, query [B,H,S,d], key [B,Hkv,S,d], value [B,Hkv,S,d], attention_mask, scaling=...,
**kw) -> (out [B,S,H,d], None)`: q and k arrive after RoPE, k and v per KV head (not
repeated); `module.layer_idx` names the layer. The layer's own view arrives as keyword
arguments: `scaling` (e.g. Gemma's `query_pre_attn_scalar`), `sliding_window` (None on a global
layer) and `softcap` (Gemma 2 logit soft-capping); a function must honour all three.

`check_supported(model)` refuses, in one line naming the model type and the feature, what the
harness cannot honour: ALiBi, cross-attention, latent (compressed-KV) attention, attention
sinks, and any model whose decoder layers the registered function does not reach (counted on a
two-token forward). Attention modules that call SDPA inline (Falcon) are routed to the
registered function by :mod:`lessctl.adapters` inside the block.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lessctl.adapters import route_of, routed
from lessctl.errors import LessctlError

_ids = itertools.count()

# keyword arguments of the attention interface that change the math and that we cannot honour
_UNSUPPORTED_KWARGS = {"s_aux": "attention sinks", "sinks": "attention sinks"}
# config flags -> the feature they switch on
_UNSUPPORTED_CONFIG = {
    "alibi": "ALiBi position biases",
    "add_cross_attention": "cross-attention",
    "is_encoder_decoder": "cross-attention (encoder-decoder)",
    "kv_lora_rank": "latent (compressed-KV) attention",
    "use_sliding_window_chunks": "chunked attention",
    "attention_chunk_size": "chunked attention",
}
# model types whose attention has a feature no config flag names
_UNSUPPORTED_TYPES = {
    "bloom": "ALiBi position biases",
    "mpt": "ALiBi position biases",
    "deepseek_v2": "latent (compressed-KV) attention",
    "deepseek_v3": "latent (compressed-KV) attention",
}


class UnsupportedModel(LessctlError):
    """A model the harness cannot evaluate faithfully; the message is one line."""


def model_type(model) -> str:
    return getattr(model.config, "model_type", None) or type(model).__name__


def refuse_unknown_kwargs(module, kw: dict) -> None:
    """Refuse attention-interface arguments that change the math (one line naming them)."""
    for key, feature in _UNSUPPORTED_KWARGS.items():
        if kw.get(key) is not None:
            raise UnsupportedModel(f"lessctl cannot honour {feature} ({key}); not supported")
    if kw.get("dropout"):
        raise UnsupportedModel(f"attention dropout {kw['dropout']} during evaluation; use eval()")


def attention_layers(model) -> list[torch.nn.Module]:
    """The decoder's attention modules, in layer order (modules with `layer_idx` and `o_proj`,
    or with a route in :mod:`lessctl.adapters`)."""
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and (hasattr(m, "o_proj") or route_of(m) is not None)
    ]
    return sorted(mods, key=lambda m: m.layer_idx)


def check_supported(model) -> list[dict]:
    """Refuse (one line) a model whose attention the harness cannot honour (module doc);
    returns each layer's view ``{"scaling", "window", "softcap"}`` as the layer passes it."""
    kind = model_type(model)
    if kind in _UNSUPPORTED_TYPES:
        raise UnsupportedModel(f"model type {kind}: {_UNSUPPORTED_TYPES[kind]} is not supported")
    cfg = model.config.get_text_config(decoder=True)
    for c in {id(model.config): model.config, id(cfg): cfg}.values():
        for key, feature in _UNSUPPORTED_CONFIG.items():
            if getattr(c, key, None):
                raise UnsupportedModel(f"model type {kind}: {feature} ({key}) is not supported")
    n = getattr(cfg, "num_hidden_layers", None)
    if not n:
        raise UnsupportedModel(f"model type {kind}: no decoder attention layers found")
    seen: dict[int, dict] = {}

    def count(module, query, key, value, attention_mask, **kw):
        refuse_unknown_kwargs(module, kw)
        seen[int(module.layer_idx)] = {
            "scaling": None if kw.get("scaling") is None else float(kw["scaling"]),
            "window": None if kw.get("sliding_window") is None else int(kw["sliding_window"]),
            "softcap": None if kw.get("softcap") is None else float(kw["softcap"]),
        }
        b, h, s, d = query.shape
        return query.new_zeros(b, s, h, value.shape[-1]), None

    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    with use_attention(model, count), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    if set(seen) != set(range(n)) or len(attention_layers(model)) != n:
        raise UnsupportedModel(
            f"model type {kind}: lessctl's attention function reaches {len(seen)} of {n} "
            f"decoder layers (its attention does not go through transformers' attention "
            f"interface or has no o_proj); not supported"
        )
    return [seen[i] for i in range(n)]


def sdpa(module, query, key, value, attention_mask, **kw):
    """transformers' own SDPA attention (the reference path)."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def no_mask(*args, **kwargs) -> None:
    """A mask function for attention functions that build their own (the evicting cache): no
    [B, 1, T, seen + T] mask is allocated, whatever the context length."""
    return None


@contextmanager
def use_attention(model, fn: Callable, mask: Callable = sdpa_mask) -> Iterator[str]:
    """Switch `model` to attention function `fn` (with the causal mask `mask`, by default
    SDPA's) inside the block."""
    name = f"lessctl_{next(_ids)}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask)
    layers = attention_layers(model)
    configs = {id(c): c for c in (model.config, *[m.config for m in layers])}
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        with routed(layers):
            yield name
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]
        for interface in (AttentionInterface, AttentionMaskInterface):  # no leak per block
            interface._global_mapping.pop(name, None)
