"""`lessctl bench`: decode latency, tokens/s, cache bytes, peak memory, prefill cost, throughput
at equal memory and a per-phase breakdown of the decode step, over contexts.

For every context (``bench.contexts``; ``full`` only up to ``bench.full_max_context``), batch
size (``bench.batch_sizes``) and method, measured alone (:func:`isolated_measure`: on CUDA in
this process with the device's peak counters reset, elsewhere in a fresh spawned process;
``bench.isolate=false`` measures in this process), a seeded random prompt is prefilled in
forwards of ``bench.prefill_chunk`` tokens (:mod:`lessctl.bench.measure`; LESS on a model with
sliding-window layers prefills in one forward, prompt protocol, and gets no prefill-only rows):

- ``full``: a library ``DynamicCache``, transformers' own SDPA attention;
- ``baseline``: the configured policy on the evicting cache, ``chunked`` protocol (the cache
  never holds more than budget + chunk tokens, so prefill memory is flat in the context);
- ``less``: the policy plus phi/psi kernels (trained via ``methods.load_less`` when a checkpoint
  exists, refused like ``eval`` when one of another budget does; untrained ones of the
  configured rank (each layer's, for a per-layer ``less.rank``) and hidden width when there is
  none: the same cost; rows ``kernels``, ``state_ranks``, ``trained_budget``, ``transfer``).

Then ``bench.warmup`` greedy steps (the first brings an evicting cache down to its budget) and
``bench.steps`` timed ones (median per-token latency; CUDA: the device's event timers).
Metrics per row: ``latency_ms``, ``tokens_per_s``, ``cache_bytes`` (every cache tensor, state
included), ``peak_mem_bytes`` (over the timed steps: ``torch.cuda.max_memory_allocated`` on
CUDA, else the process's peak resident set, model weights included), ``prefill_s``,
``prefill_peak_mem_bytes``; for evicting methods ``step_<phase>_us`` (layer 0's steady step
timed per phase, :mod:`lessctl.bench.breakdown`). ``bench.prefill_contexts``: prefill-only
rows for ``less`` (a prompt longer than memory would allow unchunked). ``bench.paired_contexts``:
rows ``paired_ms`` (mean, with every step in ``samples_ms``) from one step of each method in turn
in this process (:mod:`lessctl.bench.paired`), whose ratios carry a paired bootstrap interval.
``bench.throughput_contexts``: rows ``equal_memory_tokens_per_s`` (``batch_size``: the largest
batch whose cache fits ``bench.memory_cap_mb``, at most ``bench.max_batch``; every step at it in
``samples_ms``), the prefilled cache replicated over the batch and decoded in the same
interleaved rounds (prefill not counted); their ratios carry a paired interval too.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig

from lessctl.bench.measure import bench_kernels, chunked_prefill_ok, decode_steps, measure
from lessctl.bench.memory import in_fresh_process, peak_memory, reset_peak, return_freed_memory
from lessctl.bench.paired import interleaved, ratio, throughput_ratio
from lessctl.cache import native
from lessctl.errors import LessctlError
from lessctl.methods import TRAINED_ON_KEYS, method_names
from lessctl.models import attention_geometry
from lessctl.policies.budget import build_policy
from lessctl.stats import Estimate

__all__ = [
    "METRICS",
    "decode_steps",
    "latency_ratios",
    "paired_ratios",
    "throughput_ratios",
    "peak_memory",
    "reset_peak",
    "run",
]

METRICS = (
    "latency_ms",
    "tokens_per_s",
    "cache_bytes",
    "peak_mem_bytes",
    "prefill_s",
    "prefill_peak_mem_bytes",
)


def _measure_in_fresh_process(cfg_dict: dict, name: str, context: int, batch: int, decode: bool):
    """`measure` in this (spawned) process with its own copy of the model."""
    from omegaconf import OmegaConf

    from lessctl.config import resolve_dtype
    from lessctl.models import load_model

    torch.set_num_threads(int(cfg_dict.pop("_threads")))
    native.configure(cfg_dict.get("native_step", "auto"))
    return_freed_memory()
    cfg = OmegaConf.create(cfg_dict)
    device = torch.device("cpu")
    model, _ = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    return measure(cfg, model, name, context, batch, decode)


def isolated_measure(
    cfg: DictConfig, model, name: str, context: int, batch: int, decode: bool = True
) -> dict:
    """`measure` with this method's memory alone: on CUDA in this process (peak counters reset
    per method), elsewhere in a fresh spawned process (memory freed by an earlier prefill or
    method stays in a process's resident set). `bench.isolate=false`: all in this process
    (faster; CPU peaks then only grow)."""
    if model.device.type == "cuda" or not cfg.bench.get("isolate", True):
        return measure(cfg, model, name, context, batch, decode)
    from omegaconf import OmegaConf

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    cfg_dict["_threads"] = torch.get_num_threads()
    return in_fresh_process(_measure_in_fresh_process, cfg_dict, name, context, batch, decode)


def _check(cfg: DictConfig, model, names: list[str], context: int) -> None:
    """Refuse a bad budget (or a mismatched checkpoint) before any process starts."""
    geo = attention_geometry(model)
    policy = build_policy(
        cfg.policy, seq_len=context, max_position_embeddings=geo["max_position_embeddings"]
    )
    if policy.budget is None and any(n != "full" for n in names):
        raise LessctlError("bench needs an evicting policy (policy.name != full) for baseline/less")
    if "less" in names:
        bench_kernels(cfg, geo, "cpu", policy)


def run(cfg: DictConfig, model, tokenizer, log=print) -> list[dict[str, Any]]:
    """Rows {task: bench, model, method, policy, budget, context, batch_size, prefill_chunk,
    kernels, state_ranks, trained_budget, transfer, native_step, triton_step, metric,
    value} (module doc)."""
    b = cfg.bench
    names = list(b.methods)
    allowed = method_names(bench=True)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise LessctlError(f"unknown bench.methods entry {bad[0]!r}; allowed: {', '.join(allowed)}")
    full_max = int(b.full_max_context)
    plan = [
        (c, bs, n, True)
        for c in [int(x) for x in b.contexts]
        for bs in [int(x) for x in b.batch_sizes]
        for n in names
        if n != "full" or c <= full_max
    ]
    if "less" in names and b.prefill_contexts:
        if chunked_prefill_ok(model, "less"):
            plan += [(int(c), 1, "less", False) for c in b.prefill_contexts]
        else:
            log("no prefill-only rows: LESS cannot prefill in chunks on sliding-window layers")
    paired = [int(c) for c in b.get("paired_contexts", [])]
    throughput = [int(c) for c in b.throughput_contexts]
    for c in sorted({p[0] for p in plan} | set(paired) | set(throughput)):
        _check(cfg, model, names, c)
    rows: list[dict[str, Any]] = []
    for context, batch, name, decode in plan:
        t0 = time.perf_counter()
        got = isolated_measure(cfg, model, name, context, batch, decode)
        base = _columns(cfg, name, context, batch, got["budget"], got["cols"])
        rows += [{**base, "metric": k, "value": float(v)} for k, v in got["values"].items()]
        what = "decode" if decode else "prefill only"
        log(f"{name} context {context} batch {batch} ({what}): {time.perf_counter() - t0:.1f}s")
    for context in sorted(set(paired) | set(throughput)):
        t0 = time.perf_counter()
        here = [n for n in names if n != "full" or context <= full_max]
        eq = context in throughput
        got = interleaved(cfg, model, here, context, context in paired, eq)
        for name, m in got.items():
            base = _columns(cfg, name, context, 1, m["budget"], m["cols"])
            if m["ms"]:
                mean = sum(m["ms"]) / len(m["ms"])
                rows.append({**base, "metric": "paired_ms", "value": mean, "samples_ms": m["ms"]})
            if eq:
                fit, ms = m["eq_batch"], m["eq_ms"]
                tps = fit * 1e3 * len(ms) / sum(ms) if ms else 0.0
                rows.append(
                    {
                        **base,
                        "batch_size": fit,
                        "native_step": m.get("eq_native_step", base["native_step"]),
                        "triton_step": m.get("eq_triton_step", base["triton_step"]),
                        "metric": "equal_memory_tokens_per_s",
                        "value": tps,
                        "samples_ms": ms,
                    }
                )
        what = "interleaved" + (", equal memory" if eq else "")
        log(f"{what} {', '.join(here)} context {context}: {time.perf_counter() - t0:.1f}s")
    for line in summary(rows):
        log(line)
    return rows


def _columns(cfg: DictConfig, name: str, context: int, batch: int, budget, cols: dict) -> dict:
    """A bench row's identity and provenance columns (without metric and value)."""
    return {
        "task": "bench",
        "model": cfg.model.name,
        "method": name,
        "policy": "full" if name == "full" else cfg.policy.name,
        "budget": budget,
        "context": context,
        "batch_size": batch,
        "prefill_chunk": int(cfg.bench.prefill_chunk),
        "memory_cap_mb": float(cfg.bench.memory_cap_mb),
        "kernels": None,
        "state_ranks": None,  # less: each layer's state rank
        "trained_budget": None,
        "transfer": None,
        **dict.fromkeys(TRAINED_ON_KEYS),  # less with trained kernels: their text (methods.py)
        "native_step": None,  # less: whether its steps ran the C++ LESS step (cache/native.py)
        "triton_step": None,  # less: whether they ran the Triton one (cache/triton_step.py)
        **cols,
    }


RATIOS = (("less", "baseline"), ("baseline", "full"), ("less", "full"))


def paired_ratios(rows: list[dict[str, Any]]) -> dict[tuple[int, str, str], Estimate]:
    """{(context, num, den): mean step time of num / den over the same interleaved rounds, with
    its paired bootstrap interval} from the ``paired_ms`` rows."""
    ms = {(r["context"], r["method"]): r["samples_ms"] for r in rows if r["metric"] == "paired_ms"}
    return {
        (c, num, den): ratio(ms[(c, num)], ms[(c, den)])
        for c in sorted({c for c, _ in ms})
        for num, den in RATIOS
        if (c, num) in ms and (c, den) in ms
    }


def throughput_ratios(rows: list[dict[str, Any]]) -> dict[tuple[int, str, str], Estimate]:
    """{(context, num, den): tokens/s at equal memory of num / den over the same interleaved
    rounds, each at its own batch, with its paired bootstrap interval} from the
    ``equal_memory_tokens_per_s`` rows (a method that fits no sequence has none)."""
    eq = {
        (r["context"], r["method"]): (r["batch_size"], r["samples_ms"])
        for r in rows
        if r["metric"] == "equal_memory_tokens_per_s" and r["batch_size"] > 0
    }
    return {
        (c, num, den): throughput_ratio(eq[(c, num)], eq[(c, den)])
        for c in sorted({c for c, _ in eq})
        for num, den in RATIOS
        if (c, num) in eq and (c, den) in eq
    }


def _by(rows: list[dict], metric: str) -> dict[tuple[int, int, str], float]:
    return {
        (r["context"], r["batch_size"], r["method"]): r["value"]
        for r in rows
        if r["metric"] == metric
    }


def latency_ratios(rows: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """LESS latency / baseline latency per (context, batch size) from bench rows."""
    lat = _by(rows, "latency_ms")
    return {
        (c, bs): v / lat[(c, bs, "baseline")]
        for (c, bs, m), v in lat.items()
        if m == "less" and (c, bs, "baseline") in lat
    }


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """A table of the decode rows and the ratios measured in this run."""
    lat, tps, cb = _by(rows, "latency_ms"), _by(rows, "tokens_per_s"), _by(rows, "cache_bytes")
    peak = _by(rows, "peak_mem_bytes")
    out = [
        f"{'context':>8} {'batch':>5} {'method':>9} {'ms/token':>9} {'tokens/s':>9} "
        f"{'cache MiB':>10} {'peak MiB':>9}"
    ]
    for key in sorted(lat):
        c, bs, m = key
        out.append(
            f"{c:>8} {bs:>5} {m:>9} {lat[key]:>9.2f} {tps[key]:>9.1f} {cb[key] / 2**20:>10.2f} "
            f"{peak[key] / 2**20:>9.0f}"
        )
    for c, bs in sorted({(c, bs) for c, bs, _ in lat}):
        ratios = []
        for num, den in RATIOS:
            if (c, bs, num) in lat and (c, bs, den) in lat:
                ratios.append(f"{num}/{den} = {lat[(c, bs, num)] / lat[(c, bs, den)]:.2f}")
        if ratios:
            out.append(f"context {c} batch {bs}: latency " + ", ".join(ratios))
    pre = _by(rows, "prefill_peak_mem_bytes")
    for (c, bs, m), v in sorted(pre.items()):
        out.append(f"prefill {m} context {c} batch {bs}: peak {v / 2**20:.0f} MiB")
    for (c, num, den), e in paired_ratios(rows).items():
        out.append(
            f"context {c} interleaved: {num}/{den} = {e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"
        )
    for (c, bs, m), v in sorted(_by(rows, "equal_memory_tokens_per_s").items()):
        out.append(f"context {c} equal memory: {m} batch {bs}, {v:.1f} tokens/s")
    for (c, num, den), e in throughput_ratios(rows).items():
        out.append(
            f"context {c} equal memory: tokens/s {num}/{den} = {e.value:.2f} "
            f"[{e.low:.2f}, {e.high:.2f}]"
        )
    return out
