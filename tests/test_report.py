import math

from lessctl.report import gap_closed
from lessctl.report import run as write_report
from lessctl.runs import start_run


def _rows(budget, values):
    base = {
        "task": "perplexity",
        "model": "m",
        "dataset": "wikitext2",
        "source": "embedded:wikitext",
        "policy": "h2o",
        "window": 512,
    }
    return [
        {
            **base,
            "method": m,
            "budget": None if m == "full" else b,
            "metric": "ppl_word",
            "value": v,
        }
        for (m, b), v in zip(
            [
                ("full", None),
                ("baseline", budget),
                ("baseline_plus", budget + 4),
                ("less", budget),
                ("performer", budget),
            ],
            values,
            strict=True,
        )
    ]


def test_gap_closed():
    assert gap_closed(10.0, 20.0, 15.0) == 0.5
    assert gap_closed(10.0, 20.0, 20.0) == 0.0
    assert math.isnan(gap_closed(20.0, 10.0, 15.0))  # Baseline+ better than Full: no gap


def test_report_on_saved_runs_is_deterministic(compose, tmp_path):
    cfg = compose(f"results_dir={tmp_path}")
    run = start_run(cfg, "eval", [])
    run.add_rows(_rows(32, [10.0, 30.0, 20.0, 15.0, 25.0]))
    run.finish()
    path = write_report(tmp_path)
    text = path.read_text()
    assert (
        "| m | wikitext2 | embedded:wikitext | 512 | h2o | 32 | 10.000 | 30.000 | 20.000 | 15.000 "
        "| 25.000 | – | 0.500 |" in text
    )
    assert "not comparable" in text
    assert (tmp_path / "figures" / "perplexity-ppl_word-m-wikitext2-h2o.png").exists()
    assert write_report(tmp_path).read_text() == text


def test_unfinished_runs_are_ignored(compose, tmp_path):
    run = start_run(compose(f"results_dir={tmp_path}"), "eval", [])
    run.add_rows(_rows(32, [10.0, 30.0, 20.0, 15.0, 25.0]))  # never finished
    assert "No finished runs" in write_report(tmp_path).read_text()


def test_streaming_rows_do_not_hide_parallel_ones_and_windows_stay_apart(compose, tmp_path):
    cfg = compose(f"results_dir={tmp_path}")
    run = start_run(cfg, "eval", [])
    run.add_rows(_rows(32, [10.0, 30.0, 20.0, 15.0, 25.0]))
    run.finish()
    stream = start_run(cfg, "eval", [])
    stream.add_rows(
        [{**r, "task": "perplexity_streaming"} for r in _rows(32, [11.0, 31.0, 21.0, 16.0, 26.0])]
    )
    stream.finish()
    wide = start_run(cfg, "eval", [])
    wide.add_rows([{**r, "window": 1024} for r in _rows(32, [9.0, 19.0, 17.0, 13.0, 18.0])])
    wide.finish()
    text = write_report(tmp_path).read_text()
    assert "parallel form" in text and "evicting cache" in text
    assert "| 512 | h2o | 32 | 10.000 |" in text  # Full of its own window
    assert "| 1024 | h2o | 32 | 9.000 |" in text


def test_report_selects_one_study_by_run_name(compose, tmp_path):
    smoke = start_run(compose(f"results_dir={tmp_path}"), "eval", [])
    smoke.add_rows(_rows(16, [1e16, 2e16, 2e16, 2e16, 2e16]))
    smoke.finish()
    study = start_run(compose(f"results_dir={tmp_path}", "run_name=study"), "eval", [])
    rows = _rows(32, [10.0, 30.0, 20.0, 15.0, 25.0])
    for r in rows:
        if r["method"] == "less":
            r.update(trained_budget=16, transfer=True)
    study.add_rows(rows)
    study.finish()
    everything = write_report(tmp_path).read_text()
    assert "| 16 |" in everything and "| 32 |" in everything
    text = write_report(tmp_path, run_name="study").read_text()
    assert "run_name=study" in text and "| 16 |" not in text.split("## Runs")[0]
    assert "10000000000000000" not in text and "1e+16" not in text
    # LESS's trained budget shown beside the evaluated one
    assert "LESS trained at" in text and "| 16 (transfer) |" in text
