"""The shared contract of every registered kernel family (lessctl.less.kernels.KERNELS) under
every registered state variant (lessctl.less.states.STATES): a new family or variant gets these
tests with none of its own.

1. the cache's recurrent form (streaming protocol: evictions folded into H and z one key at a
   time, then the steady decode step) equals the parallel form, with kernels strong enough that
   the state changes the logits;
2. where nothing is evicted the state is empty and the method is the plain policy (here: the
   unmodified model);
3. the state the cache holds has the bytes that Baseline+ is given (R d + R fp32 per KV head and
   layer, :func:`lessctl.policies.budget.state_tokens`; with a rank per layer, the mean over
   the layers), whatever the family;
4. save and load give the same features.

The model's layers get different ranks (``RANKS``, as ``less.rank=[4, 2]`` gives them), so a
cache or state that assumed one rank for every layer fails (1)-(3).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lessctl.less.kernels import KERNELS, KernelConfig, LayerKernels
from lessctl.less.states import STATES
from lessctl.policies import get_policy
from lessctl.policies.budget import STATE_BYTES, state_tokens
from tests.test_cache import parallel_logits, streamed_with_cache

FAMILIES = sorted(KERNELS)
VARIANTS = sorted(STATES)
STATES_OF = {"sum": 1}  # M states per KV head for a variant (others: 2, dividing RANKS)
RANK = 4
RANKS = (4, 2)  # layer i has rank RANKS[i % 2] (less.rank per layer): the forms hold per layer


def family_kernels(
    model, kind: str, scale: float = 1.0, state: str = "sum"
) -> dict[int, LayerKernels]:
    """Kernels of ``kind`` under state variant ``state`` for every layer, psi's scale ``scale``
    (not ~0: the state weighs), layer i of rank ``RANKS[i % 2]``."""
    c = model.config
    kc = KernelConfig(
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        rank=RANK,
        hidden=32,
        dropout=0.0,
        init_scale=scale,
        kind=kind,
        seed=1,
        state=state,
        states=STATES_OF.get(state, 2),
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return {
            i: LayerKernels(replace(kc, rank=RANKS[i % 2])).eval()
            for i in range(c.num_hidden_layers)
        }


def test_the_registry_holds_the_paper_its_ablation_and_the_variants():
    assert {"learned", "performer", "light", "hedgehog"} <= set(KERNELS)
    assert {"sum", "multi"} <= set(STATES)


@pytest.mark.parametrize(
    "policy", [("lambda", dict(sink=2, recent=10)), ("h2o", dict(heavy=6, recent=6))]
)
@pytest.mark.parametrize("state", VARIANTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_recurrent_form_equals_the_parallel_form(tiny_model, kind, state, policy):
    model, _ = tiny_model
    pol = get_policy(policy[0], **policy[1])
    kernels = family_kernels(model, kind, state=state)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = parallel_logits(model, ids, pol, kernels)
    got, cache = streamed_with_cache(model, ids, pol, kernels)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert all(layer.state.z.abs().sum() > 0 for layer in cache.layers)
    # the state matters here, so (1) is not the plain policy twice
    assert (got - parallel_logits(model, ids, pol, None)).abs().max().item() > 1e-3


@pytest.mark.parametrize("state", VARIANTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_nothing_evicted_is_the_plain_policy(tiny_model, kind, state):
    model, _ = tiny_model
    pol = get_policy("h2o", heavy=32, recent=32)  # budget 64 > the 30 tokens
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    kernels = family_kernels(model, kind, state=state)
    with torch.no_grad():
        want = model(ids).logits.float()
    scale = want.abs().max().item()
    assert (parallel_logits(model, ids, pol, kernels) - want).abs().max() <= 1e-5 * scale
    got, cache = streamed_with_cache(model, ids, pol, kernels)
    assert (got - want).abs().max() <= 1e-5 * scale
    assert all(float(layer.state.z.abs().sum()) < 1e-30 for layer in cache.layers)


@pytest.mark.parametrize("state", VARIANTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_the_state_holds_the_bytes_baseline_plus_is_given(tiny_model, kind, state):
    model, _ = tiny_model
    c = model.config
    d, hkv = c.hidden_size // c.num_attention_heads, c.num_key_value_heads
    pol = get_policy("lambda", sink=2, recent=6)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    _, cache = streamed_with_cache(model, ids, pol, family_kernels(model, kind, state=state))
    for i, layer in enumerate(cache.layers):
        st, r = layer.state, RANKS[i % 2]
        held = st.H.numel() * st.H.element_size() + st.z.numel() * st.z.element_size()
        assert held == hkv * (r * d + r) * STATE_BYTES
    # Baseline+ of per-layer ranks: the tokens of the mean state over the layers
    ranks = [RANKS[i % 2] for i in range(len(cache.layers))]
    mean_bytes = hkv * sum((r * d + r) * STATE_BYTES for r in ranks) / len(ranks)
    assert abs(state_tokens(ranks, d, 4) * hkv * 2 * d * 4 - mean_bytes) <= hkv * d * 4


@pytest.mark.parametrize("state", VARIANTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_save_and_load_give_the_same_features(tmp_path, kind, state):
    kc = KernelConfig(
        4,
        2,
        16,
        rank=RANK,
        hidden=8,
        kind=kind,
        init_scale=0.5,
        seed=2,
        state=state,
        states=STATES_OF.get(state, 2),
    )
    torch.manual_seed(0)
    mod = LayerKernels(kc).eval()
    mod.save(tmp_path / "k.safetensors")
    back = LayerKernels.load(tmp_path / "k.safetensors").eval()
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    assert back.cfg == kc
    assert torch.equal(back.log_phi(q), mod.log_phi(q)) and torch.equal(
        back.log_psi(k), mod.log_psi(k)
    )
