""":class:`EvictingCache`: a transformers ``Cache`` of :class:`~lessctl.cache.layer.EvictingLayer`
(one per decoder layer) whose registered attention function evicts and attends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from lessctl.cache.layer import PROTOCOLS, EvictingLayer
from lessctl.cache.store import left_pad_counts
from lessctl.errors import InputError
from lessctl.hooks import no_mask, refuse_unknown_kwargs, use_attention
from lessctl.less.kernels import LayerKernels
from lessctl.policies.base import Policy


class EvictingCache(Cache):
    """Real-eviction cache: ``policy`` (+ per-layer ``kernels``: the LESS state) on every layer.

    ``protocol``: ``"prompt"``, ``"streaming"`` or ``"chunked"`` (with ``chunk`` tokens per
    chunk); see :mod:`lessctl.cache`. ``attention_mask`` [B,T]: the left-padded prompt mask
    (None: no padding). Run the model inside :meth:`attached`.
    """

    def __init__(
        self,
        num_layers: int,
        policy: Policy,
        kernels: dict[int, LayerKernels] | None = None,
        *,
        protocol: str = "prompt",
        attention_mask: Tensor | None = None,
        chunk: int | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol={protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if protocol == "chunked" and (not isinstance(chunk, int) or chunk < 1):
            raise InputError(f"protocol=chunked needs chunk = an int >= 1 tokens, got {chunk!r}")
        if kernels is not None and set(range(num_layers)) - set(kernels):
            raise ValueError(f"kernels must cover layers 0..{num_layers - 1}")
        pads = left_pad_counts(attention_mask)
        self.policy, self.protocol, self.chunk = policy, protocol, chunk
        layers = [
            EvictingLayer(policy, None if kernels is None else kernels[i], protocol, pads, chunk)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)

    @classmethod
    def for_model(
        cls,
        model,
        policy: Policy,
        kernels: dict[int, LayerKernels] | None = None,
        *,
        protocol: str = "prompt",
        attention_mask: Tensor | None = None,
        chunk: int | None = None,
    ) -> EvictingCache:
        """A cache with one layer per decoder layer of ``model``."""
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        return cls(
            n, policy, kernels, protocol=protocol, attention_mask=attention_mask, chunk=chunk
        )

    def attention(
        self,
        module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kw,
    ) -> tuple[Tensor, None]:
        """Registered attention function: query [B,H,T,d] -> (out [B,T,H,d], None)."""
        refuse_unknown_kwargs(module, kw)
        layer = self.layers[module.layer_idx]
        out = layer.attend(query, key, value, scaling, sliding_window, softcap)
        return out.transpose(1, 2), None

    @contextmanager
    def attached(self, model) -> Iterator[EvictingCache]:
        """Run ``model`` with this cache's attention function inside the block (the model's
        own mask is not built: the cache masks by position)."""
        with use_attention(model, self.attention, mask=no_mask):
            yield self

    def nbytes(self) -> int:
        """Bytes of every cache tensor (K, V, positions, scores, low-rank state)."""
        return sum(layer.nbytes() for layer in self.layers)

    def fork(self, kernels: dict[int, LayerKernels] | None) -> EvictingCache:
        """A copy (own tensors) of a cache that has evicted nothing yet, e.g. right after the
        prompt, with other ``kernels`` (None: no state): one prefill serves several methods."""
        if any(layer.pending for layer in self.layers):
            raise RuntimeError("cannot fork an EvictingCache in the middle of a forward")
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            kept = (layer.positions[:, 0] >= 0).sum(-1)  # [B] real tokens held
            if bool((kept != (layer.seen - layer.pads).clamp(min=0)).any()):
                raise RuntimeError("cannot fork an EvictingCache that has evicted tokens")
        out = EvictingCache(
            len(self.layers), self.policy, kernels, protocol=self.protocol, chunk=self.chunk
        )
        for src, dst in zip(self.layers, out.layers, strict=True):
            if not src.is_initialized:
                continue
            s = src.store
            dst.lazy_initialization(s.keys, s.values)
            d = dst.store
            d.keys, d.values = s.keys.clone(), s.values.clone()
            d.positions = s.positions.clone()
            d.acc = None if s.acc is None else s.acc.clone()
            dst.pads, dst.first_evict = src.pads.clone(), src.first_evict.clone()
            dst.seen = src.seen
        return out

    def to_dynamic(self) -> DynamicCache:
        """The kept K/V as a library ``DynamicCache`` (all of the prompt before any eviction)."""
        if any(
            layer.keys.shape[2] != layer.seen or bool((layer.positions < 0).any())
            for layer in self.layers
        ):
            raise RuntimeError("to_dynamic needs a cache that holds every token and no padding")
        return DynamicCache(
            ddp_cache_data=[(x.keys.clone(), x.values.clone()) for x in self.layers]
        )


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by any cache: :meth:`EvictingCache.nbytes` or the K/V of a library cache."""
    if isinstance(cache, EvictingCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for x in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(x, Tensor):
                total += x.numel() * x.element_size()
    return total


def running(model, cache: Cache):
    """The context to run ``model`` with ``cache`` in: an evicting cache's attention function,
    nothing for a library cache."""
    return cache.attached(model) if isinstance(cache, EvictingCache) else nullcontext()


@torch.no_grad()
def prefill(model, cache: Cache, input_ids: Tensor, chunk: int | None = None) -> Tensor:
    """Run a prompt [B,T] through ``model`` with ``cache`` (an evicting or a library cache),
    ``chunk`` tokens per forward (None: one forward), so that activations stay O(chunk)
    whatever T; -> the last row's logits [B,V]. With ``protocol="chunked"`` and ``chunk`` = the
    cache's chunk the cache (and so the whole prefill) holds O(budget + chunk) tokens."""
    size = input_ids.shape[1] if chunk is None else chunk
    with running(model, cache):
        for a in range(0, input_ids.shape[1], size):
            logits = model(
                input_ids[:, a : a + size], cache=cache, use_cache=True, logits_to_keep=1
            ).logits
    return logits[:, -1]
