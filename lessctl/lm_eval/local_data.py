"""Data of lessctl's local lm-eval tasks (taskdefs/*.yaml), read without the hub.

lm-eval hands a task's metadata (`--metadata '{"wikitext_path": ...}'`, `lm_eval.metadata`) to
these loaders as keyword arguments:

- `wikitext(wikitext_path=None)`: documents of the embedded WikiText stand-in, or of a local file
  (`.jsonl` with a `page` or `text` field per document, or one `.txt` document), as
  `{"test": Dataset(page)}`;
- `multiple_choice(mc_path=None)`: `taskdefs/mc.jsonl` (or a local JSONL with `question`,
  `choices`, `answer`) as `{"test": Dataset}`.

`SOURCES[task]` records where the data came from (`embedded:wikitext`, `file:<path>`,
`package:<path>`), for the provenance of result rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lessctl.errors import LessctlError

TASKDEFS = Path(__file__).resolve().parent / "taskdefs"
SOURCES: dict[str, str] = {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise LessctlError(f"lm-eval data file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def wikitext(wikitext_path: str | None = None, **_: Any):
    """Documents as `{"test": Dataset(page=...)}` (the embedded stand-in unless a path)."""
    if wikitext_path:
        p = Path(wikitext_path).expanduser()
        if p.suffix == ".txt" and p.exists():
            pages = [p.read_text(encoding="utf-8")]
        else:
            pages = [r.get("page", r.get("text", "")) for r in _jsonl(p)]
        SOURCES["lessctl_wikitext"] = f"file:{p}"
    else:
        from lessctl import assets

        pages = [r["text"] for r in _jsonl(assets.build_corpus("wikitext"))]
        SOURCES["lessctl_wikitext"] = "embedded:wikitext"
    pages = [t for t in pages if t.strip()]
    if not pages:
        raise LessctlError(f"lessctl_wikitext: {SOURCES['lessctl_wikitext']} holds no text")
    return _dataset([{"page": t} for t in pages])


def page(doc: dict[str, str]) -> str:
    """The document itself (the stand-in is plain text: no WikiText detokenisation)."""
    return doc["page"]


def wikitext_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple]:
    """lm-eval's own wikitext scoring: words = whitespace pieces of the document, bytes = its
    UTF-8 length; the aggregations turn (loglikelihood, count) pairs into perplexities."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)


def multiple_choice(mc_path: str | None = None, **_: Any):
    """The shipped multiple-choice questions (or a local JSONL of the same fields)."""
    p = Path(mc_path).expanduser() if mc_path else TASKDEFS / "mc.jsonl"
    rows = _jsonl(p)
    for i, r in enumerate(rows, 1):
        if not {"question", "choices", "answer"} <= set(r):
            raise LessctlError(f"{p}: row {i} lacks question, choices or answer")
    SOURCES["lessctl_mc"] = f"file:{p}" if mc_path else "package:lessctl/lm_eval/taskdefs/mc.jsonl"
    return _dataset(rows)
