"""The per-layer training objective of LESS (less-method.md §4), as pure functions.

One layer, given its q, k, v (post-RoPE, fp32), its frozen o_proj weights, the policy's
decisions and its kernels φ/ψ:

    target = o_proj(full causal attention(q, k, v))          the layer's own output
    pred   = o_proj(combine(sparse part, low-rank part))     LESS with the policy's evictions
    loss   = MSE(pred, target) over rows t >= budget

The policy's ``evict_at`` and the sparse part (normalised output + log-sum-exp) do not depend on
φ/ψ, so :func:`fixed_part` computes them once per batch of sequences and :func:`predict` adds
the kernels' part. Shapes: n sequences, H query heads, Hkv KV heads, S tokens, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lessctl.less.attention import combine, low_rank_attention, sparse_attention
from lessctl.less.kernels import LayerKernels
from lessctl.policies.base import expire, layer_evict_at, never_evicted


@dataclass(frozen=True)
class LayerView:
    """How a layer attends: its softmax ``scale``, sliding ``window`` and logit ``softcap``."""

    scale: float
    window: int | None = None
    softcap: float | None = None


def o_proj(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, H, S, d] attention output -> [n, S, hidden] through the frozen o_proj ``w``
    (``weight`` [hidden, H*d], optional ``bias`` [hidden])."""
    n, h, s, d = x.shape
    return F.linear(x.transpose(1, 2).reshape(n, s, h * d), w["weight"], w.get("bias"))


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The layer's own attention (the training target) in fp32, GQA-aware: q [n,H,S,d], k, v
    [n,Hkv,S,d] -> [n,H,S,d]. Causal softmax, with the layer's sliding ``window`` and logit
    ``softcap`` where it has them."""
    if window is not None or softcap is not None:
        ev = expire(never_evicted(k), window)
        return sparse_attention(q, k, v, ev, scale, softcap=softcap)[0]
    if q.device.type == "cpu":  # each KV head serves its group without a copy: 1.5x faster
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # on CUDA, fp32 GQA would fall back to the S x S math kernel; repeated K/V keep O(S) memory
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def decisions(
    policy,
    q: torch.Tensor,
    k: torch.Tensor,
    view: LayerView,
    v: torch.Tensor | None = None,
    kernels: LayerKernels | None = None,
) -> torch.Tensor:
    """The policy's ``evict_at`` [n,Hkv,S] for q [n,H,S,d], k [n,Hkv,S,d] (fp32); a
    state-aware policy (``recall``) decides with ``kernels`` and v [n,Hkv,S,d] when given
    (else as its base policy)."""
    return layer_evict_at(policy, q, k, view.scale, view.window, view.softcap, v=v, kernels=kernels)


def fixed_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: dict[str, torch.Tensor],
    view: LayerView,
    ev: torch.Tensor,
    ev_plus: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What the loss needs that does not depend on φ/ψ, from fp32 q [n,H,S,d], k, v
    [n,Hkv,S,d] and the policy's ``ev`` [n,Hkv,S]: ``target`` [n,S,hidden], ``evict_at``,
    ``sparse_out`` [n,H,S,d], ``sparse_lse`` [n,H,S]; with Baseline+'s ``ev_plus`` (validation)
    also ``baseline`` and ``plus`` [n,S,hidden] (the sparse policies' outputs after o_proj).
    ``target``: the layer's own output where it is already known (it does not depend on the
    policy: several policies trained on one batch share it)."""
    sc, win, cap = view.scale, view.window, view.softcap
    out, lse = sparse_attention(q, k, v, ev, sc, softcap=cap)
    pre = {
        "target": o_proj(full_attention(q, k, v, sc, win, cap), w) if target is None else target,
        "evict_at": ev,
        "sparse_out": out,
        "sparse_lse": lse,
    }
    if ev_plus is not None:
        pre["baseline"] = o_proj(out, w)
        pre["plus"] = o_proj(sparse_attention(q, k, v, ev_plus, sc, softcap=cap)[0], w)
    return pre


def predict(
    kern: LayerKernels,
    b: dict[str, torch.Tensor],
    w: dict[str, torch.Tensor],
    window: int | None,
    max_evicted: int | None = None,
) -> torch.Tensor:
    """LESS's layer output [n,S,hidden] for batch ``b`` (q, k, v and :func:`fixed_part`'s
    ``evict_at``, ``sparse_out``, ``sparse_lse``), in fp32."""
    q, k, v = (b[n].to(torch.float32) for n in ("q", "k", "v"))
    num, den = low_rank_attention(
        kern.phi(q), kern.psi(k), v, b["evict_at"], window=window, max_evicted=max_evicted
    )
    return o_proj(combine(b["sparse_out"].to(torch.float32), b["sparse_lse"], num, den), w)


def rows_mse(pred: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
    """MSE of pred and target [n,S,hidden] over rows ``t >= start`` (the budget)."""
    return F.mse_loss(pred[:, start:], target[:, start:].to(pred.dtype))


def layer_loss(
    kern: LayerKernels,
    b: dict[str, torch.Tensor],
    w: dict[str, torch.Tensor],
    window: int | None,
    budget: int,
    max_evicted: int | None = None,
) -> torch.Tensor:
    """The training loss of one layer on batch ``b``: a scalar."""
    return rows_mse(predict(kern, b, w, window, max_evicted), b["target"], budget)
