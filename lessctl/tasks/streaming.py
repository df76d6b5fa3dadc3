"""`eval.mode=streaming`: perplexity decoded token by token through the real-eviction cache.

As StreamingLLM measures it: every token of a window is a decode row of an
:class:`~lessctl.cache.EvictingCache` with eviction from the first token (streaming protocol),
and predicts the next one. Windows, counts and rows mirror :func:`lessctl.tasks.perplexity.run`
(``task`` is ``perplexity_streaming``). A forward carries a whole window (each layer still runs its
rows one at a time, which gives exactly the logits of one-token forwards); ``full`` uses the
library ``DynamicCache``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lessctl.decoding import stream_logits
from lessctl.methods import Method
from lessctl.tasks.base import register
from lessctl.tasks.perplexity import run as perplexity_run
from lessctl.tasks.perplexity import window_tokens


def stream_nll(
    model, windows: torch.Tensor, method: Method, batch_size: int = 1, chunk: int | None = None
) -> tuple[list[float], list[int]]:
    """Per window of [N,W]: Σ NLL (nats) and predicted tokens, streamed through the cache one
    window at a time (`batch_size` is accepted for the interface and not used)."""
    nll, count = [], []
    for w in windows:
        x = w[None].to(model.device)
        logits = stream_logits(model, x, method.policy, method.kernels, chunk=chunk or x.shape[1])
        nll.append(F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item())
        count.append(x.shape[1] - 1)
    return nll, count


def run(
    cfg: DictConfig, model, tokenizer, methods: list[Method], log=print, run_dir=None
) -> list[dict[str, Any]]:
    """Streaming perplexity rows (task `perplexity_streaming`), same columns as
    :func:`lessctl.tasks.perplexity.run`."""
    return perplexity_run(
        cfg,
        model,
        tokenizer,
        methods,
        log,
        nll=stream_nll,
        task="perplexity_streaming",
        run_dir=run_dir,
    )


@register("perplexity_streaming", context_tokens=window_tokens)
def task(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir, log=print):
    return run(cfg, model, tokenizer, methods, log=log, run_dir=run_dir)
