"""Activation shards on disk: one safetensors file per layer and chunk of sequences.

Layout of an extraction folder `<cache>/activations/<hash>/`:

    manifest.json                  model, dataset + source, seq_len, tokens, dtype, geometry
    o_proj.safetensors             `layer_<i>.weight` [hidden, H*d] (and `.bias`) of every layer
    layer_<i>/chunk_<c>.safetensors  q [n, H, S, d], k [n, Hkv, S, d], v [n, Hkv, S, d]
    chunks/chunk_<c>.json          written last: the chunk is complete; byte size of each shard

A shard is written to a temporary file and renamed; a chunk counts only once its marker exists,
so an interrupted extraction never leaves a half-written chunk that looks complete. Reading
checks each file's size against the marker and that safetensors can parse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lessctl.atomic import write_json_atomic
from lessctl.errors import LessctlError


class ShardError(LessctlError):
    """Missing, corrupt or mismatched activation shards."""


def config_hash(spec: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable spec (an extraction spec, a model's inputs)."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> int:
    """Write a safetensors file through a temporary file + rename; return its byte size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path.stat().st_size


class ShardStore:
    """Read/write access to one extraction folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- layout
    def shard(self, layer: int, chunk: int) -> Path:
        return self.root / f"layer_{layer:03d}" / f"chunk_{chunk:05d}.safetensors"

    def marker(self, chunk: int) -> Path:
        return self.root / "chunks" / f"chunk_{chunk:05d}.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # -- manifest
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise ShardError(f"no activations at {self.root} (manifest.json missing)")
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ShardError(f"corrupt manifest {self.manifest_path}") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest)

    # -- chunks
    def done_chunks(self) -> list[int]:
        return sorted(
            int(p.stem.split("_")[1]) for p in (self.root / "chunks").glob("chunk_*.json")
        )

    def write_chunk(self, chunk: int, per_layer: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write every layer's shard of `chunk`, then its completion marker."""
        sizes = {str(i): save_atomic(t, self.shard(i, chunk)) for i, t in per_layer.items()}
        n = next(iter(per_layer.values()))["q"].shape[0]
        write_json_atomic(self.marker(chunk), {"sequences": n, "bytes": sizes})

    def read(self, layer: int, chunk: int) -> dict[str, torch.Tensor]:
        """q, k, v of one layer and chunk; a missing, truncated or corrupt shard is named."""
        path = self.shard(layer, chunk)
        if not self.marker(chunk).exists():
            raise ShardError(f"chunk {chunk} of {self.root} is not complete (no marker)")
        if not path.exists():
            raise ShardError(f"missing activation shard {path}")
        want = json.loads(self.marker(chunk).read_text())["bytes"].get(str(layer))
        if want is not None and path.stat().st_size != want:
            raise ShardError(
                f"corrupt activation shard {path}: {path.stat().st_size} bytes, expected {want}"
            )
        try:
            out = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ShardError(f"corrupt activation shard {path}: {err}") from None
        if not {"q", "k", "v"} <= set(out):
            raise ShardError(f"corrupt activation shard {path}: lacks q/k/v")
        return out

    def o_proj(self, layer: int) -> dict[str, torch.Tensor]:
        path = self.root / "o_proj.safetensors"
        try:
            w = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ShardError(f"missing or corrupt {path}: {err}") from None
        return {k.split(".", 1)[1]: v for k, v in w.items() if k.startswith(f"layer_{layer}.")}
