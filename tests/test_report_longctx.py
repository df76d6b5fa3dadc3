"""`lessctl report` on long-context rows: heatmaps per method and accuracy against budget."""

from lessctl.report import run as write_report
from lessctl.runs import start_run


def _rows(budget, acc, n=4):
    """acc: method -> value, the same for every (length, depth) cell of a 2 x 3 grid."""
    out = []
    for m, v in acc.items():
        b = None if m == "full" else (budget + 4 if m == "baseline_plus" else budget)
        for length in (512, 1024):
            for depth in (0.0, 0.5, 1.0):
                for metric in ("contains", "exact"):
                    out.append(
                        {
                            "task": "passkey",
                            "model": "m",
                            "dataset": "passkey",
                            "source": "generated:passkey/5digits",
                            "method": m,
                            "policy": "h2o",
                            "budget": b,
                            "question": "after",
                            "length": length,
                            "depth": depth,
                            "samples": n,
                            "metric": metric,
                            "value": v,
                        }
                    )
    return out


def test_longctx_heatmaps_and_budget_table(compose, tmp_path):
    cfg = compose(f"results_dir={tmp_path}")
    for budget, acc in ((32, {"baseline": 0.25, "baseline_plus": 0.5, "less": 0.75}), (64, {})):
        run = start_run(cfg, "eval", [])
        methods = {"full": 1.0, **acc} if acc else {"full": 1.0, "baseline": 1.0, "less": 1.0}
        run.add_rows(_rows(budget, methods))
        run.finish()
    text = write_report(tmp_path).read_text()
    assert "## Long-context retrieval" in text
    assert "| policy | budget | full | baseline | baseline_plus | less |" in text
    # 6 cells x 4 samples = 24 per method; Baseline+ is listed at its Baseline's budget
    assert "| h2o | 32 | 1.00 [0.86, 1.00] (n=24) | 0.25 " in text
    assert "| 0.50 [0.31, 0.69] (n=24) | 0.75 " in text
    # paired over the 6 cells: +0.25 in every cell
    assert "| LESS − Baseline+ |" in text and "| +0.25 [+0.25, +0.25] better |" in text
    assert "| h2o | 64 | 1.00 [0.86, 1.00] (n=24) | 1.00 " in text
    figs = sorted(p.name for p in (tmp_path / "figures").glob("longctx-*.png"))
    assert figs == [
        "longctx-passkey-passkey-m-after-h2o-32.png",
        "longctx-passkey-passkey-m-after-h2o-64.png",
    ]
    assert write_report(tmp_path).read_text() == text


def test_baseline_plus_run_apart_is_listed_at_the_budget_it_matches(compose, tmp_path):
    """Baseline+ evaluated in a run without Baseline (methods split over processes) sits in the
    row of the budget it is matched to (its budget less extra_tokens), not a row of its own."""
    cfg = compose(f"results_dir={tmp_path}")
    for acc in ({"full": 1.0, "baseline": 0.25, "less": 0.75}, {"baseline_plus": 0.5}):
        run = start_run(cfg, "eval", [])
        rows = _rows(32, acc)
        for r in rows:
            r["extra_tokens"] = 4 if r["method"] == "baseline_plus" else None
        run.add_rows(rows)
        run.finish()
    text = write_report(tmp_path).read_text()
    assert "| h2o | 32 | 1.00 [0.86, 1.00] (n=24) | 0.25 [0.12, 0.45] (n=24) | 0.50 " in text
    assert "| h2o | 36 |" not in text


def test_full_is_counted_on_the_cells_of_each_budget_row(compose, tmp_path):
    """A budget evaluated on part of the grid (one length of two) is compared with Full on
    that part alone."""
    cfg = compose(f"results_dir={tmp_path}")
    for rows in (
        _rows(32, {"full": 1.0, "baseline": 0.0}),
        [r for r in _rows(64, {"baseline": 0.5}) if r["length"] == 512],
    ):
        run = start_run(cfg, "eval", [])
        run.add_rows(rows)
        run.finish()
    text = write_report(tmp_path).read_text()
    assert "| h2o | 32 | 1.00 [0.86, 1.00] (n=24) | 0.00 " in text
    assert "| h2o | 64 | 1.00 [0.76, 1.00] (n=12) | 0.50 " in text
