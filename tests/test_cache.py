"""EvictingCache: equals the parallel masked form, evicts physically, keeps padding out."""

from __future__ import annotations

import pytest
import torch

from lessctl.cache import EvictingCache, evict_many, evict_many_sequential, left_pad_counts
from lessctl.decoding import stream_logits
from lessctl.hooks import use_attention
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import ParallelAttention
from lessctl.policies import H2O, TOVA, get_policy

POLICIES = {
    "lambda": dict(sink=2, recent=14),
    "h2o": dict(heavy=8, recent=8),
    "tova": dict(budget=16),
    "snapkv": dict(heavy=10, window=6, kernel=5),
    "composite": dict(sink=2, heavy=7, recent=7, w_h2o=1.0, w_tova=0.5),
    "recall": dict(base=H2O(8, 8), pool=4),
    "recall-tova": dict(base=TOVA(16), pool=3),
}


def strong_kernels(
    model, rank: int = 4, hidden: int = 32, scale: float = 1.0
) -> dict[int, LayerKernels]:
    """Kernels with s1 = s2 = ``scale`` (not ~0), so the state weighs like the kept tokens."""
    c = model.config
    kc = KernelConfig(
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        rank=rank,
        hidden=hidden,
        dropout=0.0,
        init_scale=scale,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return {i: LayerKernels(kc).eval() for i in range(c.num_hidden_layers)}


def parallel_logits(model, ids, policy, kernels):
    """The independent reference: teacher-forced parallel form over the whole sequence."""
    with torch.no_grad(), use_attention(model, ParallelAttention(policy, kernels)):
        return model(ids).logits.float()


def streamed_with_cache(model, ids, policy, kernels):
    """One token per forward; returns (logits, cache) so tests can inspect the cache."""
    cache = EvictingCache.for_model(model, policy, kernels, protocol="streaming")
    outs = []
    with cache.attached(model), torch.no_grad():
        for i in range(ids.shape[1]):
            outs.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits.float())
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("with_kernels", [False, True])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_streaming_equals_parallel_form(tiny_model, name, with_kernels):
    model, _ = tiny_model
    policy = get_policy(name.split("-")[0], **POLICIES[name])
    kernels = strong_kernels(model) if with_kernels else None
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    ref = parallel_logits(model, ids, policy, kernels)
    got, cache = streamed_with_cache(model, ids, policy, kernels)
    assert (got - ref).abs().max().item() < 1e-4
    if with_kernels:
        for layer in cache.layers:
            assert layer.state.z.abs().sum() > 1.0 and layer.state.H.abs().sum() > 1.0
        # the state matters: the same policy without it gives other logits
        assert (got - parallel_logits(model, ids, policy, None)).abs().max().item() > 1e-2


def test_chunked_forward_equals_one_token_forwards(tiny_model):
    model, _ = tiny_model
    policy, kernels = get_policy("h2o", heavy=6, recent=6), strong_kernels(model)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    one = stream_logits(model, ids, policy, kernels, chunk=1)
    whole = stream_logits(model, ids, policy, kernels, chunk=40)
    assert (one - whole).abs().max().item() < 1e-4


def test_eviction_is_physical_and_nbytes_constant(tiny_model):
    model, _ = tiny_model
    n = 12
    policy, kernels = get_policy("tova", budget=n), strong_kernels(model)
    cache = EvictingCache.for_model(model, policy, kernels, protocol="streaming")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    sizes = []
    with cache.attached(model), torch.no_grad():
        for i in range(40):
            model(ids[:, i : i + 1], cache=cache, use_cache=True)
            if i + 1 >= n:
                sizes.append(cache.nbytes())
                for layer in cache.layers:
                    assert layer.keys.shape[2] == n and layer.values.shape[2] == n
                    assert layer.positions.shape[2] == n
    assert len(set(sizes)) == 1
    assert cache.get_seq_length() == 40
    kept = cache.layers[0].positions
    assert kept.max().item() == 39 and len(set(kept[0, 0].tolist())) == n


def test_batched_padded_streaming_equals_single(tiny_model):
    model, _ = tiny_model
    policy, kernels = get_policy("h2o", heavy=6, recent=6), strong_kernels(model)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 256, (30,), generator=g), torch.randint(0, 256, (18,), generator=g)
    ids = torch.stack([a, torch.cat([torch.full((12,), 256), b])])
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    batch = stream_logits(model, ids, policy, kernels, attention_mask=mask)
    la = stream_logits(model, a[None], policy, kernels)
    lb = stream_logits(model, b[None], policy, kernels)
    assert (batch[0] - la[0]).abs().max().item() < 1e-4
    assert (batch[1, 12:] - lb[0]).abs().max().item() < 1e-4


def test_right_padding_is_refused():
    with pytest.raises(ValueError, match="left padding only"):
        left_pad_counts(torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize(
    "name,params",
    [
        ("lambda", dict(sink=3, recent=5)),
        ("h2o", dict(heavy=4, recent=4)),
        ("tova", dict(budget=8)),
        ("recent", dict(budget=8)),
        ("random", dict(budget=8, seed=2)),
        ("snapkv", dict(heavy=5, window=3)),
    ],
)
def test_bulk_eviction_fast_path_equals_repeated_select(name, params):
    policy = get_policy(name, **params)
    g = torch.Generator().manual_seed(7)
    m, t = 20, 20
    pos = torch.cat([torch.randperm(m, generator=g).expand(2, 3, m), torch.full((2, 3, 1), t)], -1)
    acc = torch.rand(2, 3, m + 1, generator=g)
    acc[..., -1] = 0
    probs = torch.rand(2, 3, m + 1, generator=g)
    count = m + 1 - policy.budget
    fast = evict_many(policy, t, pos, acc, probs, count)
    slow = evict_many_sequential(policy, t, pos, acc, probs, count)
    assert torch.equal(fast, slow) and (fast.sum(-1) == count).all()


def test_cache_without_its_attention_function_refuses(tiny_model):
    model, _ = tiny_model
    cache = EvictingCache.for_model(model, get_policy("recent", budget=4))
    ids = torch.randint(0, 256, (1, 3))
    with torch.no_grad(), pytest.raises(RuntimeError, match="attached"):
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,params", [("h2o", dict(heavy=16, recent=16)), ("lambda", dict(sink=4, recent=28))]
)
def test_streaming_equals_parallel_smollm2(smollm2, name, params):
    model, _ = smollm2
    policy = get_policy(name, **params)
    # s = 0.1: the state moves logits by ~10 yet does not drown the kept tokens (at s = 1 over
    # 30 layers fp32 summation order alone reaches ~7e-4)
    kernels = strong_kernels(model, rank=8, hidden=64, scale=0.1)
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(8))
    ref = parallel_logits(model, ids, policy, kernels)
    got = stream_logits(model, ids, policy, kernels, chunk=96)
    assert (got - ref).abs().max().item() < 1e-4
    assert (ref - parallel_logits(model, ids, policy, None)).abs().max().item() > 1.0


def test_recall_with_kernels_refuses_several_evictions_at_one_row(tiny_model):
    """recall with a state evicts one key per row (each eviction changes the state the next
    reads): a prompt past the budget is refused in one line; without kernels it is the base's."""
    from lessctl.errors import LessctlError

    model, _ = tiny_model
    policy = get_policy("recall", base=H2O(8, 8), pool=4)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(8))
    for kernels in (strong_kernels(model), None):
        cache = EvictingCache.for_model(model, policy, kernels, protocol="prompt")
        with cache.attached(model), torch.no_grad():
            model(ids[:, :29], cache=cache, use_cache=True)
            if kernels is None:
                model(ids[:, 29:], cache=cache, use_cache=True)
                assert cache.layers[0].positions.shape[-1] == 16
                continue
            with pytest.raises(LessctlError, match="one key per row.*protocol=streaming"):
                model(ids[:, 29:], cache=cache, use_cache=True)
