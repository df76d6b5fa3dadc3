"""`passkey`: a random number hidden at a chosen depth in repeated filler; answer = the number.

The classic test (Mohtashami & Jaggi 2023): "There is an important info hidden inside a lot of
irrelevant text..." then "The grass is green. The sky is blue..." repeated, with "The pass key
is N. Remember it. N is the pass key." at the depth, then "What is the pass key?". Grid:
`task.lengths` (tokens in all) x `task.depths` x `task.samples`, seeded per cell.
"""

from __future__ import annotations

import random
from pathlib import Path

from omegaconf import DictConfig

from lessctl.methods import Method
from lessctl.schema import int_at_least
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
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
QUESTION = "What is the pass key?"
PREFIX = "The pass key is"


def make_samples(cfg: DictConfig, tokenizer) -> list[Sample]:
    t = cfg.task
    digits = int(t.digits)
    hay = haystack.noise(tokenizer)
    out = []
    for length in t.lengths:
        for depth in t.depths:
            for k in range(int(t.samples)):
                rng = random.Random(sample_seed(cfg, length, depth, k))
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                needle = f"The pass key is {key}. Remember it. {key} is the pass key."
                ctx, q, p, at = haystack.fill(
                    tokenizer, hay, rng, int(length), INTRO, [needle], [float(depth)], QUESTION,
                    PREFIX,
                )  # fmt: skip
                out.append(
                    Sample(
                        id=f"{length}-{depth}-{k}",
                        context=ctx,
                        question=q,
                        answer_prefix=p,
                        answers=[key],
                        max_new_tokens=int(t.max_new_tokens),
                        length=int(length),
                        depth=float(depth),
                        needle_at=at[0],
                    )
                )
    return out


KEYS = {**GRID_KEYS, "depths": DEPTHS, "digits": int_at_least(1)}


@register("passkey", context_tokens=check_lengths, keys=KEYS)
def run(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print):
    samples = make_samples(cfg, tokenizer)
    source = f"generated:passkey/{int(cfg.task.digits)}digits"
    return run_samples(
        cfg, model, tokenizer, methods, run_dir, samples, dataset="passkey", source=source, log=log
    )
