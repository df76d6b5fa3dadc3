"""The LESS part of a steady decode step as one Triton kernel on a GPU (the C++ op's counterpart).

On CUDA the torch path of :func:`~lessctl.cache.step.steady_step` makes ~14 small calls per
layer for the state (two gathers, the feature rows, five products and GELUs, |.|, H and z,
H / z, log(phi z)); :func:`less_step` is one launch of
:func:`~lessctl.cache.triton_kernel.less_step_kernel` instead, with the C++ op's signature
(``csrc/less_step.cpp``), so :func:`~lessctl.cache.step.native_state` calls either. All of it
is in Triton: the freed key's gather and its psi (MLP, ``M``, the fold mask), the fold into H
and z, the virtual keys' values ``H / z`` and the query's logits ``log(phi z)``. The sliding
layer's release and fold buffer stay in torch, as for the C++ op.

Why no separate merge by log-sum-exp (FlashInfer's ``merge_state``): the state's ``R``
virtual keys (key 0, value ``H_r / z_r``, additive logit ``log phi_r(q) z_r``) sit after the
kept keys in the same buffers (:class:`~lessctl.cache.store.KeptStore`), so the one
``scaled_dot_product_attention`` call over ``n + R`` keys already is that merge: its softmax
over ``[l_i, log phi_r z_r]`` gives ``(sum_i e^{l_i} v_i + phi H) / (sum_i e^{l_i} + phi z)``,
i.e. ``(e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`` with ``lse_b = log phi z``
and ``o_b = phi H / phi z``, computed stably by the attention kernel's online softmax. A
separate merge would need the kept keys' log-sum-exp, which torch's public SDPA does not
return (so a second attention kernel), and a logits-pass policy (H2O, TOVA, soft-capping)
needs the joint probabilities anyway. So the kernel writes the virtual keys' values and
logits exactly as the C++ op does, and the attention stays one call.

Config ``triton_step`` (:func:`configure`): ``auto`` (default) uses it for learned kernels on
CUDA where ``triton`` imports, and falls back to the torch path with one warning where it does
not; ``always`` requires it (no Triton or no GPU is an error; on a CPU device only under
Triton's interpreter, ``TRITON_INTERPRET=1``, which runs it on CPU tensors: the tests, where
``auto`` leaves CPU to the C++ op and the torch path);
``never`` never uses it. On CPU the C++ op (``native_step``) serves the step. Like
``native_step`` the mode is read when a cache layer packs, and run meta records
:func:`status`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from lessctl.errors import LessctlError

MODES = ("auto", "always", "never")
_BH = 64  # hidden units per block of a row's MLP (a [d, 64] tile of W1 at a time)
_state: dict = {"mode": "auto", "op": None, "error": None}
log = logging.getLogger(__name__)


def configure(mode: str) -> str:
    """Set the process's ``triton_step`` mode (module doc) -> the previous one."""
    if mode not in MODES:
        raise LessctlError(f"triton_step={mode!r}; allowed: {', '.join(MODES)}")
    prev, _state["mode"] = _state["mode"], mode
    return prev


def mode() -> str:
    return _state["mode"]


def interpreted() -> bool:
    """Whether Triton's interpreter runs kernels (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load() -> Callable:
    from lessctl.cache import triton_kernel  # imports triton (module doc of triton_kernel)

    kernel = triton_kernel.less_step_kernel

    def op(*args) -> None:
        less_step(kernel, *args)

    return op


def less_step_op(device: torch.device | str) -> Callable | None:
    """The Triton step for tensors on ``device`` where the mode allows it and Triton imports
    (module doc), else None; mode ``always`` raises where it cannot run."""
    dev = torch.device(device)
    if _state["mode"] == "never":
        return None
    if dev.type != "cuda" and not (interpreted() and _state["mode"] == "always"):
        if _state["mode"] == "always":
            raise LessctlError(
                f"triton_step=always needs a CUDA device, not {dev.type} (on CPU the C++ op "
                "serves the step: native_step; Triton's interpreter: TRITON_INTERPRET=1)"
            )
        return None
    if _state["op"] is None and _state["error"] is None:
        try:
            _state["op"] = _load()
        except Exception as err:  # triton missing, or a build of it that does not import
            lines = str(err).strip().splitlines() or [""]
            _state["error"] = f"{type(err).__name__}: {lines[-1]}"
            if _state["mode"] == "auto":
                log.warning(
                    "triton_step=auto: the Triton LESS step is unavailable (%s); the torch "
                    "path runs (same results)",
                    _state["error"],
                )
    if _state["op"] is None and _state["mode"] == "always":
        raise LessctlError(f"triton_step=always but Triton is unavailable: {_state['error']}")
    return _state["op"]


def status() -> str:
    """``disabled`` (mode ``never``), ``loaded`` (``loaded (interpreter)`` under
    ``TRITON_INTERPRET=1``), ``unavailable (<why>)`` (tried, failed) or ``not loaded`` (not
    needed in this process: no CUDA device, or no steady LESS step yet)."""
    if _state["mode"] == "never":
        return "disabled"
    if _state["op"] is not None:
        return "loaded (interpreter)" if interpreted() else "loaded"
    if _state["error"] is not None:
        return f"unavailable ({_state['error']})"
    return "not loaded"


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def less_step(
    kernel,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    slot: Tensor,
    folded: Tensor | None,
    w1: Tensor,
    w2: Tensor,
    m: Tensor,
    H: Tensor,
    z: Tensor,
    vvals: Tensor,
    logits: Tensor,
    absorb: bool,
) -> None:
    """Launch ``kernel`` (:mod:`lessctl.cache.triton_kernel`) with the C++ op's arguments:
    q [B,H,1,d], keys [B,Hkv,m,d], values [B,Hkv,m,dv] (the model's dtype, any strides); slot
    [B,Hkv,1] int64; folded [B,Hkv,1] bool or None (every freed key folds); w1 [H+Hkv,d,hid],
    w2 [H+Hkv,hid,R], m [Hkv,R,R] fp32 contiguous; H [B,Hkv,R,dv], z [B,Hkv,R] fp32 contiguous
    (updated in place); vvals [B,Hkv,R,dv] and logits [B,Hkv,g,R] written (any strides);
    absorb false: the state is left as it is and only logits are written. Shapes are checked
    on the host from metadata only (no device sync)."""
    b, hkv, _, d = keys.shape
    h, dv, hid, r = q.shape[1], values.shape[-1], w1.shape[-1], w2.shape[-1]
    if h % hkv or q.shape[2] != 1 or q.shape[3] != d:
        raise ValueError(f"triton less_step: q {tuple(q.shape)} for keys {tuple(keys.shape)}")
    for name, x in (("w1", w1), ("w2", w2), ("m", m), ("H", H), ("z", z)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"triton less_step: {name} must be fp32 contiguous")
    if tuple(H.shape) != (b, hkv, r, dv) or tuple(logits.shape) != (b, hkv, h // hkv, r):
        raise ValueError("triton less_step: state or logits shape")
    fold = slot if folded is None else folded  # a placeholder pointer where there is no mask
    kernel[(b * hkv,)](
        q,
        keys,
        values,
        slot,
        fold,
        w1,
        w2,
        m,
        H,
        z,
        vvals,
        logits,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *keys.stride(),
        *values.stride(),
        slot.stride(0),
        slot.stride(1),
        fold.stride(0),
        fold.stride(1),
        *vvals.stride(),
        *logits.stride(),
        hkv,
        h // hkv,
        d,
        dv,
        hid,
        r,
        ABSORB=bool(absorb),
        HAS_FOLDED=folded is not None,
        BD=_pow2(d),
        BDV=_pow2(dv),
        BH=min(_BH, _pow2(hid)),
        BR=_pow2(r),
    )
