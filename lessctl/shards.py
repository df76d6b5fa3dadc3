"""Activation shards on disk: one safetensors file per layer and chunk of sequences.

Layout of an extraction folder `<cache>/activations/<hash>/`:

    manifest.json                  model, dataset + source, seq_len, tokens, dtype, geometry
    o_proj.safetensors             `layer_<i>.weight` [hidden, H*d] (and `.bias`) of every layer
    layer_<i>/chunk_<c>.safetensors  q [n, H, S, d], k [n, Hkv, S, d], v [n, Hkv, S, d]
    chunks/chunk_<c>.json          written last: the chunk is complete; byte size and sha256
                                   of each layer's shard

A shard is written to a temporary file and renamed; a chunk counts only once its marker exists,
so an interrupted extraction never leaves a half-written chunk that looks complete. Reading
checks each file's size and sha256 against the marker (the bytes are hashed as they are read,
once) and that safetensors can parse it; the manifest holds `o_proj.safetensors`' sha256, checked
the same way. `lessctl extract` rerun re-checks every finished chunk (sizes always, hashes with
`extract.verify=true`) and extracts a bad one again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from lessctl.atomic import file_sha256, write_bytes_atomic, write_json_atomic
from lessctl.errors import LessctlError


class ShardError(LessctlError):
    """Missing, corrupt or mismatched activation shards."""


def config_hash(spec: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable spec (an extraction spec, a model's inputs)."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def save_atomic_digest(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None
) -> tuple[int, str]:
    """Write a safetensors file through a temporary file + rename; return its byte size and
    sha256 (of the bytes written, hashed before they leave memory)."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> int:
    """:func:`save_atomic_digest`'s byte size alone."""
    return save_atomic_digest(tensors, path, metadata)[0]


def load_checked(
    path: Path, size: int | None = None, sha256: str | None = None, what: str = "file"
) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, its bytes checked against the recorded ``size`` and
    ``sha256`` where given (one read: hashed, then parsed); a missing, truncated, altered or
    unparsable file is a ShardError naming it."""
    if not path.exists():
        raise ShardError(f"missing {what} {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ShardError(f"cannot read {what} {path}: {err.strerror}") from None
    if size is not None and len(data) != size:
        raise ShardError(f"corrupt {what} {path}: {len(data)} bytes, expected {size}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ShardError(f"corrupt {what} {path}: its sha256 differs from the one recorded")
    try:
        return load(data)
    except (SafetensorError, ValueError) as err:
        raise ShardError(f"corrupt {what} {path}: {err}") from None


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
        written = {
            str(i): save_atomic_digest(t, self.shard(i, chunk)) for i, t in per_layer.items()
        }
        n = next(iter(per_layer.values()))["q"].shape[0]
        write_json_atomic(
            self.marker(chunk),
            {
                "sequences": n,
                "bytes": {i: size for i, (size, _) in written.items()},
                "sha256": {i: digest for i, (_, digest) in written.items()},
            },
        )

    def chunk_record(self, chunk: int) -> dict[str, Any]:
        """A finished chunk's marker: sequences, and per layer its shard's bytes (and sha256)."""
        path = self.marker(chunk)
        if not path.exists():
            raise ShardError(f"chunk {chunk} of {self.root} is not complete (no marker)")
        try:
            rec = json.loads(path.read_text())
            int(rec["sequences"]), dict(rec["bytes"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ShardError(f"corrupt chunk marker {path}") from None
        return rec

    def check_chunk(self, chunk: int, layers: int, hashes: bool = False) -> str | None:
        """What is wrong with a finished chunk of ``layers`` layers, or None: its marker parses,
        every layer's shard exists with the recorded size, and with ``hashes`` its recorded
        sha256 (reads every byte)."""
        try:
            rec = self.chunk_record(chunk)
        except ShardError as err:
            return str(err)
        for layer in range(layers):
            path, key = self.shard(layer, chunk), str(layer)
            if not path.exists():
                return f"missing activation shard {path}"
            if key not in rec["bytes"] or path.stat().st_size != rec["bytes"][key]:
                return f"activation shard {path} has {path.stat().st_size} bytes, not as recorded"
            digest = rec.get("sha256", {}).get(key)
            if hashes and digest is not None and file_sha256(path) != digest:
                return f"activation shard {path}: its sha256 differs from the one recorded"
        return None

    def read(self, layer: int, chunk: int) -> dict[str, torch.Tensor]:
        """q, k, v of one layer and chunk; a missing, truncated or altered shard is named."""
        rec, key = self.chunk_record(chunk), str(layer)
        out = load_checked(
            self.shard(layer, chunk),
            rec["bytes"].get(key),
            rec.get("sha256", {}).get(key),
            "activation shard",
        )
        if not {"q", "k", "v"} <= set(out):
            raise ShardError(f"corrupt activation shard {self.shard(layer, chunk)}: lacks q/k/v")
        return out

    def write_o_proj(self, weights: dict[str, torch.Tensor]) -> str:
        """Write every layer's o_proj weights; return the file's sha256 (for the manifest)."""
        return save_atomic_digest(weights, self.root / "o_proj.safetensors")[1]

    def o_proj(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s o_proj weights, the file checked against the manifest's sha256."""
        path = self.root / "o_proj.safetensors"
        w = load_checked(path, sha256=self.manifest().get("o_proj_sha256"), what="o_proj weights")
        return {k.split(".", 1)[1]: v for k, v in w.items() if k.startswith(f"layer_{layer}.")}
