"""The LESS part of a steady decode step as one C++ call on CPU (``csrc/less_step.cpp``).

A decode step on a CPU pays several microseconds for every call into torch whatever it
computes, and the LESS part of the step (the freed key's psi, H and z, the virtual keys' values,
the query's log phi z) is ~14 such calls for a few microseconds of arithmetic. Compiled here
with ``torch.utils.cpp_extension`` when first needed (about a minute once, then cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; a C++ compiler and ninja are
needed). It computes what :func:`~lessctl.cache.step.steady_step`'s torch path computes, in
fp32, up to rounding (its GELU's erf is within 5e-7; tests/test_native_step.py). It computes
each sequence's rows apart, so it serves batches of up to ``MAX_BATCH`` sequences; larger ones
take the torch path, whose batched products then cost less.

Config ``native_step`` (:func:`configure`): ``auto`` (default) uses it for learned kernels on CPU
where it builds and falls back to the torch path with one warning where it does not; ``always``
requires it (a failed build is an error); ``never`` never uses it. Elsewhere (Performer
kernels, a traced step) the torch path runs; on CUDA the Triton kernel of
:mod:`lessctl.cache.triton_step` where ``triton_step`` allows it, else the torch path. The
mode is read when a cache layer fills (packs): a layer already in the steady state keeps the
path it took until it packs again.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from collections.abc import Callable
from pathlib import Path

from lessctl.errors import LessctlError

MODES = ("auto", "always", "never")
# the op computes each sequence's rows apart; from a few sequences on, the torch path's batched
# products cost less (in decoding here: 1.02x vs 1.09x the plain step at 1, 1.25x vs 1.13x at 64)
MAX_BATCH = 4
_SOURCE = Path(__file__).parent / "csrc" / "less_step.cpp"
_state: dict = {"mode": "auto", "op": None, "error": None}
log = logging.getLogger(__name__)


def configure(mode: str) -> str:
    """Set the process's ``native_step`` mode (module doc) -> the previous one."""
    if mode not in MODES:
        raise LessctlError(f"native_step={mode!r}; allowed: {', '.join(MODES)}")
    prev, _state["mode"] = _state["mode"], mode
    return prev


def mode() -> str:
    return _state["mode"]


def _build() -> Callable:
    from torch.utils.cpp_extension import load

    digest = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]
    name = f"lessctl_less_step_{platform.machine()}_{digest}"  # per architecture and source
    return load(name, [str(_SOURCE)], extra_cflags=["-O3"], verbose=False).less_step


def less_step_op() -> Callable | None:
    """The compiled op where the mode allows it and it builds (built once per process), else
    None; mode ``always`` raises where it does not build."""
    if _state["mode"] == "never":
        return None
    if _state["op"] is None and _state["error"] is None:
        try:
            _state["op"] = _build()
        except Exception as err:  # a missing compiler or ninja, a failed build
            lines = str(err).strip().splitlines() or [""]
            _state["error"] = f"{type(err).__name__}: {lines[-1]}"
            if _state["mode"] == "auto":
                log.warning(
                    "native_step=auto: the C++ LESS step did not build (%s); the torch path "
                    "runs (slower on CPU, same results)",
                    _state["error"],
                )
    if _state["op"] is None and _state["mode"] == "always":
        raise LessctlError(
            f"native_step=always but the C++ LESS step did not build: {_state['error']}"
        )
    return _state["op"]


def status() -> str:
    """``disabled`` (mode ``never``), ``built``, ``unavailable`` (tried, did not build) or
    ``not built`` (not needed yet in this process)."""
    if _state["mode"] == "never":
        return "disabled"
    if _state["op"] is not None:
        return "built"
    return "unavailable" if _state["error"] is not None else "not built"
