import json

from lessctl.runs import list_runs, start_run


def test_run_folder_provenance(compose, tmp_path):
    cfg = compose("model=tiny-random", f"results_dir={tmp_path}/res", "seed=3")
    run = start_run(cfg, "eval", ["model=tiny-random", "seed=3"])
    assert (run.path / "config.yaml").read_text().count("tiny-random") >= 1
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["versions"]["torch"] and meta["git"]
    run.add_rows([{"metric": "ppl", "value": 1.5}])
    run.finish()
    [again] = list_runs(tmp_path / "res", "eval")
    [row] = again.rows()
    assert row["value"] == 1.5 and row["seed"] == 3 and "v_transformers" in row
    assert again.meta["status"] == "finished"


def test_revision_is_dirty_for_code_changes_not_for_run_outputs(tmp_path, monkeypatch):
    """A run records `<commit>+dirty` when tracked code differs from the commit, but not when
    only tracked results under `results/` do (a reproduce run empties them first)."""
    import shutil
    import subprocess

    import lessctl.runs as runs

    repo = tmp_path / "repo"
    (repo / "lessctl").mkdir(parents=True)
    (repo / "results").mkdir()
    shutil.copy(runs.__file__, repo / "lessctl" / "runs.py")
    (repo / "results" / "REPORT.md").write_text("old\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    monkeypatch.setattr(runs, "__file__", str(repo / "lessctl" / "runs.py"))
    clean = runs.git_revision()
    assert len(clean) == 12 and "+" not in clean
    (repo / "results" / "REPORT.md").unlink()
    assert runs.git_revision() == clean
    (repo / "lessctl" / "runs.py").write_text("# changed\n")
    assert runs.git_revision() == clean + "+dirty"


def test_a_stage_ended_by_sigterm_says_interrupted_and_an_error_failed(compose, tmp_path):
    """SIGTERM (SLURM's time limit, `kill`) ends a stage like Ctrl-C: its run folder says
    `interrupted`, an exception says `failed`; the previous SIGTERM handler comes back."""
    import os
    import signal

    import pytest

    from lessctl.cli import _stage_run

    cfg = compose("model=tiny-random", f"results_dir={tmp_path}/res")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _stage_run("eval", [], cfg):
        os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(ValueError), _stage_run("eval", [], cfg):
        raise ValueError("x")
    got = sorted(r.meta["status"] for r in list_runs(tmp_path / "res", "eval"))
    assert got == ["failed", "interrupted"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_run_whose_process_died_is_marked_interrupted_when_next_seen(compose, tmp_path):
    """kill -9 leaves meta.json `running`: the next look at the folder on the same host finds
    its recorded pid gone and marks it `interrupted`; a live process's run stays `running`, and
    so does one from another host (its pid says nothing here)."""
    import platform
    import subprocess
    import sys

    from lessctl.atomic import write_json_atomic

    cfg = compose("model=tiny-random", f"results_dir={tmp_path}/res")
    dead, alive, elsewhere = (start_run(cfg, "eval", []) for _ in range(3))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_json_atomic(dead.path / "meta.json", {**dead.meta, "pid": gone.pid})
        write_json_atomic(alive.path / "meta.json", {**alive.meta, "pid": sleeper.pid})
        other = {**elsewhere.meta, "pid": gone.pid, "host": platform.node() + "-other"}
        write_json_atomic(elsewhere.path / "meta.json", other)
        status = {r.path: r.meta["status"] for r in list_runs(tmp_path / "res", "eval")}
    finally:
        sleeper.kill()
    assert status == {dead.path: "interrupted", alive.path: "running", elsewhere.path: "running"}
    assert json.loads((dead.path / "meta.json").read_text())["status"] == "interrupted"
