"""Report section: perplexity (word and token level; teacher-forced and streaming), a table per
metric with intervals and a figure per (model, dataset, policy): each method's figure with its
95% interval where one budget was evaluated, its curve over the budget with a band where
several were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lessctl import stats
from lessctl.report.registry import ReportContext, register_section, task_rows
from lessctl.report.tables import LABEL, ORDER, _figure, _md, interval_table, method_table

TASKS = (
    ("perplexity", "teacher-forced, parallel form"),
    ("perplexity_streaming", "token by token through the evicting cache"),
)
METRICS = (("ppl_word", "word-level"), ("ppl_token", "token-level"))


def _estimate(r: pd.Series, label: str) -> stats.Estimate:
    """The method's figure in table row `r` with its 95% interval (NaN bounds when the row kept
    no per-window values, or is missing)."""
    s = (r.get("_samples") or {}).get(label)
    if s is not None:
        return stats.figure(s)
    v = r[label] if label in r else float("nan")
    return stats.Estimate(float(v), float("nan"), float("nan"))


def _variants(g: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The figure's rows split by what besides the budget tells them apart (window, source,
    evaluation settings), each with a legend suffix ("" when there is only one)."""
    cols = [c for c in g.columns if c not in _NOT_VARIANT and not c.startswith("_")]
    cols = [c for c in cols if c not in LABEL.values() and g[c].nunique(dropna=False) > 1]
    if not cols:
        return [("", g)]
    return [
        (" (" + ", ".join(f"{c} {v}" for c, v in zip(cols, key, strict=True)) + ")", sub)
        for key, sub in g.groupby(cols, sort=True, dropna=False)
    ]


_NOT_VARIANT = {"model", "dataset", "policy", "budget", "gap closed", "LESS trained at"}


def _draw_points(ax, g: pd.DataFrame) -> None:
    """One evaluated budget: a point per method with its 95% interval as an error bar."""
    variants = _variants(g)
    shown = [m for m in ORDER if g[LABEL[m]].notna().any()]  # methods that were evaluated
    width = 0.6 / len(variants)
    for k, (suffix, sub) in enumerate(variants):
        r = sub.iloc[-1]
        est = [_estimate(r, LABEL[m]) for m in shown]
        x = np.arange(len(shown)) + (k - (len(variants) - 1) / 2) * width
        y = np.array([e.value for e in est])
        lo = np.array([e.value - e.low for e in est])
        hi = np.array([e.high - e.value for e in est])
        err = np.nan_to_num(np.vstack([lo, hi]), nan=0.0)
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=suffix.strip(" ()") or None)
    ax.set_xticks(np.arange(len(shown)), [LABEL[m] for m in shown], fontsize=8)
    budget = g["budget"].iloc[-1]
    at = f"budget {int(budget)} tokens; " if budget == budget and budget is not None else ""
    ax.set_xlabel(f"method ({at}bars: 95% interval)")
    if len(variants) > 1:
        ax.legend(fontsize=7)


def _draw_curves(ax, g: pd.DataFrame) -> None:
    """Several budgets: a curve per method over the budget with its 95% interval as a band;
    Full (no budget) as a horizontal line with its band."""
    for suffix, sub in _variants(g):
        sub = sub.sort_values("budget")
        x = sub["budget"].to_numpy(dtype=float)
        for m in ORDER:
            est = [_estimate(r, LABEL[m]) for _, r in sub.iterrows()]
            y = np.array([e.value for e in est])
            if np.isnan(y).all():
                continue
            (line,) = ax.plot(x, y, marker="o", label=LABEL[m] + suffix)
            lo, hi = np.array([e.low for e in est]), np.array([e.high for e in est])
            ok = ~(np.isnan(y) | np.isnan(lo) | np.isnan(hi))
            if ok.sum() > 1:
                ax.fill_between(x[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, lw=0)
            elif ok.any():  # one budget with an interval: a bar, as a band needs two
                err = [y[ok] - lo[ok], hi[ok] - y[ok]]
                ax.errorbar(x[ok], y[ok], yerr=err, fmt="none", capsize=3, ecolor=line.get_color())
    budgets = sorted(g["budget"].dropna().unique())
    ax.set_xticks(budgets, [str(int(b)) for b in budgets])
    ax.set_xlabel("budget (tokens; bands: 95% interval)")
    ax.legend(fontsize=7)


def _ppl_figures(t: pd.DataFrame, fig_dir: Path, metric: str) -> list[str]:
    """A figure per (model, dataset, policy): with one evaluated budget, each method's figure
    with its 95% interval; with several, each method's curve over the budget with its band."""
    names = []
    for (model, dataset, policy), g in t.groupby(["model", "dataset", "policy"]):
        g = g.sort_values("budget")
        name = f"{metric}-{model}-{dataset}-{policy}.png"

        def draw(ax, g=g, title=f"{model} {dataset} {policy}"):
            if g["budget"].nunique() > 1:
                _draw_curves(ax, g)
            else:
                _draw_points(ax, g)
            ax.set_ylabel(metric.rsplit("-", 1)[-1])
            ax.set_title(title)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


@register_section("perplexity", 10)
def section(ctx: ReportContext) -> list[str]:
    out = []
    for task, how in TASKS:
        ppl = task_rows(ctx.latest, "task", task)
        for metric, title in METRICS:
            t = method_table(ppl, metric, lower_is_better=True)
            if t.empty:
                continue
            shown = interval_table(t, lower_is_better=True, digits=2)
            out += [f"## Perplexity ({title}, {how})", "", _md(shown), ""]
            figs = _ppl_figures(t, ctx.fig_dir, f"{task}-{metric}")
            out += [f"![{f}](figures/{f})" for f in figs] + [""]
    return out
