"""Online training (train.source=online): the same kernels as training from shards, resumable,
data parallel (lessctl/training/sources/online.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lessctl import extract as E
from lessctl import train as T
from lessctl.schema import SchemaError
from lessctl.training import loop
from lessctl.training.sources import online

from .test_extract import TEXT

QUIET = {"log": lambda *_: None}
# fp32 activations on both paths; the kernels pass through ~2 x 8 Adam steps: a few hundred fp32
# roundings of O(1) relative size each (eps 1.2e-7) bound the relative gap well below this
RTOL = 1e-4
# dropout on (each layer's own RNG stream), a batch that does not divide the 4-row chunks
# (row gathers), two epochs (the order reshuffled); 16 sequences: 3 training chunks, 1 validation
OVER = ["less.dropout=0.3", "train.batch_size=3", "train.epochs=2", "extract.tokens=1024"]


@pytest.fixture
def text(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text(TEXT)
    return ["experiment=smoke", f"data.path={tmp_path / 'text.txt'}", *OVER]


def _kernels(out) -> dict[int, dict[str, torch.Tensor]]:
    _, kernels = T.load_checkpoint(out)
    return {i: k.state_dict() for i, k in kernels.items()}


def _gap(a: dict, b: dict) -> float:
    """The largest relative difference of any kernel tensor of ``b``'s layers (relative to its
    largest entry in ``a``)."""
    assert b and set(b) <= set(a), (sorted(a), sorted(b))
    return max(
        float((a[i][n] - b[i][n]).abs().max() / a[i][n].abs().max().clamp(min=1e-30))
        for i in b
        for n in b[i]
    )


def test_online_gives_the_kernels_of_shards_training(text, compose, tmp_path, monkeypatch):
    cfg = compose(*text)
    E.run(cfg, **QUIET)
    shards_out, shards_m = T.run(cfg, **QUIET)
    before = {p for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    out, m = T.run(compose(*text, "train.source=online"), **QUIET)
    assert out != shards_out  # its own folder: the spec records the source
    written = {p for p in (tmp_path / "cache").rglob("*") if p.is_file()} - before
    assert written and all(p.parent == out for p in written)  # checkpoints only, no shards
    want = _kernels(shards_out)
    assert sorted(want) == [0, 1]
    assert sorted(_kernels(out)) == [0, 1] and _gap(want, _kernels(out)) < RTOL
    for a, b in zip(shards_m, m, strict=True):
        assert a["layer"] == b["layer"] and a["best_epoch"] == b["best_epoch"]
        for key in ("val_less_mse", "val_baseline_mse", "val_baseline_plus_mse"):
            assert b[key] == pytest.approx(a[key], rel=RTOL)
    man = json.loads((out / "manifest.json").read_text())
    assert man["data"]["train_source"] == "online" and man["data"]["tokens"] == 16 * 64

    # the comparison can fail (on layer 1, for time): a batch order shifted by one chunk, or a
    # wrong target
    text = [*text, "train.layers=[1]"]
    real_plan = online.batch_plan

    def shifted(items, batch_size, rng):
        plan = list(real_plan(items, batch_size, rng))
        return plan[1:] + plan[:1] if rng is not None else plan

    monkeypatch.setattr(online, "batch_plan", shifted)
    out2, _ = T.run(compose(*text, "train.source=online", "train.dir=${cache_dir}/k2"), **QUIET)
    assert _gap(want, _kernels(out2)) > 100 * RTOL
    monkeypatch.setattr(online, "batch_plan", real_plan)
    real_fixed = online.fixed_part

    def wrong_target(*a, **kw):
        pre = real_fixed(*a, **kw)
        return {**pre, "target": pre["target"] * 1.01}

    monkeypatch.setattr(online, "fixed_part", wrong_target)
    out3, _ = T.run(compose(*text, "train.source=online", "train.dir=${cache_dir}/k3"), **QUIET)
    assert _gap(want, _kernels(out3)) > 100 * RTOL


def test_online_trains_the_selected_layers_and_skips_finished(text, compose):
    cfg = compose(*text, "train.source=online", "train.layers=[1]", "train.epochs=1")
    out, m = T.run(cfg, **QUIET)
    assert [x["layer"] for x in m] == [1] and not (out / "layer_000.json").exists()
    logs: list[str] = []
    _, m = T.run(compose(*text, "train.source=online", "train.epochs=1"), log=logs.append)
    assert [x["layer"] for x in m] == [0, 1]
    assert any("layer 1: already trained" in x for x in logs)
    assert any("peak memory" in x for x in logs)


def test_interrupted_online_run_resumes_to_the_same_kernels(text, compose, monkeypatch):
    over = [*text, "train.source=online", "train.save_every=2"]
    full, _ = T.run(compose(*over, "train.dir=${cache_dir}/uninterrupted"), **QUIET)
    real_step, calls = loop.LayerTrainer.step, []

    def dying_step(self, *a, **kw):
        calls.append(1)
        if len(calls) == 17:  # mid-epoch 2 (6 batches × 2 layers an epoch), after a save
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(loop.LayerTrainer, "step", dying_step)
    cfg = compose(*over)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, **QUIET)
    out = T.checkpoint_dir(cfg, {"hash": _text_hash(cfg), "train_source": "online"})
    path = online.resume_state_path(out, [0, 1])
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 2 and 0 < state["pos"]
    assert not list(out.glob("layer_*.lock"))  # released on the way out
    monkeypatch.setattr(loop.LayerTrainer, "step", real_step)
    logs: list[str] = []
    T.run(cfg, log=logs.append)
    assert any("resuming at epoch 2" in x for x in logs)
    assert _gap(_kernels(full), _kernels(out)) < RTOL
    assert not path.exists()


def _text_hash(cfg) -> str:
    from lessctl.shards import config_hash

    return config_hash(E.extraction_spec(cfg))


def test_bad_source_is_one_line(compose):
    with pytest.raises(SchemaError, match=r"train.source='disk' is invalid; allowed: shards, on"):
        compose("train.source=disk")
    with pytest.raises(SchemaError, match=r"train.save_every=0"):
        compose("train.save_every=0")


def test_two_gloo_processes_with_batch_b_give_the_kernels_of_one_with_2b(text, compose, tmp_path):
    """`torchrun --standalone --nproc_per_node=2 -m lessctl train train.source=online`: each
    global batch of 2 x b rows is split across the ranks, gradients averaged (gloo on CPU)."""
    import os
    import subprocess
    import sys

    over = [*text[:2], "train.source=online", "train.epochs=1", "train.layers=[1]"]
    one, _ = T.run(compose(*over, "train.batch_size=4"), **QUIET)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lessctl",
        "train",
        *over,
        "train.batch_size=2",
        "threads=1",
        f"results_dir={tmp_path}/results",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = compose(*over, "train.batch_size=2")
    two = T.checkpoint_dir(cfg, {"hash": _text_hash(cfg), "train_source": "online", "world": 2})
    m = json.loads((two / "layer_001.json").read_text())
    assert m["status"] == "finished"
    # averaging two half-batch gradients reorders fp32 sums: still within RTOL after 4 steps
    assert _gap(_kernels(one), _kernels(two)) < RTOL
    # one run folder with rows (rank 0), not two
    assert len(list((tmp_path / "results").glob("runs/train/*/rows.jsonl"))) == 1


def test_submitit_local_sweep_runs_jobs_and_checkpoints_land(text, compose, tmp_path):
    """`lessctl train -m ... hydra/launcher=submitit_local`: the code path of submitit_slurm
    minus sbatch; two points (one layer each) as two submitit jobs into one checkpoint."""
    import os
    import subprocess
    import sys

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the dev extra installs it
    over = [*text[:2], "train.source=online", "train.epochs=1"]
    cmd = [
        sys.executable,
        "-m",
        "lessctl",
        "train",
        "-m",
        *over,
        "train.layers=0,1",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "threads=1",
        f"results_dir={tmp_path}/results",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Submitit 'local' sweep" in res.stdout + res.stderr
    jobs = list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 2  # two submitit jobs ran and returned
    cfg = compose(*over)
    out = T.checkpoint_dir(cfg, {"hash": _text_hash(cfg), "train_source": "online"})
    _, kernels = T.load_checkpoint(out)
    assert sorted(kernels) == [0, 1]
    metas = [
        json.loads(p.read_text()) for p in (tmp_path / "results").glob("runs/train/*/meta.json")
    ]
    assert len(metas) == 2 and all(m["status"] == "finished" for m in metas)


def test_one_pass_trains_several_policies_and_budgets_as_separate_runs(text, compose, monkeypatch):
    """`train.policies=[lambda,h2o] train.budgets=[12,16]`: four targets fed by one forward pass
    per batch; each target's kernels land in the folder a separate run names and equal that
    run's; the pass runs the model as often as one target's run does."""
    from lessctl.training.runner import run_all

    base = [*text, "train.source=online", "train.epochs=1", "train.batch_size=2"]
    over = [*base, "train.policies=[lambda,h2o]", "train.budgets=[12,16]"]
    calls: list[int] = []
    real_forward = online.use_attention

    def counting(*a, **kw):
        calls.append(1)
        return real_forward(*a, **kw)

    monkeypatch.setattr(online, "use_attention", counting)
    done = run_all(compose(*over), **QUIET, overrides=over)
    shared_calls = len(calls)
    assert [(c.policy.name, c.policy.budget.size) for c, _, _ in done] == [
        ("lambda", 12),
        ("lambda", 16),
        ("h2o", 12),
        ("h2o", 16),
    ]
    assert len({out for _, out, _ in done}) == 4
    for _, _, metrics in done:
        assert [m["layer"] for m in metrics] == [0, 1] and metrics[0]["pass_targets"] == 4
    calls.clear()
    alone = [*base, "policy=h2o", "policy.budget.size=12", "train.dir=${cache_dir}/alone"]
    out, _ = T.run(compose(*alone), **QUIET)
    assert len(calls) == shared_calls  # one pass served four targets
    h2o12 = done[2][1]
    assert out.name == h2o12.name  # the folder a separate run names
    assert _gap(_kernels(out), _kernels(h2o12)) < RTOL
    lam16 = done[1][1]
    assert _gap(_kernels(out), _kernels(lam16)) > 100 * RTOL  # the targets differ

    # a pass that fed every target the first target's decisions would fail the comparison
    real_decisions, first = online.decisions, {}

    def first_only(policy, *a, **kw):
        return real_decisions(first.setdefault("p", policy), *a, **kw)

    monkeypatch.setattr(online, "decisions", first_only)
    wrong = [*over, "train.dir=${cache_dir}/wrong"]
    bad = run_all(compose(*wrong), **QUIET, overrides=wrong)
    assert _gap(_kernels(out), _kernels(bad[2][1])) > 100 * RTOL


def test_several_trainings_need_valid_names(compose, text):
    from lessctl.config import ConfigError
    from lessctl.training.targets import target_configs

    over = [*text, "train.policies=[lambda,nope]"]
    with pytest.raises(ConfigError, match=r"'nope' is not a policy; allowed: .*h2o"):
        target_configs(compose(*over), over)
    over = [*text, "train.policies=[h2o,h2o]"]
    with pytest.raises(ConfigError, match=r"\(h2o, None\) twice"):
        target_configs(compose(*over), over)
    with pytest.raises(ConfigError, match="need the run's overrides"):
        target_configs(compose(*over), None)
    # a run's own policy override is replaced; other overrides are kept
    over = [*text, "policy=tova", "policy.budget.size=8", "train.policies=[h2o]"]
    (only,) = target_configs(compose(*over), over)
    assert only.policy.name == "h2o" and only.policy.budget.size == 8
    assert only.train.policies is None and only.less.dropout == 0.3
