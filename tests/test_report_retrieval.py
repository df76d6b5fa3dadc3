"""`lessctl report`'s retrieval section: LESS under several policies against Baseline+ under the
reference policy, per task and pooled, with the share of the Full − Baseline+ drop recovered."""

from lessctl.report import run as write_report
from lessctl.runs import start_run


def _rows(task, policy, acc, budget=32, n=4):
    """acc: method -> share found, the same in every (length, depth) cell of a 2 x 3 grid."""
    out = []
    for m, v in acc.items():
        extra = 4 if m == "baseline_plus" else None
        b = None if m == "full" else budget + (extra or 0)
        for length in (512, 1024):
            for depth in (0.0, 0.5, 1.0):
                out.append(
                    {
                        "task": task,
                        "model": "m",
                        "dataset": task,
                        "source": f"generated:{task}",
                        "method": m,
                        "policy": policy,
                        "budget": b,
                        "extra_tokens": extra,
                        "question": "after",
                        "length": length,
                        "depth": depth,
                        "samples": n,
                        "metric": "contains",
                        "value": v,
                    }
                )
    return out


def _report(compose, tmp_path, runs):
    cfg = compose(f"results_dir={tmp_path}")
    for rows in runs:
        run = start_run(cfg, "eval", [])
        run.add_rows(rows)
        run.finish()
    return write_report(tmp_path).read_text()


def test_policies_compared_against_the_reference_baseline_plus(compose, tmp_path):
    runs = []
    for task in ("passkey", "needle"):
        runs.append(_rows(task, "h2o", {"full": 1.0, "baseline_plus": 0.25, "less": 0.5}))
        runs.append(_rows(task, "recall", {"less": 0.75}))
    text = _report(compose, tmp_path, runs)
    assert "## Retrieval: LESS under each policy against Baseline+" in text
    head = (
        "| budget | LESS policy | LESS | reference | Baseline+ | Full | LESS − Baseline+ "
        "| drop recovered | LESS − LESS(h2o) |"
    )
    assert head in text
    # h2o's own LESS first; Baseline+ sits at its matched budget (36 - 4 extra tokens)
    assert (
        "| 32 | h2o | 0.50 [0.31, 0.69] (n=24) | h2o | 0.25 [0.12, 0.45] (n=24) "
        "| 1.00 [0.86, 1.00] (n=24) | +0.25 [+0.25, +0.25] better | 0.33 [0.33, 0.33] | – |"
    ) in text
    # recall: (0.75 - 0.25) / (1 - 0.25) of the drop; +0.25 over LESS under h2o
    assert (
        "| 32 | recall | 0.75 [0.55, 0.88] (n=24) | h2o | 0.25 [0.12, 0.45] (n=24) "
        "| 1.00 [0.86, 1.00] (n=24) | +0.50 [+0.50, +0.50] better | 0.67 [0.67, 0.67] "
        "| +0.25 [+0.25, +0.25] better |"
    ) in text
    assert "### passkey (passkey, m, question after, prompt)" in text
    assert "### all tasks" in text and "(n=48)" in text.split("### all tasks")[1]
    assert (tmp_path / "figures" / "retrieval-share-by-budget.png").is_file()


def test_no_drop_and_single_policy(compose, tmp_path):
    """One policy alone: no section (the long-context tables hold it); Full = Baseline+: no
    share of a drop to recover, said in words rather than a division by zero."""
    text = _report(
        compose,
        tmp_path,
        [_rows("passkey", "h2o", {"full": 1.0, "baseline_plus": 0.5, "less": 0.5})],
    )
    assert "## Retrieval" not in text
    text = _report(
        compose,
        tmp_path,
        [
            _rows("passkey", "h2o", {"full": 1.0, "baseline_plus": 1.0, "less": 1.0}),
            _rows("passkey", "composite", {"less": 0.5}),
        ],
    )
    assert "| 32 | composite |" in text and "– (no drop)" in text
    assert "| −0.50 [" not in text and "| -0.50 [-0.50, -0.50] worse |" in text


def test_drop_in_some_cells_only_prints_no_nan_and_no_negative_zero(compose, tmp_path):
    """Full beats Baseline+ at length 512 only and LESS equals Baseline+ everywhere: the share
    recovered is 0 (not "-0.00"), and resampled grids that draw only 1024-token cells (no drop,
    0/0) make its interval undefined, which the row says in words instead of "[nan, nan]"."""
    runs = [
        _rows("passkey", "h2o", {"full": 1.0, "baseline_plus": 0.5, "less": 0.5}),
        _rows("passkey", "recall", {"less": 0.5}),
    ]
    for row in runs[0]:
        if row["method"] == "full" and row["length"] == 1024:
            row["value"] = 0.5
    text = _report(compose, tmp_path, runs)
    section = text.split("## Retrieval: LESS under each policy")[1]
    assert "nan" not in section and "-0.00" not in section
    assert "| 0.00 (interval undefined: some resampled grids have no drop) |" in section
