"""SnapKV and TOVA (defaults) against their reference implementations (tests/policies/reference.py):
the kept sets of both faces (parallel ``evict_at``; the real-eviction cache, prompt and streaming
protocols) on random q/k with GQA (6 query heads, 2 KV heads), several budgets and windows, and
the edges (a prompt shorter than the budget, a window that fills the budget)."""

from __future__ import annotations

import pytest
import torch

from lessctl.cache import EvictingLayer
from lessctl.errors import InputError
from lessctl.policies import TOVA, SnapKV, build_policy, keep_mask
from tests.policies.reference import snapkv_compress, softmax_row, top, tova_evict_at

B, H, HKV, D = 2, 6, 2, 8


def qkv(s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, s, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, s, D, generator=g, dtype=torch.float64)
    return q, k, torch.randn(B, HKV, s, D, generator=g, dtype=torch.float64)


def cache_kept(policy, q, k, v, protocol: str, prompt: int = 1) -> list[list[list[list[int]]]]:
    """The cache's kept positions (sorted) after each row: prompt protocol = one forward of
    ``prompt`` rows, then one row a forward; streaming = one row a forward from the start.
    Returns ``kept[t][b][h_kv]`` for rows ``t >= prompt - 1``, indexed by row."""
    layer = EvictingLayer(policy, protocol=protocol)
    s = q.shape[2]
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, s)]
    kept: dict[int, list] = {}
    for a, e in spans:
        layer.update(k[:, :, a:e], v[:, :, a:e])
        layer.attend(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], None)
        kept[e - 1] = layer.positions.sort(-1).values.tolist()
    return kept  # type: ignore[return-value]


def parallel_kept(policy, q, k, row: int) -> list[list[list[int]]]:
    """Kept positions at ``row`` of the parallel form: [b][h_kv] -> sorted positions."""
    m = keep_mask(policy.evict_at(q, k))[:, :, row]  # [B,Hkv,S]
    return [[m[b, h].nonzero()[:, 0].tolist() for h in range(HKV)] for b in range(B)]


def snapkv_at(policy: SnapKV, q, k, o: int) -> list[list[list[int]]]:
    """SnapKV's compression of the first ``o`` tokens plus the decoded key ``o``."""
    ref = snapkv_compress(q, k, o, policy.heavy, policy.window, policy.kernel, policy.pooling)
    return [[sorted(h + [o]) for h in per_b] for per_b in ref]


SNAPKV = [
    SnapKV(heavy=5, window=4, kernel=5, pooling="avg"),
    SnapKV(heavy=3, window=8, kernel=3, pooling="max"),
    SnapKV(heavy=7, window=1, kernel=5, pooling="avg"),
    SnapKV(heavy=6, window=3, kernel=7, pooling="max"),
    SnapKV(heavy=4, window=5, kernel=1, pooling="avg"),
    SnapKV(heavy=0, window=6, kernel=5, pooling="avg"),  # the window fills the budget
]


@pytest.mark.parametrize("policy", SNAPKV, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_snapkv_parallel_face_is_snapkv_compression(policy, seed):
    n = policy.budget
    assert n == policy.heavy + policy.window + 1  # SnapKV's capacity plus the decoded token
    q, k, _ = qkv(n + 5, seed)
    for row in range(n):  # nothing is evicted before the budget is full
        assert parallel_kept(policy, q, k, row) == [[list(range(row + 1))] * HKV] * B
    assert parallel_kept(policy, q, k, n) == snapkv_at(policy, q, k, n)


@pytest.mark.parametrize("policy", SNAPKV, ids=repr)
@pytest.mark.parametrize("extra", [-3, -1, 0, 1, 17])  # prompt length - budget
def test_snapkv_prompt_protocol_is_snapkv_compression(policy, extra):
    n = policy.budget
    prompt = max(1, n + extra)
    o = max(prompt, n)  # the first eviction
    q, k, v = qkv(o + 3, seed=10 + extra)
    kept = cache_kept(policy, q, k, v, "prompt", prompt)
    for row in range(prompt - 1, o):  # a prompt within the budget is not compressed
        assert kept[row] == [[list(range(row + 1))] * HKV] * B
    assert kept[o] == snapkv_at(policy, q, k, o)
    assert all(len(h) == n for per_b in kept[o + 2] for h in per_b)


@pytest.mark.parametrize("policy", SNAPKV[:2], ids=repr)
def test_snapkv_streaming_cache_is_snapkv_compression(policy):
    n = policy.budget
    q, k, v = qkv(n + 4, seed=20)
    assert cache_kept(policy, q, k, v, "streaming")[n] == snapkv_at(policy, q, k, n)


def test_snapkv_window_must_leave_room_for_the_decoded_token():
    cfg = {"name": "snapkv", "budget": {"size": 8}}
    assert build_policy({**cfg, "window": 7}, seq_len=64, max_position_embeddings=64) == SnapKV(
        0, 7
    )
    with pytest.raises(InputError, match=r"window=8 is invalid .* \[1, 7\]"):
        build_policy({**cfg, "window": 8}, seq_len=64, max_position_embeddings=64)
    one = {"name": "snapkv", "budget": {"size": 1}, "window": 0.5}
    with pytest.raises(InputError, match="no room for snapkv's window"):
        build_policy(one, seq_len=64, max_position_embeddings=64)
    # lessctl's earlier variant counts the decoded token in the window: window = budget is fine
    across = {**cfg, "window": 8, "pool_across_window": True}
    p = build_policy(across, seq_len=64, max_position_embeddings=64)
    assert p == SnapKV(0, 8, pool_across_window=True) and p.budget == 8


@pytest.mark.parametrize("n", [1, 5, 11, 40, 43])  # 40 = S, 43 > S: never full
@pytest.mark.parametrize("seed", [0, 1])
def test_tova_parallel_face_is_tova(n, seed):
    q, k, _ = qkv(40, seed)
    want = tova_evict_at(q, k, n)
    assert torch.equal(TOVA(n).evict_at(q, k), want)
    if 1 < n < 40:  # the layer-wide choice matters here: per KV head keeps other sets
        assert not torch.equal(TOVA(n, per_head=True).evict_at(q, k), want)


def rows_of(evict_at: torch.Tensor, rows) -> dict[int, list]:
    m = keep_mask(evict_at)
    return {
        t: [[m[b, h, t].nonzero()[:, 0].tolist() for h in range(HKV)] for b in range(B)]
        for t in rows
    }


@pytest.mark.parametrize(
    ("n", "protocol", "prompt"),  # prompts no longer than the budget (then one row a forward)
    [(5, "streaming", 1), (11, "streaming", 1), (5, "prompt", 3), (5, "prompt", 5)]
    + [(11, "prompt", 1), (11, "prompt", 11)],
)
def test_tova_cache_is_tova(n, protocol, prompt):
    q, k, v = qkv(30, seed=3)
    kept = cache_kept(TOVA(n), q, k, v, protocol, prompt)
    assert kept == rows_of(tova_evict_at(q, k, n), range(prompt - 1, 30))


def test_tova_long_prompt_keeps_one_layer_set_chosen_by_the_first_decoded_row():
    """A prompt longer than the budget (docs/policies.md: TOVA's code compresses it by the
    prompt's last row; lessctl's prompt protocol by the first decoded one): at row T the layer
    keeps T and the n - 1 older keys of the largest head-averaged probability from q_T; then
    TOVA's steps."""
    n, prompt, s = 7, 19, 26
    q, k, v = qkv(s, seed=4)
    kept = cache_kept(TOVA(n), q, k, v, "prompt", prompt)
    for b in range(B):
        cand = list(range(prompt + 1))
        mean = [0.0] * len(cand)
        for hq in range(H):
            p = softmax_row(q, k, b, hq, hq // (H // HKV), prompt, cand)
            mean = [m + x / H for m, x in zip(mean, p, strict=True)]
        want = sorted(top(mean[:-1], n - 1) + [prompt])
        assert kept[prompt][b] == [want] * HKV
        for t in range(prompt, s):
            assert kept[t][b][0] == kept[t][b][1]  # one set for the layer
