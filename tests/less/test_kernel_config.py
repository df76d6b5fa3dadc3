"""`kernel_config` (lessctl.less.kernels): the one KernelConfig built from a composed config."""

from dataclasses import asdict

import pytest

from lessctl.errors import InputError
from lessctl.less.kernels import KernelConfig, kernel_config, layer_ranks
from lessctl.methods.performer import performer_kernels
from lessctl.training.spec import kernel_config as training_kernel_config

GEO = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "num_layers": 2}


def test_kernel_config_reads_every_less_key_and_applies_overrides(compose):
    cfg = compose("less.rank=4", "less.hidden=24", "less.seed=3", "less.kind=performer")
    kc = kernel_config(cfg, GEO)
    assert kc == KernelConfig(
        4,
        2,
        16,
        rank=4,
        hidden=24,
        dropout=float(cfg.less.dropout),
        init_scale=float(cfg.less.init_scale),
        kind="performer",
        seed=3,
    )
    assert kc == training_kernel_config(cfg, GEO)  # what training builds: the same
    off = kernel_config(cfg, GEO, dropout=0.0, seed=7)
    assert asdict(off) == {**asdict(kc), "dropout": 0.0, "seed": 7}


def test_performer_kernels_are_seeded_per_layer(compose):
    cfg = compose("less.rank=4", "less.seed=2")
    kern = performer_kernels(cfg, GEO, "cpu")
    assert [k.cfg.seed for k in kern.values()] == [2000, 2001]
    assert all(k.cfg.kind == "performer" and k.cfg.rank == 4 for k in kern.values())


def test_a_rank_list_gives_each_layer_its_rank(compose):
    cfg = compose("less.rank=[6,2]", "less.hidden=24")
    assert [kernel_config(cfg, GEO, i).rank for i in (0, 1)] == [6, 2]
    one = kernel_config(compose("less.rank=6", "less.hidden=24"), GEO, 1)
    assert kernel_config(cfg, GEO, 0) == one  # all but the rank as an int rank gives them
    assert layer_ranks(6, 3) == [6, 6, 6] and layer_ranks(cfg.less.rank, 2) == [6, 2]
    with pytest.raises(InputError, match="is per layer: name the layer"):
        kernel_config(cfg, GEO)
    with pytest.raises(InputError, match=r"has 2 entries; allowed: .* list of 3 ints"):
        layer_ranks(cfg.less.rank, 3)
    kern = performer_kernels(cfg, GEO, "cpu")  # the untrained ablation: each layer's rank
    assert [k.net.omega.shape[-1] for k in kern.values()] == [6, 2]
