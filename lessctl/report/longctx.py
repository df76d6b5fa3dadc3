"""The long-context part of `lessctl report`: per (task, dataset, model, policy, budget, question
position) an accuracy heatmap (length x depth) per method side by side, and a table of accuracy
(`contains`, mean over the grid, with the number of samples) against budget per method.

Registered as the report section `longctx`, called with all saved rows (it keeps the newest
per cell itself); returns Markdown lines. Baseline+, LESS and Performer are listed under the
budget of the Baseline of their run (Baseline+ holds a few more tokens, the LESS state's).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lessctl.methods import method_names
from lessctl.report.registry import ReportContext, register_section
from lessctl.stats import Samples, difference, verdict
from lessctl.tasks.longcontext import interval

ORDER = [*method_names(), "snapkv"]  # the registry's order; then rows labelled snapkv
TASKS = ("passkey", "needle", "variable_tracking", "common_words", "longctx")
METRIC = "contains"


def _less_minus_plus(gb: pd.DataFrame) -> str:
    """LESS − Baseline+ share found, paired by (length, depth) cell, with interval and verdict."""

    def cells(m: str) -> Samples:
        s = gb[gb.method == m]
        ids = tuple(zip(s.length, s.depth, strict=True))
        return Samples(s.ok.to_numpy(), s.samples.to_numpy(), ids)

    e = difference(cells("less"), cells("baseline_plus"))
    return f"{e.value:+.2f} [{e.low:+.2f}, {e.high:+.2f}] {verdict(e, lower_is_better=False)}"


def _methods(d: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(d.method))
    return [m for m in ORDER if m in present] + [m for m in present if m not in ORDER]


def _heatmap(path: Path, cells: dict[str, pd.DataFrame], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cells)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.8, 3.0), dpi=110, squeeze=False)
    im = None
    for ax, (method, piv) in zip(axes[0], cells.items(), strict=True):
        im = ax.imshow(piv.values.T, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(piv.index)), [str(int(x)) for x in piv.index], fontsize=7)
        ax.set_yticks(range(len(piv.columns)), [str(c) for c in piv.columns], fontsize=7)
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_title(method, fontsize=9)
        for i in range(piv.shape[0]):
            for j in range(piv.shape[1]):
                v = piv.values[i, j]
                if v == v:
                    ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
    axes[0][0].set_ylabel("depth", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _label(x) -> str:
    return "–" if x is None or x != x else str(int(x))


KEYS = ["task", "dataset", "source", "model", "question", "protocol", "subtask", "method", "policy"]


def prepared(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The long-context rows of ``rows`` (metric `contains`), the newest per cell, with
    ``at_budget`` (the budget a row is compared at; Full: -1) and ``ok`` (answers found);
    None when there is none."""
    if "task" not in rows or "length" not in rows:
        return None
    d = rows[rows.task.isin(TASKS) & (rows.metric == METRIC)].copy()
    if d.empty:
        return None
    d["depth"] = d["depth"].astype(object).where(d["depth"].notna(), "–")
    d["length"] = d["length"].fillna(-1)
    for col, default in (
        ("question", "after"),
        ("protocol", "prompt"),
        ("subtask", "–"),
        ("source", ""),
    ):
        d[col] = d[col].fillna(default) if col in d else default
    # the budget a row is compared at (full: none): Baseline+ at its budget less the tokens it
    # got for the state's bytes (so also when it ran apart from Baseline), others at their run's
    # Baseline budget
    base = d[d.method == "baseline"].groupby(["_run", "policy"])["budget"].first()
    extra = d["extra_tokens"] if "extra_tokens" in d else pd.Series(float("nan"), index=d.index)
    d["at_budget"] = [
        -1
        if m == "full"
        else b - x
        if m == "baseline_plus" and x == x and x is not None
        else base.get((r, p), b)
        for r, p, b, m, x in zip(d._run, d.policy, d.budget, d.method, extra, strict=True)
    ]
    d = d.sort_values("_run").drop_duplicates([*KEYS, "at_budget", "length", "depth"], keep="last")
    d["ok"] = d["value"] * d["samples"]
    return d


def sections(rows: pd.DataFrame, fig_dir: Path) -> list[str]:
    """Markdown for every long-context task in the rows (empty when there is none)."""
    d = prepared(rows)
    if d is None:
        return []
    out = [
        "## Long-context retrieval (share of answers found, `contains`)",
        "",
        "Greedy answers through the real-eviction cache; `question=after`: the context was "
        "compressed before the question was read. Full has no budget and is matched on the "
        "same task and data, over the cells (length × depth) the row's other methods ran. "
        "Interval: 95% Wilson over all samples of the grid. "
        "*LESS − Baseline+*: the difference in share found, paired over the grid's cells "
        "(length × depth, each resampled whole with its samples), with its bootstrap interval.",
        "",
    ]
    for (task, dataset, model, question, protocol, subtask), g in d.groupby(
        ["task", "dataset", "model", "question", "protocol", "subtask"], sort=True
    ):
        full = g[g.method == "full"]
        rest = g[g.method != "full"]
        table = []
        for (policy, budget), gb in rest.groupby(["policy", "at_budget"], sort=True):
            cells = set(zip(gb.length, gb.depth, strict=True))  # Full on the same cells only
            on = [c in cells for c in zip(full.length, full.depth, strict=True)]
            gb = pd.concat([full[on], gb])
            row = {"policy": policy, "budget": int(budget)}
            for m in _methods(gb):
                s = gb[gb.method == m]
                n = int(s.samples.sum())
                k = float(s.ok.sum())
                p = k / n
                lo, hi = interval([1.0] * round(k) + [0.0] * (n - round(k))) if n else (0, 0)
                row[m] = f"{p:.2f} [{lo:.2f}, {hi:.2f}] (n={n})"
            if {"less", "baseline_plus"} <= set(gb.method):
                row["LESS − Baseline+"] = _less_minus_plus(gb)
            table.append(row)
            cells = {}
            for m in _methods(gb):
                s = gb[gb.method == m]
                cells[m] = s.pivot_table(index="length", columns="depth", values="value")
            sub = "" if subtask == "–" else f"-{subtask}"
            proto = "" if protocol == "prompt" else f"-{protocol}"
            stem = f"longctx-{task}{sub}-{dataset}-{model}-{question}{proto}"
            name = f"{stem}-{policy}-{int(budget)}.png"
            name = name.replace("/", "_").replace(":", "_")
            _heatmap(
                fig_dir / name,
                cells,
                f"{task} ({dataset}) {model}, {policy} budget {int(budget)}, question {question}"
                + ("" if protocol == "prompt" else f", {protocol}"),
            )
            table[-1]["heatmap"] = f"![heatmap](figures/{name})"
        if not table:
            continue
        t = pd.DataFrame(table)
        cols = ["policy", "budget", *[m for m in ORDER if m in t.columns]]
        cols += [c for c in t.columns if c not in cols and c != "heatmap"]
        lengths = ", ".join(_label(x) for x in sorted(set(g.length)))
        sub = "" if subtask == "–" else f" / {subtask}"
        proto = "" if protocol == "prompt" else f", protocol {protocol}"
        out += [
            f"### {task}{sub} — {dataset}, {model}, question {question}{proto} (lengths {lengths})"
        ]
        out += [""]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |" for r in table]
        out += [""] + [r["heatmap"] for r in table] + [""]
    return out


@register_section("longctx", 50)
def section(ctx: ReportContext) -> list[str]:
    return sections(ctx.rows, ctx.fig_dir)
