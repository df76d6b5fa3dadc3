"""A prompt's (or chunk's) attention fused with the key scores an accumulating policy needs, so
that no ``[rows x keys]`` probabilities are held: memory O(block x keys) per layer.

An accumulating policy (H2O, SnapKV, composite) adds to each kept key ``j`` the attention the
chunk's rows ``t`` gave it, each row weighted by ``w_t`` (:meth:`~lessctl.policies.base.Policy.
row_weights`: 1 for H2O, SnapKV's observation window only, 0 for padding)::

    sums[j] = sum_t w_t sum_g p[g, t, j],   p[g, t, j] = exp(s[g, t, j] - lse[g, t])

(``s``: the logits of query head ``g`` of the KV group, ``lse``: each row's log-sum-exp over its
visible keys). Written as ``exp(LSE_j)`` with ``LSE_j = logsumexp_{g,t}(q[g,t] . k_j * scale
- lse[g, t] + log w_t)``, it is the log-sum-exp of a *transposed* attention: the keys are its
queries, the rows its keys, with one coordinate more carrying ``(log w_t - lse) / scale``
(two in half precision: a high and a low part, so the bias keeps fp32's precision). A fused
attention kernel returns that log-sum-exp without holding the matrix. So a chunk costs two fused
passes (:func:`lse_attention`): the attention itself (output and ``lse``), then the transposed
one. On CPU both run ATen's flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, the
kernel behind ``scaled_dot_product_attention``, which also returns the log-sum-exp); on other
devices an explicit softmax in row blocks (fp32). Logits are in the model's dtype's products
(fp32 accumulation), sums in fp32.

Visibility: ``None`` for a prompt's first chunk without padding (keys in row order, causal:
row ``t`` sees ``j <= t``; the transposed pass reverses both orders, so it is causal too), else
a bool mask (padding, windows, kept keys), applied in blocks of rows and of keys. A row that sees
no key gets out 0 and adds nothing; a key that no counted row sees gets 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lessctl.cache.attend import state_logits
from lessctl.less.attention import F32, attend, combine_log
from lessctl.less.state import LowRankState
from lessctl.policies.attn import default_scale

SKIP = -1e3  # the log-weight of a row that adds nothing: exp(p's log + SKIP) is 0 in fp32, and
# SKIP / scale stays finite even in fp16 (a finite bias: no -inf enters the kernel's products)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def lse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None = None,
    causal: bool = False,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + bias) v`` and each row's log-sum-exp, fused where the device
    has a kernel (CPU), else in row blocks.

    q [B,H,T,e], k/v [B,H,m,e] (one dtype), bias additive (``-inf`` = hidden) broadcastable to
    [B,H,T,m] in q's dtype, ``causal``: row ``i`` sees keys ``<= i`` (top-left, also for
    T != m) -> (out [B,H,T,e] in q's dtype, lse [B,H,T] fp32). A row that sees nothing: out and
    lse undefined (the caller masks them).
    """
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse.to(F32)
    t, m = q.shape[2], k.shape[2]
    outs, lses = [], []
    for a in range(0, t, block):
        e = min(a + block, t)
        s = torch.matmul(q[:, :, a:e], k.transpose(-1, -2)).to(F32) * scale
        if bias is not None:
            s = s + bias[..., a:e, :].to(F32)
        if causal:
            hide = torch.arange(m, device=q.device) > torch.arange(a, e, device=q.device)[:, None]
            s = s.masked_fill(hide, float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), v.to(F32)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def hidden_bias(visible: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """Additive mask of bool ``visible`` [B,Hkv,T,m] for ``heads`` query heads: [B,H,T,m]."""
    b, hkv, t, m = visible.shape
    bias = torch.zeros(b, hkv, 1, t, m, dtype=dtype, device=visible.device)
    bias = bias.masked_fill_(~visible[:, :, None], float("-inf"))
    return bias.expand(b, hkv, heads // hkv, t, m).reshape(b, heads, t, m)


def bias_columns(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-row additive bias [B,H,T] fp32 as extra key coordinates [B,H,T,c] in ``dtype``
    (dotted with ones): one column in fp32, a high and a low part in half precision."""
    hi = bias.to(dtype)
    if dtype == F32:
        return hi[..., None]
    lo = (bias - hi.to(F32)).to(dtype)
    return torch.stack([hi, lo], -1)


def column_sums(
    q: Tensor,
    kk: Tensor,
    lse: Tensor,
    weights: Tensor,
    scale: float,
    visible: Tensor | None,
    hkv: int,
    block: int = 1024,
) -> Tensor:
    """Each key's weighted attention from the rows (module doc), by the transposed pass.

    q [B,H,T,d], kk [B,H,m,d] (keys repeated over the group), lse [B,H,T] fp32 (``-inf``: a row
    that sees nothing), weights [B,T] >= 0, visible None (causal) or bool [B,Hkv,T,m], ``hkv``
    KV heads -> sums [B,Hkv,m] fp32. Rows before the first counted one are left out.
    """
    b, h, t, d = q.shape
    m = kk.shape[2]
    counted = weights > 0  # [B,T]
    live = counted.any(0).nonzero()
    if live.numel() == 0:
        return torch.zeros(b, hkv, m, dtype=F32, device=q.device)
    lo = int(live[0, 0])  # SnapKV: its observation window; H2O: 0
    w, ls = weights[:, None, lo:].to(F32), lse[..., lo:]
    ok = (w > 0) & torch.isfinite(ls)
    bias = torch.where(ok, w.log() - ls, SKIP) / scale  # [B,H,T']
    cols = bias_columns(bias, q.dtype)
    rows = torch.cat([q[:, :, lo:], cols], -1)  # the transposed pass's keys [B,H,T',d+c]
    keysq = torch.cat([kk, kk.new_ones(*kk.shape[:3], cols.shape[-1])], -1)  # its queries
    zeros = rows.new_zeros(rows.shape)  # its values (unused: only the log-sum-exp is)
    if visible is None:  # key j is seen by rows t >= j: reversed, row order is causal
        _, col_lse = lse_attention(keysq.flip(2), rows.flip(2), zeros, scale, causal=True)
        col_lse = col_lse.flip(-1)
        last = torch.where(counted, torch.arange(t, device=q.device), -1).amax(-1)  # [B]
        seen = (torch.arange(m, device=q.device) <= last[:, None])[:, None]  # [B,1,m]
    else:
        vis = visible.expand(b, hkv, t, m)[:, :, lo:]
        seen = (vis & counted[:, None, lo:, None]).any(-2)  # [B,Hkv,m]
        parts = []
        for a in range(0, m, block):
            e = min(a + block, m)
            hide = hidden_bias(vis[..., a:e].transpose(-1, -2), h, q.dtype)  # [B,H,m',T']
            parts.append(lse_attention(keysq[:, :, a:e], rows, zeros, scale, hide)[1])
        col_lse = torch.cat(parts, -1)
    sums = col_lse.exp().view(b, hkv, h // hkv, m).sum(2)
    return torch.where(seen, sums, 0.0)


def scored_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor | None,
    scale: float | None,
    weights: Tensor,
    log_phi: Tensor | None = None,
    state: LowRankState | None = None,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Rows ``q`` over kept ``keys``/``values`` (plus the state) and the keys' weighted scores.

    q [B,H,T,d], keys/values [B,Hkv,m,d], visible bool broadcastable to [B,Hkv,T,m] or None
    (causal, keys in row order, m == T), weights [B,T] (0: the row adds nothing), log_phi
    [B,H,T,R] with ``state`` -> (out [B,H,T,d] in q's dtype, sums [B,Hkv,m] fp32): as
    :func:`~lessctl.cache.attend.rows_attention` with ``weights`` (module doc). The scores are
    over the kept keys alone, without the state.
    """
    b, h, t, d = q.shape
    hkv, m = keys.shape[1], keys.shape[2]
    sc = default_scale(d, scale)
    kk, vv = keys.repeat_interleave(h // hkv, 1), values.repeat_interleave(h // hkv, 1)
    if visible is None:
        out, lse = lse_attention(q, kk, vv, sc, causal=True)
    else:
        vis = visible.expand(b, hkv, t, m)
        outs, lses = [], []
        for a in range(0, t, block):
            e = min(a + block, t)
            o, ls = lse_attention(q[:, :, a:e], kk, vv, sc, hidden_bias(vis[:, :, a:e], h, q.dtype))
            outs.append(o)
            lses.append(ls)
        has = vis.any(-1).repeat_interleave(h // hkv, 1)  # [B,H,T]: the row sees a kept key
        out = torch.where(has[..., None], torch.cat(outs, 2), 0.0)
        lse = torch.where(has, torch.cat(lses, 2), float("-inf"))
    sums = column_sums(q, kk, lse, weights, sc, None if visible is None else vis, hkv, block)
    if state is not None:
        lr_out, lr_lse = attend(state_logits(log_phi, state, hkv), state.mean_values())
        out = combine_log(out.to(F32), lse, lr_out, lr_lse).to(q.dtype)
    return out, sums
