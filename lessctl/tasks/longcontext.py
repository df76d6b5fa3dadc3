"""Long-context retrieval tasks, the shared part: samples, prompt layout, answering through the
real-eviction cache, scoring and rows. The generators (passkey, needle, variable_tracking,
common_words) and the file reader (longctx) each only make :class:`Sample` objects.

Layout (`task.question`):

- `after` (default): the prompt is the context alone; the question and the answer prefix are
  then decoded token by token through the cache, so the context was compressed (the policy's
  eviction at the first decoded row, lessctl.cache "prompt" protocol) without knowing the
  question;
- `before`: the question precedes the context in the prompt (query-aware); the answer prefix is
  decoded after it;
- `end`: context, question and answer prefix all in the prompt (the question is in the
  observation window of a query-aware policy such as SnapKV).

The sequence length of a sample (prompt + question + answer prefix) is counted in the model's
own tokens. Answers are greedy. Scores per sample: `contains` (the share of the reference
answers found in the prediction, case-insensitive: RULER's string_match_all; with
`match=any`, 1 when any is found) and `exact` (the prediction's first line, lower-cased and
stripped of surrounding punctuation, equals an answer; for several required answers, its words
are exactly the answers' words). Per-sample predictions and scores go to
`<run>/predictions/<task>-<method>-<budget>.jsonl` (``.partial`` beside it while batches are
written, so that `eval.reuse_predictions` resumes an interrupted run per sample, matching each
sample's input digest); rows per (length, depth, method) carry the mean and a 95% Wilson
interval (for 0/1 scores) or a normal interval.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lessctl.atomic import write_jsonl_atomic
from lessctl.decoding import generate
from lessctl.errors import LessctlError
from lessctl.methods import Method
from lessctl.schema import Rule, int_at_least, list_of, number, one_of
from lessctl.shards import config_hash
from lessctl.tasks.reuse import PARTIAL, method_digest, records

QUESTION_POSITIONS = ("after", "before", "end")
PROTOCOLS = ("prompt", "streaming")
GRID_KEYS: dict[str, Rule] = {  # the config keys every generated-sample task shares
    "lengths": list_of(int_at_least(1)),
    "samples": int_at_least(1),
    "question": one_of(*QUESTION_POSITIONS),
    "protocol": one_of(*PROTOCOLS),
    "max_new_tokens": int_at_least(1),
}
DEPTHS: Rule = list_of(number(0.0, 1.0))


@dataclass
class Sample:
    """One example: token ids of its pieces (no special tokens) and the reference answers."""

    id: str
    context: list[int]
    question: list[int]
    answer_prefix: list[int]
    answers: list[str]
    max_new_tokens: int
    length: int | None = None  # the grid's target length (tokens), None for files
    depth: float | None = None  # where the needle sits in the context (0 = start, 1 = end)
    match: str = "all"  # all: every answer must be found; any: one is enough
    needle_at: int | None = None  # token index of the (queried) needle in `context`
    group: dict[str, Any] = field(default_factory=dict)  # extra row keys (e.g. subtask)


# ----------------------------------------------------------------------------- tokens


def specials(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text on its own (e.g. BOS), possibly none."""
    return list(tokenizer("").input_ids)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def layout(sample: Sample, lead: list[int], question: str) -> tuple[list[int], list[int]]:
    """(prompt ids, suffix ids decoded through the cache) for a question position."""
    if question == "after":
        return lead + sample.context, sample.question + sample.answer_prefix
    if question == "before":
        return lead + sample.question + sample.context, sample.answer_prefix
    if question == "end":
        return lead + sample.context + sample.question + sample.answer_prefix, []
    raise LessctlError(f"task.question={question!r}; allowed: {', '.join(QUESTION_POSITIONS)}")


def fixed_tokens(tokenizer, *texts: str) -> int:
    """Tokens that a sample spends outside its haystack (leading specials + the texts)."""
    return len(specials(tokenizer)) + sum(len(encode(tokenizer, t)) for t in texts)


def check_lengths(cfg: DictConfig, max_pos: int) -> int:
    """max(task.lengths) + task.max_new_tokens, refused past max_position_embeddings."""
    lengths = [int(x) for x in cfg.task.lengths]
    if not lengths or min(lengths) < 1:
        raise LessctlError(f"task.lengths={lengths}; need one or more positive token counts")
    depths = [float(d) for d in cfg.task.get("depths", [0.5])]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise LessctlError(f"task.depths={depths}; each depth must lie in [0, 1]")
    total = max(lengths) + int(cfg.task.max_new_tokens)
    if max_pos and total > max_pos:
        raise LessctlError(
            f"task.lengths max {max(lengths)} + task.max_new_tokens {cfg.task.max_new_tokens} "
            f"exceeds max_position_embeddings={max_pos}"
        )
    return total


def sample_seed(cfg: DictConfig, *parts: Any) -> str:
    """A seed string for one grid cell and index: the same sample whatever else is in the grid."""
    return "-".join(str(p) for p in (cfg.seed, cfg.task.name, *parts))


def place(haystack: list[int], starts: list[int], pieces: list[list[int]], depths: list[float]):
    """Insert `pieces` into `haystack` at the sentence starts nearest to `depths` (0..1).

    haystack: ids; starts: sentence start indices in it (0 and len(haystack) are allowed);
    returns (ids, index of each piece's first token in the result).
    """
    n = len(haystack)
    cands = sorted(set(starts) | {0, n})
    at = [min(cands, key=lambda s, d=d: (abs(s - d * n), s)) for d in depths]
    order = sorted(range(len(pieces)), key=lambda i: (at[i], i))
    out, where, prev = [], [0] * len(pieces), 0
    for i in order:
        out += haystack[prev : at[i]]
        where[i] = len(out)
        out += pieces[i]
        prev = at[i]
    return out + haystack[prev:], where


# ----------------------------------------------------------------------------- scoring


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,;:!?\"'()[]")


def score(prediction: str, answers: list[str], match: str = "all") -> dict[str, float]:
    """Per-sample `contains` and `exact` in [0, 1] (module doc)."""
    if not answers:
        raise LessctlError("a sample has no reference answer")
    pred = prediction.lower()
    found = [a.strip().lower() in pred for a in answers]
    contains = (sum(found) / len(found)) if match == "all" else float(any(found))
    first = _norm(prediction.strip().split("\n")[0])
    if len(answers) == 1 or match == "any":
        exact = float(first in {_norm(a) for a in answers})
    else:
        words = set(re.findall(r"\w+", first))
        exact = float(words == {w for a in answers for w in re.findall(r"\w+", a.lower())})
    return {"contains": contains, "exact": exact}


def interval(values: list[float], z: float = 1.959964) -> tuple[float, float]:
    """95% interval of a mean: Wilson for 0/1 values, normal otherwise."""
    n = len(values)
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        den = 1 + z * z / n
        mid = (mean + z * z / (2 * n)) / den
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / den
        return max(0.0, mid - half), min(1.0, mid + half)
    if n < 2:
        return float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return max(0.0, mean - z * sd / math.sqrt(n)), min(1.0, mean + z * sd / math.sqrt(n))


# ----------------------------------------------------------------------------- answering


def answer(
    model,
    prompts: list[list[int]],
    suffixes: list[list[int]],
    method: Method,
    max_new_tokens: list[int],
    pad_id: int,
    tokenizer=None,
    protocol: str = "prompt",
) -> list[list[int]]:
    """Greedy answers for a batch through the evicting cache: each prompt in one forward (left
    padding), then its suffix fed one token per step (teacher-forced), then up to
    `max_new_tokens[i]` tokens (:func:`lessctl.decoding.generate` with ``forced``). ``protocol``
    `prompt`: the prompt's evictions all at the first decoded row; `streaming`: one per row
    from the first token on, as the parallel form decides (a state-aware policy with kernels
    needs it)."""
    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return generate(
        model,
        ids,
        mask,
        method.policy,
        method.kernels,
        max_new_tokens=max_new_tokens,
        forced=suffixes,
        protocol=protocol,
        tokenizer=tokenizer,
    )


def _cell(s: Sample) -> tuple:
    return (s.length, s.depth, tuple(sorted(s.group.items())))


def input_digest(method_key: str, prompt: list[int], suffix: list[int], max_new_tokens: int) -> str:
    """One sample's input to a method (:func:`method_digest`): its exact tokens and answer
    length."""
    return config_hash([method_key, prompt, suffix, max_new_tokens], 20)


def reused(dirs: list[str], file_name: str, digests: list[str]) -> tuple[dict[int, str], list[str]]:
    """Predictions read back from earlier run folders in ``dirs`` (their
    ``predictions/<file_name>``, or the partial file an interrupted run left), per sample: a
    record whose input digest (:func:`input_digest`) equals the sample's -> ({sample index:
    prediction}, the folders read from). Files written before digests existed are not read."""
    want: dict[str, list[int]] = defaultdict(list)
    for i, dg in enumerate(digests):
        want[dg].append(i)
    got: dict[int, str] = {}
    used: list[str] = []
    for d, r in records(dirs, file_name):
        took = False
        for i in want.get(r.get("input"), []):  # samples with the same input share it
            got.setdefault(i, r["prediction"])
            took = True
        if took and d not in used:
            used.append(d)
    return got, used


def run_samples(
    cfg: DictConfig,
    model,
    tokenizer,
    methods: list[Method],
    run_dir: Path,
    samples: list[Sample],
    *,
    dataset: str,
    source: str,
    log=print,
) -> list[dict[str, Any]]:
    """Answer every sample with every method; per-sample files and rows per cell and method."""
    if not samples:
        raise LessctlError(f"task={cfg.task.name}: no samples to evaluate")
    question = str(cfg.task.get("question", "after"))
    if question not in QUESTION_POSITIONS:
        raise LessctlError(f"task.question={question!r}; allowed: {', '.join(QUESTION_POSITIONS)}")
    protocol = str(cfg.task.get("protocol", "prompt"))
    if protocol not in PROTOCOLS:
        raise LessctlError(f"task.protocol={protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    lead = specials(tokenizer)
    laid = [layout(s, lead, question) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (len(laid[i][0]) + len(laid[i][1]), i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = max(1, int(cfg.eval.batch_size))
    out_dir = Path(run_dir) / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = str(cfg.task.name)
    reuse_dirs = [str(d) for d in cfg.eval.get("reuse_predictions") or []]
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        budget = m.policy.budget
        file_name = f"{name}-{m.name}-{budget}.jsonl"
        key = method_digest(model, m) + ("" if protocol == "prompt" else f"/{protocol}")
        digests = [
            input_digest(key, *laid[i], samples[i].max_new_tokens) for i in range(len(samples))
        ]
        preds, back = reused(reuse_dirs, file_name, digests)
        todo = [i for i in order if i not in preds]
        partial = out_dir / (file_name + PARTIAL)
        for a in range(0, len(todo), bs):
            idx = todo[a : a + bs]
            got = answer(
                model,
                [laid[i][0] for i in idx],
                [laid[i][1] for i in idx],
                m,
                [samples[i].max_new_tokens for i in idx],
                pad,
                tokenizer,
                protocol,
            )
            for i, toks in zip(idx, got, strict=True):
                preds[i] = tokenizer.decode(toks, skip_special_tokens=True)
            done = [
                {"id": samples[i].id, "input": digests[i], "prediction": preds[i]}
                for i in sorted(preds)
            ]
            write_jsonl_atomic(partial, done)  # an interrupted run resumes from here
            log(
                f"{name} {m.name}: {len(preds)}/{len(samples)} samples "
                f"({time.perf_counter() - t0:.0f}s, {max(len(laid[i][0]) for i in idx)} tokens)"
            )
        per = []
        for i, s in enumerate(samples):
            sc = score(preds[i], s.answers, s.match)
            per.append(
                {
                    "id": s.id,
                    "length": s.length,
                    "depth": s.depth,
                    "tokens": len(laid[i][0]) + len(laid[i][1]),
                    "needle_at": s.needle_at,
                    **s.group,
                    "prediction": preds[i],
                    "answers": s.answers,
                    "checkpoint": m.checkpoint,
                    "input": digests[i],
                    **sc,
                }
            )
        path = out_dir / file_name
        write_jsonl_atomic(path, per)
        partial.unlink(missing_ok=True)
        cells: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            cells[_cell(s)].append(i)
        base = {
            "task": name,
            "model": cfg.model.name,
            "dataset": dataset,
            "source": source,
            "method": m.name,
            "policy": cfg.policy.name,
            "budget": budget,
            "checkpoint": m.checkpoint,
            "question": question,
            "protocol": protocol,
            "predictions": str(path),
            "reused_from": ", ".join(back) if back else None,
            "reused": len(samples) - len(todo),
        }
        for (length, depth, group), ix in sorted(cells.items(), key=lambda c: str(c[0])):
            for metric in ("contains", "exact"):
                vals = [per[i][metric] for i in ix]
                lo, hi = interval(vals)
                rows.append(
                    {
                        **base,
                        **dict(group),
                        "length": length,
                        "depth": depth,
                        "samples": len(ix),
                        "max_new_tokens": max(samples[i].max_new_tokens for i in ix),
                        "metric": metric,
                        "value": sum(vals) / len(vals),
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
        acc = sum(p["contains"] for p in per) / len(per)
        how = f", {len(samples) - len(todo)} read back from {', '.join(back)}" if back else ""
        log(
            f"{name:18s} {m.name:14s} budget={budget}  contains {acc:.3f} over {len(per)} "
            f"samples  ({time.perf_counter() - t0:.0f}s{how})"
        )
    return rows
