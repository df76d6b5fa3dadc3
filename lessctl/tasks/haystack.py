"""Haystacks for the generated long-context tasks, in the model's own tokens.

- :class:`Haystack`: sentences tokenised once (each with a leading space), cut into exactly
  `n` tokens from a seeded starting sentence (wrapping around), with the sentence starts kept
  so needles go between sentences.
- `noise()`: the repeated filler of the passkey test ("The grass is green. ...").
- `corpus(tokenizer, *corpus_texts(data_cfg))`: real text, the data config's corpus (the
  embedded stand-in by default).
- `words(texts)`: distinct lower-case words of a corpus, for keys and word lists.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lessctl.errors import LessctlError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MAX_CORPUS_TOKENS = 200_000  # enough text for any haystack up to 8k tokens, varied starts


@dataclass
class Haystack:
    ids: list[int]  # all sentences, concatenated
    starts: list[int]  # start index of each sentence in `ids`
    source: str

    def cut(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """`n` tokens from a random sentence on (wrapping) -> (ids, sentence starts in them).

        The cut ends at a sentence end; the excess is trimmed from the first sentence, so the
        text before the question is whole."""
        if n < 0:
            raise LessctlError(f"the haystack would need {n} tokens; raise task.lengths")
        first = rng.randrange(len(self.starts))
        ids, starts = [], []
        i = first
        while len(ids) < n:
            a = self.starts[i]
            b = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.ids)
            starts.append(len(ids))
            ids += self.ids[a:b]
            i = (i + 1) % len(self.starts)
        extra = len(ids) - n
        return ids[extra:], [0] + [s - extra for s in starts if s > extra]


def from_sentences(tokenizer, sentences: list[str], source: str) -> Haystack:
    enc = tokenizer([" " + s for s in sentences], add_special_tokens=False).input_ids
    ids, starts = [], []
    for e in enc:
        if e:
            starts.append(len(ids))
            ids += list(e)
    if not ids:
        raise LessctlError(f"the haystack {source} holds no text")
    return Haystack(ids, starts, source)


def noise(tokenizer) -> Haystack:
    return from_sentences(tokenizer, _SENTENCE.split(NOISE), "generated:noise")


def corpus_texts(data_cfg) -> tuple[list[str], str]:
    from lessctl.data import load_texts

    c = load_texts(data_cfg)
    return c.items, c.source


def corpus(tokenizer, texts: list[str], source: str) -> Haystack:
    """Sentences of a corpus's texts (`corpus_texts`), up to ~200k tokens' worth of characters."""
    sentences, chars = [], 0
    for t in texts:
        for s in _SENTENCE.split(" ".join(t.split())):
            if s:
                sentences.append(s)
                chars += len(s)
        if chars > 4 * _MAX_CORPUS_TOKENS:
            break
    return from_sentences(tokenizer, sentences, source)


def words(texts: list[str], min_len: int = 4, max_len: int = 10) -> list[str]:
    """Distinct lower-case alphabetic words of the texts, sorted (deterministic)."""
    pat = re.compile(rf"\b[a-z]{{{min_len},{max_len}}}\b")
    seen: set[str] = set()
    chars = 0
    for t in texts:
        seen.update(pat.findall(t))
        chars += len(t)
        if chars > 4 * _MAX_CORPUS_TOKENS:
            break
    return sorted(seen)


def fill(
    tokenizer,
    hay: Haystack,
    rng: random.Random,
    length: int,
    intro: str,
    needles: list[str],
    depths: list[float],
    question: str,
    answer_prefix: str,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """A context of `length` tokens in all (leading specials, intro, haystack with the needles
    at `depths` of it, question, answer prefix) -> (context ids, question ids, prefix ids,
    index of each needle's first token in the context)."""
    from lessctl.tasks.longcontext import encode, place, specials

    intro_ids = encode(tokenizer, intro)
    q_ids = encode(tokenizer, "\n" + question)
    p_ids = encode(tokenizer, " " + answer_prefix)
    pieces = [encode(tokenizer, " " + n) for n in needles]
    fixed = len(specials(tokenizer)) + len(intro_ids) + len(q_ids) + len(p_ids)
    n = length - fixed - sum(len(p) for p in pieces)
    if n < 0:
        raise LessctlError(
            f"task.lengths entry {length} is too short: the template and needles alone take "
            f"{length - n} tokens"
        )
    ids, starts = hay.cut(n, rng)
    body, where = place(ids, starts, pieces, depths)
    return intro_ids + body, q_ids, p_ids, [len(intro_ids) + w for w in where]
