import pytest

from lessctl.tasks.summarize import build_prompt, clean, rouge


def test_prompt_format():
    p = build_prompt([("Doc one.", "Sum one.")], "Doc two.")
    assert p == "###\nArticle: Doc one.\n\nSummary: Sum one.\n\n###\nArticle: Doc two.\n\nSummary:"


def test_rouge_known_strings():
    [same] = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    [part] = rouge(["the cat"], ["the cat sat"])
    # unigrams: P = 2/2, R = 2/3 -> F = 0.8; bigrams: P = 1/1, R = 1/2 -> F = 2/3
    assert part["rouge1"] == pytest.approx(0.8)
    assert part["rouge2"] == pytest.approx(2 / 3)
    [none] = rouge(["dog"], ["the cat"])
    assert none["rouge1"] == 0.0


def test_clean_stops_at_separator():
    assert clean(" A summary.\n\n###\nArticle: next") == "A summary."


def test_eval_summarization_end_to_end_on_tiny_model(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from lessctl.cli import app
    from lessctl.runs import list_runs

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    docs = [
        {
            "document": f"Story {i}: the council met and approved a new bridge over the river. "
            "Work starts in spring and ends next year." * (1 + i % 2),
            "summary": f"Bridge {i} approved.",
        }
        for i in range(4)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "experiment=smoke",
            "task=xsum",
            f"data.path={path}",
            "eval.samples=3",
            "eval.max_new_tokens=6",
            "eval.max_prompt_tokens=500",
            "policy.budget.size=48",
            "eval.methods=[full,baseline,baseline_plus,performer]",
        ],
    )
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    rows = run.rows()
    assert {(r["method"], r["metric"]) for r in rows} == {
        (m, k)
        for m in ("full", "baseline", "baseline_plus", "performer")
        for k in ("rouge1", "rouge2", "rougeL")
    }
    assert all(0.0 <= r["value"] <= 1.0 and r["samples"] == 3 for r in rows)
    preds = list((run.path / "predictions").glob("xsum-*.jsonl"))
    assert len(preds) == 4
    assert len(preds[0].read_text().splitlines()) == 3
    for r in rows:  # per-example values (the report's bootstrap units) average to the row
        assert len(r["example_values"]) == len(set(r["example_ids"])) == 3
        assert sum(r["example_values"]) / 3 == pytest.approx(r["value"])
    # a left-padded batch of 3 decodes the same predictions as batch size 1
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "experiment=smoke",
            "task=xsum",
            f"data.path={path}",
            "eval.samples=3",
            "eval.max_new_tokens=6",
            "eval.max_prompt_tokens=500",
            "policy.budget.size=48",
            "eval.methods=[full,baseline]",
            "eval.batch_size=3",
        ],
    )
    assert res.exit_code == 0, res.output
    batched = {(r["method"], r["metric"]): r for r in list_runs("results", "eval")[-1].rows()}
    for r in rows:
        if r["method"] in ("full", "baseline"):
            b = batched[(r["method"], r["metric"])]
            assert b["example_ids"] == r["example_ids"]
            assert b["example_values"] == pytest.approx(r["example_values"])
