"""Checkpoint integrity: hashes, status, locks (lessctl/training/checkpoints.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from lessctl import extract as E
from lessctl import train as T
from lessctl.errors import LessctlError
from lessctl.training.checkpoints import CheckpointError, LayerLock, finished_metrics

from .test_extract import TEXT

QUIET = {"log": lambda *_: None}


@pytest.fixture
def extracted(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text(TEXT)
    overrides = ["experiment=smoke", f"data.path={tmp_path / 'text.txt'}", "train.epochs=1"]
    E.run(compose(*overrides), **QUIET)
    return overrides


@pytest.fixture
def trained(extracted, compose):
    out, _ = T.run(compose(*extracted), **QUIET)
    return out


def _flip(path, at: int = -20) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def test_layer_json_records_sha256_and_a_flipped_byte_is_refused_and_retrained(
    trained, extracted, compose
):
    m = json.loads((trained / "layer_000.json").read_text())
    assert m["status"] == "finished" and len(m["sha256"]) == 64
    T.load_checkpoint(trained)  # intact: loads
    _flip(trained / "layer_000.safetensors")  # a byte of the weights, the file still parses
    with pytest.raises(CheckpointError, match=r"layer_000\.safetensors is corrupt.*lessctl train"):
        T.load_checkpoint(trained)
    assert finished_metrics(trained, 0) is None and finished_metrics(trained, 1) is not None
    logs: list[str] = []
    T.run(compose(*extracted), log=logs.append)  # the re-run retrains layer 0 only
    assert any("layer 1: already trained" in x for x in logs)
    assert not any("layer 0: already trained" in x for x in logs)
    T.load_checkpoint(trained)


def test_eval_refuses_a_corrupt_layer_naming_it(trained, extracted, compose, tiny_model):
    from lessctl.methods import load_less
    from lessctl.models import attention_geometry
    from lessctl.policies.budget import build_policy

    cfg = compose(*extracted, f"less.ckpt={trained}")
    geo = attention_geometry(tiny_model[0])
    policy = build_policy(cfg.policy, seq_len=64, max_position_embeddings=128)
    load_less(cfg, geo, "cpu", policy)
    _flip(trained / "layer_001.safetensors")
    with pytest.raises(LessctlError, match=r"layer_001\.safetensors is corrupt"):
        load_less(cfg, geo, "cpu", policy)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "empty_json", "garbled_json", "unfinished_json", "manifest_truncated"],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(trained, damage):
    k, j, man = (
        trained / "layer_000.safetensors",
        trained / "layer_000.json",
        trained / "manifest.json",
    )
    if damage == "truncate":
        k.write_bytes(k.read_bytes()[:100])
        want = r"layer_000\.safetensors is corrupt"
    elif damage == "empty_json":
        j.write_text("")
        want = r"layer_000\.json is corrupt"
    elif damage == "garbled_json":
        j.write_text(j.read_text()[:30])
        want = r"layer_000\.json is corrupt"
    elif damage == "unfinished_json":
        j.unlink()
        want = r"layer_000\.json is missing"
    else:
        man.write_text(man.read_text()[:10])
        want = r"corrupt checkpoint manifest .*manifest\.json"
    with pytest.raises(CheckpointError, match=want) as err:
        T.load_checkpoint(trained)
    assert "\n" not in str(err.value)


def test_eval_with_a_truncated_manifest_is_one_line(trained, extracted):
    from typer.testing import CliRunner

    from lessctl.cli import app

    (trained / "manifest.json").write_text('{"format": 2, "mod')
    res = CliRunner().invoke(
        app, ["eval", *extracted, f"less.ckpt={trained}", "eval.methods=[less]", "eval.windows=1"]
    )
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and "corrupt checkpoint manifest" in lines[-1], res.output
    assert "Traceback" not in res.output


def test_non_finite_loss_is_not_finished_and_not_loadable(extracted, compose):
    cfg = compose(*extracted, "train.lr=1e30", "train.epochs=3")
    out, metrics = T.run(cfg, **QUIET)
    stopped = [m["layer"] for m in metrics if m["status"].startswith("stopped: non-finite")]
    assert stopped
    i = stopped[0]
    assert not (out / f"layer_{i:03d}.safetensors").exists()  # nothing loadable as kernels
    assert finished_metrics(out, i) is None
    with pytest.raises(CheckpointError, match=rf"layer {i} was not trained \(stopped"):
        T.load_checkpoint(out)
    # eval and bench (load_less) refuse it too, naming the layer
    from lessctl.methods import load_less
    from lessctl.policies.budget import build_policy

    pol = build_policy(cfg.policy, seq_len=64, max_position_embeddings=128)
    geo = json.loads((out / "manifest.json").read_text())["geometry"]
    with pytest.raises(CheckpointError, match=rf"layer {i} was not trained"):
        load_less(compose(*extracted, "train.lr=1e30", f"less.ckpt={out}"), geo, "cpu", pol)
    logs: list[str] = []
    T.run(cfg, log=logs.append)  # re-run: the stopped layer is trained again, not skipped
    assert not any(f"layer {i}: already trained" in x for x in logs)


def test_a_layer_locked_by_a_live_process_is_skipped_a_dead_ones_lock_is_taken(extracted, compose):
    cfg = compose(*extracted)
    man = json.loads((E.extraction_dir(cfg) / "manifest.json").read_text())
    out = T.checkpoint_dir(cfg, man)
    out.mkdir(parents=True)
    hold = (
        "import sys, time; from pathlib import Path; from lessctl.training.checkpoints import "
        f"LayerLock; assert LayerLock(Path({str(out)!r}), 0).acquire(); print('held', flush=True);"
        " time.sleep(60)"
    )
    live = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        logs: list[str] = []
        _, metrics = T.run(cfg, log=logs.append)
        assert [m["layer"] for m in metrics] == [1]
        assert any("layer 0: being trained by another run" in x for x in logs)
        assert (out / "layer_000.lock").exists() and not (out / "layer_001.lock").exists()
    finally:
        live.kill()
        live.wait()
    # the holder is gone (killed: the kernel dropped its flock), the next run trains the layer
    _, metrics = T.run(cfg, **QUIET)
    assert sorted(m["layer"] for m in metrics) == [0, 1]
    assert not (out / "layer_000.lock").exists()


def test_two_concurrent_runs_train_disjoint_layers(extracted, compose):
    """Two runs at once on one folder (threads of one process: the lock is O_EXCL whatever the
    holder): each layer is trained by exactly one of them."""
    cfg = compose(*extracted, "train.epochs=2")
    logs: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            T.run(cfg, log=logs[i].append)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    trained = [{int(x.split()[1]) for x in lg if " epoch " in x} for lg in logs]
    assert trained[0].isdisjoint(trained[1]) and trained[0] | trained[1] == {0, 1}


def test_lock_is_exclusive_and_released(tmp_path):
    a, b = LayerLock(tmp_path, 3), LayerLock(tmp_path, 3)
    assert a.acquire() and not b.acquire()
    owner = json.loads((tmp_path / "layer_003.lock").read_text())
    assert owner == {"host": socket.gethostname(), "pid": os.getpid()}
    a.release()
    assert b.acquire()
    b.release()
