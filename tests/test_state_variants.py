"""State variants (``less.state``, lessctl.less.states) beyond the shared conformance test
(tests/less/test_kernel_families.py): what ``multi`` computes, that it trains, that a
checkpoint is matched by its variant, and that the paper's default keeps its folder names.

Mutations these tests catch: a router that is a no-op or not trained (its gradients cut), gates
that do not sum to one over the states, linear and log writes that disagree, a multi checkpoint
evaluated as a sum one (or the other way round), a default config whose spec gains the new keys
(every earlier checkpoint folder renamed), rows that do not say which variant they ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from lessctl import train as T
from lessctl.cli import app
from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import load_less
from lessctl.models import attention_geometry
from lessctl.policies import build_policy
from lessctl.runs import list_runs
from lessctl.training.checkpoints import checkpoint_dir
from lessctl.training.spec import train_spec

from .test_rank_per_layer import extracted  # noqa: F401, F811 (the smoke extraction fixture)

MULTI = ("less.state=multi", "less.states=2", "less.rank=4")


def _kernels(state: str = "multi", states: int = 2, kind: str = "learned") -> LayerKernels:
    kc = KernelConfig(4, 2, 16, rank=4, hidden=8, dropout=0.0, init_scale=0.5, kind=kind)
    torch.manual_seed(0)
    return LayerKernels(KernelConfig(**{**kc.__dict__, "state": state, "states": states})).eval()


@torch.no_grad()
def test_multi_writes_each_key_into_its_states_as_a_soft_mix():
    mod = _kernels()
    k = torch.randn(3, 2, 7, 16)
    psi = mod.net.psi(k)  # the family's features, before the router
    mixed = mod.psi(k).view(3, 2, 7, 2, 2) / psi.view(3, 2, 7, 2, 2)  # g_m on state m's rows
    g = mixed[..., 0]
    assert torch.allclose(mixed[..., 1], g, rtol=1e-5)  # one gate per state
    assert torch.allclose(g.sum(-1), torch.ones(3, 2, 7), rtol=1e-5)  # a mix
    assert float(g.std(dim=2).max()) > 1e-3  # the router tells keys apart
    # linear and log writes are the same map
    assert torch.allclose(mod.log_psi(k), torch.log(mod.psi(k)), rtol=1e-5, atol=1e-6)
    # reads are phi's own: every state is read by its rows of phi(q)
    q = torch.randn(3, 4, 7, 16)
    assert torch.equal(mod.phi(q), mod.net.phi(q))


def test_the_router_gets_gradients():
    mod = _kernels().train()
    k = torch.randn(2, 2, 5, 16)
    (mod.psi(k) * torch.randn(2, 2, 5, 4)).sum().backward()
    assert float(mod.state_map.W.grad.abs().sum()) > 0
    assert float(mod.state_map.b.grad.abs().sum()) > 0


def test_multi_trains_evaluates_and_is_matched_by_its_variant(extracted, compose, tiny_model):  # noqa: F811
    geo = attention_geometry(tiny_model[0])
    out_sum, _ = T.run(compose(*extracted, "less.rank=4"), log=lambda *_: None)
    out, metrics = T.run(compose(*extracted, *MULTI), log=lambda *_: None)
    assert out != out_sum and [m["layer"] for m in metrics] == [0, 1]
    man, kernels = T.load_checkpoint(out)
    assert (man["kernel"]["state"], man["kernel"]["states"]) == ("multi", 2)
    # the router trained with the kernels: its bias starts at 0
    assert kernels[0].state_map.W.shape == (geo["num_kv_heads"], 4, 2)
    assert float(kernels[0].state_map.b.detach().abs().sum()) > 0
    pol = build_policy(compose(*extracted).policy, seq_len=64, max_position_embeddings=512)
    # a sum checkpoint is not a multi one, nor the other way round: one line each
    with pytest.raises(LessctlError, match="less.state=sum \\(evaluating less.state=multi\\)"):
        load_less(compose(*extracted, *MULTI, f"less.ckpt={out_sum}"), geo, "cpu", pol)
    with pytest.raises(LessctlError, match="less.state=multi \\(evaluating less.state=sum\\)"):
        load_less(compose(*extracted, "less.rank=4", f"less.ckpt={out}"), geo, "cpu", pol)
    # eval finds it by its variant; rows name the variant
    res = CliRunner().invoke(app, ["eval", *extracted, *MULTI, "eval.methods=[baseline_plus,less]"])
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    rows = {(r["method"], r["metric"]): r for r in run.rows()}
    less = rows[("less", "ppl_token")]
    assert less["checkpoint"] == str(out) and less["state_variant"] == "multi x2"
    assert less["state_ranks"] == [4, 4] and math.isfinite(less["value"])
    assert rows[("baseline_plus", "ppl_token")]["state_variant"] is None


def test_the_papers_state_keeps_the_checkpoint_folder_names(compose):
    man = {"hash": "acts"}
    plain = compose("model=tiny-random")
    assert {"state", "states"}.isdisjoint(train_spec(plain, man)["less"])
    multi = compose("model=tiny-random", *MULTI)
    assert train_spec(multi, man)["less"]["state"] == "multi"
    assert checkpoint_dir(multi, man) != checkpoint_dir(
        compose("model=tiny-random", "less.rank=4"), man
    )


def test_every_variant_preset_composes_at_the_papers_bytes(compose):
    """conf/variant/*: each composes under experiment=variants, passes the schema and holds the
    paper's state bytes (rank 8), so the variants study compares at equal bytes."""
    from pathlib import Path

    conf = Path(__file__).resolve().parent.parent / "conf" / "variant"
    names = sorted(p.stem for p in conf.glob("*.yaml"))
    assert {"paper", "light", "hedgehog", "multi2", "multi4"} <= set(names)
    kinds = set()
    for name in names:
        cfg = compose("experiment=variants", f"variant={name}")
        assert int(cfg.less.rank) == 8 and cfg.run_name == "variants"
        kinds.add((cfg.less.kind, cfg.less.state, int(cfg.less.states)))
    assert len(kinds) == len(names)  # no two presets are the same sidekick
    paper = compose("experiment=variants", "variant=paper")
    assert (paper.less.kind, paper.less.state) == ("learned", "sum")
