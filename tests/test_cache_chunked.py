"""Chunked prefill (protocol "chunked"): C = 1 is streaming, C >= the prompt is the prompt
protocol, chunk boundaries evict as the parallel form says, and memory is O(budget + C)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lessctl.cache import EvictingCache, prefill
from lessctl.errors import InputError
from lessctl.policies import get_policy
from lessctl.policies.lambda_mask import LambdaMask
from tests.test_cache import parallel_logits, strong_kernels

IDS = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))


def run(model, ids, policy, kernels, protocol, chunk=None, decode=0):
    """Logits of a prompt forward (split by the cache's protocol) then ``decode`` greedy rows."""
    cache = EvictingCache.for_model(model, policy, kernels, protocol=protocol, chunk=chunk)
    with cache.attached(model), torch.no_grad():
        out = [model(ids, cache=cache, use_cache=True).logits.float()]
        x = out[0][:, -1:].argmax(-1)
        for _ in range(decode):
            out.append(model(x, cache=cache, use_cache=True).logits.float())
            x = out[-1][:, -1:].argmax(-1)
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("name", ["lambda", "h2o", "tova"])
def test_chunk_of_one_is_streaming_and_the_parallel_form(tiny_model, name):
    model, _ = tiny_model
    params = {"lambda": dict(sink=2, recent=10), "h2o": dict(heavy=6, recent=6)}
    policy = get_policy(name, **params.get(name, dict(budget=12)))
    kernels = strong_kernels(model)
    got, _ = run(model, IDS, policy, kernels, "chunked", chunk=1)
    ref = parallel_logits(model, IDS, policy, kernels)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["lambda", "h2o", "snapkv"])
def test_chunk_covering_the_prompt_is_the_prompt_protocol(tiny_model, name):
    model, _ = tiny_model
    params = {
        "lambda": dict(sink=2, recent=10),
        "h2o": dict(heavy=6, recent=6),
        "snapkv": dict(heavy=6, window=6, kernel=3),
    }
    policy, kernels = get_policy(name, **params[name]), strong_kernels(model)
    ref, _ = run(model, IDS, policy, kernels, "prompt", decode=12)
    for chunk in (40, 64):
        got, _ = run(model, IDS, policy, kernels, "chunked", chunk=chunk, decode=12)
        assert (got - ref).abs().max().item() < 1e-4


@dataclasses.dataclass(frozen=True)
class ChunkedLambda(LambdaMask):
    """Λ's decision under chunked prefill, in closed form: a non-sink key j leaves at the first
    chunk start a with j <= a - recent (the chunk start evicts down to the budget)."""

    chunk: int = 1

    def evict_at(self, q, k, scale=None):
        s = k.shape[2]
        j = torch.arange(s)
        first = ((j + self.recent + self.chunk - 1) // self.chunk) * self.chunk
        e = torch.where(j < self.sink, s, first.clamp(max=s))
        return e.expand(*k.shape[:2], s).contiguous()


@pytest.mark.parametrize("chunk", [3, 8])
def test_chunk_boundaries_evict_and_fold_as_the_parallel_form(tiny_model, chunk):
    """Rows inside a chunk see the kept keys, the chunk's keys so far and the state of every key
    evicted at or before the chunk's start: the parallel form with the chunked decision."""
    model, _ = tiny_model
    policy, kernels = LambdaMask(sink=2, recent=6), strong_kernels(model)
    got, cache = run(model, IDS, policy, kernels, "chunked", chunk=chunk)
    ref = parallel_logits(model, IDS, ChunkedLambda(sink=2, recent=6, chunk=chunk), kernels)
    assert (got - ref).abs().max().item() < 1e-4
    # and that is not the streaming result
    assert (got - parallel_logits(model, IDS, policy, kernels)).abs().max().item() > 1e-3


def test_chunked_cache_holds_at_most_budget_plus_chunk(tiny_model):
    model, _ = tiny_model
    policy, kernels = get_policy("h2o", heavy=4, recent=4), strong_kernels(model)
    cache = EvictingCache.for_model(model, policy, kernels, protocol="chunked", chunk=5)
    sizes = []
    with cache.attached(model), torch.no_grad():
        for a in range(0, 40, 5):
            model(IDS[:, a : a + 5], cache=cache, use_cache=True)
            sizes.append(cache.layers[0].keys.shape[2])
    assert max(sizes) <= 8 + 5 and sizes[-1] == 8 + 4  # budget + the chunk's other keys


def test_prefill_driver_equals_one_forward(tiny_model):
    model, _ = tiny_model
    policy, kernels = get_policy("lambda", sink=2, recent=6), strong_kernels(model)
    _, whole = run(model, IDS, policy, kernels, "chunked", chunk=8)
    cache = EvictingCache.for_model(model, policy, kernels, protocol="chunked", chunk=8)
    last = prefill(model, cache, IDS, chunk=8)
    ref, _ = run(model, IDS, policy, kernels, "chunked", chunk=8)
    assert (last.float() - ref[:, -1]).abs().max().item() < 1e-4
    for a, b in zip(cache.layers, whole.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.state.H, b.state.H, atol=1e-5)


def test_chunked_needs_a_chunk():
    with pytest.raises(InputError, match="chunk"):
        EvictingCache(2, get_policy("lambda", sink=2, recent=6), protocol="chunked")
