"""Independent references for SnapKV and TOVA: plain loops over Python floats, written from the
methods' own code, calling nothing of :mod:`lessctl.policies`.

- SnapKV: FasterDecoding/SnapKV ``SnapKVCluster.update_kv`` (a prompt of ``T >= capacity``
  tokens: the last ``window`` rows' softmax over every key before them, summed over the rows,
  for the keys before the window only; pooled over those keys alone with zero padding; the top
  ``capacity - window`` of them plus the window's ``window`` keys are kept), with GQA as kvpress
  ``SnapKVPress`` (pool each query head's scores, average over the KV group). SnapKV's code has
  no GQA of its own (it repeats K/V and keeps one set per query head) and kvpress no max
  pooling: for ``max`` the group's summed scores are pooled, as lessctl documents.
- TOVA: schwartz-lab-NLP/TOVA ``TOVACache.reduce`` (the current row's attention over the cached
  keys plus itself, averaged over all query heads of the layer; the top ``cache_size`` kept, one
  set for every KV head), keeping the new key at its own row as kvpress does (TOVA's top-k may
  drop it; lessctl never evicts a key at its own row).

Ties (equal scores, common with max pooling): the later position is kept, lessctl's rule;
``torch.topk``'s order among equal values is unspecified.
"""

from __future__ import annotations

import math

import torch


def softmax_row(q, k, b: int, hq: int, hk: int, row: int, keys: list[int]) -> list[float]:
    """Query head ``hq``'s softmax at ``row`` over ``keys`` of KV head ``hk`` (scale 1/sqrt(d))."""
    d = q.shape[-1]
    logits = [float(q[b, hq, row] @ k[b, hk, j]) / math.sqrt(d) for j in keys]
    m = max(logits)
    ex = [math.exp(x - m) for x in logits]
    z = sum(ex)
    return [e / z for e in ex]


def pool(scores: list[float], kernel: int, pooling: str) -> list[float]:
    """1-D pooling, stride 1, ``kernel // 2`` zero padding at both ends of ``scores``."""
    r, m = kernel // 2, len(scores)
    out = []
    for j in range(m):
        near = [scores[i] if 0 <= i < m else 0.0 for i in range(j - r, j + r + 1)]
        out.append(sum(near) / kernel if pooling == "avg" else max(near))
    return out


def top(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest scores (ties: the later index)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], -j))[:count]


def snapkv_compress(
    q, k, prompt: int, heavy: int, window: int, kernel: int, pooling: str
) -> list[list[list[int]]]:
    """SnapKV's prompt compression of keys ``0 .. prompt-1`` to ``capacity = heavy + window``:
    q [B,H,>=prompt,d], k [B,Hkv,>=prompt,d] -> kept positions, sorted, per (b, h_kv)."""
    b_, h, _, _ = q.shape
    hkv = k.shape[1]
    g = h // hkv
    capacity = heavy + window
    out = []
    for b in range(b_):
        heads = []
        for hk in range(hkv):
            if prompt <= capacity:  # nothing to compress (SnapKV: q_len < max_capacity_prompt)
                heads.append(list(range(prompt)))
                continue
            prefix = prompt - window
            per_query = []
            for hq in range(hk * g, (hk + 1) * g):
                score = [0.0] * prefix
                for row in range(prompt - window, prompt):
                    p = softmax_row(q, k, b, hq, hk, row, list(range(row + 1)))  # causal
                    for j in range(prefix):
                        score[j] += p[j]
                per_query.append(score)
            if pooling == "avg":  # kvpress: pool each query head, then the group's mean
                pooled = [pool(s, kernel, pooling) for s in per_query]
                final = [sum(p[j] for p in pooled) / g for j in range(prefix)]
            else:
                final = pool([sum(s[j] for s in per_query) for j in range(prefix)], kernel, "max")
            heads.append(sorted(top(final, heavy) + list(range(prefix, prompt))))
        out.append(heads)
    return out


def tova_evict_at(q, k, cache_size: int) -> torch.Tensor:
    """TOVA over a whole sequence, one token per step: q [B,H,S,d], k [B,Hkv,S,d] -> evict_at
    [B,Hkv,S] (the first row at which each key is no longer kept; S = never)."""
    b_, h, s, _ = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = torch.full((b_, hkv, s), s, dtype=torch.long)
    for b in range(b_):
        kept: list[int] = []  # one set for the layer
        for t in range(s):
            cand = kept + [t]
            if len(cand) > cache_size:
                mean = [0.0] * len(cand)
                for hq in range(h):
                    p = softmax_row(q, k, b, hq, hq // g, t, cand)
                    mean = [m + x / h for m, x in zip(mean, p, strict=True)]
                old = range(len(kept))  # the new key stays
                victim = cand[min(old, key=lambda i: (mean[i], cand[i]))]
                cand.remove(victim)
                out[b, :, victim] = t
            kept = cand
    return out
