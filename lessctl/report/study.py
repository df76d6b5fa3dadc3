"""The `experiment=study` part of `lessctl report` (eval runs named `*-study`): gap closed (word
perplexity, Baseline+ → Full) of each point with its paired interval and the wall time of the
train run that made its kernels, the figure of gap closed against training tokens (one line per
text, train source, epochs, hidden width and rank), and the one-factor
comparisons: for every two points that differ in exactly one factor, the change in gap closed
from the smaller setting to the larger, paired over the same windows, with its interval and a
word. Returns Markdown lines."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lessctl import stats
from lessctl.report.registry import ReportContext, register_section
from lessctl.report.tables import _figure, _md, _samples, gap_closed

FACTORS = ("text", "train source", "train tokens", "epochs", "hidden", "rank")
METHODS = ("full", "baseline_plus", "less")


def study_point(checkpoint: str, run: str | None = None, train_run: str | None = None) -> dict:
    """The factors of the kernels in `checkpoint`: their training text, ``train.source``,
    tokens, epochs, hidden width and rank, from its manifest (and its activations' manifest).
    Where the folder is gone (another machine): from the config of the train run folder
    `train_run` that wrote it, else from the eval run folder `run`'s, which named the point
    (`extract.tokens`, `train.*`, `less.*`; not the text: an eval's `data` is what it
    evaluated, so "–"). Empty when none is there."""
    man_path = Path(checkpoint) / "manifest.json"
    if man_path.exists():
        man = json.loads(man_path.read_text())
        data = man.get("data", {})
        tokens = data.get("tokens")
        acts = Path(str(man.get("activations", ""))) / "manifest.json"
        if tokens is None and acts.exists():
            tokens = json.loads(acts.read_text()).get("tokens")
        return {
            "text": man.get("dataset"),
            "train source": data.get("train_source", "shards"),
            "train tokens": tokens,
            "epochs": man["spec"]["train"]["epochs"],
            "hidden": man["kernel"]["hidden"],
            "rank": _rank(man["kernel"]["rank"]),
        }
    for folder, own_text in ((train_run, True), (run, False)):
        cfg_path = Path(folder or "") / "config.yaml"
        if folder is not None and cfg_path.exists():
            return _point_of_config(cfg_path, own_text)
    return {}


def _point_of_config(cfg_path: Path, own_text: bool) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_path)
    rank = cfg.less.rank
    return {
        "text": cfg.data.name if own_text else "–",
        "train source": cfg.train.get("source", "shards"),
        "train tokens": int(cfg.extract.tokens),
        "epochs": int(cfg.train.epochs),
        "hidden": int(cfg.less.hidden),
        "rank": _rank(rank if isinstance(rank, int) else [int(r) for r in rank]),
    }


def train_run_of(checkpoint: str, train_runs: list[tuple[dict[str, Any], Path]]):
    """(meta, folder) of the finished train run that wrote `checkpoint`, or None."""
    return next(((m, p) for m, p in train_runs if m.get("checkpoint") == checkpoint), None)


def train_wall(meta: dict[str, Any] | None) -> str:
    """A train run's wall time (its meta.json start to end) as ``h:mm:ss``; "–" without one."""
    from datetime import datetime

    if not meta or not meta.get("end") or not meta.get("start"):
        return "–"
    sec = datetime.fromisoformat(meta["end"]) - datetime.fromisoformat(meta["start"])
    total = int(sec.total_seconds())
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _train_runs(eval_run: str) -> list[tuple[dict[str, Any], Path]]:
    """(meta.json, folder) of every finished train run beside the eval run folder `eval_run`
    (``<results>/runs/eval/<name>`` -> ``<results>/runs/train/*``)."""
    root = Path(eval_run).parent.parent / "train"
    runs = []
    for p in sorted(root.glob("*/meta.json")):
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("status") == "finished":
            runs.append((meta, p.parent))
    return runs


def _rank(rank: int | list[int]) -> int | str:
    """A checkpoint's rank as a study factor: an int (also a list of one rank for every layer),
    else each layer's rank joined by commas ("2,4")."""
    if isinstance(rank, int) or len(set(rank)) > 1:
        return rank if isinstance(rank, int) else ",".join(map(str, rank))
    return int(rank[0])


def study_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per study point: its factors, Full / Baseline+ / LESS word perplexity, gap
    closed with its paired interval; `_samples` holds the three methods' windows."""
    need = {"_run", "task", "metric", "method", "value", "checkpoint"}
    if df.empty or not need <= set(df.columns):
        return pd.DataFrame()
    d = df[
        df["_run"].astype(str).str.endswith("-study")
        & (df["task"] == "perplexity")
        & (df["metric"] == "ppl_word")
    ]
    points = []
    for run, g in d.groupby("_run"):
        vals = {m: g[g.method == m].value.iloc[-1] for m in METHODS if (g.method == m).any()}
        less = g[g.method == "less"]
        if len(vals) < 3 or less.checkpoint.isna().all():
            continue
        run_dir = str(less.run.iloc[-1]) if "run" in less and less.run.notna().any() else None
        ckpt = str(less.checkpoint.iloc[-1])
        trained = train_run_of(ckpt, _train_runs(run_dir)) if run_dir else None
        point = study_point(ckpt, run_dir, str(trained[1]) if trained else None)
        if not point:
            continue
        if point["text"] == "–" and "kernel_text_source" in less:  # the row's own record
            src = less.kernel_text_source.iloc[-1]
            point["text"] = str(src).split(":", 1)[-1] if isinstance(src, str) else "–"
        point["train wall"] = train_wall(trained[0] if trained else None)
        smp = [_samples(g[g.method == m].iloc[-1]) for m in METHODS]
        low = high = float("nan")
        if all(x is not None for x in smp):  # paired over the same windows
            est = stats.gap_closed(*smp)
            low, high = est.low, est.high
        points.append(
            {
                "dataset": less.dataset.iloc[-1],
                "policy": less.policy.iloc[-1],
                "budget": less.budget.iloc[-1],
                **point,
                "Full": vals["full"],
                "Baseline+": vals["baseline_plus"],
                "LESS": vals["less"],
                "gap closed": gap_closed(vals["full"], vals["baseline_plus"], vals["less"]),
                "95% interval": "–" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]",
                "_low": low,
                "_high": high,
                "_samples": smp if all(x is not None for x in smp) else None,
                "run": run,
            }
        )
    table = pd.DataFrame(points)
    if table.empty:
        return table
    if table["rank"].map(lambda r: isinstance(r, str)).any():  # a rank per layer: all as text
        table["rank"] = table["rank"].astype(str)
    order = ["dataset", "policy", "text", "train source", "epochs", "hidden", "rank"]
    return table.sort_values([*order, "train tokens"])


def comparisons(table: pd.DataFrame) -> pd.DataFrame:
    """Every two points of one (dataset, policy, budget) that differ in exactly one factor: the
    change in gap closed from the smaller setting to the larger, with its paired interval."""
    rows = []
    if table.empty:
        return pd.DataFrame()
    for _, g in table.groupby(["dataset", "policy", "budget"]):
        for (_, a), (_, b) in itertools.combinations(g.iterrows(), 2):
            differ = [f for f in FACTORS if a[f] != b[f]]
            if len(differ) != 1 or a["_samples"] is None or b["_samples"] is None:
                continue
            f = differ[0]
            if a[f] > b[f]:
                a, b = b, a
            est = stats.gap_closed_change(a["_samples"], b["_samples"])
            fixed = ", ".join(f"{k} {a[k]}" for k in FACTORS if k != f)
            rows.append(
                {
                    "dataset": a["dataset"],
                    "policy": a["policy"],
                    "budget": a["budget"],
                    "factor": f,
                    "from → to": f"{a[f]} → {b[f]}",
                    "at": fixed,
                    "Δ gap closed": f"{est.value:+.3f}",
                    "95% interval": "–"
                    if math.isnan(est.low)
                    else f"[{est.low:+.3f}, {est.high:+.3f}]",
                    "verdict": "–"
                    if math.isnan(est.low)
                    else ("not significant" if not est.significant else "significant"),
                }
            )
    return pd.DataFrame(rows)


def _figures(table: pd.DataFrame, fig_dir: Path) -> list[str]:
    names = []
    for (dataset, policy, budget), g in table.groupby(["dataset", "policy", "budget"]):
        name = f"study-gap-{dataset}-{policy}-{int(budget)}.png"

        def draw(ax, g=g, title=f"study: {dataset} {policy} budget {int(budget)}"):
            for (text, src, ep, hid, r), s in g.groupby(
                ["text", "train source", "epochs", "hidden", "rank"]
            ):
                err = [s["gap closed"] - s["_low"], s["_high"] - s["gap closed"]]
                ax.errorbar(
                    s["train tokens"],
                    s["gap closed"],
                    yerr=None if s["_low"].isna().any() else err,
                    marker="o",
                    capsize=3,
                    label=f"{text} ({src}), epochs {ep}, hidden {hid}, R {r}",
                )
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xscale("log")
            ax.set_xlabel("training tokens")
            ax.set_ylabel("gap closed (Baseline+ → Full)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=6)

        _figure(fig_dir / name, draw)
        names.append(name)
    return names


def sections(df: pd.DataFrame, fig_dir: Path) -> list[str]:
    """The study's Markdown: points table, figure, one-factor comparisons (none: no lines)."""
    table = study_table(df)
    if table.empty:
        return []
    out = [
        "## Study: what moves the gap (experiment=study, word perplexity)",
        "",
        _md(table.drop(columns=["run", "_low", "_high", "_samples"])),
        "",
    ]
    out += [f"![{f}](figures/{f})" for f in _figures(table, fig_dir)] + [""]
    comp = comparisons(table)
    if not comp.empty:
        out += [
            "One factor at a time: the change in gap closed between two points that differ in "
            "that factor alone (paired over the same windows; 95% bootstrap interval).",
            "",
            _md(comp),
            "",
        ]
    return out


@register_section("study", 70)
def section(ctx: ReportContext) -> list[str]:
    return sections(ctx.rows, ctx.fig_dir)
