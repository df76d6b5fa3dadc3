"""The retrieval study's part of `lessctl report` (`make retrieval`): LESS under several
eviction policies against Baseline+ under a reference policy, per long-context task and
pooled over the tasks, at each budget.

For every reference policy R that has Baseline+ rows at a budget, each LESS row at that budget
(under any policy P) gets: its share found; *LESS(P) − Baseline+(R)*, paired over the grid's
cells; the share of the Full − Baseline+(R) drop that it recovers, ``(LESS − B+) / (Full −
B+)`` (:func:`lessctl.stats.gap_closed`, paired over the cells Full, Baseline+ and LESS share);
and *LESS(P) − LESS(R)*. A cell is (task, subtask, length, depth) with its samples; intervals
are paired bootstrap intervals over cells (each resampled whole), accuracies' Wilson intervals
over samples. Drawn: share found against budget per task and pooled, with those intervals.

Registered as the report section `retrieval`; it writes nothing unless LESS ran under at
least two policies on one task at one budget (then :mod:`lessctl.report.longctx` alone has no
cross-policy comparison).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lessctl.report.longctx import prepared
from lessctl.report.registry import ReportContext, register_section
from lessctl.stats import Estimate, Samples, difference, gap_closed, paired, verdict
from lessctl.tasks.longcontext import interval

GROUP = ["task", "dataset", "model", "question", "protocol", "subtask"]
CELL = ["task", "subtask", "length", "depth"]
POOLED = "all tasks"


def _samples(s: pd.DataFrame) -> Samples:
    ids = tuple(zip(*(s[c] for c in CELL), strict=True))
    return Samples(s.ok.to_numpy(), s.samples.to_numpy(), ids)


def _share(s: pd.DataFrame) -> tuple[float, float, float, int]:
    """Share found with its Wilson interval and the number of samples."""
    n = int(s.samples.sum())
    k = round(float(s.ok.sum()))
    lo, hi = interval([1.0] * k + [0.0] * (n - k)) if n else (float("nan"),) * 2
    return (k / n if n else float("nan")), lo, hi, n


def _fmt(e: Estimate, signed: bool = True) -> str:
    f = "{:+.2f}" if signed else "{:.2f}"
    value, low, high = (x + 0.0 for x in (e.value, e.low, e.high))  # no "-0.00"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"


def _recovered(full: Samples, plus: Samples, less: Samples) -> str:
    """Share of the Full − Baseline+ drop that LESS recovers, with its interval."""
    f, p, _ = paired([full, plus, less])
    if abs(f.figure() - p.figure()) < 1e-12:
        return "– (no drop)"
    e = gap_closed(full, plus, less)
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        # Resampled grids in which Full and Baseline+ tie leave the ratio undefined.
        return f"{e.value + 0.0:.2f} (interval undefined: some resampled grids have no drop)"
    return _fmt(e, signed=False)


def _rows(g: pd.DataFrame) -> list[dict[str, str]]:
    """The comparison rows of one task group (or the pooled tasks)."""
    full = g[g.method == "full"]
    out = []
    for budget in sorted(set(g.at_budget[g.method != "full"])):
        gb = g[g.at_budget == budget]
        refs = sorted(set(gb.policy[gb.method == "baseline_plus"]))
        for ref in refs:
            plus = gb[(gb.method == "baseline_plus") & (gb.policy == ref)]
            less_ref = gb[(gb.method == "less") & (gb.policy == ref)]
            for pol in sorted(set(gb.policy[gb.method == "less"]), key=lambda p: (p != ref, p)):
                less = gb[(gb.method == "less") & (gb.policy == pol)]
                cells = set(zip(*(less[c] for c in CELL), strict=True))
                on = [c in cells for c in zip(*(full[c] for c in CELL), strict=True)]
                p, lo, hi, n = _share(less)
                row = {
                    "budget": str(int(budget)),
                    "LESS policy": pol,
                    "LESS": f"{p:.2f} [{lo:.2f}, {hi:.2f}] (n={n})",
                    "reference": ref,
                }
                bp, blo, bhi, bn = _share(plus)
                row["Baseline+"] = f"{bp:.2f} [{blo:.2f}, {bhi:.2f}] (n={bn})"
                if any(on):
                    fp, flo, fhi, fn = _share(full[on])
                    row["Full"] = f"{fp:.2f} [{flo:.2f}, {fhi:.2f}] (n={fn})"
                try:
                    d = difference(_samples(less), _samples(plus))
                    row["LESS − Baseline+"] = f"{_fmt(d)} {verdict(d, lower_is_better=False)}"
                except ValueError:  # no shared cells
                    row["LESS − Baseline+"] = "– (no shared cells)"
                if any(on):
                    try:
                        row["drop recovered"] = _recovered(
                            _samples(full[on]), _samples(plus), _samples(less)
                        )
                    except ValueError:
                        row["drop recovered"] = "– (no shared cells)"
                if pol != ref and not less_ref.empty:
                    try:
                        d = difference(_samples(less), _samples(less_ref))
                        row[f"LESS − LESS({ref})"] = (
                            f"{_fmt(d)} {verdict(d, lower_is_better=False)}"
                        )
                    except ValueError:
                        row[f"LESS − LESS({ref})"] = "– (no shared cells)"
                out.append(row)
    return out


def _figure(path: Path, groups: dict[str, pd.DataFrame]) -> None:
    """Share found against budget: one panel per task (and pooled), a line per method/policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), dpi=110, squeeze=False)
    for ax, (title, g) in zip(axes[0], groups.items(), strict=True):
        full = g[g.method == "full"]
        if not full.empty:
            p, lo, hi, _ = _share(full)
            ax.axhline(p, color="k", ls="--", lw=1, label="full")
            ax.axhspan(lo, hi, color="k", alpha=0.08)
        rest = g[g.method.isin(["baseline_plus", "less"])]
        for (method, pol), s in rest.groupby(["method", "policy"], sort=True):
            pts = [(b, *_share(sb)[:3]) for b, sb in s.groupby("at_budget", sort=True)]
            xs = [int(b) for b, *_ in pts]
            ys = [y for _, y, _, _ in pts]
            err = [[max(y - lo, 0) for _, y, lo, _ in pts], [max(hi - y, 0) for _, y, _, hi in pts]]
            name = "Baseline+" if method == "baseline_plus" else "LESS"
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=f"{name} ({pol})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget (tokens)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("share found (contains)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def sections(rows: pd.DataFrame, fig_dir: Path) -> list[str]:
    d = prepared(rows)
    if d is None:
        return []
    less = d[d.method == "less"]
    if not (less.groupby([*GROUP, "at_budget"]).policy.nunique() >= 2).any():
        return []
    groups: dict[str, pd.DataFrame] = {}
    for key, g in d.groupby(GROUP, sort=True):
        task, dataset, model, question, protocol, subtask = key
        sub = "" if subtask == "–" else f" / {subtask}"
        groups[f"{task}{sub} ({dataset}, {model}, question {question}, {protocol})"] = g
    if len(groups) > 1:
        groups[POOLED] = d
    out = [
        "## Retrieval: LESS under each policy against Baseline+",
        "",
        "Per task and pooled over the tasks (a cell: task × length × depth with its samples). "
        "*LESS − Baseline+*: difference in share found, paired over cells, bootstrap interval. "
        "*drop recovered*: (LESS − Baseline+) / (Full − Baseline+), the share of the drop "
        "from Full to Baseline+ that LESS wins back, paired over the cells all three share. "
        "*LESS − LESS(ref)*: LESS under this policy against LESS under the reference policy "
        "(the policy of the Baseline+ row), same kernels' training text and budget.",
        "",
    ]
    for title, g in groups.items():
        table = _rows(g)
        if not table:
            continue
        cols = list(dict.fromkeys(c for r in table for c in r))
        out += [f"### {title}", ""]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |" for r in table]
        out += [""]
    name = "retrieval-share-by-budget.png"
    _figure(fig_dir / name, groups)
    out += [f"![share found against budget](figures/{name})", ""]
    return out


@register_section("retrieval", 55)
def section(ctx: ReportContext) -> list[str]:
    return sections(ctx.rows, ctx.fig_dir)
