"""Peak memory of one measurement: the device's counters on CUDA, the process's peak resident set
(VmHWM, resettable on Linux) elsewhere; and running a measurement alone in a fresh process."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import resource
import sys
from pathlib import Path

import torch


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: the device's peak counters on CUDA; on CPU freed memory
    goes back to the OS (malloc_trim) and Linux's peak resident set (VmHWM) is reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Peak bytes since `reset_peak`: CUDA allocated, else the process's peak resident set
    (VmHWM; where it cannot be reset, ru_maxrss of this fresh process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


def return_freed_memory() -> None:
    """glibc: serve every allocation >= 128 KiB by mmap (a fixed threshold), so that a freed
    tensor (the prefill's activations, the evicted prompt) leaves the resident set at once and
    the peak measures what the method holds."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process (its memory alone); fn must be importable."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
