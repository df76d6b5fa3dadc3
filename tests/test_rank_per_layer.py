"""``less.rank`` as one rank per layer (``less.rank=[r0, r1, ...]``): each layer's kernels, its
checkpoint, its cache state and Baseline+'s equal bytes follow that layer's rank.

Mutations these tests catch: a list resolved by another layer's index (mixed ranks: layer 0 has
rank 2, layer 1 rank 4, and the reversed list is refused), a uniform list that builds other
kernels than the int (other seed, other config), a cache or checkpoint that assumes one rank for
every layer, Baseline+ given the first, largest or summed rank instead of the mean state bytes.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lessctl import extract as E
from lessctl import train as T
from lessctl.cli import app
from lessctl.errors import LessctlError
from lessctl.less.kernels import LayerKernels, kernel_config
from lessctl.methods import build_methods, load_less
from lessctl.models import attention_geometry
from lessctl.policies import build_policy, get_policy
from lessctl.runs import list_runs
from lessctl.schema import SchemaError
from tests.test_cache import parallel_logits, streamed_with_cache

from .test_extract import TEXT

MIXED = "less.rank=[2,4]"  # tiny-random has 2 layers


@pytest.fixture
def extracted(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    ov = ["experiment=smoke", f"data.path={tmp_path / 't.txt'}", "train.epochs=1"]
    E.run(compose(*ov), log=lambda *_: None)
    return ov


def _policy(cfg, seq_len=64):
    return build_policy(cfg.policy, seq_len=seq_len, max_position_embeddings=512)


def test_a_uniform_list_trains_the_same_kernels_as_the_int(extracted, compose, tiny_model):
    model = tiny_model[0]
    geo = attention_geometry(model)
    out_int, _ = T.run(compose(*extracted), log=lambda *_: None)
    out_list, _ = T.run(compose(*extracted, "less.rank=[8,8]"), log=lambda *_: None)
    assert out_int != out_list  # its own folder (the spec holds the list), same kernels in it
    _, k_int = T.load_checkpoint(out_int)
    man, k_list = T.load_checkpoint(out_list)
    assert man["kernel"]["rank"] == [8, 8]
    for i in (0, 1):
        assert k_int[i].cfg == k_list[i].cfg
        a, b = k_int[i].state_dict(), k_list[i].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    pol = _policy(compose(*extracted))
    want = parallel_logits(model, ids, pol, {i: k.eval() for i, k in k_int.items()})
    assert torch.equal(
        parallel_logits(model, ids, pol, {i: k.eval() for i, k in k_list.items()}), want
    )
    # an int checkpoint serves an evaluation at the uniform list (and the other way round)
    ck = load_less(compose(*extracted, "less.rank=[8,8]", f"less.ckpt={out_int}"), geo, "cpu", pol)
    assert [ck.kernels[i].cfg.rank for i in (0, 1)] == [8, 8]
    ck = load_less(compose(*extracted, f"less.ckpt={out_list}"), geo, "cpu", pol)
    assert ck.path == str(out_list)


def test_mixed_ranks_train_evaluate_and_stream(extracted, compose, tiny_model, tmp_path):
    model = tiny_model[0]
    geo = attention_geometry(model)
    out, metrics = T.run(compose(*extracted, MIXED), log=lambda *_: None)
    assert [m["layer"] for m in metrics] == [0, 1]
    man, kernels = T.load_checkpoint(out)
    assert man["kernel"]["rank"] == [2, 4]
    for i, r in ((0, 2), (1, 4)):
        assert kernels[i].cfg.rank == r
        assert kernels[i].net.W2q.shape[-1] == kernels[i].net.W2k.shape[-1] == r
    # the reversed list or one rank is another kernel shape: refused in one line
    pol = _policy(compose(*extracted))
    for other in ("less.rank=[4,2]", "less.rank=4"):
        with pytest.raises(LessctlError, match="trained for less.rank=") as err:
            load_less(compose(*extracted, other, f"less.ckpt={out}"), geo, "cpu", pol)
        assert "\n" not in str(err.value)
    # a manifest that says [4, 2] over layer files of [2, 4]: the files' ranks decide
    lying = tmp_path / "lying"
    shutil.copytree(out, lying)
    (lying / "manifest.json").write_text(
        json.dumps({**man, "kernel": {**man["kernel"], "rank": [4, 2]}})
    )
    with pytest.raises(LessctlError, match="layer 0 has rank 2; evaluating less.rank=4"):
        load_less(compose(*extracted, "less.rank=[4,2]", f"less.ckpt={lying}"), geo, "cpu", pol)
    # eval finds the checkpoint by its ranks and evaluates perplexity
    res = CliRunner().invoke(
        app, ["eval", *extracted, MIXED, "eval.methods=[baseline,baseline_plus,less]"]
    )
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    rows = {(r["method"], r["metric"]): r for r in run.rows()}
    less = rows[("less", "ppl_token")]
    assert less["checkpoint"] == str(out) and less["state_ranks"] == [2, 4]
    assert math.isfinite(less["value"]) and less["value"] > 1
    assert rows[("baseline", "ppl_token")]["state_ranks"] is None
    assert rows[("baseline_plus", "ppl_token")]["state_ranks"] == [2, 4]
    # the real-eviction cache with the loaded kernels equals the parallel form; each layer's
    # state has its own rank
    loaded = load_less(compose(*extracted, MIXED, f"less.ckpt={out}"), geo, "cpu", pol).kernels
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = parallel_logits(model, ids, pol, loaded)
    got, cache = streamed_with_cache(model, ids, pol, loaded)
    assert (got - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)
    assert [layer.state.H.shape[-2] for layer in cache.layers] == [2, 4]
    assert [layer.state.z.shape[-1] for layer in cache.layers] == [2, 4]


def test_strong_mixed_rank_kernels_stream_as_the_parallel_form(compose, tiny_model):
    """Kernels built from the config (kernel_config per layer) with a weight that makes the
    state change the logits: the cache's recurrent form still equals the parallel form."""
    model = tiny_model[0]
    geo = attention_geometry(model)
    cfg = compose("model=tiny-random", MIXED)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        kern = {
            i: LayerKernels(kernel_config(cfg, geo, i, dropout=0.0, init_scale=1.0)).eval()
            for i in (0, 1)
        }
    assert [kern[i].cfg.rank for i in (0, 1)] == [2, 4]
    pol = get_policy("lambda", sink=2, recent=10)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = parallel_logits(model, ids, pol, kern)
    got, _ = streamed_with_cache(model, ids, pol, kern)
    assert (got - ref).abs().max().item() <= 1e-5 * max(ref.abs().max().item(), 1.0)
    assert (got - parallel_logits(model, ids, pol, None)).abs().max().item() > 1e-3


def test_a_wrong_length_or_a_zero_rank_is_refused_in_one_line(extracted, compose, tiny_model):
    geo = attention_geometry(tiny_model[0])
    with pytest.raises(SchemaError, match=r"less.rank=\[2, 0\] is invalid; allowed: an int") as e:
        compose("less.rank=[2,0]")
    assert "\n" not in str(e.value)
    with pytest.raises(SchemaError, match="hedgehog; allowed: even"):
        compose("less.rank=[2,3]", "less.kind=hedgehog")
    compose("less.rank=[2,6]", "less.kind=hedgehog")  # every entry even: allowed
    bad = compose(*extracted, "less.rank=[2,4,6]")  # the schema does not know the layers
    want = r"less.rank=\[2, 4, 6\] has 3 entries; allowed: an int >= 1 or a list of 2 ints"
    for attempt in (
        lambda: T.run(bad, log=lambda *_: None),
        lambda: T.run(compose(*extracted, "less.rank=[2,4,6]", "train.source=online"), log=print),
        lambda: build_methods(bad, geo, 64, "cpu", torch.float32),  # any method: eval refuses
        lambda: kernel_config(bad, geo, 0),
    ):
        with pytest.raises(LessctlError, match=want) as e:
            attempt()
        assert "\n" not in str(e.value)


def test_baseline_plus_gets_the_mean_state_bytes(compose, tiny_model):
    """bf16 K/V, d=16: a token's K+V are 64 bytes, a rank-R state (R d + R) * 4 = 68 R bytes,
    so the first, largest, summed and mean rank of [2, 14] give 2, 15, 17 and 8 tokens."""
    geo = attention_geometry(tiny_model[0])

    def plus(*ov):
        cfg = compose("model=tiny-random", "eval.methods=[baseline,baseline_plus]", *ov)
        base, m = build_methods(cfg, geo, 64, "cpu", torch.bfloat16)
        assert m.policy.budget == base.policy.budget + m.extra_tokens
        return m

    mean = plus("less.rank=8")
    got = plus("less.rank=[2,14]")
    assert got.extra_tokens == mean.extra_tokens == 8 and got.policy == mean.policy
    assert got.columns()["state_ranks"] == [2, 14] and mean.columns()["state_ranks"] == [8, 8]
    # a mean that is no whole rank: the tokens nearest the mean state's bytes, 3.5 * 68 = 238
    odd = plus("less.rank=[3,4]")
    assert abs(odd.extra_tokens * 64 - 238) <= 32 and odd.extra_tokens == 4


def test_checkpoint_folders_and_method_digests_tell_rank_lists_apart(compose, tiny_model):
    """A rerun at less.rank=[4,2] must neither train into nor read back [2,4]'s results."""
    from lessctl.tasks.longcontext import method_digest
    from lessctl.training.checkpoints import checkpoint_dir

    model = tiny_model[0]
    geo = attention_geometry(model)
    man = {"hash": "acts"}  # the extraction: the same for all three
    ranks = ("less.rank=[2,4]", "less.rank=[4,2]", "less.rank=4")
    cfgs = [compose("model=tiny-random", r) for r in ranks]
    assert len({checkpoint_dir(c, man) for c in cfgs}) == 3
    digests = {
        method_digest(model, build_methods(c, geo, 64, "cpu", torch.float32)[0])
        for c in (compose("model=tiny-random", "eval.methods=[performer]", r) for r in ranks)
    }
    assert len(digests) == 3


def test_bench_builds_untrained_kernels_of_each_layers_rank(compose, tiny_model, tmp_path):
    """Without a checkpoint bench measures untrained kernels of the same shapes: per layer."""
    from lessctl.bench.measure import bench_kernels

    geo = attention_geometry(tiny_model[0])
    cfg = compose("model=tiny-random", MIXED, f"train.dir={tmp_path / 'none'}")
    kernels, cols = bench_kernels(cfg, geo, "cpu", get_policy("lambda", sink=2, recent=6))
    assert cols["kernels"] == "untrained" and cols["state_ranks"] == [2, 4]
    assert [kernels[i].net.W2k.shape[-1] for i in (0, 1)] == [2, 4]
