"""The shared test of the method registry (lessctl.methods.registry): every registered method is
built on the tiny model and run through the teacher-forced attention, and what the config
schema, `lessctl bench` and the report list comes from the registry. A newly registered method
is held by these tests with no test of its own."""

import math

import pytest
import torch

import lessctl.report as report
import lessctl.report.longctx as report_longctx
from lessctl import extract as E
from lessctl import train as T
from lessctl.errors import LessctlError
from lessctl.methods import (
    BENCH_METHODS,
    METHODS,
    REGISTRY,
    build_methods,
    labels,
    method_names,
    register_method,
    specs,
)
from lessctl.models import attention_geometry
from lessctl.tasks.perplexity import method_window_nll

from .test_extract import TEXT

SEQ = 48


@pytest.fixture
def smoke(compose, tmp_path, monkeypatch):
    """experiment=smoke on a small text file (the smoke policy: lambda, budget 16); `train()`
    trains kernels for it, for the methods that need trained ones."""
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    ov = ["experiment=smoke", f"data.path={tmp_path / 't.txt'}", "train.epochs=1"]

    def train() -> None:
        E.run(compose(*ov), log=lambda *_: None)
        T.run(compose(*ov), log=lambda *_: None)

    return ov, train


def test_names_order_and_labels_come_from_the_registry():
    assert METHODS == method_names() == tuple(s.name for s in specs())
    assert [s.order for s in specs()] == sorted(s.order for s in specs())
    assert METHODS[0] == "full"  # the reference heads every table
    assert BENCH_METHODS == tuple(s.name for s in specs() if s.bench)
    assert set(BENCH_METHODS) <= set(METHODS)
    assert report.ORDER == list(METHODS) and report.LABEL == labels()
    assert report_longctx.ORDER[: len(METHODS)] == list(METHODS)
    assert len(set(labels().values())) == len(METHODS)  # one column per method


def test_schema_allows_exactly_the_registered_methods(compose):
    compose(f"eval.methods=[{','.join(METHODS)}]", f"bench.methods=[{','.join(BENCH_METHODS)}]")
    with pytest.raises(LessctlError, match="eval.methods") as err:
        compose("eval.methods=[full,nope]")
    assert all(n in str(err.value) for n in METHODS)
    for n in set(METHODS) - set(BENCH_METHODS):
        with pytest.raises(LessctlError, match="bench.methods"):
            compose(f"bench.methods=[{n}]")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_method("full", "Full", 0)(lambda ctx: None)
    assert REGISTRY["full"].label == "Full"


@pytest.mark.parametrize("name", METHODS)
def test_every_registered_method_builds_and_runs(name, smoke, compose, tiny_model):
    """Each method's declared needs hold for what its builder makes, and it runs teacher-forced
    on the tiny model: Full equals the model's own loss, an evicting one differs from it."""
    spec = REGISTRY[name]
    ov, train = smoke
    if spec.kernels == "trained":
        train()
    model, _ = tiny_model
    geo = attention_geometry(model)
    cfg = compose(*ov, f"eval.methods=[{name}]")
    [m] = build_methods(cfg, geo, SEQ, "cpu", torch.float32)
    [base] = build_methods(compose(*ov, "eval.methods=[baseline]"), geo, SEQ, "cpu", torch.float32)
    assert m.name == name
    assert (m.kernels is None) == (spec.kernels is None)
    if m.kernels is not None:
        assert sorted(m.kernels) == list(range(geo["num_layers"]))
        trained = m.checkpoint is not None
        assert trained == (spec.kernels == "trained")
    cols = m.columns()
    assert {"trained_budget", "transfer", "extra_tokens"} <= set(cols)
    if spec.state_bytes:
        assert (
            cols["extra_tokens"] > 0
            and m.policy.budget == base.policy.budget + cols["extra_tokens"]
        )
    else:
        assert not cols["extra_tokens"]
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 256, (2, SEQ), generator=g)
    nll, count = method_window_nll(model, windows, m, batch_size=2)
    assert count == [SEQ - 1] * 2 and all(math.isfinite(x) for x in nll)
    ref = [model(w[None], labels=w[None]).loss.item() * (SEQ - 1) for w in windows]
    if m.policy.budget is None:
        assert nll == pytest.approx(ref, rel=1e-4)
    else:
        assert m.policy.budget < SEQ and nll != pytest.approx(ref, rel=1e-4)
