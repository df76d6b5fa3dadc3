"""`lessctl report`: tables and figures from saved runs only → `results/REPORT.md`.

Reads every finished `results/runs/*/*/rows.jsonl` (with `run_name=X`: only the runs labelled
X, i.e. one study's runs); when a (model, dataset, source, method, policy,
budget, metric, ...) key was measured in several runs, the newest run wins. Per task a table
Full / Baseline / Baseline+ / LESS / Performer with the share of the Baseline+→Full gap that
LESS closes; figures under `results/figures/`. Where rows keep their per-window or per-example
values, every figure carries a 95% seeded bootstrap interval and LESS − Baseline+ / LESS −
Baseline are paired differences with a word (better / worse / not significant), see
lessctl.stats. No timestamps are written, so re-running on the same runs gives the same file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import lessctl.methods  # noqa: F401  (registers every method)
from lessctl import stats
from lessctl.errors import LessctlError
from lessctl.methods.registry import labels
from lessctl.report_bench import bench_sections
from lessctl.report_longctx import sections as longctx_sections
from lessctl.report_study import sections as study_sections
from lessctl.runs import RunError, list_runs, warn
from lessctl.stats import Samples

LABEL = labels()  # method -> its column label, in the registry's order (lessctl.methods)
ORDER = list(LABEL)


def load_rows(results_dir: str | Path, run_name: str | None = None) -> pd.DataFrame:
    """All saved rows of finished runs (only those labelled `run_name` when given), newest run
    last; a run folder that cannot be read is skipped with one warning line naming it."""
    rows = []
    for run in list_runs(results_dir):
        if run.meta.get("status") != "finished":
            continue
        if run_name is not None and run.meta.get("run_name") != run_name:
            continue
        try:
            saved = run.rows()
        except RunError as err:
            warn(f"skipped a run folder: {err}")
            continue
        for r in saved:
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
    cols = [c for c in df.columns if not c.startswith("_")]
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
    transfer = r.get("transfer")
    moved = transfer == transfer and bool(transfer)  # NaN: no value; numpy bools count too
    return f"{int(tb)}" + (" (transfer)" if moved else "")


# settings a method's figure depends on beside model, data and window: Full is only compared
# with the methods of a run when these match (perplexity: windows; summarisation: the prompt)
SETTINGS = ("windows", "samples", "shots", "sampling", "max_new_tokens", "max_prompt_tokens")


def method_table(df: pd.DataFrame, metric: str, lower_is_better: bool) -> pd.DataFrame:
    """One row per (model, dataset, source, window, settings, policy, budget): a column per
    method + the gap closed. Full is matched on the same model, dataset, source, window and
    `SETTINGS` (the columns the rows have), never across different evaluation settings."""
    d = df[df.metric == metric] if "metric" in df else df[:0]
    if d.empty:  # e.g. a results folder with bench runs alone
        return pd.DataFrame()
    d = d.assign(window=d["window"].fillna(-1) if "window" in d else -1)
    extra = [c for c in SETTINGS if c in d and d[c].notna().any()]
    d = d.assign(**{c: d[c].map(lambda x: "–" if x != x or x is None else str(x)) for c in extra})
    ctx = ["model", "dataset", "source", "window", *extra]
    n = len(ctx)
    full = d[d.method == "full"].groupby(ctx)["value"].last()
    full_samples = (
        d[d.method == "full"]
        .groupby(ctx)
        .apply(lambda g: _samples(g.iloc[-1]), include_groups=False)
    )
    rest = d[d.method != "full"]
    # baseline_plus/less/performer rows are keyed by the policy's (baseline) budget
    base_budget = rest[rest.method == "baseline"].groupby([*ctx, "policy", "_run"])["budget"].last()
    out = []
    for key, g in rest.groupby([*ctx, "policy", "_run"], sort=True):
        budget = base_budget.get(key, g.budget.min())
        row = dict(zip([*ctx, "policy"], key[: n + 1], strict=True))
        row["budget"] = int(budget) if budget == budget else None
        row["Full"] = full.get(key[:n], float("nan"))
        samples = {"Full": full_samples.get(key[:n])}
        for m in ORDER[1:]:
            v = g[g.method == m]
            row[LABEL[m]] = v["value"].iloc[-1] if len(v) else float("nan")
            samples[LABEL[m]] = _samples(v.iloc[-1]) if len(v) else None
        row["LESS trained at"] = _trained_at(g[g.method == "less"])
        row["_samples"] = samples
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
    keys = [*ctx, "policy", "budget"]
    t = t.sort_values(keys).drop_duplicates(keys, keep="last")
    if (t["window"] == -1).all():
        t = t.drop(columns="window")
    return t


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


def _samples(r: pd.Series) -> Samples | None:
    """A row's bootstrap units: perplexity windows (Σ NLL, count) or per-example ROUGE."""
    nll, count = r.get("window_nll"), r.get("window_count")
    if isinstance(nll, list) and isinstance(count, list) and nll:
        return Samples(np.array(nll), np.array(count), exp=True)
    vals, ids = r.get("example_values"), r.get("example_ids")
    if isinstance(vals, list) and isinstance(ids, list) and vals:
        return Samples(np.array(vals), np.ones(len(vals)), ids=tuple(ids))
    return None


def _ci(e: stats.Estimate, digits: int) -> str:
    if math.isnan(e.low):
        return f"{e.value:.{digits}f}"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


def interval_table(t: pd.DataFrame, lower_is_better: bool, digits: int) -> pd.DataFrame:
    """`method_table` for display: each method's figure with its 95% bootstrap interval, gap
    closed with its interval, and the paired differences LESS − Baseline+ and LESS − Baseline
    with their intervals and a word (better / worse / not significant). Rows without per-unit
    values show the bare figures and no comparison."""
    out = []
    for _, r in t.iterrows():
        smp = r.get("_samples") or {}
        row = {c: r[c] for c in t.columns if not c.startswith("_") and c not in LABEL.values()}
        row.pop("gap closed", None)
        trained_at = row.pop("LESS trained at", None)
        for lab in LABEL.values():
            s = smp.get(lab)
            row[lab] = _ci(stats.figure(s), digits) if s is not None else _fmt(r[lab])
        if trained_at is not None:
            row["LESS trained at"] = trained_at
        full, plus, less = smp.get("Full"), smp.get("Baseline+"), smp.get("LESS")
        if full is not None and plus is not None and less is not None:
            f, p = full.figure(), plus.figure()
            has_gap = p > f if lower_is_better else p < f
            row["gap closed"] = _ci(stats.gap_closed(full, plus, less), 2) if has_gap else "no gap"
        else:
            row["gap closed"] = _fmt(r["gap closed"], "", 3)
        for other in ("Baseline+", "Baseline"):
            o = smp.get(other)
            if less is None or o is None:
                row[f"LESS − {other}"] = "–"
                continue
            d = stats.difference(less, o)
            row[f"LESS − {other}"] = f"{_ci(d, digits)} {stats.verdict(d, lower_is_better)}"
        out.append(row)
    return pd.DataFrame(out)


STATS_NOTE = (
    "Figures are followed by their 95% interval, a seeded percentile bootstrap "
    "(scipy.stats.bootstrap) over the evaluated units: perplexity windows, resampled whole "
    "(a window's Σ NLL with its token or word count, since perplexity is a ratio), or "
    "summarisation examples. Comparisons are paired: every resample draws the same windows or "
    "examples for all methods, so the spread the methods share cancels. *LESS − X* is the "
    "difference of the figures (perplexity: lower is better; ROUGE: higher is better); when its "
    "interval contains 0 it reads *not significant*, otherwise *better* or *worse*. *Gap closed* "
    "is the share of the Baseline+ → Full gap that LESS closes, with its interval."
)


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


def run(results_dir: str | Path = "results", run_name: str | None = None) -> Path:
    """Write `<results_dir>/REPORT.md` and its figures from the finished runs (those labelled
    `run_name` when given: one study's runs); returns the report's path."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LessctlError(
            f"results_dir={str(results_dir)!r} is not a folder; allowed: the folder the stages "
            "wrote their runs to (results_dir=DIR; default: results)"
        )
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
    out += [STATS_NOTE, ""]
    for task, how in (
        ("perplexity", "teacher-forced, parallel form"),
        ("perplexity_streaming", "token by token through the evicting cache"),
    ):
        ppl = latest[latest.get("task") == task] if "task" in latest else latest[:0]
        for metric, title in (("ppl_word", "word-level"), ("ppl_token", "token-level")):
            t = method_table(ppl, metric, lower_is_better=True)
            if t.empty:
                continue
            shown = interval_table(t, lower_is_better=True, digits=2)
            out += [f"## Perplexity ({title}, {how})", "", _md(shown), ""]
            figs = _ppl_figures(t, fig_dir, f"{task}-{metric}")
            out += [f"![{f}](figures/{f})" for f in figs] + [""]
    summ = latest[latest.get("task") == "summarization"] if "task" in latest else latest[:0]
    for metric in ("rouge1", "rouge2", "rougeL"):
        t = method_table(summ, metric, lower_is_better=False)
        if not t.empty:
            shown = interval_table(t, lower_is_better=False, digits=3)
            out += [f"## Summarisation {metric.upper()} F-measure", "", _md(shown), ""]
    out += lm_eval_section(latest)
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
    out += longctx_sections(df, fig_dir)  # passkey / needle / RULER-style: lessctl.report_longctx
    out += bench_sections(df, fig_dir)  # lessctl.report_bench: the newest bench run
    out += study_sections(df, fig_dir)  # lessctl.report_study: experiment=study's points
    runs = sorted(set(latest["run"])) if "run" in latest else []
    out += ["## Runs", ""] + [f"- `{r}`" for r in runs] + [""]
    path = results_dir / "REPORT.md"
    path.write_text("\n".join(out))
    return path
