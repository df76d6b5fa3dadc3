"""The `experiment=variants` part of `lessctl report` (eval runs named `*-variants`): for each
dataset, policy, budget and perplexity measure, every sidekick variant's figure and the share of
the Baseline+ → Full gap it closes, with its paired interval; the change in gap closed against
the paper's form (learned kernels, one sum state), paired over the same windows; the state's
ranks and Baseline+'s extra tokens (equal bytes); and a figure of gap closed per variant.

A variant is named by its kernel family, state variant and ranks (the rows' `kernel_kind`,
`state_variant`, `state_ranks`); Performer's untrained random features are one of them. Each is
compared with the Baseline+ of its own state bytes (the Baseline+ row of the same ranks).
Returns Markdown lines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from lessctl import stats
from lessctl.report.registry import ReportContext, register_section
from lessctl.report.tables import _figure, _md, _samples

MEASURES = {"ppl_word": "word perplexity", "ppl_token": "token perplexity"}
PAPER = ("learned", "sum")  # the paper's form: its kernel family and state


def _ranks(r: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in r) if isinstance(r, list) else ()


def variant_label(row: pd.Series) -> str:
    """``learned · sum · R 8`` (a rank per layer: its mean, ``R ~6.5``)."""
    ranks = _ranks(row.get("state_ranks"))
    rank = (
        ""
        if not ranks
        else f"R {ranks[0]}"
        if len(set(ranks)) == 1
        else "R ~" + (f"{sum(ranks) / len(ranks):.1f}")
    )
    return f"{row.get('kernel_kind')} · {row.get('state_variant')} · {rank}".strip(" ·")


def _interval(e: stats.Estimate, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(e.low):
        return f.format(e.value)
    return f"{f.format(e.value)} [{f.format(e.low)}, {f.format(e.high)}]"


def _word(e: stats.Estimate) -> str:
    if math.isnan(e.low):
        return "–"
    return "not significant" if not e.significant else ("better" if e.value > 0 else "worse")


def variants_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, policy, budget, measure, variant): its perplexity, gap closed with
    its paired interval and word against Baseline+ (the interval excludes 0), and the change
    in gap closed against the paper's form with its interval and word. `_gap`, `_low`,
    `_high` hold gap closed's figures for the figure."""
    need = {"_run", "task", "metric", "method", "value", "kernel_kind"}
    if df.empty or not need <= set(df.columns):
        return pd.DataFrame()
    d = df[
        df["_run"].astype(str).str.endswith("-variants")
        & (df["task"] == "perplexity")
        & df["metric"].isin(list(MEASURES))
    ]
    out = []
    # Full evicts nothing (no budget) and Baseline+'s rows carry its budget with the extra
    # tokens: group by what the three share, then by the kernels' budget
    for (dataset, policy, metric), g in d.groupby(["dataset", "policy", "metric"]):
        g = g.sort_values("_run")
        full = g[g.method == "full"]
        if full.empty or (full_s := _samples(full.iloc[-1])) is None:
            continue
        plus = {}
        for _, r in g[g.method == "baseline_plus"].iterrows():
            extra = r.get("extra_tokens")
            base = r.budget - (0 if extra is None or pd.isna(extra) else extra)
            plus[(float(base), _ranks(r.state_ranks))] = r
        kerneled = g[g.kernel_kind.notna()].copy()
        for budget, kb in kerneled.groupby("budget"):
            out += _variant_rows(dataset, policy, budget, metric, full, full_s, plus, kb)
    return pd.DataFrame(out)


def _variant_rows(dataset, policy, budget, metric, full, full_s, plus, kb) -> list[dict]:
    """The rows of one (dataset, policy, measure) at the kernels' budget ``budget``."""
    out = []
    kb = kb.copy()
    kb["_label"] = kb.apply(variant_label, axis=1)
    latest = kb.drop_duplicates("_label", keep="last")
    triples: dict[str, list] = {}  # label -> [Full, Baseline+, variant samples, row, plus row]
    for _, v in latest.iterrows():
        p = plus.get((float(budget), _ranks(v.state_ranks)))
        smp = _samples(v)
        if p is None or smp is None or (p_s := _samples(p)) is None:
            continue
        triples[v._label] = [full_s, p_s, smp, v, p]
    paper = next(
        (
            lab
            for lab, t in triples.items()
            if (t[3].kernel_kind, t[3].state_variant) == PAPER and t[3].method == "less"
        ),
        None,
    )
    for lab, (f_s, p_s, v_s, v, p) in triples.items():
        gap = stats.gap_closed(f_s, p_s, v_s)
        row = {
            "dataset": dataset,
            "policy": policy,
            "budget": budget,
            "measure": MEASURES[metric],
            "variant": lab,
            "method": v.method,
            "state ranks": _ranks(v.state_ranks)[0]
            if len(set(_ranks(v.state_ranks))) == 1
            else ",".join(map(str, _ranks(v.state_ranks))),
            "Baseline+ extra tokens": "–"
            if pd.isna(p.get("extra_tokens"))
            else int(p.extra_tokens),
            "Full": full.iloc[-1].value,
            "Baseline+": p.value,
            "variant ppl": v.value,
            "gap closed": _interval(gap),
            "vs Baseline+": _word(gap),
            "Δ gap closed vs paper": "–",
            "vs paper": "–",
            "_gap": gap.value,
            "_low": gap.low,
            "_high": gap.high,
        }
        if paper is not None and lab != paper:
            change = stats.gap_closed_change(triples[paper][:3], [f_s, p_s, v_s])
            row["Δ gap closed vs paper"] = _interval(change, signed=True)
            row["vs paper"] = _word(change)
        out.append(row)
    return out


def _figures(table: pd.DataFrame, fig_dir: Path) -> list[str]:
    names = []
    for (dataset, policy, budget, measure), g in table.groupby(
        ["dataset", "policy", "budget", "measure"]
    ):
        name = f"variants-gap-{dataset}-{policy}-{int(budget)}-{measure.split()[0]}.png"

        def draw(ax, g=g, title=f"variants: {dataset} {policy} budget {int(budget)}, {measure}"):
            y = range(len(g))
            err = [g["_gap"] - g["_low"], g["_high"] - g["_gap"]]
            ax.barh(list(y), g["_gap"], xerr=None if g["_low"].isna().any() else err, capsize=3)
            ax.set_yticks(list(y), list(g["variant"]), fontsize=7)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_xlabel("gap closed (Baseline+ → Full), 95% interval")
            ax.set_title(title, fontsize=9)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


def sections(df: pd.DataFrame, fig_dir: Path) -> list[str]:
    table = variants_table(df)
    if table.empty:
        return []
    out = [
        "## Variants: the sidekick's forms at equal state bytes (experiment=variants)",
        "",
        "Each variant's share of the Baseline+ → Full gap with its paired interval (*vs "
        "Baseline+*: better when the interval lies above 0), and the change against the "
        "paper's form (learned kernels, one sum state) paired over the same windows. Baseline+ "
        "is given the tokens worth each variant's state bytes.",
        "",
        _md(table.drop(columns=["_gap", "_low", "_high"])),
        "",
    ]
    out += [f"![{f}](figures/{f})" for f in _figures(table, fig_dir)] + [""]
    return out


@register_section("variants", 75)
def section(ctx: ReportContext) -> list[str]:
    return sections(ctx.rows, ctx.fig_dir)
