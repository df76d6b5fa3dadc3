"""`lessctl report`: tables and figures from saved runs only → `results/REPORT.md`.

Reads every finished `results/runs/*/*/rows.jsonl` (with `run_name=X`: only the runs labelled
X, i.e. one study's runs); when a (model, dataset, source, method, policy,
budget, metric, ...) key was measured in several runs, the newest run wins. Per task a table
Full / Baseline / Baseline+ / LESS / Performer with the share of the Baseline+→Full gap that
LESS closes; figures under `results/figures/`. No timestamps are written, so re-running on the
same runs gives the same file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from lessctl.runs import list_runs

ORDER = ["full", "baseline", "baseline_plus", "less", "performer"]
LABEL = {
    "full": "Full",
    "baseline": "Baseline",
    "baseline_plus": "Baseline+",
    "less": "LESS",
    "performer": "Performer",
}


def load_rows(results_dir: str | Path, run_name: str | None = None) -> pd.DataFrame:
    """All saved rows of finished runs (only those labelled `run_name` when given), newest run
    last."""
    rows = []
    for run in list_runs(results_dir):
        if run.meta.get("status") != "finished":
            continue
        if run_name is not None and run.meta.get("run_name") != run_name:
            continue
        for r in run.rows():
            rows.append({**r, "_run": run.path.name, "_command": run.path.parent.name})
    return pd.DataFrame(rows)


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    keys = [k for k in keys if k in df.columns]
    return df.sort_values("_run").drop_duplicates(keys, keep="last")


def gap_closed(full: float, plus: float, less: float) -> float:
    """Share of the Baseline+→Full gap that LESS closes (1 = reaches Full, 0 = no better), for
    lower-is-better metrics; NaN when Baseline+ is not worse than Full (no gap to close)."""
    vals = (full, plus, less)
    if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in vals):
        return float("nan")
    if plus <= full:
        return float("nan")
    return (plus - less) / (plus - full)


INT_COLS = {
    "window",
    "budget",
    "layer",
    "layers",
    "layers LESS < Baseline+",
    "context",
    "batch_size",
    "cache_bytes",
    "peak_mem_bytes",
}


def _fmt(x: Any, col: str = "", digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if col in INT_COLS and isinstance(x, float):
        return str(int(x))
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], c) for c in cols) + " |")
    return "\n".join(lines)


def _trained_at(less: pd.DataFrame) -> str:
    """The budget LESS's kernels were trained at (rows `trained_budget`, `transfer`): e.g. `32`,
    or `32 (transfer)` when evaluated at another budget with less.transfer=true."""
    if less.empty or "trained_budget" not in less or less["trained_budget"].isna().all():
        return "–"
    r = less.iloc[-1]
    tb = r["trained_budget"]
    if tb is None or tb != tb:
        return "–"
    return f"{int(tb)}" + (" (transfer)" if r.get("transfer") is True else "")


def method_table(df: pd.DataFrame, metric: str, lower_is_better: bool) -> pd.DataFrame:
    """One row per (model, dataset, source, window, policy, budget): a column per method + the
    gap closed. Full is matched on the same model, dataset, source and window."""
    d = df[df.metric == metric]
    d = d.assign(window=d["window"].fillna(-1) if "window" in d else -1)
    ctx = ["model", "dataset", "source", "window"]
    full = d[d.method == "full"].groupby(ctx)["value"].last()
    rest = d[d.method != "full"]
    # baseline_plus/less/performer rows are keyed by the policy's (baseline) budget
    base_budget = rest[rest.method == "baseline"].groupby([*ctx, "policy", "_run"])["budget"].last()
    out = []
    for key, g in rest.groupby([*ctx, "policy", "_run"], sort=True):
        budget = base_budget.get(key, g.budget.min())
        row = dict(zip([*ctx, "policy"], key[:5], strict=True))
        row["budget"] = int(budget) if budget == budget else None
        row["Full"] = full.get(key[:4], float("nan"))
        for m in ORDER[1:]:
            v = g[g.method == m]["value"]
            row[LABEL[m]] = v.iloc[-1] if len(v) else float("nan")
        row["LESS trained at"] = _trained_at(g[g.method == "less"])
        f, p, le = row["Full"], row["Baseline+"], row["LESS"]
        row["gap closed"] = gap_closed(f, p, le) if lower_is_better else gap_closed(-f, -p, -le)
        out.append(row)
    t = pd.DataFrame(out)
    if t.empty:
        return t
    keys = [*ctx, "policy", "budget"]
    t = t.sort_values(keys).drop_duplicates(keys, keep="last")
    if (t["window"] == -1).all():
        t = t.drop(columns="window")
    return t


def _figure(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    draw(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


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


def _bench_figures(d: pd.DataFrame, fig_dir: Path) -> list[str]:
    names = []
    for metric, unit in (("latency_ms", "ms / token"), ("cache_bytes", "KV-cache bytes")):
        s = d[d.metric == metric]
        if s.empty:
            continue
        name = f"bench-{metric}.png"

        def draw(ax, s=s, unit=unit):
            for (method, bs), g in s.groupby(["method", "batch_size"]):
                g = g.sort_values("context")
                ax.plot(g.context, g.value, marker="o", label=f"{method} (batch {int(bs)})")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


def run(results_dir: str | Path = "results", run_name: str | None = None) -> Path:
    """Write `<results_dir>/REPORT.md` and its figures from the finished runs (those labelled
    `run_name` when given: one study's runs); returns the report's path."""
    results_dir = Path(results_dir)
    df = load_rows(results_dir, run_name)
    fig_dir = results_dir / "figures"
    out = [
        "# lessctl report",
        "",
        "Generated by `lessctl report` from the saved runs under `results/runs/` (each row "
        "names its run folder, which holds the config, overrides and versions)"
        + (f"; only runs labelled `run_name={run_name}`." if run_name else "."),
        "",
    ]
    if df.empty:
        out.append("No finished runs yet.")
        path = results_dir / "REPORT.md"
        path.write_text("\n".join(out) + "\n")
        return path
    if (df.get("source", pd.Series(dtype=str)).astype(str).str.startswith("embedded:")).any():
        out += [
            "> Rows with source `embedded:*` ran on the offline stand-in corpora (see "
            "assets.md): they are not comparable with the paper's WikiText / PG-19 / "
            "XSum numbers.",
            "",
        ]
    keys = [
        "task",
        "stage",
        "model",
        "dataset",
        "source",
        "method",
        "policy",
        "budget",
        "metric",
        "window",
        "layer",
        "context",
        "batch_size",
        "mode",
    ]
    latest = _latest(df, keys)
    for task, how in (
        ("perplexity", "teacher-forced, parallel form"),
        ("perplexity_streaming", "token by token through the evicting cache"),
    ):
        ppl = latest[latest.get("task") == task] if "task" in latest else latest[:0]
        for metric, title in (("ppl_word", "word-level"), ("ppl_token", "token-level")):
            t = method_table(ppl, metric, lower_is_better=True)
            if t.empty:
                continue
            out += [f"## Perplexity ({title}, {how})", "", _md(t), ""]
            figs = _ppl_figures(t, fig_dir, f"{task}-{metric}")
            out += [f"![{f}](figures/{f})" for f in figs] + [""]
    summ = latest[latest.get("task") == "summarization"] if "task" in latest else latest[:0]
    for metric in ("rouge1", "rouge2", "rougeL"):
        t = method_table(summ, metric, lower_is_better=False)
        if not t.empty:
            out += [f"## Summarisation {metric.upper()} F-measure", "", _md(t), ""]
    train = latest[latest.get("stage") == "train"] if "stage" in latest else latest[:0]
    if not train.empty:
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
        out += [
            "## Kernel training (validation MSE after o_proj, mean over layers)",
            "",
            _md(piv),
            "",
        ]
        out += [f"![{f}](figures/{f})" for f in _layer_figures(train, fig_dir)] + [""]
    bench = latest[latest.get("task") == "bench"] if "task" in latest else latest[:0]
    if not bench.empty:
        bench = bench.assign(
            budget=bench["budget"].map(lambda b: "–" if b is None or b != b else str(int(b)))
        )
        piv = bench.pivot_table(
            index=["method", "policy", "budget", "batch_size", "context"],
            columns="metric",
            values="value",
            aggfunc="last",
        ).reset_index()
        out += ["## Decode benchmark", "", _md(piv), ""]
        out += [f"![{f}](figures/{f})" for f in _bench_figures(bench, fig_dir)] + [""]
    runs = sorted(set(latest["run"])) if "run" in latest else []
    out += ["## Runs", ""] + [f"- `{r}`" for r in runs] + [""]
    path = results_dir / "REPORT.md"
    path.write_text("\n".join(out))
    return path
