"""`eval.mode=streaming`: perplexity decoded token by token through the real-eviction cache.

As StreamingLLM measures it: every token of a window is a decode row of an
:class:`~lessctl.cache.EvictingCache` with eviction from the first token (streaming protocol),
and predicts the next one. Windows, counts and rows mirror :func:`lessctl.perplexity.run`
(``task`` is ``perplexity_streaming``). A forward carries a whole window (each layer still runs its
rows one at a time, which gives exactly the logits of one-token forwards); ``full`` uses the
library ``DynamicCache``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lessctl.data import load_texts, token_windows
from lessctl.decoding import stream_logits
from lessctl.methods import Method
from lessctl.perplexity import count_words


def stream_nll(
    model, windows: torch.Tensor, method: Method, chunk: int | None = None
) -> tuple[float, int]:
    """Σ NLL (nats) and predicted tokens over windows [N,W], streamed through the cache."""
    total, count = 0.0, 0
    for w in windows:
        x = w[None].to(model.device)
        logits = stream_logits(model, x, method.policy, method.kernels, chunk=chunk or x.shape[1])
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return total, count


def run(
    cfg: DictConfig, model, tokenizer, methods: list[Method], log=print
) -> list[dict[str, Any]]:
    """Streaming perplexity rows: per method `ppl_token` and `ppl_word` (with tokens and words)."""
    e = cfg.eval
    window = int(e.window or model.config.max_position_embeddings)
    corpus = load_texts(cfg.data)
    windows = token_windows(
        corpus.items, tokenizer, window, window * int(e.windows) if e.windows else None
    )
    words = count_words(tokenizer, windows)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        nll, n = stream_nll(model, windows, m)
        base = {
            "task": "perplexity_streaming",
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "source": corpus.source,
            "method": m.name,
            "policy": cfg.policy.name,
            "budget": m.policy.budget,
            "window": window,
            "checkpoint": m.checkpoint,
            "tokens": n,
            "words": words,
            "windows": len(windows),
        }
        ppl_t, ppl_w = math.exp(nll / n), math.exp(nll / words)
        rows += [
            {**base, "metric": "ppl_token", "value": ppl_t},
            {**base, "metric": "ppl_word", "value": ppl_w},
        ]
        log(
            f"{cfg.data.name:10s} {m.name:14s} budget={m.policy.budget}  streaming "
            f"ppl(token) {ppl_t:8.3f}  ppl(word) {ppl_w:8.3f}  ({time.perf_counter() - t0:.0f}s)"
        )
    return rows
