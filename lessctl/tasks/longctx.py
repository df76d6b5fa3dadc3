"""`longctx`: any long-context file in the column layout that KV-compression suites export
(kvpress's RULER / LongBench / InfiniteBench / LooGLE exports): `context`, `question`,
`answer_prefix`, `answer` (a string or a list), `max_new_tokens`, one example a row, as
`.jsonl`, `.json` (records or lines), `.csv` or `.parquet`:

    lessctl eval task=longctx data.path=FILE

`answer_prefix` and `max_new_tokens` may be missing (default: empty, `task.max_new_tokens`).
Optional columns `task` (a sub-task name), `length` and `depth` become row keys, so a RULER
export with several tasks and lengths gives a row per (sub-task, length). A list answer means
every item must be found (`task.match=all`, RULER) or any one (`task.match=any`, LongBench's
alternatives). The question and the answer prefix are appended as they are (no separator).
Examples longer than max_position_embeddings - max_new_tokens are skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.methods import Method
from lessctl.schema import one_of
from lessctl.tasks.base import register
from lessctl.tasks.longcontext import GRID_KEYS, Sample, encode, run_samples, specials

COLUMNS = ("context", "question", "answer")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
MATCHES = ("all", "any")


def read(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .parquet file, checked for the required columns."""
    import pandas as pd

    if not path.exists():
        raise LessctlError(f"data.path={str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise LessctlError(f"data.path={str(path)!r}: allowed formats are {', '.join(FORMATS)}")
    try:
        if suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            try:
                df = pd.read_json(path, dtype=False)
            except ValueError:
                df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LessctlError(f"data.path={str(path)!r} cannot be read: {first}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise LessctlError(
            f"data.path={str(path)!r} lacks column(s) {', '.join(missing)}; need "
            f"context, question, answer (answer_prefix, max_new_tokens optional)"
        )
    return df.to_dict("records")


def answers_of(value, where: str) -> list[str]:
    """A string or a list (a JSON list in a CSV cell) -> list of non-empty strings."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if hasattr(value, "tolist"):
        value = value.tolist()
    items = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    items = [a for a in items if a.strip()]
    if not items:
        raise LessctlError(f"{where}: empty answer")
    return items


def _given(v) -> bool:
    """A cell that holds a value (not missing, NaN or empty)."""
    return v is not None and v == v and v != ""


def make_samples(cfg: DictConfig, tokenizer, max_pos: int) -> tuple[list[Sample], int, Path]:
    if not cfg.data.get("path"):
        raise LessctlError("task=longctx needs data.path=FILE (.jsonl, .json, .csv or .parquet)")
    match = str(cfg.task.match)
    if match not in MATCHES:
        raise LessctlError(f"task.match={match!r}; allowed: {', '.join(MATCHES)}")
    path = Path(cfg.data.path).expanduser()
    lead = len(specials(tokenizer))
    out, skipped = [], 0
    for i, r in enumerate(read(path)):
        where = f"{path} row {i + 1}"
        mnt = r.get("max_new_tokens")
        mnt = int(mnt if _given(mnt) else cfg.task.max_new_tokens)
        prefix = str(r["answer_prefix"]) if _given(r.get("answer_prefix")) else ""
        s = Sample(
            id=str(i),
            context=encode(tokenizer, str(r["context"])),
            question=encode(tokenizer, str(r["question"])),
            answer_prefix=encode(tokenizer, prefix),
            answers=answers_of(r["answer"], where),
            max_new_tokens=mnt,
            length=int(r["length"]) if _given(r.get("length")) else None,
            depth=float(r["depth"]) if _given(r.get("depth")) else None,
            match=match,
            group={"subtask": str(r["task"])} if _given(r.get("task")) else {},
        )
        total = lead + len(s.context) + len(s.question) + len(s.answer_prefix) + mnt
        if max_pos and total > max_pos:
            skipped += 1
            continue
        out.append(s)
    return out, skipped, path


def max_tokens(cfg: DictConfig, max_pos: int) -> int:
    """Examples are cut to the model: the longest sequence is max_position_embeddings."""
    return max_pos


KEYS = {
    "question": GRID_KEYS["question"],
    "match": one_of(*MATCHES),
    "protocol": GRID_KEYS["protocol"],
    "max_new_tokens": GRID_KEYS["max_new_tokens"],
}


@register("longctx", context_tokens=max_tokens, keys=KEYS)
def run(cfg: DictConfig, model, tokenizer, methods: list[Method], run_dir: Path, log=print):
    max_pos = model.config.max_position_embeddings
    samples, skipped, path = make_samples(cfg, tokenizer, max_pos)
    if skipped:
        log(f"longctx: skipped {skipped} example(s) longer than max_position_embeddings={max_pos}")
    if not samples:
        raise LessctlError(f"data.path={str(path)!r}: no example fits max_position_embeddings")
    rows = run_samples(
        cfg,
        model,
        tokenizer,
        methods,
        run_dir,
        samples,
        dataset=path.stem,
        source=f"file:{path}",
        log=log,
    )
    return [{**r, "skipped": skipped} for r in rows]
