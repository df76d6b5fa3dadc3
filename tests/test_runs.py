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
