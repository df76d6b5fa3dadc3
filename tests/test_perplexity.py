import json
import math

import pytest
import torch

from lessctl.hooks import use_attention
from lessctl.methods import Method, ParallelAttention
from lessctl.policies import get_policy
from lessctl.tasks.perplexity import method_nll, method_window_nll


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 48), generator=g)


def test_full_matches_loss_reference(tiny_model, windows):
    model, _ = tiny_model
    nll, n = method_nll(model, windows, Method("full", get_policy("full")))
    ref = sum(model(w[None], labels=w[None]).loss.item() * (w.numel() - 1) for w in windows)
    assert n == 3 * 47
    assert nll == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    "policy",
    [
        get_policy("full"),
        get_policy("h2o", heavy=6, recent=6),
        get_policy("lambda", sink=2, recent=6),
    ],
)
def test_batched_windows_give_each_windows_own_values(tiny_model, windows, policy):
    """A batch of windows per forward (eval.batch_size) gives the per-window values of one
    window at a time: no window leaks into another's eviction or loss."""
    model, _ = tiny_model
    m = Method("full" if policy.budget is None else "baseline", policy)
    one = method_window_nll(model, windows, m, batch_size=1)
    two = method_window_nll(model, windows, m, batch_size=2)
    assert one[1] == two[1] == [47, 47, 47]
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert len(set(one[0])) == 3  # the windows differ


def test_registered_attention_is_causal_and_equals_eager(tiny_model, windows):
    """Pitfall: a registered function without a mask function attends to the future."""
    model, _ = tiny_model
    x = windows[:1]
    ref = model(x, labels=x).loss
    with use_attention(model, ParallelAttention(get_policy("full"))):
        got = model(x, labels=x).loss
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_baseline_with_budget_over_window_equals_full(tiny_model, windows):
    model, _ = tiny_model
    full = method_nll(model, windows, Method("full", get_policy("full")))[0]
    wide = method_nll(model, windows, Method("baseline", get_policy("lambda", sink=4, recent=60)))[
        0
    ]
    tight = method_nll(model, windows, Method("baseline", get_policy("lambda", sink=2, recent=6)))[
        0
    ]
    assert wide == pytest.approx(full, rel=1e-5)
    assert not math.isclose(tight, full, rel_tol=1e-4)


def test_eval_cli_perplexity_rows(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lessctl.cli import app
    from lessctl.runs import list_runs

    from .test_extract import TEXT

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "experiment=smoke",
            f"data.path={tmp_path / 't.txt'}",
            "eval.methods=[full,baseline,baseline_plus,performer]",
        ],
    )
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    rows = run.rows()
    assert {r["method"] for r in rows} == {"full", "baseline", "baseline_plus", "performer"}
    r = rows[0]
    assert r["source"].startswith("file:") and r["v_torch"] and r["git"] and r["seed"] == 0
    assert {r["metric"] for r in rows} == {"ppl_token", "ppl_word"}
    by = {(r["method"], r["metric"]): r for r in rows}
    # tiny-random: d=16, R=8: the state holds R*d + R = 136 numbers = 4 tokens of K+V (2*16)
    assert (
        by[("baseline_plus", "ppl_token")]["budget"] == by[("baseline", "ppl_token")]["budget"] + 4
    )
    # per-window values (the report's bootstrap units) add up to the aggregate figure
    for r in rows:
        assert len(r["window_nll"]) == len(r["window_count"]) == r["windows"] >= 2
        assert math.exp(sum(r["window_nll"]) / sum(r["window_count"])) == pytest.approx(r["value"])
        assert sum(r["window_count"]) == (r["tokens"] if r["metric"] == "ppl_token" else r["words"])
    assert by[("full", "ppl_token")]["window_nll"] != by[("baseline", "ppl_token")]["window_nll"]
    assert by[("baseline_plus", "ppl_token")]["extra_tokens"] == 4
    assert by[("baseline", "ppl_token")]["trained_budget"] is None


def test_bad_method_and_missing_checkpoint(compose, tiny_model, tmp_path):
    from lessctl.errors import LessctlError
    from lessctl.methods import build_methods
    from lessctl.models import attention_geometry

    geo = attention_geometry(tiny_model[0])
    with pytest.raises(LessctlError, match="allowed"):
        build_methods(
            compose("experiment=smoke", "eval.methods=[nope]"), geo, 64, "cpu", torch.float32
        )
    with pytest.raises(LessctlError, match="lessctl train"):
        build_methods(
            compose("experiment=smoke", f"train.dir={tmp_path}", "eval.methods=[less]"),
            geo,
            64,
            "cpu",
            torch.float32,
        )


@pytest.mark.slow
def test_smollm2_parallel_full_equals_sdpa_and_policy_hurts(smollm2):
    model, tok = smollm2
    text = (
        "The committee met on Tuesday to discuss the new budget. After a long debate, the "
        "members agreed to fund the library, repair the old bridge and hire two more teachers "
        "for the primary school. The mayor said the decision would help families across the "
        "town, and promised to publish the full accounts before the end of the year."
    ) * 3
    x = tok(text, return_tensors="pt").input_ids
    ref = model(x, labels=x).loss
    with use_attention(model, ParallelAttention(get_policy("full"))):
        full = model(x, labels=x).loss
    with use_attention(model, ParallelAttention(get_policy("lambda", sink=4, recent=12))):
        sparse = model(x, labels=x).loss
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    assert sparse > ref


def test_words_are_counted_once_over_the_evaluated_text(tiny_model):
    from lessctl.data import token_windows
    from lessctl.tasks.perplexity import count_words

    _, tok = tiny_model
    docs = ["alpha beta gamma delta epsilon " * 6, "zeta eta theta iota kappa " * 6]
    one = token_windows(docs, tok, 7)  # 7-token windows cut words
    joined = one.reshape(1, -1)
    assert count_words(tok, one) == count_words(tok, joined)
    # the whole text in one window: exactly the documents' words
    whole = token_windows(docs, tok, sum(len(tok(d).input_ids) + 1 for d in docs))
    assert count_words(tok, whole) == sum(len(d.split()) for d in docs)
    # each window's share (the bootstrap units) adds up to the words counted once, and a word
    # cut by a boundary is not counted twice
    from lessctl.tasks.perplexity import words_per_window

    for n in (3, 5, 7, 11):
        w = token_windows(docs, tok, n)
        shares = words_per_window(tok, w)
        assert sum(shares) == count_words(tok, w)
        assert sum(shares) < sum(count_words(tok, x[None]) for x in w)  # words were cut


def test_an_interrupted_perplexity_run_keeps_its_finished_methods_and_resumes(
    tmp_path, monkeypatch
):
    """Each method's windows are saved as it finishes: a run stopped during the second method
    keeps the first, a rerun with eval.reuse_predictions reads it back (rows equal an
    uninterrupted run's, reused_from set) and computes only the rest; another policy budget or
    another text is computed anew (its digest differs)."""
    from typer.testing import CliRunner

    from lessctl.cli import app
    from lessctl.runs import list_runs
    from lessctl.tasks import perplexity

    from .test_extract import TEXT

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    args = ["eval", "experiment=smoke", f"data.path={tmp_path / 't.txt'}"]
    args += ["eval.methods=[full,baseline]"]
    real, calls = perplexity.method_window_nll, []

    def stops_at_the_second(model, windows, method, batch_size=1):
        calls.append(method.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, windows, method, batch_size)

    monkeypatch.setattr(perplexity, "method_window_nll", stops_at_the_second)
    run = lambda *extra: CliRunner().invoke(app, [*args, *extra])  # noqa: E731
    assert run().exit_code != 0
    [stopped] = list_runs("results", "eval")
    assert stopped.meta["status"] == "interrupted" and not stopped.rows()
    [saved] = (stopped.path / "predictions").glob("perplexity-*.jsonl")
    assert [json.loads(x)["method"] for x in saved.read_text().splitlines()] == ["full"]
    calls.clear()
    counted = lambda *a, **k: calls.append(a[2].name) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(perplexity, "method_window_nll", counted)
    assert run(f"eval.reuse_predictions=[{stopped.path}]").exit_code == 0
    assert calls == ["baseline"]
    calls.clear()
    assert run().exit_code == 0  # from scratch
    assert calls == ["full", "baseline"]
    resumed, scratch = sorted(
        (r for r in list_runs("results", "eval") if r.path != stopped.path), key=lambda r: r.path
    )
    key = lambda r: (r["method"], r["metric"], r["value"], tuple(r["window_nll"]))  # noqa: E731
    assert sorted(map(key, resumed.rows())) == sorted(map(key, scratch.rows()))
    by = {r["method"]: r["reused_from"] for r in resumed.rows()}
    assert by == {"full": str(stopped.path), "baseline": None}
    calls.clear()  # another budget: baseline's digest differs, full's does not
    assert run(f"eval.reuse_predictions=[{stopped.path}]", "policy.budget.size=6").exit_code == 0
    assert calls == ["baseline"]
    calls.clear()  # another text: nothing is reused
    (tmp_path / "t.txt").write_text(TEXT[::-1])
    assert run(f"eval.reuse_predictions=[{stopped.path}]").exit_code == 0
    assert calls == ["full", "baseline"]
