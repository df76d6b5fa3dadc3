"""Report section: kernel training (`stage=train` rows), validation MSE after o_proj per
method, mean over layers, how many layers LESS beats Baseline+ in, and a figure per layer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lessctl.report.registry import ReportContext, register_section, task_rows
from lessctl.report.tables import LABEL, _figure, _md


def _layer_figures(df: pd.DataFrame, fig_dir: Path) -> list[str]:
    d = df[(df.get("stage") == "train") & (df.metric == "val_mse")] if "stage" in df else df[:0]
    names = []
    for (model, policy, budget), g in d.groupby(["model", "policy", "budget"]):
        name = f"train-mse-{model}-{policy}-{int(budget)}.png"

        def draw(ax, g=g, title=f"{model} {policy} budget {int(budget)}: validation MSE"):
            for m in ("baseline", "baseline_plus", "less"):
                s = g[g.method == m].sort_values("layer")
                ax.plot(s.layer, s.value, marker=".", label=LABEL[m])
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel("MSE after o_proj")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


@register_section("training", 40)
def section(ctx: ReportContext) -> list[str]:
    train = task_rows(ctx.latest, "stage", "train")
    if train.empty:
        return []
    piv = train.pivot_table(
        index=["model", "policy", "budget"], columns="method", values="value", aggfunc="mean"
    ).reset_index()
    wins = train.pivot_table(
        index=["model", "policy", "budget", "layer"], columns="method", values="value"
    ).reset_index()
    wins["less_below_plus"] = wins["less"] < wins["baseline_plus"]
    cnt = wins.groupby(["model", "policy", "budget"])["less_below_plus"].agg(["sum", "count"])
    piv = piv.merge(cnt.reset_index(), on=["model", "policy", "budget"])
    piv = piv.rename(
        columns={
            "baseline": "Baseline MSE",
            "baseline_plus": "Baseline+ MSE",
            "less": "LESS MSE",
            "sum": "layers LESS < Baseline+",
            "count": "layers",
        }
    )
    out = [
        "## Kernel training (validation MSE after o_proj, mean over layers)",
        "",
        _md(piv),
        "",
    ]
    return out + [f"![{f}](figures/{f})" for f in _layer_figures(train, ctx.fig_dir)] + [""]
