from typer.testing import CliRunner

from lessctl.cli import app

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"]).output
    assert "assets" in out


def test_cfg_prints_resolved_config():
    res = runner.invoke(app, ["assets", "model=tiny-random", "seed=7", "--cfg"])
    assert res.exit_code == 0
    assert "name: tiny-random" in res.output and "seed: 7" in res.output


def test_bad_override_one_line_error():
    res = runner.invoke(app, ["assets", "model=nope"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "allowed" in lines[0] and "smollm2-135m" in lines[0]


def test_assets_check_on_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "empty"))
    res = runner.invoke(app, ["assets", "--check"])
    assert res.exit_code == 1  # nothing is there, and --check downloads nothing
    assert "smollm2-135m" in res.output
    assert not (tmp_path / "empty" / "downloads").exists()


def test_run_stage_one_line_only_for_the_harness_own_errors():
    import pytest
    import typer

    from lessctl.cli import run_stage
    from lessctl.errors import LessctlError

    def own():
        raise LessctlError("train.epochs=0 is invalid; allowed: an int >= 1")

    with pytest.raises(typer.Exit) as err:
        run_stage(own)
    assert err.value.exit_code == 2
    # a library's ValueError is a bug: it keeps its traceback
    with pytest.raises(ValueError, match="invalid literal"):
        run_stage(int, "not a number")


def test_bad_values_exit_2_with_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for args, needle in (
        (["train", "model=tiny-random", "train.epochs=0"], "train.epochs=0"),
        (["extract", "model=tiny-random", "extract.tokens=0"], "extract.tokens=0"),
        (["eval", "model=tiny-random", "eval.shots=-1"], "eval.shots=-1"),
        (["extract", "model=tiny-random", "device=cuda"], "device='cuda' is not available"),
    ):
        res = runner.invoke(app, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_bad_inputs_of_issue_26_exit_2_with_one_line(tmp_path):
    """Each was a traceback, a wrong list of options, or accepted with exit 0."""
    cases = (
        (["eval", "task=nope"], "unknown task 'nope'; allowed: common_words, lm_eval"),
        (["eval", "eval.methods=nope"], "eval.methods='nope' is invalid; allowed: a non-empty"),
        (["eval", "eval.methods=[]"], "eval.methods=[] is invalid"),
        (["train", "train.memory_gb=-1"], "train.memory_gb=-1 is invalid"),
        (["train", "train.layers=abc"], "train.layers='abc' is invalid"),
        (["eval", "policy=h2o", "policy.heavy_ratio=abc"], "policy.heavy_ratio='abc' is invalid"),
        (["eval", "task=lm_eval", "lm_eval.limit=-1"], "lm_eval.limit=-1 is invalid"),
        (["extract", "experiment=smoke", "extract.tokens=10"], "extract.tokens=10 is invalid"),
        (["report", f"results_dir={tmp_path / 'none'}"], f"results_dir='{tmp_path / 'none'}'"),
    )
    for args, needle in cases:
        res = runner.invoke(app, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    res = runner.invoke(app, ["eval", "task=nope"])
    assert "or a data option" in res.output and "wikitext2" in res.output  # both kinds named
