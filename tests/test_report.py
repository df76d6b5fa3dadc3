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


def test_report_gives_intervals_paired_differences_and_words(compose, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    hard = rng.normal(1500.0, 300.0, 32)  # windows differ a lot in difficulty
    nll = {
        "full": hard,
        "baseline": hard + 200,
        "baseline_plus": hard + 100,
        "less": hard + 50 + rng.normal(0, 5, 32),
        "performer": hard + 100 + rng.normal(0, 40, 32),  # = Baseline+ up to noise
    }
    rows = _rows(32, [0.0] * 5)
    for r in rows:
        r["window_nll"] = list(nll[r["method"]])
        r["window_count"] = [511] * 32
        r["value"] = math.exp(sum(r["window_nll"]) / sum(r["window_count"]))
    cfg = compose(f"results_dir={tmp_path}")
    run = start_run(cfg, "eval", [])
    run.add_rows(rows)
    # summarisation: Full measured once (policy lambda run), shared by the h2o run
    ids = list(range(100, 140))
    base = rng.uniform(0.1, 0.3, 40)
    rouge = {
        "full": base + 0.02,
        "baseline": base,
        "baseline_plus": base,
        "less": base + rng.normal(0, 0.03, 40),
    }
    summ = {"task": "summarization", "model": "m", "dataset": "xsum", "source": "s"}
    run.add_rows(
        [
            {
                **summ,
                "method": m,
                "policy": "h2o",
                "budget": None if m == "full" else 64,
                "metric": "rouge1",
                "value": float(np.mean(v)),
                "example_ids": ids,
                "example_values": list(v),
            }
            for m, v in rouge.items()
        ]
    )
    run.finish()
    text = write_report(tmp_path).read_text()
    assert "paired" in text and "not significant" in text
    ppl_line = next(x for x in text.splitlines() if x.startswith("| m | wikitext2"))
    cells = [c.strip() for c in ppl_line.strip("|").split("|")]
    header = next(
        x for x in text.splitlines() if x.startswith("| model") and "LESS − Baseline+" in x
    )
    col = dict(zip([c.strip() for c in header.strip("|").split("|")], cells, strict=True))
    lo, hi = (float(x) for x in col["Full"].split("[")[1].rstrip("]").split(","))
    assert lo < math.exp(hard.sum() / (511 * 32)) < hi
    assert col["LESS − Baseline+"].endswith("better")  # paired: significant
    assert col["LESS − Baseline"].endswith("better")
    gap = col["gap closed"]
    g, (glo, ghi) = float(gap.split()[0]), (float(x) for x in gap.split("[")[1][:-1].split(","))
    assert 0.4 < glo < g < ghi < 0.6
    summ_line = next(x for x in text.splitlines() if x.startswith("| m | xsum"))
    assert "not significant" in summ_line  # LESS = Baseline+ up to noise
    assert write_report(tmp_path).read_text() == text  # seeded


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


def test_full_is_never_matched_across_evaluation_settings(compose, tmp_path):
    # Full measured on 32 windows in one run, the other methods on 8 in another: no gap closed
    # may pair them (the figures are on different text); with equal settings they pair.
    cfg = compose(f"results_dir={tmp_path}")
    full_run = start_run(cfg, "eval", [])
    full_run.add_rows([{**_rows(32, [10.0] * 5)[0], "windows": 32}])
    full_run.finish()
    rest = start_run(cfg, "eval", [])
    rest.add_rows([{**r, "windows": 8} for r in _rows(32, [10.0, 30.0, 20.0, 15.0, 25.0])[1:]])
    rest.finish()
    line = next(x for x in write_report(tmp_path).read_text().splitlines() if "| 8 |" in x)
    assert "10.000" not in line and "30.000" in line
    same = start_run(cfg, "eval", [])
    same.add_rows([{**r, "windows": 32} for r in _rows(32, [10.0, 30.0, 20.0, 15.0, 25.0])[1:]])
    same.finish()
    line = next(x for x in write_report(tmp_path).read_text().splitlines() if "| 32 | h2o" in x)
    assert "10.000" in line and "0.500" in line


def test_a_run_folder_that_cannot_be_read_is_skipped_with_one_warning(compose, tmp_path, capsys):
    """A truncated meta.json (or rows.jsonl) was a traceback that lost the whole report."""
    cfg = compose(f"results_dir={tmp_path}")
    good = start_run(cfg, "eval", [])
    good.add_rows(_rows(32, [10.0, 30.0, 20.0, 15.0, 25.0]))
    good.finish()
    text = write_report(tmp_path).read_text()
    broken = []
    for name in ("meta.json", "rows.jsonl"):
        run = start_run(cfg, "eval", [])
        run.add_rows(_rows(32, [99.0, 99.0, 99.0, 99.0, 99.0]))
        run.finish()
        f = run.path / name
        f.write_bytes(f.read_bytes()[:-7])  # cut mid-line
        broken.append(f)
    capsys.readouterr()
    assert write_report(tmp_path).read_text() == text  # the readable run alone, as before
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warned) == 2, warned
    for f, line in zip(broken, warned, strict=True):
        assert line.startswith("warning: skipped a run folder: ") and str(f) in line


def test_report_on_a_missing_results_folder_is_one_line(tmp_path):
    import pytest

    from lessctl.errors import LessctlError

    with pytest.raises(LessctlError, match=r"results_dir='.*/nowhere' is not a folder; allowed"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
