"""`variable_tracking`: RULER's multi-hop tracing. "VAR ABCDE = 12345." then "VAR FGHIJ = VAR
ABCDE." ... hidden in the passkey filler, in order at seeded depths; the question asks for
every variable that holds the value. `task.chains` chains (the first is asked, the others
distract), `task.hops` assignments after the first. The answer is all of the chain's names.
The grid's depth does not apply (one column, depth null).
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from omegaconf import DictConfig

from lessctl.methods import Method
from lessctl.schema import int_at_least
from lessctl.tasks import haystack
from lessctl.tasks.base import register
from lessctl.tasks.longcontext import GRID_KEYS, Sample, check_lengths, run_samples, sample_seed

INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def chain(rng: random.Random, hops: int, used: set[str]) -> tuple[list[str], str]:
    """Distinct 5-letter variable names (hops + 1) and a 5-digit value."""
    names = []
    while len(names) < hops + 1:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in used:
            used.add(v)
            names.append(v)
    return names, str(rng.randrange(10000, 100000))


def make_samples(cfg: DictConfig, tokenizer) -> list[Sample]:
    t = cfg.task
    hay = haystack.noise(tokenizer)
    hops, chains = int(t.hops), int(t.chains)
    out = []
    for length in t.lengths:
        for k in range(int(t.samples)):
            rng = random.Random(sample_seed(cfg, length, k))
            used: set[str] = set()
            needles, depths, asked = [], [], None
            for _ in range(chains):
                names, value = chain(rng, hops, used)
                asked = asked or (names, value)
                needles.append(f"VAR {names[0]} = {value}.")
                needles += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
                depths += sorted(rng.random() for _ in range(hops + 1))
            names, value = asked
            question = f"Find all variables that are assigned the value {value} in the text above."
            prefix = (
                "Answer: According to the chain(s) of variable assignment in the text above, "
                f"{hops + 1} variables are assigned the value {value}, they are:"
            )
            ctx, q, p, at = haystack.fill(
                tokenizer, hay, rng, int(length), INTRO, needles, depths, question, prefix
            )
            out.append(
                Sample(
                    id=f"{length}-{k}",
                    context=ctx,
                    question=q,
                    answer_prefix=p,
                    answers=names,
                    max_new_tokens=int(t.max_new_tokens),
                    length=int(length),
                    needle_at=at[0],
                )
            )
    return out


KEYS = {**GRID_KEYS, "chains": int_at_least(1), "hops": int_at_least(0)}


@register("variable_tracking", context_tokens=check_lengths, keys=KEYS)
def run(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print):
    t = cfg.task
    source = f"generated:variable_tracking/c{int(t.chains)}h{int(t.hops)}"
    return run_samples(
        cfg,
        model,
        tokenizer,
        methods,
        run_dir,
        make_samples(cfg, tokenizer),
        dataset="variable_tracking",
        source=source,
        log=log,
    )
