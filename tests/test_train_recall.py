"""policy=recall trains (shards) with decisions remade from the kernels after every epoch, and
evaluates with its kernels; the online source refuses it in one line."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lessctl import train as T
from lessctl.cli import app
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies.base import layer_evict_at
from lessctl.policies.budget import baseline_plus, build_policy

from .test_train import extracted  # noqa: F401  (the fixture)

RECALL = ["policy=recall", "policy.pool=4"]


def strong(geo: dict, seed: int = 1) -> LayerKernels:
    kc = KernelConfig(
        geo["num_heads"],
        geo["num_kv_heads"],
        geo["head_dim"],
        rank=4,
        hidden=32,
        dropout=0.0,
        init_scale=1.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LayerKernels(kc).eval()


@pytest.mark.parametrize("memory_gb", [None, 0])
def test_redecide_remakes_decisions_and_drops_stale_parts(
    extracted,  # noqa: F811
    compose,
    tmp_path,
    memory_gb,
):
    """Before: the base policy's decisions (no kernels yet); after redecide(kern): the
    decisions recall makes with kern, held in memory or re-read from disk (a stale precomputed
    file would give the old ones); Baseline+ stays the base policy with more tokens."""
    cfg = compose(*extracted, *RECALL)
    store = T.activations(cfg)
    man = store.manifest()
    pol = build_policy(cfg.policy, seq_len=man["seq_len"], max_position_embeddings=128)
    plus = baseline_plus(pol, int(cfg.less.rank), man["geometry"]["head_dim"], 4)
    chunks = store.done_chunks()
    mem = float("inf") if memory_gb is None else 0.0
    data = T.LayerData(store, 1, pol, plus, man["scaling"], "cpu", tmp_path / "pre", mem)
    data.prepare(chunks[:-2], chunks[-2:])
    kern = strong(man["geometry"])
    for c in chunks:
        raw = store.read(1, c)
        q, k, v = (raw[n].float() for n in ("q", "k", "v"))
        assert torch.equal(data.load(c)["evict_at"], pol.base.evict_at(q, k, man["scaling"]))
    mode = data.redecide(kern, chunks[:-2], chunks[-2:])
    assert mode == ("memory" if memory_gb is None else "stream")
    changed = 0
    for c in chunks:
        raw = store.read(1, c)
        q, k, v = (raw[n].float() for n in ("q", "k", "v"))
        want = layer_evict_at(pol, q, k, man["scaling"], v=v, kernels=kern)
        got = data.load(c, validation=c in chunks[-2:])
        assert torch.equal(got["evict_at"], want)
        changed += int(not torch.equal(want, pol.base.evict_at(q, k, man["scaling"])))
        if c in chunks[-2:]:
            ev_plus = layer_evict_at(plus, q, k, man["scaling"])
            assert torch.equal(ev_plus, plus.base.evict_at(q, k, man["scaling"]))
    assert changed == len(chunks)  # the kernels' state does change decisions


def test_each_epoch_trains_on_the_previous_epochs_kernels(extracted, compose, monkeypatch):  # noqa: F811
    """The runner remakes the decisions after every epoch, with the kernels of that moment."""
    calls: list[torch.Tensor] = []
    real = T.LayerData.redecide

    def spy(self, kernels, *a):
        calls.append(next(kernels.parameters()).detach().clone())
        return real(self, kernels, *a)

    monkeypatch.setattr(T.LayerData, "redecide", spy)
    _, (m,) = T.run(compose(*extracted, *RECALL, "train.layers=[0]", "train.epochs=3"))
    assert len(calls) == 3 and not torch.equal(calls[0], calls[1])
    assert m["policy"] == "recall" and m["status"] == "finished"
    assert m["val_less_mse"] < m["val_untrained_mse"]


def eval_rows(runner, *over: str) -> list[dict]:
    import json
    from pathlib import Path

    res = runner.invoke(app, ["eval", *over, "eval.windows=1"])
    assert res.exit_code == 0, res.output
    path = Path(res.output.strip().splitlines()[-1].split("→")[-1].strip())
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_trains_and_evaluates_recall(extracted):  # noqa: F811
    """`lessctl train/eval policy=recall experiment=smoke`: LESS reads the recall checkpoint;
    Baseline (no state to ask) is exactly h2o's at the same budget."""
    runner = CliRunner()
    res = runner.invoke(app, ["train", *extracted, *RECALL, "train.epochs=2"])
    assert res.exit_code == 0, res.output
    rows = eval_rows(runner, *extracted, *RECALL, "eval.methods=[baseline,less]")
    less = [r for r in rows if r["method"] == "less"]
    assert less and all(r["policy"] == "recall" and r["checkpoint"] for r in less)
    h2o = eval_rows(runner, *extracted, "policy=h2o", "eval.methods=[baseline]")
    base = {r["metric"]: r["value"] for r in rows if r["method"] == "baseline"}
    assert base == {r["metric"]: r["value"] for r in h2o if r["method"] == "baseline"}


def test_online_source_refuses_recall(extracted, compose):  # noqa: F811
    with pytest.raises(LessctlError, match="policy=recall .*train.source=shards only"):
        T.run(compose(*extracted, *RECALL, "train.source=online"))
