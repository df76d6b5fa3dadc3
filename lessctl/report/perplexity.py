"""Report section: perplexity (word and token level; teacher-forced and streaming), a table per
metric with intervals and a figure per (model, dataset, policy)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lessctl.report.registry import ReportContext, register_section, task_rows
from lessctl.report.tables import LABEL, ORDER, _figure, _md, interval_table, method_table

TASKS = (
    ("perplexity", "teacher-forced, parallel form"),
    ("perplexity_streaming", "token by token through the evicting cache"),
)
METRICS = (("ppl_word", "word-level"), ("ppl_token", "token-level"))


def _ppl_figures(t: pd.DataFrame, fig_dir: Path, metric: str) -> list[str]:
    names = []
    for (model, dataset, policy), g in t.groupby(["model", "dataset", "policy"]):
        g = g.sort_values("budget")
        name = f"{metric}-{model}-{dataset}-{policy}.png"

        def draw(ax, g=g, title=f"{model} {dataset} {policy}"):
            for m in ORDER:
                ax.plot(g.budget, g[LABEL[m]], marker="o", label=LABEL[m])
            ax.set_xlabel("budget (tokens)")
            ax.set_ylabel(metric.rsplit("-", 1)[-1])
            ax.set_title(title)
            ax.legend(fontsize=7)

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
