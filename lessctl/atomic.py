"""Atomic file writes: a temporary file in the same folder, renamed into place when complete,
so an interrupted write never leaves a file that looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _write_atomic(path: Path, write, binary: bool = False) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` as the whole file."""
    _write_atomic(path, lambda f: f.write(data), binary=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON."""
    _write_atomic(path, lambda f: json.dump(obj, f, indent=2, default=str))


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object a line; returns the row count."""

    def write(f) -> int:
        n = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        return n

    return _write_atomic(path, write)
