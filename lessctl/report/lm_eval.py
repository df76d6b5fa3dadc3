"""Report section: lm-evaluation-harness tasks (`task=lm_eval` rows)."""

from __future__ import annotations

import pandas as pd

from lessctl.report.registry import ReportContext, register_section
from lessctl.report.tables import LABEL, ORDER, _md


def lm_eval_section(latest: pd.DataFrame) -> list[str]:
    """Markdown for `task=lm_eval` rows: per (model, lm-eval task, source, metric, window,
    policy, run) a column per method with `value ± lm-eval's standard error`; the budget is the
    Baseline's (Baseline+ keeps more tokens)."""
    d = latest[latest.get("task") == "lm_eval"] if "task" in latest else latest[:0]
    if d.empty:
        return []

    def cell(r) -> str:
        err = r.get("stderr")
        return f"{r['value']:.4g}" + (f" ± {err:.2g}" if err is not None and err == err else "")

    d = d.assign(cell=d.apply(cell, axis=1))
    ctx = ["model", "lm_eval_task", "source", "metric", "window", "policy", "_run"]
    out = []
    for key, g in d.groupby(ctx, sort=True):
        row = dict(zip(ctx[:-1], key[:-1], strict=True))
        base = g[g.method == "baseline"]["budget"]
        row["budget"] = (base if len(base) else g[g.method != "full"]["budget"]).min()
        for m in ORDER:
            v = g[g.method == m]["cell"]
            row[LABEL[m]] = v.iloc[-1] if len(v) else "–"
        out.append(row)
    t = pd.DataFrame(out).drop_duplicates(ctx[:-1], keep="last")
    return [
        "## lm-evaluation-harness tasks (value ± lm-eval's standard error)",
        "",
        _md(t),
        "",
    ]


@register_section("lm_eval", 30)
def section(ctx: ReportContext) -> list[str]:
    return lm_eval_section(ctx.latest)
