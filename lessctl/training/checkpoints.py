"""Checkpoint folders: `<train.dir>/<hash of train_spec>/`.

    manifest.json            what was trained (model, data, policy and split, kernel shape)
    layer_<i>.safetensors    a layer's kernels (+ their config)
    layer_<i>.json           written last: metrics, ``status`` and the kernels file's sha256
    layer_<i>.lock           while a process trains the layer: its host and pid

A layer is finished only if its json says ``status: finished`` and the sha256 of its kernels
file matches: a re-run skips finished layers and retrains the others (a layer stopped by a
non-finite loss has a json with its status, but no kernels file). Two runs on one folder train
different layers: each takes a layer's lock (O_EXCL) before training it and skips a layer
locked by a live process; a lock whose process is gone (same host) is stale and taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lessctl.atomic import write_json_atomic
from lessctl.errors import LessctlError
from lessctl.less.kernels import LayerKernels
from lessctl.shards import config_hash, file_sha256, save_atomic_digest
from lessctl.training.spec import train_spec


class CheckpointError(LessctlError):
    """A checkpoint folder or layer that cannot be used (one line naming the file)."""


def checkpoint_dir(cfg: DictConfig, man: dict[str, Any]) -> Path:
    return Path(cfg.train.dir).expanduser() / config_hash(train_spec(cfg, man))


def kernels_path(out: Path, layer: int) -> Path:
    return out / f"layer_{layer:03d}.safetensors"


def metrics_path(out: Path, layer: int) -> Path:
    return out / f"layer_{layer:03d}.json"


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """The folder's manifest, written once (same hash, same content)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").exists():
        write_json_atomic(out / "manifest.json", manifest)


def read_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / "manifest.json"
    if not path.exists():
        raise CheckpointError(f"no LESS checkpoint at {out} (manifest.json missing)")
    try:
        man = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"corrupt checkpoint manifest {path} ({type(err).__name__}): delete {out} and run "
            f"`lessctl train` again"
        ) from None
    if not isinstance(man, dict):
        raise CheckpointError(f"corrupt checkpoint manifest {path}: delete {out} and retrain")
    return man


def save_layer(out: Path, kern: LayerKernels | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write a layer's kernels (``None``: a layer that did not finish; any old file goes), then
    its json with the file's sha256 (the json is the layer's completion marker)."""
    layer = int(metrics["layer"])
    path = kernels_path(out, layer)
    if kern is None or metrics["status"] != "finished":
        path.unlink(missing_ok=True)
        metrics = {**metrics, "file": None, "sha256": None}
    else:
        tensors, meta = kern.safetensors()
        _, digest = save_atomic_digest(tensors, path, meta)  # a kill leaves no torn file
        metrics = {**metrics, "file": path.name, "sha256": digest}
    write_json_atomic(metrics_path(out, layer), metrics)
    return metrics


def layer_problem(out: Path, layer: int, check_hash: bool = True) -> str | None:
    """Why layer ``layer`` of ``out`` is not a finished, intact layer (None: it is): its json
    says finished and, with ``check_hash``, its kernels file has the sha256 recorded there (a
    layer written before checksums records none: its status alone counts)."""
    mp, kp = metrics_path(out, layer), kernels_path(out, layer)
    if not mp.exists():
        return f"{mp.name} is missing (the layer never finished)"
    try:
        m = json.loads(mp.read_text())
        status, want = m["status"], m.get("sha256")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return f"{mp.name} is corrupt ({type(err).__name__})"
    if status != "finished":
        return f"layer {layer} was not trained ({status})"
    if not kp.exists():
        return f"{kp.name} is missing"
    if check_hash and want and file_sha256(kp) != want:
        return f"{kp.name} is corrupt (its sha256 differs from the one in {mp.name})"
    return None


def finished_metrics(out: Path, layer: int) -> dict[str, Any] | None:
    """The metrics of a finished, intact layer, else None."""
    if layer_problem(out, layer) is not None:
        return None
    return json.loads(metrics_path(out, layer).read_text())


def verified_kernels(out: Path, layer: int, device="cpu") -> LayerKernels:
    """A finished layer's kernels, its hash checked; else one line naming the file and what to
    do."""
    why = layer_problem(out, layer)
    if why is not None:
        raise CheckpointError(
            f"LESS checkpoint {out}: {why}; run `lessctl train` with the same overrides to "
            f"(re)train layer {layer}"
        )
    try:
        return LayerKernels.load(kernels_path(out, layer), device)
    except Exception as err:  # a file whose hash matches but does not parse: still one line
        raise CheckpointError(
            f"LESS checkpoint {out}: {kernels_path(out, layer).name} cannot be read "
            f"({type(err).__name__}); delete it and run `lessctl train` again"
        ) from None


def stored_layers(out: Path) -> list[int]:
    """Layers with a json or a kernels file in ``out``."""
    found = set()
    for p in out.glob("layer_*"):
        stem = p.name.split(".")[0]
        if p.suffix in (".json", ".safetensors") and stem[6:].isdigit():
            found.add(int(stem[6:]))
    return sorted(found)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[int, LayerKernels]]:
    """A checkpoint folder's manifest and its layers' kernels, each checked (status finished,
    sha256); any layer that is not is refused in one line naming its file."""
    path = Path(path)
    man = read_manifest(path)
    return man, {i: verified_kernels(path, i) for i in stored_layers(path)}


# -- per-layer locks
class LayerLock:
    """``layer_<i>.lock``, held by an exclusive ``flock`` for as long as the layer trains: the
    kernel releases it when its holder ends however it ends (kill -9 included), so no lock goes
    stale and none is taken over by guesswork. The file records the holder's host and pid for
    people. :meth:`acquire` returns False while another process (or another open of the file in
    this one) holds it. Where the filesystem has no flock (some network mounts), the lock is
    taken with a warning."""

    def __init__(self, out: Path, layer: int):
        self.path = out / f"layer_{layer:03d}.lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # no flock here: proceed unlocked rather than refuse to train
                print(f"warning: {self.path}: the filesystem has no flock; not locked")
            try:  # released and unlinked by its holder between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
            self.fd = fd
            return True

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter re-opens a new file
            os.close(self.fd)  # closing drops the flock
            self.fd = None
