"""`common_words`: RULER's common-words extraction (aggregation). A numbered list of words in
which `task.common` words occur `task.common_freq` times each and the others
`task.uncommon_freq` times; the answer is the common ones. Words are distinct words of the data
config's corpus (`data=`); as many uncommon words as fit `task.lengths` (the sequence may end
a few tokens short of the length, never past it). Depth does not apply (depth null).
"""

from __future__ import annotations

import random
from pathlib import Path

from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.methods import Method
from lessctl.schema import int_at_least
from lessctl.tasks import haystack
from lessctl.tasks.base import register
from lessctl.tasks.longcontext import (
    GRID_KEYS,
    Sample,
    check_lengths,
    encode,
    run_samples,
    sample_seed,
    specials,
)

INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)


def listing(tokenizer, words: list[str]) -> list[int]:
    return encode(tokenizer, INTRO + "\n" + " ".join(f"{i}. {w}" for i, w in enumerate(words, 1)))


def make_one(tokenizer, pool, rng, length: int, common: int, cf: int, uf: int):
    """(context ids, question ids, prefix ids, common words) within `length` tokens."""
    q = encode(tokenizer, f"\nWhat are the {common} most common words in the above list?")
    p = encode(
        tokenizer, f"\nAnswer: The top {common} words that appear most often in the list are:"
    )
    budget = length - len(specials(tokenizer)) - len(q) - len(p)
    chosen = rng.sample(pool, len(pool))
    top, rest = chosen[:common], chosen[common:]
    shuffle_seed = rng.random()

    def build(n_uncommon: int) -> list[int]:
        words = top * cf + rest[:n_uncommon] * uf
        random.Random(shuffle_seed).shuffle(words)
        return listing(tokenizer, words)

    if len(build(0)) > budget:
        raise LessctlError(
            f"task.lengths entry {length} is too short for task.common={common} x "
            f"task.common_freq={cf} words; lower them or raise the length"
        )
    lo, hi = 0, len(rest)  # the most uncommon words that fit: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return build(lo), q, p, top


def make_samples(cfg: DictConfig, tokenizer) -> tuple[list[Sample], str]:
    t = cfg.task
    texts, source = haystack.corpus_texts(cfg.data)
    pool = haystack.words(texts)
    common = int(t.common)
    if len(pool) < common + 1:
        raise LessctlError(f"data={cfg.data.name}: only {len(pool)} distinct words")
    out = []
    for length in t.lengths:
        for k in range(int(t.samples)):
            rng = random.Random(sample_seed(cfg, length, k))
            ctx, q, p, top = make_one(
                tokenizer, pool, rng, int(length), common, int(t.common_freq), int(t.uncommon_freq)
            )
            out.append(
                Sample(
                    id=f"{length}-{k}",
                    context=ctx,
                    question=q,
                    answer_prefix=p,
                    answers=top,
                    max_new_tokens=int(t.max_new_tokens),
                    length=int(length),
                )
            )
    return out, source


KEYS = {
    **GRID_KEYS,
    "common": int_at_least(1),
    "common_freq": int_at_least(1),
    "uncommon_freq": int_at_least(1),
}


@register("common_words", context_tokens=check_lengths, keys=KEYS)
def run(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print):
    samples, source = make_samples(cfg, tokenizer)
    return run_samples(
        cfg,
        model,
        tokenizer,
        methods,
        run_dir,
        samples,
        dataset=f"common_words:{cfg.data.name}",
        source=source,
        log=log,
    )
