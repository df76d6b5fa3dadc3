"""What the report's sections share: the saved rows (`load_rows`, newest run wins per key),
the per-method table of a metric with the gap closed (`method_table`) and its display with
95% intervals and paired differences (`interval_table`, lessctl.stats), Markdown and figure
helpers. The method columns and their order come from the method registry (lessctl.methods).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import lessctl.methods  # noqa: F401  (registers every method)
from lessctl import stats
from lessctl.methods.registry import labels
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
