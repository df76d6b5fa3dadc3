"""Teacher-forced perplexity in the paper's protocol (less-method.md §5).

The text is cut into windows of `eval.window` tokens; every row of every window sees only what
the policy keeps (plus the LESS state), through a registered attention function on the
unmodified model. Token-level perplexity = exp(Σ NLL / predicted tokens); word-level
perplexity = exp(Σ NLL / words), words counted by whitespace over the evaluated text once
(per document, see `count_words`).

Rows keep the per-window values for the report's bootstrap intervals (lessctl.stats):
`window_nll` (Σ NLL of each window) and `window_count` (its predicted tokens for `ppl_token`,
its words for `ppl_word`); the windows are the same, in the same order, for every method.

Each method's per-window values are appended to `predictions/<task>-<dataset>.jsonl` as soon as
the method finishes (with its input digest: lessctl.tasks.reuse), so a run stopped part-way
keeps the methods it finished, and a rerun with `eval.reuse_predictions=[<that run folder>]`
reads them back and computes only the rest (rows say `reused_from`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lessctl.data import load_texts, token_windows
from lessctl.errors import LessctlError
from lessctl.hooks import use_attention
from lessctl.methods import Method, ParallelAttention
from lessctl.shards import config_hash
from lessctl.tasks.base import register
from lessctl.tasks.reuse import method_digest, records


def window_nll(model, windows: torch.Tensor, batch_size: int = 1) -> tuple[list[float], list[int]]:
    """Per window: Σ NLL (nats) and predicted tokens, over `[N, W]` windows, `batch_size`
    windows per forward (equal lengths, no padding: a batch gives each window's own values)."""
    nll, count = [], []
    with torch.no_grad():
        for a in range(0, len(windows), batch_size):
            x = windows[a : a + batch_size].to(model.device)
            logits = model(x, use_cache=False).logits.float()
            per_token = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"
            )  # [b, W-1]
            nll += per_token.sum(1).tolist()
            count += [x.shape[1] - 1] * len(x)
    return nll, count


def method_window_nll(
    model, windows: torch.Tensor, method: Method, batch_size: int = 1
) -> tuple[list[float], list[int]]:
    """Per-window Σ NLL and token counts with `method` applied to every layer (full: the model
    as is)."""
    if method.name == "full":
        return window_nll(model, windows, batch_size)
    with use_attention(model, ParallelAttention(method.policy, method.kernels)):
        return window_nll(model, windows, batch_size)


def method_nll(model, windows: torch.Tensor, method: Method) -> tuple[float, int]:
    """Σ NLL and token count over all windows with `method` applied to every layer."""
    nll, count = method_window_nll(model, windows, method)
    return sum(nll), sum(count)


def _words(tokenizer, ids: list[int]) -> int:
    """Whitespace-separated words of `ids` decoded, counted per EOS-separated document."""
    docs: list[list[int]] = [[]]
    for i in ids:
        if i == tokenizer.eos_token_id:
            docs.append([])
        else:
            docs[-1].append(i)
    return sum(len(tokenizer.decode(d, skip_special_tokens=True).split()) for d in docs if d)


def count_words(tokenizer, windows: torch.Tensor) -> int:
    """Whitespace-separated words of the evaluated text, each counted once: the windows are
    joined back into the token stream they were cut from, split at EOS into its documents, and
    each document is decoded and counted (lm-evaluation-harness counts words per document), so
    a word cut by a window boundary counts once, and documents never run into each other."""
    return _words(tokenizer, windows.flatten().tolist())


def words_per_window(tokenizer, windows: torch.Tensor) -> list[int]:
    """Each window's share of the words counted once (`count_words`): its own words, less one
    when its first word continues the previous window's last word (the two boundary tokens
    decode to one word together and to one each alone), so a word cut by a window boundary
    belongs to the window it starts in. Linear in the text. windows [N,S] -> N ints."""
    eos = tokenizer.eos_token_id
    shares, last = [], None
    for w in windows.tolist():
        n = _words(tokenizer, w)
        if last is not None and eos not in (last, w[0]):
            alone = _words(tokenizer, [last]) == 1 == _words(tokenizer, [w[0]])
            n -= int(alone and _words(tokenizer, [last, w[0]]) == 1)
        shares.append(n)
        last = w[-1]
    return shares


def run(
    cfg: DictConfig,
    model,
    tokenizer,
    methods: list[Method],
    log=print,
    *,
    nll: Callable[..., tuple[list[float], list[int]]] | None = None,
    task: str = "perplexity",
    run_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Perplexity rows: per method `ppl_token` and `ppl_word` (with tokens and words).

    `nll(model, windows, method, batch_size) -> (Σ NLL per window, tokens per window)`: the
    parallel form by default, `eval.batch_size` windows per forward; lessctl.tasks.streaming passes
    its token-by-token cache version (task `perplexity_streaming`). With ``run_dir``, each
    method's windows are saved as it finishes and earlier ones reused (module doc).
    """
    nll = nll or method_window_nll
    e = cfg.eval
    window = int(e.window or model.config.max_position_embeddings)
    corpus = load_texts(cfg.data)
    windows = token_windows(
        corpus.items, tokenizer, window, window * int(e.windows) if e.windows else None
    )
    batch_size = int(e.get("batch_size") or 1)
    if batch_size < 1:
        raise LessctlError(f"eval.batch_size={batch_size}; allowed: an int >= 1")
    window_words = words_per_window(tokenizer, windows)
    words = sum(window_words)
    if words == 0:
        raise LessctlError(f"data={cfg.data.name}: the evaluated windows decode to no words")
    file_name = f"{task}-{cfg.data.name}.jsonl"
    reuse_dirs = [str(d) for d in cfg.eval.get("reuse_predictions") or []]
    text_digest = config_hash(windows.tolist(), 20)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        digest = config_hash([task, method_digest(model, m), text_digest], 20)
        back = next((dr for dr in records(reuse_dirs, file_name) if dr[1]["input"] == digest), None)
        if back is not None:
            window_nll, window_tokens = back[1]["window_nll"], back[1]["window_count"]
        else:
            window_nll, window_tokens = nll(model, windows, m, batch_size)
        if run_dir is not None:  # reused too: this run's folder then resumes a later run
            save_method(Path(run_dir), file_name, m.name, digest, window_nll, window_tokens)
        total, n = sum(window_nll), sum(window_tokens)
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
            "reused_from": back[0] if back is not None else None,
        }
        ppl_t, ppl_w = math.exp(total / n), math.exp(total / words)
        rows += [
            {
                **base,
                "metric": "ppl_token",
                "value": ppl_t,
                "window_nll": window_nll,
                "window_count": window_tokens,
            },
            {
                **base,
                "metric": "ppl_word",
                "value": ppl_w,
                "window_nll": window_nll,
                "window_count": window_words,
            },
        ]
        log(
            f"{cfg.data.name:10s} {m.name:14s} budget={m.policy.budget}  {task}  ppl(token) "
            f"{ppl_t:8.3f}  ppl(word) {ppl_w:8.3f}  "
            + (f"(reused from {back[0]})" if back else f"({time.perf_counter() - t0:.0f}s)")
        )
    return rows


def save_method(
    run_dir: Path,
    file_name: str,
    method: str,
    digest: str,
    window_nll: list[float],
    window_count: list[int],
) -> None:
    """Append one finished method's per-window values to ``run_dir/predictions/<file_name>``
    (one JSON line, flushed and synced: a kill keeps every method finished before it)."""
    out = run_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    rec = {"method": method, "input": digest, "window_nll": window_nll}
    rec["window_count"] = window_count
    with open(out / file_name, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def window_tokens(cfg: DictConfig, max_pos: int) -> int:
    """`eval.window` (default: max_position_embeddings), refused past the model's limit."""
    window = int(cfg.eval.window or max_pos)
    if max_pos and window > max_pos:
        raise LessctlError(f"eval.window={window} exceeds max_position_embeddings={max_pos}")
    return window


@register("perplexity", context_tokens=window_tokens)
def task(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir, log=print):
    return run(cfg, model, tokenizer, methods, log=log, run_dir=run_dir)
