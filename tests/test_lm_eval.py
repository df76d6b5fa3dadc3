"""lm-evaluation-harness backend: the `lessctl` model against lm-eval's plain HFLM and against
lessctl's own parallel-form perplexity, the launcher, and `lessctl eval task=lm_eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lessctl.errors import LessctlError
from lessctl.lm_eval.model import LessctlLM, lessctl_overrides
from lessctl.methods import Method
from lessctl.policies import get_policy
from lessctl.tasks.perplexity import method_nll

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 64
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def ll_requests(pairs):
    return [
        Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]


def rolling_request(text):
    return [Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]


PAIRS = [
    ("Question: what jumps over the dog?\nAnswer:", " the fox"),
    ("Question: what jumps over the dog?\nAnswer:", " a zebra"),
    (TEXT[:150], TEXT[150:170]),
    ("Sphinx of", " black quartz"),
]


def lessctl_lm(model, tok, method, batch_size=1):
    return LessctlLM(
        pretrained=model, tokenizer=tok, method=method, max_length=WINDOW, batch_size=batch_size
    )


def h2o(budget=16):
    return Method("baseline", get_policy("h2o", heavy=budget - 4, recent=4))


def test_full_equals_plain_hflm(tiny_model):
    """Same inputs, same log-likelihoods as lm-eval's own HF model (fp32, 1e-4)."""
    model, tok = tiny_model
    plain = HFLM(pretrained=model, tokenizer=tok, backend="causal", max_length=WINDOW)
    ours = lessctl_lm(model, tok, Method("full", get_policy("full")))
    ref, got = plain.loglikelihood(ll_requests(PAIRS)), ours.loglikelihood(ll_requests(PAIRS))
    for (a, greedy_a), (b, greedy_b) in zip(ref, got, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
        assert greedy_a == greedy_b
    doc = TEXT * 2  # longer than one window: several rolling windows
    ref_roll = plain.loglikelihood_rolling(rolling_request(doc))[0]
    assert ours.loglikelihood_rolling(rolling_request(doc))[0] == pytest.approx(ref_roll, abs=1e-4)


def test_rolling_loglikelihood_equals_parallel_perplexity(tiny_model):
    """For a policy, lm-eval's rolling log-likelihood of a document = -(Σ NLL) of lessctl's
    parallel-form perplexity (method_nll) on the same windows; and the policy really acts."""
    model, tok = tiny_model
    method = h2o()
    lm = lessctl_lm(model, tok, method)
    doc = (TEXT * 3)[: 3 * WINDOW]  # byte tokens: three full rolling windows
    ids = lm.tok_encode(doc)
    assert len(ids) == 3 * WINDOW
    windows = [
        torch.tensor(ctx + cont)[None]
        for ctx, cont in map(
            make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, WINDOW, 1)
        )
    ]
    assert [w.shape[1] for w in windows] == [WINDOW + 1] * 3
    nll = [method_nll(model, w, method) for w in windows]
    assert sum(n for _, n in nll) == len(ids)  # every token predicted once
    rolling = lm.loglikelihood_rolling(rolling_request(doc))[0]
    assert -rolling == pytest.approx(sum(t for t, _ in nll), abs=1e-4)
    full = lessctl_lm(model, tok, Method("full", get_policy("full")))
    assert abs(full.loglikelihood_rolling(rolling_request(doc))[0] - rolling) > 1e-2


def test_policy_batched_equals_one_at_a_time(tiny_model):
    """Right padding in a batch changes nothing for a policy (evictions are causal)."""
    model, tok = tiny_model
    one = lessctl_lm(model, tok, h2o(8)).loglikelihood(ll_requests(PAIRS))
    many = lessctl_lm(model, tok, h2o(8), batch_size=4).loglikelihood(ll_requests(PAIRS))
    for (a, _), (b, _) in zip(one, many, strict=True):
        assert b == pytest.approx(a, abs=1e-4)


def test_generation_full_equals_plain_hflm_and_policy_runs_through_cache(tiny_model):
    model, tok = tiny_model
    req = [
        Instance(
            "generate_until",
            doc={},
            arguments=(TEXT[:40], {"until": ["zz"], "max_gen_toks": 12, "do_sample": False}),
            idx=0,
        )
    ]
    plain = HFLM(pretrained=model, tokenizer=tok, backend="causal", max_length=WINDOW)
    ours = lessctl_lm(model, tok, Method("full", get_policy("full")))
    ref = plain.generate_until(req)
    assert ours.generate_until(req) == ref
    evicting = lessctl_lm(model, tok, h2o(8)).generate_until(req)
    assert isinstance(evicting[0], str) and len(evicting[0]) > 0


def test_model_args_and_refusals(tiny_model):
    assert lessctl_overrides({"budget": 32, "ckpt": "/k", "less.rank": 8, "policy": "h2o"}) == [
        "policy.budget.size=32",
        "less.ckpt=/k",
        "less.rank=8",
        "policy=h2o",
    ]
    with pytest.raises(LessctlError, match="unknown lessctl model argument 'bogus'"):
        lessctl_overrides({"bogus": 1})
    model, tok = tiny_model
    with pytest.raises(LessctlError, match="unknown method 'nope'"):
        LessctlLM(pretrained=model, tokenizer=tok, method="nope", max_length=WINDOW)


def test_launcher_runs_lm_eval_command_line(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lessctl.lm_eval",
        "--model",
        "lessctl",
        "--model_args",
        "model=tiny-random,method=baseline,policy=lambda,budget=16,max_length=64,dtype=float32",
        "--device",
        "cpu",
        "--tasks",
        "lessctl_mc",
        "--limit",
        "2",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["lessctl_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["lessctl_mc"]["effective"] == 2
    assert results["config"]["lessctl_policy"] == "lambda"


def test_eval_task_lm_eval_rows_and_report(tmp_path):
    from typer.testing import CliRunner

    from lessctl.cli import app

    res = CliRunner().invoke(
        app,
        [
            "eval",
            "model=tiny-random",
            "dtype=float32",
            "task=lm_eval",
            "lm_eval.tasks=[lessctl_mc]",
            "lm_eval.limit=3",
            "lm_eval.bootstrap_iters=100",
            "eval.methods=[full,baseline]",
            "eval.window=64",
            "policy=lambda",
            "policy.budget.size=16",
            f"results_dir={tmp_path}",
        ],
    )
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs" / "eval").iterdir()
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
    acc = [r for r in rows if r["metric"] == "acc"]
    assert {r["method"] for r in acc} == {"full", "baseline"}
    for r in acc:
        assert r["task"] == "lm_eval" and r["lm_eval_task"] == "lessctl_mc"
        assert r["n"] == 3 and r["stderr"] is not None and r["git"] and r["v_lm_eval"]
        assert r["source"].endswith("mc.jsonl")
    assert (run / "lm_eval" / "full.json").exists() and (run / "lm_eval" / "baseline.json").exists()

    from lessctl.report import run as write_report

    text = Path(write_report(tmp_path)).read_text()
    assert "lessctl_mc" in text


def test_unknown_task_is_one_line():
    from lessctl.lm_eval.task import load_tasks, task_manager

    manager = task_manager(["lessctl_mc"])  # local tasks only: no index of lm-eval's own
    assert "lessctl_wikitext" in manager.all_tasks
    with pytest.raises(LessctlError, match="unknown lm_eval task 'no_such_task'"):
        load_tasks(["no_such_task"], manager)


def test_wikitext_task_is_lm_evals_word_perplexity_with_bootstrap_stderr(tiny_model, tmp_path):
    """lessctl_wikitext on a local file: lm-eval's word perplexity and bits per byte equal
    exp(-Σ loglik / Σ words) and -Σ loglik / (Σ bytes · ln 2) over the documents' rolling
    log-likelihoods; the perplexity's missing stderr is bootstrapped over documents."""
    import math
    import re

    from lm_eval.evaluator import simple_evaluate

    from lessctl.lm_eval.task import fill_stderr, result_rows, task_manager

    docs = [TEXT[:90], TEXT[40:200] + "\n", "  " + TEXT[10:60], TEXT * 2]
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model, tok = tiny_model
    lm = lessctl_lm(model, tok, h2o())
    manager = task_manager(["lessctl_wikitext"], metadata={"wikitext_path": str(path)})
    res = simple_evaluate(
        model=lm, tasks=["lessctl_wikitext"], task_manager=manager, bootstrap_iters=200
    )
    lls = [lm.loglikelihood_rolling(rolling_request(d))[0] for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    got = res["results"]["lessctl_wikitext"]
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-5)
    filled = fill_stderr(res, 200, seed=0)
    assert ("lessctl_wikitext", "word_perplexity_stderr,none") in filled
    rows = {r["metric"]: r for r in result_rows(res, filled)}
    assert rows["word_perplexity"]["stderr"] > 0
    assert rows["word_perplexity"]["stderr_by"] == "lessctl bootstrap over examples"
    assert rows["word_perplexity"]["source"] == f"file:{path}"
    assert rows["word_perplexity"]["n"] == len(docs)
    assert "sample_len" not in rows


def test_task_with_unreachable_data_is_one_line(tmp_path):
    from lessctl.lm_eval.task import load_tasks, task_manager

    (tmp_path / "fake.yaml").write_text(
        "task: fake_hub_task\ndataset_path: nobody/no_such_dataset\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{c}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    manager = task_manager(["fake_hub_task"], str(tmp_path))
    with pytest.raises(LessctlError) as err:
        load_tasks(["fake_hub_task"], manager)
    msg = str(err.value)
    assert "'fake_hub_task': its data cannot be loaded" in msg and "include_path" in msg
    assert "\n" not in msg
