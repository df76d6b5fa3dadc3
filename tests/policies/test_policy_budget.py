"""Budget configs, one-line errors and Baseline+."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lessctl.errors import LessctlError
from lessctl.policies import (
    H2O,
    POLICIES,
    TOVA,
    Full,
    LambdaMask,
    RandomPolicy,
    Recent,
    SnapKV,
    baseline_plus,
    build_policy,
    get_policy,
    state_tokens,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "policy"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_has_a_yaml_that_builds(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    p = build_policy(cfg, seq_len=4096, max_position_embeddings=4096)
    assert p.name == name == cfg["name"]


def test_official_fractions_llama2_7b():
    cfg = yaml.safe_load((CONF / "h2o.yaml").read_text())
    assert build_policy(cfg, seq_len=4096, max_position_embeddings=4096) == H2O(102, 102)
    lam = {"name": "lambda", "budget": {"size": 0.05, "of": "max_position_embeddings"}, "sink": 4}
    assert build_policy(lam, seq_len=4096, max_position_embeddings=4096) == LambdaMask(4, 200)
    tova = {"name": "tova", "budget": {"size": 0.1, "of": "sequence"}}
    assert build_policy(tova, seq_len=1000, max_position_embeddings=4096) == TOVA(100)
    rnd = {"name": "random", "budget": {"size": 64}, "seed": 3}
    assert build_policy(rnd, seq_len=100, max_position_embeddings=4096) == RandomPolicy(64, 3)
    h2o_int = {"name": "h2o", "budget": {"size": 11}, "heavy_ratio": 0.5}
    assert build_policy(h2o_int, seq_len=100, max_position_embeddings=4096) == H2O(5, 6)
    assert build_policy({"name": "full"}, seq_len=10, max_position_embeddings=10) == Full()


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"name": "nope", "budget": {"size": 8}}, "allowed: composite, full, h2o, lambda, random"),
        ({"name": "tova", "budget": {"size": 0}}, "size=0"),
        ({"name": "tova", "budget": {"size": -3}}, "size=-3"),
        ({"name": "tova", "budget": {"size": 0.0}}, "size=0.0"),
        ({"name": "tova", "budget": {"size": 1.5}}, "size=1.5"),
        ({"name": "tova", "budget": {"size": 4097}}, "exceeds the context of 4096"),
        ({"name": "tova", "budget": {"size": 0.5, "of": "sequence"}}, None),
        ({"name": "tova", "budget": {"size": 0.05, "of": "prompt"}}, "of='prompt'"),
        ({"name": "recent", "budget": {"size": 0.0001}}, "gives 0 tokens"),
        ({"name": "lambda", "budget": {"size": 4}, "sink": 4}, "sink=4"),
        ({"name": "h2o", "budget": {"size": 8}, "heavy_ratio": 2.0}, "heavy_ratio=2.0"),
        ({"name": "snapkv", "budget": {"size": 8}, "window": 9}, "window=9"),
        ({"name": "snapkv", "budget": {"size": 8}, "window": 0}, "window=0"),
        ({"name": "snapkv", "budget": {"size": 8}, "window": 1.0}, "window=1.0"),
        ({"name": "snapkv", "budget": {"size": 8}, "kernel": 4}, "kernel=4"),
        ({"name": "snapkv", "budget": {"size": 8}, "pooling": "sum"}, "pooling='sum'"),
        ({"name": "snapkv", "budget": {"size": 8}, "window": 8}, "window=8"),
        ({"name": "snapkv", "budget": {"size": 8}, "pool_across_window": "yes"}, "'yes'"),
        ({"name": "tova", "budget": {"size": 8}, "per_head": 1}, "per_head=1"),
    ],
)
def test_bad_budgets_are_one_line_value_errors(cfg, needle):
    if needle is None:  # a valid control case
        assert build_policy(cfg, seq_len=4096, max_position_embeddings=4096).budget == 2048
        return
    with pytest.raises(ValueError) as err:
        build_policy(cfg, seq_len=4096, max_position_embeddings=4096)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg


def test_budget_larger_than_context_fraction_of_max_positions():
    cfg = {"name": "h2o", "budget": {"size": 0.5, "of": "max_position_embeddings"}}
    with pytest.raises(ValueError, match="exceeds the context of 1000"):
        build_policy(cfg, seq_len=1000, max_position_embeddings=4096)


def test_baseline_plus_adds_state_memory():
    assert baseline_plus(H2O(102, 102), rank=8, head_dim=128, kv_bytes=4) == H2O(104, 104)
    assert baseline_plus(LambdaMask(4, 200), rank=8, head_dim=128, kv_bytes=4) == LambdaMask(4, 204)
    assert baseline_plus(TOVA(204), rank=8, head_dim=128, kv_bytes=4) == TOVA(208)
    assert baseline_plus(Recent(10), rank=8, head_dim=128, kv_bytes=4) == Recent(14)
    assert baseline_plus(RandomPolicy(10, 5), rank=8, head_dim=128, kv_bytes=4) == RandomPolicy(
        14, 5
    )
    assert baseline_plus(Full(), rank=8, head_dim=128, kv_bytes=4) == Full()
    assert baseline_plus(SnapKV(100, 32, 7, "max"), rank=8, head_dim=128, kv_bytes=4) == SnapKV(
        104, 32, 7, "max"
    )
    assert (
        baseline_plus(H2O(10, 10), rank=16, head_dim=64, kv_bytes=4).budget == 20 + 8
    )  # round(8.125)


def test_baseline_plus_counts_bytes_not_numbers():
    # bf16/fp16 K/V (2 bytes) beside the fp32 state: the state is worth twice the tokens
    assert state_tokens(8, 128, kv_bytes=4) == 4 and state_tokens(8, 128, kv_bytes=2) == 8
    assert baseline_plus(LambdaMask(4, 200), rank=8, head_dim=128, kv_bytes=2) == LambdaMask(4, 208)
    assert baseline_plus(H2O(102, 102), rank=8, head_dim=128, kv_bytes=2) == H2O(106, 106)
    # an fp16 state beside fp16 K/V is numbers again
    assert state_tokens(8, 128, kv_bytes=2, state_bytes=2) == 4


def test_registry_and_budgets():
    assert get_policy("h2o", heavy=3, recent=2).budget == 5
    assert Full().budget is None
    with pytest.raises(ValueError, match="unknown policy 'x'; allowed: composite, full, h2o"):
        get_policy("x")
    with pytest.raises(ValueError):
        LambdaMask(4, 0)


def test_snapkv_budget_splits_into_window_and_heavy():
    cfg = yaml.safe_load((CONF / "snapkv.yaml").read_text())
    p = build_policy(cfg, seq_len=4096, max_position_embeddings=4096)
    # one token of the budget is the decoded one (SnapKV's capacity is budget - 1)
    assert p == SnapKV(heavy=101, window=102, kernel=5, pooling="avg") and p.budget == 204
    tokens = {"name": "snapkv", "budget": {"size": 64}, "window": 16, "pooling": "max"}
    assert build_policy(tokens, seq_len=512, max_position_embeddings=512) == SnapKV(
        47, 16, 5, "max"
    )
    share = {"name": "snapkv", "budget": {"size": 10}, "window": 0.25, "kernel": 7}
    assert build_policy(share, seq_len=512, max_position_embeddings=512) == SnapKV(7, 2, 7)
    # lessctl's earlier variant: the window counts the decoded token
    across = {**tokens, "pool_across_window": True}
    assert build_policy(across, seq_len=512, max_position_embeddings=512) == SnapKV(
        48, 16, 5, "max", pool_across_window=True
    )
    tiny = {"name": "snapkv", "budget": {"size": 1}, "window": 0.5, "pool_across_window": True}
    assert build_policy(tiny, seq_len=512, max_position_embeddings=512) == SnapKV(
        0, 1, pool_across_window=True
    )  # at least one window token
    for cfg in (tokens, across):
        assert build_policy(cfg, seq_len=512, max_position_embeddings=512).budget == 64


def test_tova_per_head_is_a_config_key():
    tova = {"name": "tova", "budget": {"size": 12}}
    assert build_policy(tova, seq_len=64, max_position_embeddings=64) == TOVA(12)
    per_head = {**tova, "per_head": True}
    assert build_policy(per_head, seq_len=64, max_position_embeddings=64) == TOVA(12, True)
    assert baseline_plus(TOVA(12, True), rank=8, head_dim=128, kv_bytes=4) == TOVA(16, True)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["policy=tova", "policy.per_head=abc"], "policy.per_head='abc' is invalid"),
        (["policy=snapkv", "policy.pool_across_window=2"], "policy.pool_across_window=2"),
    ],
)
def test_policy_flags_are_checked_where_the_config_enters(compose, overrides, needle):
    with pytest.raises(LessctlError) as err:
        compose(*overrides)
    assert "\n" not in str(err.value) and needle in str(err.value)
    assert "true or false" in str(err.value)
    cfg = compose(overrides[0], overrides[1].split("=")[0] + "=true")
    assert cfg.policy.get("per_head", cfg.policy.get("pool_across_window")) is True


def test_policies_own_their_config():
    """build_policy resolves the budget and hands the rest to the class: every registered
    policy builds itself (from_config), and a new one needs no branch in budget.py."""
    from dataclasses import dataclass

    from lessctl.policies.base import POLICIES, Budget, Policy, register

    kw = dict(seq_len=64, max_position_embeddings=128)
    for name, cls in POLICIES.items():
        cfg = {"name": name, "budget": {"size": 16}}
        p = build_policy(cfg, **kw)
        assert type(p) is cls
        if cls.has_budget:
            b = Budget(16, 128, 64)
            assert p == cls.from_config(cfg, b, cls.budget_tokens(cfg, b)) and p.budget == 16

    @dataclass(frozen=True)
    class Halves(Policy):
        budget: int = 8  # type: ignore[misc]
        name = "halves-test"

        @classmethod
        def from_config(cls, cfg, b, total):
            return cls(budget=max(1, total // 2))

    register(Halves)
    try:
        got = build_policy(
            {"name": "halves-test", "budget": {"size": 0.25, "of": "sequence"}}, **kw
        )
        assert got == Halves(budget=8)
    finally:
        POLICIES.pop("halves-test")


def test_attention_helpers_live_on_the_ground_floor():
    """lessctl/policies/attn.py imports nothing of lessctl; base.py keeps the old names."""
    import ast
    import inspect

    from lessctl.policies import attn, base

    tree = ast.parse(inspect.getsource(attn))
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert mods and not any(m.startswith("lessctl") for m in mods if m)
    for name in ("default_scale", "capped", "group_probs", "keep_mask", "never_evicted"):
        assert getattr(base, name) is getattr(attn, name)
