"""Attention of query rows over kept keys plus the LESS state, in one softmax (general path).

The state enters as ``R`` virtual keys per KV head: logit ``log phi_r(q) + log z_r``, value
``H_r / z_r`` (:meth:`~lessctl.less.state.LowRankState.mean_values`), so that the softmax over
kept logits and virtual logits is exactly LESS's ``[sum_kept e^s v + phi H] / [sum_kept e^s +
phi z]`` (:mod:`lessctl.less.attention`), in log space: nothing overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lessctl.less.attention import F32, attend, kept_logits
from lessctl.less.state import LowRankState


def state_logits(log_phi: Tensor, state: LowRankState, hkv: int) -> Tensor:
    """Virtual-key logits ``log phi_r(q) + log z_r``: log_phi [B,H,T,R] -> [B,Hkv,g,T,R] fp32."""
    b, h, t, r = log_phi.shape
    return log_phi.to(F32).view(b, hkv, h // hkv, t, r) + state.log_z()[:, :, None, None]


def rows_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
    log_phi: Tensor | None = None,
    state: LowRankState | None = None,
    want_probs: bool = False,
    block: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """Rows ``q`` over kept ``keys``/``values`` where ``visible``, plus the state, fp32.

    q [B,H,T,d], keys/values [B,Hkv,m,d], visible bool broadcastable to [B,Hkv,T,m] (None: all),
    log_phi [B,H,T,R] with ``state`` (None: no state) -> (out [B,H,T,d] in q's dtype, probs
    [B,Hkv,T,m] or None): ``probs`` is each row's softmax over its visible kept keys alone
    (without the state: what an accumulating policy adds), summed over the group. A row that
    sees nothing gets out 0 and probs 0. Rows go in blocks of ``block`` (memory).
    """
    t = q.shape[2]
    hkv = keys.shape[1]
    if state is not None:
        values = torch.cat([values, state.mean_values().to(values.dtype)], 2)
    outs, probs = [], []
    for a in range(0, t, block):
        e = min(a + block, t)
        vis = None if visible is None else visible[..., a:e, :]
        s = kept_logits(q[:, :, a:e], keys, vis, scale, softcap)  # [B,Hkv,g,T',m]
        if want_probs and state is None:  # one softmax gives both (a prompt's H2O scores)
            has = (s.amax(-1) != float("-inf")).unsqueeze(-1)  # a row with no key: 0, as attend
            p = torch.where(has, s.softmax(-1), 0.0)
            probs.append(torch.nan_to_num(p).sum(2))
            outs.append(torch.einsum("bkgtm,bkmd->bkgtd", p, values.to(F32)).flatten(1, 2))
            continue
        if want_probs:
            probs.append(torch.nan_to_num(s.softmax(-1)).sum(2))
        if state is not None:
            s = torch.cat([s, state_logits(log_phi[:, :, a:e], state, hkv)], -1)
        outs.append(attend(s, values)[0])
    out = torch.cat(outs, 2).to(q.dtype)
    return out, (torch.cat(probs, 2) if want_probs else None)


def sdpa_rows(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    visible: Tensor,
    scale: float | None,
    log_phi: Tensor | None = None,
    state: LowRankState | None = None,
    block: int = 1024,
) -> Tensor:
    """:func:`rows_attention` through ``scaled_dot_product_attention`` (no soft-capping, no
    probabilities; every row must see a key): the visibility as an additive mask and the state
    as R virtual keys with per-row logits. Same shapes -> out [B,H,T,d] in q's dtype."""
    b, h, t, d = q.shape
    hkv, m = keys.shape[1], keys.shape[2]
    g = h // hkv
    if state is not None:
        r = state.z.shape[-1]
        keys = torch.cat([keys, keys.new_zeros(b, hkv, r, d)], 2)
        values = torch.cat([values, state.mean_values().to(values.dtype)], 2)
    kk, vv = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    outs = []
    for a in range(0, t, block):
        e = min(a + block, t)
        vis = visible.expand(b, hkv, t, m)[:, :, a:e]
        bias = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~vis, float("-inf")
        )
        bias = bias[:, :, None].expand(b, hkv, g, e - a, m)
        if state is not None:
            bias = torch.cat([bias, state_logits(log_phi[:, :, a:e], state, hkv).to(q.dtype)], -1)
        bias = bias.reshape(b, h, e - a, -1)
        outs.append(
            F.scaled_dot_product_attention(q[:, :, a:e], kk, vv, attn_mask=bias, scale=scale)
        )
    return torch.cat(outs, 2)
