"""Decoding through the real-eviction cache: generation and streaming logits.

- :func:`generate`: new tokens per sequence for a (left-padded) batch of prompts, with a manual
  decode loop (default; greedy or temperature sampling with an optional ``torch.Generator``) or
  through ``model.generate()`` (``use_hf_generate=True``). ``policy.name == "full"`` without
  kernels runs transformers' own ``DynamicCache`` and attention; anything else runs an
  :class:`~lessctl.cache.EvictingCache`. Output is cut before EOS and before the first stop
  string (at the last token boundary before the stop string starts).
- :func:`stream_logits`: per-token logits with eviction from the first token (streaming
  protocol), ``chunk`` tokens per forward (1 = literally token by token; any chunk gives the
  same logits, since each layer runs its rows one at a time).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor
from transformers import DynamicCache

from lessctl.cache import EvictingCache
from lessctl.less.kernels import LayerKernels
from lessctl.policies.base import Policy


def uses_library_cache(policy: Policy, kernels: dict[int, LayerKernels] | None) -> bool:
    """True when transformers' normal path applies (nothing evicted, no state)."""
    return policy.name == "full" and kernels is None


def make_cache(
    model,
    policy: Policy,
    kernels: dict[int, LayerKernels] | None,
    protocol: str = "prompt",
    attention_mask: Tensor | None = None,
) -> tuple[DynamicCache | EvictingCache, AbstractContextManager]:
    """The cache for a method and the context to run the model in (attention registered)."""
    if uses_library_cache(policy, kernels):
        return DynamicCache(config=model.config), nullcontext()
    cache = EvictingCache.for_model(
        model, policy, kernels, protocol=protocol, attention_mask=attention_mask
    )
    return cache, cache.attached(model)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Per-sequence positions of a left-padded mask [B,T] -> [B,T] (padding at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cut(
    tokens: list[int],
    eos_ids: set[int],
    stop_strings: list[str] | None,
    tokenizer,
) -> tuple[list[int], bool]:
    """Tokens before the first EOS and before the first stop string -> (tokens, stopped)."""
    stopped = False
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            tokens, stopped = tokens[:i], True
            break
    if stop_strings and tokenizer is not None and tokens:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in stop_strings if s and s in text]
        if hits:
            start = min(hits)
            k = 0
            while (
                k < len(tokens)
                and len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) <= start
            ):
                k += 1
            tokens, stopped = tokens[:k], True
    return tokens, stopped


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, list | tuple) else {int(ids)}


def _next_token(
    logits: Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """logits [B,V] -> next ids [B] (greedy or temperature sampling)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    policy: Policy,
    kernels: dict[int, LayerKernels] | None,
    *,
    max_new_tokens: int | list[int],
    forced: list[list[int]] | None = None,
    protocol: str = "prompt",
    do_sample: bool = False,
    temperature: float = 0.3,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    use_hf_generate: bool = False,
) -> list[list[int]]:
    """New token ids per sequence; input_ids/attention_mask [B,T] (left padding).

    ``max_new_tokens``: one limit, or one per sequence. ``forced``: tokens per sequence fed one
    per step through the cache after the prompt (teacher-forced, their outputs ignored; e.g. a
    question after a context the cache compressed without it) before that sequence generates;
    sequences with shorter ones start generating earlier.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    b = input_ids.shape[0]
    limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
    forced = forced or [[] for _ in range(b)]
    if len(limits) != b or len(forced) != b:
        raise ValueError(f"{b} sequences but {len(limits)} limits and {len(forced)} forced lists")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    eos = _eos_ids(model, tokenizer)
    cache, ctx = make_cache(model, policy, kernels, protocol, attention_mask)
    if use_hf_generate:
        if any(forced) or len(set(limits)) > 1:
            raise ValueError("use_hf_generate takes neither forced tokens nor per-row limits")
        if generator is not None:
            raise ValueError("use_hf_generate does not take a torch.Generator; seed torch instead")
        pad = tokenizer.pad_token_id if tokenizer is not None else next(iter(eos), 0)
        kw = {"temperature": temperature, "top_k": None, "top_p": None} if do_sample else {}
        with ctx, torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                cache=cache,
                max_new_tokens=limits[0],
                do_sample=do_sample,
                pad_token_id=pad,
                stop_strings=stop_strings,
                tokenizer=tokenizer,
                **kw,
            )
        new = out[:, input_ids.shape[1] :].tolist()
        return [cut(seq, eos, stop_strings, tokenizer)[0] for seq in new]
    new: list[list[int]] = [[] for _ in range(b)]
    done = [m <= 0 for m in limits]
    fed = [0] * b
    mask, pos, x = attention_mask, position_ids(attention_mask), input_ids
    with ctx, torch.no_grad():
        for _ in range(max(len(f) for f in forced) + max(limits)):
            logits = model(
                x,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            nxt = _next_token(logits, do_sample, temperature, generator)
            feed = nxt.tolist()
            for i, tok in enumerate(feed):
                if fed[i] < len(forced[i]):
                    feed[i] = forced[i][fed[i]]
                    fed[i] += 1
                elif not done[i]:
                    new[i].append(tok)
                    stopped = cut(new[i], eos, stop_strings, tokenizer)[1]
                    done[i] = stopped or len(new[i]) >= limits[i]
            if all(done):
                break
            x = torch.tensor(feed, device=nxt.device)[:, None] if any(forced) else nxt[:, None]
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            pos = pos[:, -1:] + 1
    return [cut(seq, eos, stop_strings, tokenizer)[0] for seq in new]


def stream_logits(
    model,
    input_ids: Tensor,
    policy: Policy,
    kernels: dict[int, LayerKernels] | None,
    attention_mask: Tensor | None = None,
    chunk: int = 1,
) -> Tensor:
    """Logits of every token decoded through the cache with eviction from the first token.

    input_ids [B,T] (or [T]), attention_mask [B,T] (left padding) -> logits [B,T,V] fp32.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    cache, ctx = make_cache(model, policy, kernels, "streaming", attention_mask)
    pos = position_ids(attention_mask)
    outs = []
    with ctx, torch.no_grad():
        for a in range(0, input_ids.shape[1], chunk):
            e = min(a + chunk, input_ids.shape[1])
            outs.append(
                model(
                    input_ids[:, a:e],
                    attention_mask=attention_mask[:, :e],
                    position_ids=pos[:, a:e],
                    cache=cache,
                    use_cache=True,
                ).logits.float()
            )
    return torch.cat(outs, 1)
