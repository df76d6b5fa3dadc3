import json

import pytest
import torch
from typer.testing import CliRunner

from lessctl import extract as E
from lessctl.cli import app
from lessctl.hooks import attention_layers
from lessctl.models import load_model
from lessctl.shards import ShardError, ShardStore

TEXT = " ".join(
    f"Paragraph {i}: the river rose after the storm, and the village moved its boats to higher "
    f"ground while the council argued about the bridge."
    for i in range(40)
)


@pytest.fixture
def smoke(compose, tmp_path, monkeypatch):
    """Smoke overrides with a private cache and a small real text file."""
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text(TEXT)
    overrides = ["experiment=smoke", f"data.path={tmp_path / 'text.txt'}"]
    return overrides, compose(*overrides)


def test_shards_hold_what_attention_sees(smoke):
    overrides, cfg = smoke
    man = E.run(cfg, log=lambda *_: None)
    store = ShardStore(E.extraction_dir(cfg))
    assert man["chunks"] == len(store.done_chunks()) == 6 and man["source"].startswith("file:")
    model, _ = load_model(cfg.model, seed=cfg.seed)
    outs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o: outs.__setitem__(mod.layer_idx, o[0]))
        for m in attention_layers(model)
    ]
    from lessctl.data import load_texts, token_windows
    from lessctl.models import byte_tokenizer

    x = token_windows(load_texts(cfg.data).items, byte_tokenizer(), 64, 1536)[:4]
    with torch.no_grad():
        model(x, use_cache=False)
    for h in hooks:
        h.remove()
    from lessctl.train import _o_proj, full_attention

    for layer in range(2):
        s = store.read(layer, 0)
        assert s["q"].shape == (4, 4, 64, 16) and s["k"].shape == (4, 2, 64, 16)
        recon = _o_proj(full_attention(s["q"], s["k"], s["v"], man["scaling"]), store.o_proj(layer))
        torch.testing.assert_close(recon, outs[layer], atol=1e-4, rtol=1e-4)


def test_resume_redoes_only_the_unfinished_chunk(smoke):
    _, cfg = smoke
    E.run(cfg, log=lambda *_: None)
    store = ShardStore(E.extraction_dir(cfg))
    # simulate a kill during chunk 3: marker never written, a shard half-written
    store.marker(3).unlink()
    store.shard(1, 3).write_bytes(store.shard(1, 3).read_bytes()[:100])
    before = {c: store.shard(0, c).stat().st_mtime_ns for c in range(6)}
    with pytest.raises(ShardError, match="not complete"):
        store.read(1, 3)
    E.run(cfg, log=lambda *_: None)
    after = {c: store.shard(0, c).stat().st_mtime_ns for c in range(6)}
    assert [c for c in range(6) if before[c] != after[c]] == [3]
    assert store.read(1, 3)["q"].shape[0] == 4


def test_corrupt_shard_is_named(smoke):
    _, cfg = smoke
    E.run(cfg, log=lambda *_: None)
    store = ShardStore(E.extraction_dir(cfg))
    p = store.shard(1, 2)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ShardError, match=str(p.name)):
        store.read(1, 2)


def _flip_a_byte(path) -> None:
    """Same size, one byte of the tensor data changed (what a checksum alone can see)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_shard_or_o_proj_is_refused_by_its_sha256(smoke):
    _, cfg = smoke
    E.run(cfg, log=lambda *_: None)
    store = ShardStore(E.extraction_dir(cfg))
    assert set(store.chunk_record(2)["sha256"]) == {"0", "1"}
    good = store.read(1, 2)
    _flip_a_byte(store.shard(1, 2))
    with pytest.raises(ShardError, match=f"{store.shard(1, 2)}: its sha256 differs"):
        store.read(1, 2)
    assert store.read(0, 2)["q"].shape == good["q"].shape  # the chunk's other layer reads
    _flip_a_byte(store.root / "o_proj.safetensors")
    with pytest.raises(ShardError, match="o_proj.safetensors: its sha256 differs"):
        store.o_proj(0)


def test_extract_rerun_redoes_a_bad_chunk(smoke, compose):
    """A rerun checks every finished chunk: a truncated shard (size) always, a flipped byte
    (sha256) with extract.verify=true; the bad chunk alone is extracted again, byte-identical
    to the first extraction, and a corrupt marker counts as a bad chunk too."""
    overrides, cfg = smoke
    E.run(cfg, log=lambda *_: None)
    store = ShardStore(E.extraction_dir(cfg))
    first = {c: store.shard(1, c).read_bytes() for c in range(6)}
    store.shard(1, 3).write_bytes(first[3][:-10])
    _flip_a_byte(store.shard(1, 4))
    store.marker(5).write_text('{"sequences": 4, "by')
    lines: list[str] = []
    E.run(cfg, log=lines.append)  # sizes only: chunks 3 and 5 are redone, 4 is not seen
    assert any("chunk 3:" in x and "bytes, not as recorded" in x for x in lines)
    assert any("chunk 5: corrupt chunk marker" in x for x in lines)
    assert not any("chunk 4:" in x for x in lines)
    assert store.shard(1, 3).read_bytes() == first[3] and store.shard(1, 5).read_bytes() == first[5]
    lines.clear()
    E.run(compose(*overrides, "extract.verify=true"), log=lines.append)
    assert [x.split(":")[0] for x in lines if x.startswith("chunk ")] == ["chunk 4"]
    assert {c: store.shard(1, c).read_bytes() for c in range(6)} == first


def test_disk_estimate_and_bad_dtype(smoke, compose):
    overrides, _ = smoke
    with pytest.raises(Exception, match="extract.dtype"):
        E.run(compose(*overrides, "extract.dtype=int8"), log=lambda *_: None)
    geo = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
    assert E.bytes_needed(1, 1, geo, torch.float16) == 30 * 15 * 64 * 2


def test_a_full_disk_is_one_line_in_units_that_fit(smoke, monkeypatch):
    """Was "needs 0.00 GiB but has 0.00 GiB free"."""
    import shutil
    from collections import namedtuple

    overrides, cfg = smoke
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(Exception) as e:
        E.run(cfg, log=lambda *_: None)
    geo = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    need = E.bytes_needed(24, 64, geo, torch.float32)  # experiment=smoke: 24 x 64 tokens
    assert need == 2 * (4 + 2 * 2) * 16 * 24 * 64 * 4 == 1.5 * 2**20
    assert str(e.value) == (
        f"extraction needs 1.50 MiB but {E.extraction_dir(cfg)} has 4.00 KiB free; "
        "lower extract.tokens or set extract.dir"
    )


def test_cli_extract_records_run(smoke):
    overrides, cfg = smoke
    res = CliRunner().invoke(app, ["extract", *overrides])
    assert res.exit_code == 0, res.output
    [meta] = list((__import__("pathlib").Path("results/runs/extract")).glob("*/meta.json"))
    assert json.loads(meta.read_text())["status"] == "finished"


def test_failed_extract_marks_its_run_failed(smoke, tmp_path):
    overrides, _ = smoke
    # a bad value is refused before any run folder exists (schema at compose time) ...
    res = CliRunner().invoke(app, ["extract", *overrides, "extract.dtype=int8"])
    assert res.exit_code == 2 and "extract.dtype" in res.output
    assert not __import__("pathlib").Path("results/runs/extract").exists()
    # ... one the stage finds (a missing text file) marks its run failed
    res = CliRunner().invoke(app, ["extract", *overrides, f"data.path={tmp_path / 'missing.txt'}"])
    assert res.exit_code == 2, res.output
    [meta] = list(__import__("pathlib").Path("results/runs/extract").glob("*/meta.json"))
    assert json.loads(meta.read_text())["status"] == "failed"


@pytest.mark.parametrize(
    "code, words",
    [
        (__import__("errno").ENOSPC, "free space there"),
        (__import__("errno").EROFS, "read-only: set extract.dir"),
        (__import__("errno").EACCES, "fix its permissions"),
    ],
)
def test_a_full_or_read_only_disk_is_one_line_naming_the_path(smoke, monkeypatch, code, words):
    """Disk full mid-extraction, a read-only or forbidden extract.dir: exit 2 and one line with
    the path and what to do, the chunks written before it kept (the rerun resumes)."""
    import os

    from lessctl import shards

    overrides, cfg = smoke
    real, writes = shards.save_atomic_digest, []

    def fails_at_the_sixth(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 6:  # o_proj, chunks 0 and 1 (2 layers each), then chunk 2
            raise OSError(code, os.strerror(code), str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(shards, "save_atomic_digest", fails_at_the_sixth)
    res = CliRunner().invoke(app, ["extract", *overrides])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(writes[-1]) in res.output.replace("\n", "")
    assert words in res.output.replace("\n", "") and "Traceback" not in res.output
    assert ShardStore(E.extraction_dir(cfg)).done_chunks() == [0, 1]
