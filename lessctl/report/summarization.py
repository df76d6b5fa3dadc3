"""Report section: summarisation ROUGE-1/2/L F-measure (higher is better), with intervals."""

from __future__ import annotations

from lessctl.report.registry import ReportContext, register_section, task_rows
from lessctl.report.tables import _md, interval_table, method_table


@register_section("summarization", 20)
def section(ctx: ReportContext) -> list[str]:
    summ = task_rows(ctx.latest, "task", "summarization")
    out = []
    for metric in ("rouge1", "rouge2", "rougeL"):
        t = method_table(summ, metric, lower_is_better=False)
        if not t.empty:
            shown = interval_table(t, lower_is_better=False, digits=3)
            out += [f"## Summarisation {metric.upper()} F-measure", "", _md(shown), ""]
    return out
