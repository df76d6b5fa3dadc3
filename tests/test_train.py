import json
import shutil

import pytest
from typer.testing import CliRunner

from lessctl import extract as E
from lessctl import train as T
from lessctl.cli import app
from lessctl.shards import ShardError

from .test_extract import TEXT


@pytest.fixture
def extracted(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text(TEXT)
    overrides = ["experiment=smoke", f"data.path={tmp_path / 'text.txt'}"]
    E.run(compose(*overrides), log=lambda *_: None)
    return overrides


def test_two_layer_training_loss_falls_and_beats_baselines(extracted, compose):
    out, metrics = T.run(compose(*extracted, "train.epochs=6"), log=lambda *_: None)
    assert [m["layer"] for m in metrics] == [0, 1]
    for m in metrics:
        h = m["history"]
        assert h[-1]["train_mse"] < h[0]["train_mse"]
        assert m["val_less_mse"] < m["val_untrained_mse"]
        assert (out / f"layer_{m['layer']:03d}.safetensors").exists()
    man, kernels = T.load_checkpoint(out)
    assert sorted(kernels) == [0, 1] and man["policy"] == "lambda"


def test_resume_skips_finished_layers(extracted, compose):
    logs = []
    T.run(compose(*extracted, "train.layers=[0]", "train.epochs=1"), log=logs.append)
    out, metrics = T.run(compose(*extracted, "train.epochs=1"), log=logs.append)
    assert any("layer 0: already trained" in m for m in logs)
    assert len(metrics) == 2


def test_h2o_trains(extracted, compose):
    _, metrics = T.run(
        compose(
            *extracted,
            "policy=h2o",
            "policy.budget.size=16",
            "policy.budget.of=sequence",
            "train.epochs=2",
        ),
        log=lambda *_: None,
    )
    assert all(m["policy"] == "h2o" and m["budget"] == 16 for m in metrics)


def test_snapkv_trains_with_its_baseline_plus(extracted, compose):
    over = ["policy=snapkv", "policy.budget.size=16", "policy.window=4", "train.layers=[0]"]
    _, metrics = T.run(compose(*extracted, *over, "train.epochs=1"), log=lambda *_: None)
    (m,) = metrics
    assert m["policy"] == "snapkv" and m["budget"] == 16 and m["budget_plus"] > 16
    assert m["val_baseline_plus_mse"] != m["val_baseline_mse"]  # the extra heavy tokens count


def test_bad_inputs_are_one_line(extracted, compose, tmp_path):
    with pytest.raises(ValueError, match="exceeds the context"):
        T.run(compose(*extracted, "policy.budget.size=65"), log=lambda *_: None)
    with pytest.raises(Exception, match="train.layers has 7"):
        T.run(compose(*extracted, "train.layers=[7]"), log=lambda *_: None)
    with pytest.raises(ShardError, match="run `lessctl extract`"):
        T.run(compose(*extracted, "extract.tokens=960"), log=lambda *_: None)  # not extracted
    # shards of another model
    src = E.extraction_dir(compose(*extracted))
    other = tmp_path / "other"
    shutil.copytree(src, other)
    man = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**man, "model": "llama2-7b"}))
    with pytest.raises(ShardError, match="come from model 'llama2-7b'"):
        T.run(compose(*extracted, f"train.activations={other}"), log=lambda *_: None)
    # an extraction from before per-layer views (window, softcap, scaling) is refused
    old = tmp_path / "old"
    shutil.copytree(src, old)
    man = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if k != "layers"}))
    with pytest.raises(ShardError, match="predates per-layer attention views"):
        T.run(compose(*extracted, f"train.activations={old}"), log=lambda *_: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match="manifest.json|no activations"):
        T.run(compose(*extracted, f"train.activations={empty}"), log=lambda *_: None)


def test_non_finite_loss_stops_layer_keeps_others(extracted, compose):
    _, metrics = T.run(compose(*extracted, "train.lr=1e30", "train.epochs=3"), log=lambda *_: None)
    assert len(metrics) == 2
    assert any(m["status"].startswith("stopped: non-finite") for m in metrics)


def test_cli_train_prints_table_and_error(extracted):
    runner = CliRunner()
    res = runner.invoke(app, ["train", *extracted, "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "Baseline+" in res.output and "LESS" in res.output
    res = runner.invoke(app, ["train", *extracted, "policy=nope"])
    assert res.exit_code == 2 and "allowed" in res.output


def test_multirun_fans_out_layers_with_joblib(extracted, compose, tmp_path):
    """`lessctl train -m train.layers=0,1 hydra/launcher=joblib threads=1`: one job per layer,
    each with one torch thread, in a real subprocess (Hydra reconfigures logging, so not
    through CliRunner)."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "lessctl",
        "train",
        "-m",
        *extracted,
        "train.epochs=1",
        "train.layers=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "threads=1",
        f"results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr
    man = json.loads((E.extraction_dir(compose(*extracted)) / "manifest.json").read_text())
    out = T.checkpoint_dir(compose(*extracted, "train.epochs=1"), man)
    assert (out / "layer_000.json").exists() and (out / "layer_001.json").exists()
    assert len(list((tmp_path / "sweep").glob("*/.hydra"))) == 2
    runs = (tmp_path / "results").glob("runs/train/*/meta.json")
    metas = [json.loads(p.read_text()) for p in runs]
    assert len(metas) == 2 and all(m["threads"] == 1 and m["status"] == "finished" for m in metas)


def test_incomplete_extraction_is_refused(extracted, compose):
    from lessctl.shards import ShardStore

    store = ShardStore(E.extraction_dir(compose(*extracted)))
    store.marker(2).unlink()  # as if extract was killed during chunk 2
    with pytest.raises(ShardError, match=r"incomplete \(5/6 chunks\)"):
        T.run(compose(*extracted), log=lambda *_: None)


def test_multirun_bad_override_is_one_line():
    res = CliRunner().invoke(
        app,
        [
            "train",
            "-m",
            "experiment=smoke",
            "train.layers=0,1",
            "policy=nope",
            "hydra/launcher=joblib",
        ],
    )
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown policy 'nope'" in lines[0]


def test_in_memory_and_streamed_training_agree_and_memory_reads_shards_once(
    extracted, compose, monkeypatch
):
    """train.memory_gb only decides where a layer's tensors live: held in memory (each shard
    read once per layer, whatever the epochs) or streamed from disk per epoch; the same seed
    gives the same kernels either way."""
    from lessctl.shards import ShardStore

    reads: list[tuple[int, int]] = []
    real_read = ShardStore.read

    def counting_read(self, layer, chunk):
        reads.append((layer, chunk))
        return real_read(self, layer, chunk)

    monkeypatch.setattr(ShardStore, "read", counting_read)
    over = [*extracted, "train.layers=[1]", "train.epochs=3"]
    _, (mem,) = T.run(compose(*over, "train.dir=${cache_dir}/k_mem"), log=lambda *_: None)
    assert mem["data_in"] == "memory" and len(reads) == len(set(reads)) == 6
    reads.clear()
    _, (disk,) = T.run(
        compose(*over, "train.dir=${cache_dir}/k_disk", "train.memory_gb=0"), log=lambda *_: None
    )
    assert disk["data_in"] == "stream" and len(reads) > 6  # re-read every epoch
    for key in ("val_less_mse", "val_untrained_mse", "best_epoch"):
        assert mem[key] == disk[key]
    assert [h["train_mse"] for h in mem["history"]] == [h["train_mse"] for h in disk["history"]]


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_decisions_made_for_many_chunks_at_once_equal_per_chunk(
    extracted, compose, policy, tmp_path
):
    """prepare() runs the policy over groups of chunks in one call; every chunk's evict_at (and
    its validation Baseline+'s) must be what the policy decides on that chunk alone."""
    import torch

    from lessctl.policies.base import layer_evict_at
    from lessctl.policies.budget import baseline_plus, build_policy

    cfg = compose(*extracted, f"policy={policy}")
    store = T.activations(cfg)
    man = store.manifest()
    pol = build_policy(cfg.policy, seq_len=man["seq_len"], max_position_embeddings=128)
    plus = baseline_plus(pol, int(cfg.less.rank), man["geometry"]["head_dim"], 4)
    chunks = store.done_chunks()

    def prepared(group_bytes: float) -> dict:
        data = T.LayerData(store, 1, pol, plus, man["scaling"], "cpu", tmp_path / "pre")
        data.GROUP_BYTES = group_bytes
        assert data.prepare(chunks[:-2], chunks[-2:]) == "memory"
        return data.resident

    together, alone = prepared(float("inf")), prepared(1)
    for c in chunks:
        raw = store.read(1, c)
        want = layer_evict_at(pol, raw["q"].float(), raw["k"].float(), man["scaling"])
        assert torch.equal(together[c]["evict_at"], want) and torch.equal(
            alone[c]["evict_at"], want
        )
        assert torch.equal(together[c]["sparse_out"], alone[c]["sparse_out"])
    assert torch.equal(together[chunks[-1]]["plus"], alone[chunks[-1]]["plus"])
