"""experiment=study's machinery on the tiny model: each point's eval uses the kernels trained
with its own extract.tokens / train.*, and the report plots gap closed against training tokens."""

from pathlib import Path

from typer.testing import CliRunner

from lessctl import extract as E
from lessctl import train as T
from lessctl.cli import app
from lessctl.report import run as write_report
from lessctl.runs import list_runs

from .test_extract import TEXT


def test_study_points_use_their_own_kernels_and_reach_the_report(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    base = ["experiment=smoke", f"data.path={tmp_path / 't.txt'}", "train.epochs=1"]
    points = [["extract.tokens=1536"], ["extract.tokens=768"]]
    ckpts = []
    for p in points:  # train every point first: the last trained is the newest checkpoint
        E.run(compose(*base, *p), log=lambda *_: None)
        ckpts.append(str(T.run(compose(*base, *p), log=lambda *_: None)[0]))
    for p in points:
        res = CliRunner().invoke(
            app, ["eval", *base, *p, "run_name=study", "eval.methods=[full,baseline_plus,less]"]
        )
        assert res.exit_code == 0, res.output
    runs = sorted(list_runs("results", "eval"), key=lambda r: r.path.name)
    used = [next(r["checkpoint"] for r in run.rows() if r["method"] == "less") for run in runs]
    assert used == ckpts  # the older checkpoint for the first point, not the newest
    text = write_report("results").read_text()
    assert "## Study: what moves the gap" in text
    study = text.split("## Study: what moves the gap", 1)[1].split("\n## ", 1)[0]
    points = study.split("One factor at a time", 1)[0]
    header = next(ln for ln in points.splitlines() if ln.startswith("| dataset"))
    col = [c.strip() for c in header.split("|")].index("train tokens")
    rows = [ln for ln in points.splitlines() if ln.startswith("| ") and "lambda" in ln]
    assert sorted(int(ln.split("|")[col]) for ln in rows) == [768, 1536]  # train tokens
    wall = [c.strip() for c in header.split("|")].index("train wall")
    # trained by T.run, not the CLI: no train run folder holds their time
    assert all(ln.split("|")[wall].strip() == "–" for ln in rows)
    for ln in rows:  # each point's gap closed with its paired bootstrap interval around it
        cells = [c.strip() for c in ln.strip("|").split("|")]
        gap, low, high = float(cells[-2]), *map(float, cells[-1].strip("[]").split(","))
        assert low <= gap <= high and low < high
    assert list(Path("results/figures").glob("study-gap-*.png"))
    # one factor apart (training tokens): the change in gap closed from 768 to 1536 tokens,
    # paired, is the difference of the two points' figures, inside its own interval
    comp = study.split("One factor at a time", 1)[1]
    crow = next(ln for ln in comp.splitlines() if ln.startswith("| ") and "768 → 1536" in ln)
    cells = [c.strip() for c in crow.strip("|").split("|")]
    assert cells[3] == "train tokens" and cells[-1] in ("significant", "not significant")
    gaps = {int(ln.split("|")[col]): float(ln.split("|")[-3]) for ln in rows}
    change, (low, high) = float(cells[-3]), map(float, cells[-2].strip("[]").split(","))
    assert abs(change - (gaps[1536] - gaps[768])) < 2e-3 and low <= change <= high
    assert (cells[-1] == "significant") == (low > 0 or high < 0)


def test_one_factor_comparisons_pair_only_points_one_factor_apart():
    """Points two factors apart are not compared; the smaller setting is always `from`."""
    import numpy as np
    import pandas as pd

    from lessctl.report.study import comparisons
    from lessctl.stats import Samples

    rng = np.random.default_rng(0)

    def smp(shift):  # Full, Baseline+, LESS windows (NLL sums, token counts)
        n = np.full(16, 100.0)
        return [Samples(rng.normal(m, 0.1, 16) * 100, n, exp=True) for m in (2.0, 3.0, shift)]

    base = {"dataset": "d", "policy": "lambda", "budget": 32, "epochs": 2, "hidden": 128}
    base |= {"text": "train-mix", "train source": "shards"}
    table = pd.DataFrame(
        [
            {**base, "train tokens": 1000, "rank": 8, "_samples": smp(2.9)},
            {**base, "train tokens": 4000, "rank": 8, "_samples": smp(2.5)},
            {**base, "train tokens": 1000, "rank": 4, "_samples": smp(2.8)},
            {**base, "train tokens": 4000, "rank": 4, "epochs": 6, "_samples": smp(2.2)},
            # other text and more tokens: two factors from every point, compared with none
            {**base, "train tokens": 9000, "rank": 8, "text": "train-large", "_samples": smp(2.1)},
        ]
    )
    comp = comparisons(table)
    assert sorted(zip(comp.factor, comp["from → to"], strict=True)) == [
        ("rank", "4 → 8"),
        ("train tokens", "1000 → 4000"),
    ]
    tok = comp[comp.factor == "train tokens"].iloc[0]
    assert tok["at"] == "text train-mix, train source shards, epochs 2, hidden 128, rank 8"
    assert float(tok["Δ gap closed"]) > 0.3 and tok.verdict == "significant"


def test_a_study_point_names_a_per_layer_rank(tmp_path):
    """A checkpoint's rank list is one factor value: a uniform list is its rank, a mixed one
    each layer's rank ("2,4", not the first or the mean)."""
    import json

    from lessctl.report.study import study_point

    for rank, want in ((8, 8), ([8, 8], 8), ([2, 4], "2,4")):
        ck = tmp_path / f"ck{want}"
        ck.mkdir(exist_ok=True)
        man = {"spec": {"train": {"epochs": 2}}, "kernel": {"hidden": 32, "rank": rank}}
        (ck / "manifest.json").write_text(json.dumps(man))
        assert study_point(str(ck))["rank"] == want


def test_a_point_whose_kernels_are_gone_is_read_from_its_runs(tmp_path):
    """On another machine the checkpoint folder is gone: the point's factors come from the
    config of the train run that wrote it (text included), else from the eval run's own config
    (which named the point, but whose `data` is the evaluated text: no text); the train wall
    time comes from that train run."""
    from lessctl.report.study import study_point, train_run_of, train_wall

    def config(folder, data):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(
            f"data: {{name: {data}}}\nextract: {{tokens: 1000448}}\n"
            "train: {epochs: 1, source: online}\nless: {hidden: 128, rank: 8}\n"
        )
        return str(folder)

    ev = config(tmp_path / "runs" / "eval" / "x-study", "wikitext2")
    tr = config(tmp_path / "runs" / "train" / "y-study", "train-large")
    want = {
        "train source": "online",
        "train tokens": 1000448,
        "epochs": 1,
        "hidden": 128,
        "rank": 8,
    }
    assert study_point(str(tmp_path / "gone"), ev, tr) == {"text": "train-large", **want}
    assert study_point(str(tmp_path / "gone"), ev) == {"text": "–", **want}
    assert study_point(str(tmp_path / "gone"), str(tmp_path / "no-run")) == {}
    t0 = "2026-01-01T00:00:00+00:00"
    runs = [
        ({"checkpoint": "/k/other", "start": t0, "end": "2026-01-01T09:00:00+00:00"}, "p1"),
        ({"checkpoint": "/k/a", "start": t0, "end": "2026-01-01T01:02:03+00:00"}, "p2"),
    ]
    assert train_run_of("/k/a", runs)[1] == "p2" and train_run_of("/k/b", runs) is None
    assert train_wall(train_run_of("/k/a", runs)[0]) == "1:02:03" and train_wall(None) == "–"
