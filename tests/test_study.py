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
    rows = [ln for ln in study.splitlines() if ln.startswith("| ") and "lambda" in ln]
    assert sorted(int(ln.split("|")[4]) for ln in rows) == [768, 1536]  # train tokens
    for ln in rows:  # each point's gap closed with its paired bootstrap interval around it
        cells = [c.strip() for c in ln.strip("|").split("|")]
        gap, low, high = float(cells[-2]), *map(float, cells[-1].strip("[]").split(","))
        assert low <= gap <= high and low < high
    assert list(Path("results/figures").glob("study-gap-*.png"))
