"""The decode-benchmark part of `lessctl report`, from the newest bench run's rows (ratios are
only meaningful within one run): per-token decode and prefill per method and context, the
latency ratios LESS/baseline, baseline/full and LESS/full (of the isolated measurements, and of
the interleaved ones with their intervals), throughput at equal memory, and the steady decode
step's time per phase. Returns Markdown lines."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lessctl.report.registry import ReportContext, register_section
from lessctl.report.tables import _figure, _md

MiB = 2**20


def _wide(d: pd.DataFrame) -> pd.DataFrame:
    return d.pivot_table(
        index=["method", "policy", "budget", "batch_size", "context"],
        columns="metric",
        values="value",
        aggfunc="last",
    ).reset_index()


def _figures(d: pd.DataFrame, fig_dir: Path) -> list[str]:
    names = []
    for metric, unit in (("latency_ms", "ms / token"), ("cache_bytes", "KV-cache bytes")):
        s = d[(d.metric == metric) & (d.batch_size == 1)]
        if s.empty:
            continue
        name = f"bench-{metric}.png"

        def draw(ax, s=s, unit=unit):
            for method, g in s.groupby("method"):
                g = g.sort_values("context")
                ax.plot(g.context, g.value, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


def _paired_section(d: pd.DataFrame) -> list[str]:
    """The interleaved ratios (:mod:`lessctl.bench.paired`) with their intervals."""
    from lessctl.bench import paired_ratios

    p = d[d.metric == "paired_ms"]
    if p.empty:
        return []
    est = paired_ratios(p.to_dict("records"))
    if not est:  # one method alone: no ratio
        return []
    t = pd.DataFrame(
        [
            {
                "context": c,
                "ratio": f"{num} / {den}",
                "value": e.value,
                "95% interval": f"[{e.low:.3f}, {e.high:.3f}]",
                "rounds": len(p.iloc[0]["samples_ms"]),
            }
            for (c, num, den), e in est.items()
        ]
    )
    return [
        "Latency ratios from interleaved steps (every method's cache in one process, one step "
        "of each in turn, so the machine's load falls on all alike; mean step time, paired "
        "bootstrap over rounds):",
        "",
        _md(t),
        "",
    ]


def _throughput_section(d: pd.DataFrame) -> list[str]:
    """Throughput at equal memory, measured interleaved (:mod:`lessctl.bench.paired`), with the
    ratios' intervals."""
    from lessctl.bench import throughput_ratios

    eq = d[d.metric == "equal_memory_tokens_per_s"]
    if eq.empty:
        return []
    cap = eq["memory_cap_mb"].dropna().iloc[0]
    t = eq[["method", "context"]].copy()
    t["batch that fits"] = eq["batch_size"].astype(int)
    t["tokens/s"] = eq["value"]
    t["rounds"] = eq["samples_ms"].map(len)
    out = [
        f"Throughput at equal memory ({cap:g} MiB of cache; the batch is capped by "
        "`bench.max_batch`; decode only; every method's batch decoded in the same interleaved "
        "rounds, tokens/s from the mean step time):",
        "",
        _md(t.sort_values(["context", "method"])),
        "",
    ]
    est = throughput_ratios(eq.to_dict("records"))
    if est:
        r = pd.DataFrame(
            [
                {
                    "context": c,
                    "tokens/s ratio": f"{num} / {den}",
                    "value": e.value,
                    "95% interval": f"[{e.low:.3f}, {e.high:.3f}]",
                }
                for (c, num, den), e in est.items()
            ]
        )
        out += [_md(r), ""]
    return out


def bench_sections(rows: pd.DataFrame, fig_dir: Path) -> list[str]:
    """Markdown for the newest bench run in ``rows`` (all saved rows; empty: no lines)."""
    d = rows[rows.get("task") == "bench"] if "task" in rows else rows[:0]
    if d.empty:
        return []
    run = sorted(d["_run"].dropna().unique())[-1] if "_run" in d else None
    if run is not None:
        d = d[d["_run"] == run]
    d = d.assign(budget=d["budget"].map(lambda b: "–" if b is None or b != b else str(int(b))))
    w = _wide(d)
    out = [
        "## Decode benchmark",
        "",
        f"One run, `{run}`; each method measured alone (the interleaved ratios: all in one "
        "process).",
        "",
    ]
    if "native_step" in d:
        used = set(d.loc[d["method"] == "less", "native_step"].dropna().map(bool))
        say = {
            frozenset({True}): "the C++ op",
            frozenset({False}): "the torch path",
            frozenset({True, False}): "the C++ op in some rows and the torch path in others",
        }.get(frozenset(used))
        if say:
            out += [f"LESS's steady steps ran {say} (`native_step`).", ""]
    if "triton_step" in d and bool(d.loc[d["method"] == "less", "triton_step"].dropna().any()):
        out += ["LESS's steady steps ran the Triton kernel on the GPU (`triton_step`).", ""]
    dec = w[w.get("latency_ms").notna()] if "latency_ms" in w else w[:0]
    if not dec.empty:
        t = dec[["method", "policy", "budget", "batch_size", "context"]].copy()
        t["ms/token"] = dec["latency_ms"]
        t["tokens/s"] = dec["tokens_per_s"]
        t["cache MiB"] = dec["cache_bytes"] / MiB
        t["peak MiB"] = dec["peak_mem_bytes"] / MiB
        if "prefill_s" in dec:
            t["prefill s"] = dec["prefill_s"]
            t["prefill peak MiB"] = dec["prefill_peak_mem_bytes"] / MiB
        out += [_md(t.sort_values(["context", "method"])), ""]
        lat = {(r.context, r.batch_size, r.method): r.latency_ms for r in dec.itertuples()}
        ratios = []
        for c, bs in sorted({(c, bs) for c, bs, _ in lat}):
            row = {"context": c, "batch_size": bs}
            for num, den in (("less", "baseline"), ("baseline", "full"), ("less", "full")):
                if (c, bs, num) in lat and (c, bs, den) in lat:
                    row[f"{num} / {den}"] = lat[(c, bs, num)] / lat[(c, bs, den)]
            ratios.append(row)
        out += ["Latency ratios (same run):", "", _md(pd.DataFrame(ratios)), ""]
    out += _paired_section(d)
    pre = w[w.get("latency_ms").isna()] if "latency_ms" in w else w[:0]
    pre = pre[pre["prefill_s"].notna()] if "prefill_s" in pre else pre[:0]
    if not pre.empty:
        t = pre[["method", "policy", "budget", "context"]].copy()
        t["prefill s"] = pre["prefill_s"]
        t["prefill peak MiB"] = pre["prefill_peak_mem_bytes"] / MiB
        t["cache MiB"] = pre["cache_bytes"] / MiB
        out += ["Prefill only (chunked protocol):", "", _md(t), ""]
    out += _throughput_section(d)
    metrics = pd.concat([d[d["method"] == "less"], d])["metric"]  # LESS's rows have every phase
    phases = [m for m in metrics if m.startswith("step_") and m.endswith("_us")]
    cols = [c for c in dict.fromkeys(phases) if c in w]  # in the bench's order
    if cols:
        st = w[w["step_total_us"].notna()]
        t = st[["method", "context"]].copy()
        for c in cols:
            t[c[5:-3]] = st[c]
        out += ["Steady decode step of layer 0, µs per phase (median):", "", _md(t), ""]
    out += [f"![{f}](figures/{f})" for f in _figures(d, fig_dir)] + [""]
    return out


@register_section("bench", 60)
def section(ctx: ReportContext) -> list[str]:
    return bench_sections(ctx.rows, ctx.fig_dir)
