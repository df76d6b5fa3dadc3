"""Teacher-forced perplexity in the paper's protocol (less-method.md §5).

The text is cut into windows of `eval.window` tokens; every row of every window sees only what
the policy keeps (plus the LESS state), through a registered attention function on the
unmodified model. Token-level perplexity = exp(Σ NLL / predicted tokens); word-level
perplexity = exp(Σ NLL / words), words counted by whitespace over the evaluated text once
(per document, see `count_words`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lessctl.data import load_texts, token_windows
from lessctl.errors import LessctlError
from lessctl.hooks import use_attention
from lessctl.methods import Method, ParallelAttention


def window_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Σ NLL (nats) and the number of predicted tokens over `[N, W]` windows, one at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = w[None].to(model.device)
            logits = model(x, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total += nll.item()
            count += x.shape[1] - 1
    return total, count


def method_nll(model, windows: torch.Tensor, method: Method) -> tuple[float, int]:
    """Σ NLL and token count with `method` applied to every layer (full: the model as is)."""
    if method.name == "full":
        return window_nll(model, windows)
    with use_attention(model, ParallelAttention(method.policy, method.kernels)):
        return window_nll(model, windows)


def count_words(tokenizer, windows: torch.Tensor) -> int:
    """Whitespace-separated words of the evaluated text, each counted once: the windows are
    joined back into the token stream they were cut from, split at EOS into its documents, and
    each document is decoded and counted (lm-evaluation-harness counts words per document), so
    a word cut by a window boundary counts once, and documents never run into each other."""
    eos = tokenizer.eos_token_id
    docs: list[list[int]] = [[]]
    for i in windows.flatten().tolist():
        if i == eos:
            docs.append([])
        else:
            docs[-1].append(i)
    return sum(len(tokenizer.decode(d, skip_special_tokens=True).split()) for d in docs if d)


def run(
    cfg: DictConfig,
    model,
    tokenizer,
    methods: list[Method],
    log=print,
    *,
    nll: Callable[[Any, torch.Tensor, Method], tuple[float, int]] = method_nll,
    task: str = "perplexity",
) -> list[dict[str, Any]]:
    """Perplexity rows: per method `ppl_token` and `ppl_word` (with tokens and words).

    `nll(model, windows, method) -> (Σ NLL, tokens)`: the parallel form by default;
    lessctl.streaming passes its token-by-token cache version (task `perplexity_streaming`).
    """
    e = cfg.eval
    window = int(e.window or model.config.max_position_embeddings)
    corpus = load_texts(cfg.data)
    windows = token_windows(
        corpus.items, tokenizer, window, window * int(e.windows) if e.windows else None
    )
    words = count_words(tokenizer, windows)
    if words == 0:
        raise LessctlError(f"data={cfg.data.name}: the evaluated windows decode to no words")
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        total, n = nll(model, windows, m)
        base = {
            "task": task,
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
        ppl_t, ppl_w = math.exp(total / n), math.exp(total / words)
        rows += [
            {**base, "metric": "ppl_token", "value": ppl_t},
            {**base, "metric": "ppl_word", "value": ppl_w},
        ]
        log(
            f"{cfg.data.name:10s} {m.name:14s} budget={m.policy.budget}  {task}  ppl(token) "
            f"{ppl_t:8.3f}  ppl(word) {ppl_w:8.3f}  ({time.perf_counter() - t0:.0f}s)"
        )
    return rows
