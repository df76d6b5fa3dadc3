"""`needle`: needle-in-a-haystack over real text (RULER's NIAH and its variants).

The haystack is the data config's corpus (`data=`, the embedded stand-in by default, or
`data.path=FILE.txt`); needles read "One of the special magic numbers for KEY is: VALUE.".
Variants: `task.num_keys` needles with distinct keys (the others are distractors), `task.num_values`
values per key (all must be answered), `task.num_queries` keys asked at once (all their values must
be answered). The first queried needle sits at the cell's depth, every other one at a seeded
uniform depth. Keys are words of the corpus (`task.key_type=words`) or numbers; values are
`task.value_digits`-digit numbers.
"""

from __future__ import annotations

import random
from pathlib import Path

from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.methods import Method
from lessctl.schema import int_at_least, one_of
from lessctl.tasks import haystack
from lessctl.tasks.base import register
from lessctl.tasks.longcontext import (
    DEPTHS,
    GRID_KEYS,
    Sample,
    check_lengths,
    run_samples,
    sample_seed,
)

INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards."
)
KEY_TYPES = ("words", "numbers")


def _join(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def texts(keys: list[str], n_answers: int) -> tuple[str, str]:
    """(question, answer prefix) for the queried keys."""
    k = _join(keys)
    if n_answers == 1:
        return (
            f"What is the special magic number for {k} mentioned in the provided text?",
            f"The special magic number for {k} mentioned in the provided text is",
        )
    return (
        f"What are all the special magic numbers for {k} mentioned in the provided text?",
        f"The special magic numbers for {k} mentioned in the provided text are",
    )


def make_samples(cfg: DictConfig, tokenizer) -> tuple[list[Sample], str]:
    t = cfg.task
    n_keys, n_values, n_queries = int(t.num_keys), int(t.num_values), int(t.num_queries)
    if not 1 <= n_queries <= n_keys or n_values < 1:
        raise LessctlError(
            f"task.num_keys={n_keys} task.num_values={n_values} task.num_queries={n_queries}; need "
            f"1 <= num_queries <= num_keys and num_values >= 1"
        )
    if t.key_type not in KEY_TYPES:
        raise LessctlError(f"task.key_type={t.key_type!r}; allowed: {', '.join(KEY_TYPES)}")
    texts_, source = haystack.corpus_texts(cfg.data)
    hay = haystack.corpus(tokenizer, texts_, source)
    pool = haystack.words(texts_, 5, 10) if t.key_type == "words" else []
    if t.key_type == "words" and len(pool) < n_keys:
        raise LessctlError(f"data={cfg.data.name}: {len(pool)} distinct words < task.num_keys")
    vd = int(t.value_digits)
    out = []
    for length in t.lengths:
        for depth in t.depths:
            for k in range(int(t.samples)):
                rng = random.Random(sample_seed(cfg, length, depth, k))
                if t.key_type == "words":
                    keys = rng.sample(pool, n_keys)
                else:
                    keys = [str(x) for x in rng.sample(range(10**6, 10**7), n_keys)]
                values = [
                    [str(v) for v in rng.sample(range(10 ** (vd - 1), 10**vd), n_values)]
                    for _ in keys
                ]
                needles, depths = [], []
                for i, key in enumerate(keys):
                    for j, v in enumerate(values[i]):
                        needles.append(f"One of the special magic numbers for {key} is: {v}.")
                        depths.append(float(depth) if (i, j) == (0, 0) else rng.random())
                asked = list(range(n_queries))
                answers = [v for i in asked for v in values[i]]
                question, prefix = texts([keys[i] for i in asked], len(answers))
                ctx, q, p, at = haystack.fill(
                    tokenizer, hay, rng, int(length), INTRO, needles, depths, question, prefix
                )
                out.append(
                    Sample(
                        id=f"{length}-{depth}-{k}",
                        context=ctx,
                        question=q,
                        answer_prefix=p,
                        answers=answers,
                        max_new_tokens=int(t.max_new_tokens),
                        length=int(length),
                        depth=float(depth),
                        needle_at=at[0],
                    )
                )
    return out, hay.source


def variant(cfg: DictConfig) -> str:
    t = cfg.task
    return f"needle/k{int(t.num_keys)}v{int(t.num_values)}q{int(t.num_queries)}"


KEYS = {
    **GRID_KEYS,
    "depths": DEPTHS,
    "num_keys": int_at_least(1),
    "num_values": int_at_least(1),
    "num_queries": int_at_least(1),
    "key_type": one_of(*KEY_TYPES),
    "value_digits": int_at_least(1),
}


@register("needle", context_tokens=check_lengths, keys=KEYS)
def run(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print):
    samples, source = make_samples(cfg, tokenizer)
    return run_samples(
        cfg,
        model,
        tokenizer,
        methods,
        run_dir,
        samples,
        dataset=f"{variant(cfg)}:{cfg.data.name}",
        source=source,
        log=log,
    )
