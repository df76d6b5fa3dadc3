"""Few-shot summarisation with ROUGE, in the paper's protocol (less-method.md §5).

Prompts follow H2O's jsonl format: `###\\nArticle: <doc>\\n\\nSummary: <summary>\\n\\n` per shot,
then `###\\nArticle: <doc>\\n\\nSummary:`. The prompt is processed with full attention; eviction
(into the LESS state, for `less`/`performer`) happens as tokens are decoded, through the
real-eviction cache (lessctl.decoding). Generation stops at `###` or after
`eval.max_new_tokens`. ROUGE-1/2/L F-measures come from `rouge-score` directly (`evaluate.load`
fetches a script from the hub and fails offline). Predictions are saved per example.

One policy serves every prompt: a fractional `policy.budget.of=sequence` is a fraction of
`eval.max_prompt_tokens + eval.max_new_tokens` (the longest sequence allowed), recorded in the
rows as `max_prompt_tokens`. Each ROUGE row keeps its per-example F-measures
(`example_values`, by `example_ids`, the test split's indices) for the report's bootstrap
intervals; every method sees the same examples, so methods pair by id.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rouge_score import rouge_scorer

from lessctl.data import load_pairs
from lessctl.errors import LessctlError
from lessctl.methods import Method
from lessctl.tasks.base import register

ROUGE = ("rouge1", "rouge2", "rougeL")
STOP = "###"


def build_prompt(shots: list[tuple[str, str]], document: str) -> str:
    """The few-shot prompt for `document`."""
    parts = [f"###\nArticle: {d}\n\nSummary: {s}\n\n" for d, s in shots]
    return "".join(parts) + f"###\nArticle: {document}\n\nSummary:"


def rouge(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-example ROUGE-1/2/L F-measures (stemmed), in [0, 1]."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    return [
        {k: v.fmeasure for k, v in scorer.score(ref, pred).items()}
        for pred, ref in zip(predictions, references, strict=True)
    ]


def clean(text: str) -> str:
    return text.split(STOP)[0].strip()


def prompts(cfg: DictConfig, tokenizer, max_prompt_tokens: int) -> tuple[list[dict], int, str]:
    """Encoded prompts of up to `eval.samples` examples; returns (examples, skipped, source)."""
    e = cfg.eval
    rng = random.Random(int(cfg.seed))
    test = load_pairs(cfg.data)
    shots_pool = (
        load_pairs(cfg.data, cfg.data.hub.get("shot_split", "train")).items
        if int(e.shots) > 0
        else []
    )
    shots = rng.sample(list(shots_pool), int(e.shots)) if shots_pool else []
    items = list(enumerate(test.items))
    rng.shuffle(items)
    out, skipped = [], 0
    for idx, (doc, summary) in items:
        if len(out) >= int(e.samples):
            break
        ids = tokenizer(build_prompt(shots, doc)).input_ids
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        out.append({"id": idx, "input_ids": ids, "reference": summary})
    return out, skipped, test.source


def _batches(examples: list[dict], size: int) -> list[list[int]]:
    """Positions of `examples` in batches of `size`, similar prompt lengths together (less
    left padding); a left-padded batch decodes like batch size one, so only speed changes."""
    if size < 1:
        raise LessctlError(f"eval.batch_size={size}; allowed: an int >= 1")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[a : a + size] for a in range(0, len(order), size)]


def run(
    cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print
) -> list[dict[str, Any]]:
    """ROUGE rows per method (`rouge1`, `rouge2`, `rougeL`, mean F-measure over examples)."""
    from lessctl.decoding import generate

    e = cfg.eval
    max_pos = model.config.max_position_embeddings
    max_prompt = int(e.max_prompt_tokens or (max_pos - int(e.max_new_tokens)))
    examples, skipped, source = prompts(cfg, tokenizer, max_prompt)
    if not examples:
        raise LessctlError(
            f"no {cfg.data.name} prompt fits eval.max_prompt_tokens={max_prompt}; "
            f"lower eval.shots or raise the limit"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(cfg.seed))
        preds: list[str] = [""] * len(examples)
        bs = int(e.batch_size)
        for pos in _batches(examples, bs):
            batch = [examples[i] for i in pos]
            width = max(len(x["input_ids"]) for x in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, x in enumerate(batch):  # left padding
                ids[i, width - len(x["input_ids"]) :] = torch.tensor(x["input_ids"])
                mask[i, width - len(x["input_ids"]) :] = 1
            new = generate(
                model,
                ids.to(model.device),
                mask.to(model.device),
                m.policy,
                m.kernels,
                max_new_tokens=int(e.max_new_tokens),
                protocol="prompt",
                do_sample=bool(e.sampling),
                temperature=float(e.temperature),
                stop_strings=[STOP],
                tokenizer=tokenizer,
                generator=gen,
            )
            for i, t in zip(pos, new, strict=True):
                preds[i] = clean(tokenizer.decode(t, skip_special_tokens=True))
        scores = rouge(preds, [x["reference"] for x in examples])
        budget = m.policy.budget
        path = run_dir / "predictions" / f"{cfg.data.name}-{m.name}-{budget}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for x, p, s in zip(examples, preds, scores, strict=True):
                f.write(
                    json.dumps(
                        {
                            "id": x["id"],
                            "prompt_tokens": len(x["input_ids"]),
                            "prediction": p,
                            "reference": x["reference"],
                            **s,
                        }
                    )
                    + "\n"
                )
        base = {
            "task": "summarization",
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "source": source,
            "method": m.name,
            "policy": cfg.policy.name,
            "budget": budget,
            "checkpoint": m.checkpoint,
            "samples": len(examples),
            "skipped": skipped,
            "shots": int(e.shots),
            "sampling": bool(e.sampling),
            "max_new_tokens": int(e.max_new_tokens),
            "max_prompt_tokens": max_prompt,
            "predictions": str(path),
        }
        means = {k: sum(s[k] for s in scores) / len(scores) for k in ROUGE}
        ids = [x["id"] for x in examples]
        rows += [
            {
                **base,
                "metric": k,
                "value": v,
                "example_ids": ids,
                "example_values": [s[k] for s in scores],
            }
            for k, v in means.items()
        ]
        log(
            f"{cfg.data.name:8s} {m.name:14s} budget={budget}  "
            + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f"  ({time.perf_counter() - t0:.0f}s)"
        )
    return rows


def sequence_tokens(cfg: DictConfig, max_pos: int) -> int:
    """The longest sequence allowed: `eval.max_prompt_tokens + eval.max_new_tokens`."""
    new = int(cfg.eval.max_new_tokens)
    return int(cfg.eval.max_prompt_tokens or (max_pos - new)) + new


@register("summarization", context_tokens=sequence_tokens)
def task(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir, log=print):
    return run(cfg, model, tokenizer, methods, Path(run_dir), log=log)
