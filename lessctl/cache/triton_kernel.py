"""The Triton kernel of the LESS part of a steady decode step (:mod:`lessctl.cache.triton_step`).

Imported only when the step is first needed: importing it imports ``triton`` and decorates the
kernel, and ``TRITON_INTERPRET=1`` (Triton's interpreter, which runs the kernel on CPU tensors)
is read at that moment. One program per sequence ``b`` and KV head ``c`` computes, in fp32,
what the C++ op does (``csrc/less_step.cpp``), MLPs included::

    psi = | mlp_k(K[b,c,slot]) M_c |                 (0 where the freed key is not folded)
    H[b,c] += psi^T V[b,c,slot],  z[b,c] += psi      (ABSORB)
    vvals[b,c,r] = H[b,c,r] / z[b,c,r]               (the virtual keys' values)
    logits[b,c,j,r] = log(| mlp_q(q[b, c*g+j]) |_r z[b,c,r])   for the g query heads of c

with ``mlp(x) = GELU(GELU(x W1) W2)`` (exact GELU, erf). A row's MLP is a loop over the hidden
units in blocks of ``BH`` (a [BD, BH] tile of W1 at a time): the products are row-vector times
matrix (one query row per head), so they are broadcast multiplies and sums, not ``tl.dot``
(whose tiles start at 16 rows). Sums are ``tl.reduce`` with ``tl.sum``'s own combine function:
triton.language's jit'd helpers (``tl.sum``, ``tl.zeros``) are decorated when triton is first
imported, which torch does before a test can set ``TRITON_INTERPRET``, and the interpreter cannot
call them; builtins and this module's functions follow it (and it sums that combine function
with numpy). GELU is written out where it is used (each call of a jit'd helper costs the
interpreter a re-patching of triton.language).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.standard import _sum_combine


@triton.jit
def _mlp_row(
    x_ptr,
    x_stride,
    w1_ptr,
    w2_ptr,
    D,
    HID,
    R,
    BD: tl.constexpr,
    BH: tl.constexpr,
    BR: tl.constexpr,
):
    """GELU(GELU(x W1) W2) of one row x [D] (stride x_stride, any float dtype), W1 [D,HID] and
    W2 [HID,R] fp32 row-major -> [BR] fp32 (0 past R: GELU(0) = 0)."""
    od = tl.arange(0, BD)
    orr = tl.arange(0, BR)
    x = tl.load(x_ptr + od * x_stride, mask=od < D, other=0.0).to(tl.float32)
    acc = tl.full([BR], 0.0, tl.float32)
    for h0 in range(0, HID, BH):
        oh = h0 + tl.arange(0, BH)
        w1 = tl.load(
            w1_ptr + od[:, None] * HID + oh[None, :],
            mask=(od[:, None] < D) & (oh[None, :] < HID),
            other=0.0,
        )
        hid = tl.reduce(x[:, None] * w1, 0, _sum_combine)  # [BH]
        hid = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))  # GELU
        w2 = tl.load(
            w2_ptr + oh[:, None] * R + orr[None, :],
            mask=(oh[:, None] < HID) & (orr[None, :] < R),
            other=0.0,
        )
        acc += tl.reduce(hid[:, None] * w2, 0, _sum_combine)
    return 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))


@triton.jit
def less_step_kernel(
    q,
    keys,
    values,
    slot,
    folded,
    w1,
    w2,
    m,
    H,
    z,
    vvals,
    logits,
    sq0,
    sq1,
    sq3,
    sk0,
    sk1,
    sk2,
    sk3,
    sv0,
    sv1,
    sv2,
    sv3,
    ss0,
    ss1,
    sf0,
    sf1,
    so0,
    so1,
    so2,
    so3,
    sl0,
    sl1,
    sl2,
    sl3,
    HKV,
    G,
    D,
    DV,
    HID,
    R,
    ABSORB: tl.constexpr,
    HAS_FOLDED: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    BH: tl.constexpr,
    BR: tl.constexpr,
):
    """One (sequence, KV head) of the step (module doc). Pointers: q [B,H,1,D], keys
    [B,Hkv,m,D], values [B,Hkv,m,DV], vvals [B,Hkv,R,DV] (the model's dtype, strides given);
    slot [B,Hkv,1] int64, folded [B,Hkv,1] bool (read where HAS_FOLDED); w1 [H+Hkv,D,HID], w2
    [H+Hkv,HID,R], m [Hkv,R,R], H [B,Hkv,R,DV], z [B,Hkv,R] fp32 contiguous; logits [B,Hkv,G,R]
    (fp32 or the model's dtype, strides given)."""
    i = tl.program_id(0)
    b = i // HKV
    c = i % HKV
    orr = tl.arange(0, BR)
    ov = tl.arange(0, BDV)
    rmask = orr < R
    hv_mask = rmask[:, None] & (ov[None, :] < DV)
    z_row = z + i * R
    if ABSORB:
        s = tl.load(slot + b * ss0 + c * ss1)
        f = _mlp_row(
            keys + b * sk0 + c * sk1 + s * sk2,
            sk3,
            w1 + (HKV * G + c) * D * HID,
            w2 + (HKV * G + c) * HID * R,
            D,
            HID,
            R,
            BD,
            BH,
            BR,
        )
        mc = tl.load(
            m + c * R * R + orr[:, None] * R + orr[None, :],
            mask=rmask[:, None] & rmask[None, :],
            other=0.0,
        )
        psi = tl.abs(tl.reduce(f[:, None] * mc, 0, _sum_combine))  # (mlp(k) M_c) [BR]
        if HAS_FOLDED:
            into = tl.load(folded + b * sf0 + c * sf1).to(tl.int1)
            psi = tl.where(into, psi, 0.0)
        v = tl.load(values + b * sv0 + c * sv1 + s * sv2 + ov * sv3, mask=ov < DV, other=0.0)
        h_at = H + i * R * DV + orr[:, None] * DV + ov[None, :]
        h_new = tl.load(h_at, mask=hv_mask, other=0.0) + psi[:, None] * v.to(tl.float32)[None, :]
        tl.store(h_at, h_new, mask=hv_mask)
        zr = tl.load(z_row + orr, mask=rmask, other=1.0) + psi
        tl.store(z_row + orr, zr, mask=rmask)
        out = vvals + b * so0 + c * so1 + orr[:, None] * so2 + ov[None, :] * so3
        tl.store(out, (h_new / zr[:, None]).to(vvals.dtype.element_ty), mask=hv_mask)
    else:
        zr = tl.load(z_row + orr, mask=rmask, other=1.0)
    for j in range(G):
        head = c * G + j
        f = _mlp_row(
            q + b * sq0 + head * sq1,
            sq3,
            w1 + head * D * HID,
            w2 + head * HID * R,
            D,
            HID,
            R,
            BD,
            BH,
            BR,
        )
        logit = tl.log(tl.abs(f) * zr)
        at = logits + b * sl0 + c * sl1 + j * sl2 + orr * sl3
        tl.store(at, logit.to(logits.dtype.element_ty), mask=rmask)
