"""One loader for every dataset: the real one (hub), its embedded stand-in, or a local file.

- `load_texts(data_cfg)` → `Corpus(texts, source)` for language-modelling corpora;
- `load_pairs(data_cfg, split)` → `Corpus(pairs, source)` of (document, summary) pairs;
- `token_windows(texts, tokenizer, seq_len, max_tokens)` → LongTensor `[N, seq_len]`:
  documents joined with the EOS token, cut into consecutive windows.

`data.source=auto` uses the real dataset when it can be loaded and otherwise the stand-in,
says so on the console, and records the source actually used (`hub:<id>`, `embedded:<name>`
or `file:<path>`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lessctl import assets
from lessctl.errors import LessctlError
from lessctl.models import hub_reachable


class DataError(LessctlError):
    """A dataset that cannot be loaded; the message is one line."""


@dataclass
class Corpus:
    items: list  # list[str] (text) or list[tuple[str, str]] (document, summary)
    source: str  # hub:<path>[/<name>] | embedded:<name> | file:<path>


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]{msg}[/]")


def _read_file(path: Path, kind: str) -> list:
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist")
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r} is not a file; allowed: a .txt or .jsonl file")
    if path.suffix == ".txt":
        if kind != "text":
            raise DataError(f"data.path={str(path)!r}: a .txt file holds text, not summary pairs")
        return [{"text": _text(path)}]
    if path.suffix != ".jsonl":
        raise DataError(f"data.path={str(path)!r}: allowed formats are .txt and .jsonl")
    rows = []
    for i, line in enumerate(_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{i}: not valid JSON") from None
    need = ("text",) if kind == "text" else ("document", "summary")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in need):
            raise DataError(
                f"{path}: row {i} lacks field(s) {', '.join(need)} (kind={kind}); allowed: one "
                f"JSON object a line with string {', '.join(need)}"
            )
    return rows


def _text(path: Path) -> str:
    """The file's text (UTF-8, newlines universal as `open` reads them), or one line naming the
    file and what is wrong with it."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"data.path={str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"data.path={str(path)!r} is not UTF-8 text (byte {err.start}, line {line}); "
            "allowed: a UTF-8 .txt file or a .jsonl file of JSON objects"
        ) from None


def _load_hub(cfg: Any, split: str):
    import datasets

    h = cfg.hub
    kw = {"data_files": h.data_files} if h.get("data_files") else {}
    return datasets.load_dataset(h.path, h.get("name"), split=split, **kw)


def _hub_source(cfg: Any) -> str:
    return f"hub:{cfg.hub.path}" + (f"/{cfg.hub.name}" if cfg.hub.get("name") else "")


def _resolve(cfg: Any, split: str, kind: str) -> tuple[list, str]:
    """Rows (dicts) and the source actually used."""
    if cfg.kind != kind:
        raise DataError(f"data={cfg.name} is a {cfg.kind} dataset; this task needs {kind}")
    if cfg.get("path"):
        path = Path(cfg.path).expanduser()
        return _read_file(path, kind), f"file:{path}"
    source = cfg.source
    if source not in ("auto", "hub", "embedded"):
        raise DataError(f"unknown data.source {source!r}; allowed: auto, hub, embedded")
    hub_error = None
    offline_cache = os.environ.get("HF_DATASETS_OFFLINE") == "1" or (
        os.environ.get("HF_HUB_OFFLINE") == "1"
    )  # the user says a local HF cache holds it
    if source in ("auto", "hub") and (offline_cache or hub_reachable()):
        try:
            return list(_load_hub(cfg, split)), _hub_source(cfg)
        except Exception as err:  # any loader failure falls back (auto) or is reported (hub)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            hub_error = f"{type(err).__name__}: {first}"
    elif source == "hub":
        hub_error = "the Hugging Face hub is unreachable from here"
    if source == "hub":
        raise DataError(
            f"data={cfg.name}: {cfg.hub.path} cannot be loaded from the hub ({hub_error}); "
            f"use data.source=embedded or data.path=FILE"
        )
    if not cfg.get("embedded"):
        raise DataError(
            f"data={cfg.name} has no embedded stand-in and the hub is unreachable"
            f"{f' ({hub_error})' if hub_error else ''}; pass data.path=FILE"
        )
    if source == "auto":
        _say(
            f"data={cfg.name}: hub unavailable, using the embedded stand-in '{cfg.embedded}' "
            f"(numbers are not comparable with the real dataset)"
        )
    path = assets.build_corpus(cfg.embedded)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return rows, f"embedded:{cfg.embedded}"


def load_texts(cfg: Any, split: str | None = None) -> Corpus:
    """Texts of a language-modelling dataset config (`data/<name>.yaml`)."""
    rows, source = _resolve(cfg, split or cfg.hub.split, "text")
    field = cfg.hub.get("text_field", "text") if source.startswith("hub:") else "text"
    texts = [r[field] for r in rows if r[field].strip()]
    if not texts:
        raise DataError(f"data={cfg.name} ({source}) holds no text")
    return Corpus(texts, source)


def load_pairs(cfg: Any, split: str | None = None) -> Corpus:
    """(document, summary) pairs of a summarisation dataset config; `split` train|test|..."""
    split = split or cfg.hub.split
    rows, source = _resolve(cfg, split, "summarization")
    if source.startswith("hub:"):
        d, s = cfg.hub.document_field, cfg.hub.summary_field
        pairs = [(r[d], r[s]) for r in rows]
    else:
        # stand-ins carry a `split` column; local files without one serve every split
        pairs = [(r["document"], r["summary"]) for r in rows if r.get("split", split) == split]
    if not pairs:
        raise DataError(f"data={cfg.name} ({source}) has no pairs in split {split!r}")
    return Corpus(pairs, source)


def token_windows(
    texts: list[str],
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Join documents with EOS, tokenise and cut into `[N, seq_len]` windows (int64).

    Stops once `max_tokens` tokens are collected (None = the whole corpus); the last partial
    window is dropped.
    """
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} is too small; need at least 2")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True).input_ids)
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max(max_tokens // seq_len, 1))
    if n == 0:
        raise DataError(f"corpus has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
