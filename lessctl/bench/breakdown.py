"""Where a steady decode step's time goes, per phase of :func:`~lessctl.cache.step.steady_step`:
the policy's choice, the feature maps (log phi of the query, psi of the freed key), the state
update (fold, release), writing the new key, the state read (the virtual keys' logits) and the
attention; where the layer runs the C++ LESS step (:mod:`lessctl.cache.native`) or the Triton one
(:mod:`lessctl.cache.triton_step`), its one call
(``state``: features, update and read together) instead of those three. Each phase is timed
alone on a copy of one layer's packed store (median over repetitions; a phase that works in
place repeats on the same buffers: the state's repetitions leave its buffers meaningless, and
the attention reads its own copy of the read's logits), and so is the whole step; a phase the
step does not have is None."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from lessctl.cache.layer import EvictingLayer
from lessctl.cache.step import (
    attend,
    choose_slot,
    features,
    native_state,
    one_call,
    read_state,
    slot_index,
    steady_step,
    update_state,
    write_slot,
)
from lessctl.policies.base import default_scale

PHASES = (
    "policy",
    "features",
    "state_update",
    "state",
    "write",
    "state_read",
    "attention",
    "total",
)


def _median_us(fn, device: torch.device, reps: int) -> float:
    times = []
    for i in range(reps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


@torch.no_grad()
def step_breakdown(layer: EvictingLayer, num_heads: int, reps: int = 50) -> dict[str, float]:
    """Median microseconds per phase (``PHASES``) of one steady step of ``layer`` (in the
    steady state), on random inputs of the layer's shapes and dtype."""
    s = copy.deepcopy(layer.store)
    b, hkv, _, d = s.keys.shape
    dev, dt = s.keys.device, s.keys.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, num_heads, 1, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=gen)
    policy, kern, window, softcap = layer.policy, layer.frozen, layer.window, layer.softcap
    scale = layer.scale
    t = layer.seen - layer.pads
    tt, qg = t.view(b, 1, 1), q.view(b, hkv, num_heads // hkv, d)
    sc = default_scale(d, scale)
    slot, folded, lo, ln = choose_slot(qg, k, tt, s, policy, window, sc, softcap)
    lr = feats = state = None
    single = one_call(policy, softcap)
    at = slot_index(slot, s)
    native = layer.native if layer.native is not None else getattr(layer, "triton", None)
    if s.state is not None and native is not None:
        absorb = not (window is not None and window <= policy.budget)

        def state():
            return native_state(native, q, s, kern, slot, folded, tt, window, absorb, single)

        lr = state()
        lr = None if lr is None else lr.clone()  # (the state's repetitions overwrite it)
    elif s.state is not None:
        feats = features(q, s, kern, at)
        lr = read_state(feats[0], s, kern, single)
        lr = None if lr is None else lr.clone()  # (state_read's repetitions overwrite phi)
    out = {
        "policy": lambda: choose_slot(qg, k, tt, s, policy, window, sc, softcap),
        "features": None if feats is None else (lambda: features(q, s, kern, at)),
        "state_update": None
        if feats is None
        else (lambda: update_state(s, kern, slot, folded, tt, window, feats[1:])),
        "state": state,
        "write": lambda: write_slot(s, slot, at, k, v, tt),
        "state_read": None if feats is None else (lambda: read_state(feats[0], s, kern, single)),
        "attention": lambda: attend(q, s, policy, slot, lo, ln, lr, sc, softcap),
        "total": lambda: steady_step(q, k, v, t, s, policy, kern, scale, window, softcap, native),
    }
    return {name: None if fn is None else _median_us(fn, dev, reps) for name, fn in out.items()}
