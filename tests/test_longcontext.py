"""Long-context retrieval tasks: generators (seeded, exact lengths, depth placement), scoring,
the external file format, and one task end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from lessctl.errors import LessctlError
from lessctl.tasks import haystack, longcontext, needle, passkey, variable_tracking
from lessctl.tasks.longcontext import Sample, interval, layout, place, score, specials

TEXT = (
    "The committee met on Tuesday to discuss the budget. Members argued about roads and "
    "schools for hours. In the end a compromise was reached. Local papers praised the result! "
    "Farmers wanted more water for their fields. The mayor promised a new bridge next spring. "
) * 6


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "hay.txt"
    p.write_text(TEXT)
    return p


def test_score_contains_and_exact():
    assert score("The pass key is 12345.", ["12345"]) == {"contains": 1.0, "exact": 0.0}
    assert score(" 12345.\nand more", ["12345"]) == {"contains": 1.0, "exact": 1.0}
    assert score("1234", ["12345"]) == {"contains": 0.0, "exact": 0.0}
    # several required answers (RULER string_match_all): the share found
    assert score("ABCDE, FGHIJ", ["abcde", "fghij", "KLMNO"])["contains"] == pytest.approx(2 / 3)
    assert score("FGHIJ, abcde", ["abcde", "fghij"])["exact"] == 1.0
    assert score("FGHIJ, abcde, x", ["abcde", "fghij"])["exact"] == 0.0
    # alternatives (LongBench): one is enough
    assert score("it was Paris", ["Lyon", "Paris"], match="any")["contains"] == 1.0


def test_interval_wilson_and_normal():
    lo, hi = interval([1.0, 1.0, 1.0, 1.0])
    assert hi == pytest.approx(1.0) and 0.45 < lo < 0.55  # Wilson 4/4: [0.510, 1]
    lo, hi = interval([0.0, 1.0])
    assert lo < 0.5 < hi
    lo, hi = interval([0.5, 0.7, 0.6])
    assert lo < 0.6 < hi


def test_place_inserts_at_nearest_sentence_start():
    hay = list(range(100))
    starts = [0, 10, 20, 50, 90]
    ids, where = place(hay, starts, [[-1, -1], [-2]], [0.45, 1.0])
    assert where == [50, 102]  # 0.45*100 -> nearest start 50; 1.0 -> the end, after piece 0
    assert ids[50:52] == [-1, -1] and ids[-1] == -2 and len(ids) == 103
    assert [x for x in ids if x >= 0] == hay  # the haystack itself is unchanged, in order


def test_layout_question_positions():
    s = Sample("0", [1, 2], [3], [4], ["x"], 5)
    assert layout(s, [0], "after") == ([0, 1, 2], [3, 4])
    assert layout(s, [0], "before") == ([0, 3, 1, 2], [4])
    assert layout(s, [0], "end") == ([0, 1, 2, 3, 4], [])
    with pytest.raises(LessctlError, match="allowed: after, before, end"):
        layout(s, [0], "middle")


def _total(tok, s: Sample) -> int:
    return len(specials(tok)) + len(s.context) + len(s.question) + len(s.answer_prefix)


def test_passkey_exact_length_depth_and_seed(compose, tiny_model):
    _, tok = tiny_model
    cfg = compose(
        "experiment=smoke", "task=passkey", "task.lengths=[300,480]", "task.depths=[0,0.5,1]"
    )
    a = passkey.make_samples(cfg, tok)
    hay = haystack.noise(tok)
    ends = [*hay.starts[1:], len(hay.ids)]
    sentence = max(e - b for b, e in zip(hay.starts, ends, strict=True))
    assert len(a) == 2 * 3 * int(cfg.task.samples)
    for s in a:
        assert _total(tok, s) == s.length  # counted in the model's own tokens, exactly
        text = tok.decode(s.context)
        key = s.answers[0]
        assert text.count(key) == 2 and len(key) == 5
        assert tok.decode(s.context[s.needle_at :]).startswith(" The pass key is " + key)
        # the needle sits at the depth of the haystack (within one filler sentence)
        intro = len(longcontext.encode(tok, passkey.INTRO))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        hay_len = len(s.context) - intro - len(longcontext.encode(tok, needle))
        assert abs(s.needle_at - intro - s.depth * hay_len) <= sentence / 2 + 1
    b = passkey.make_samples(cfg, tok)
    assert [s.context for s in a] == [s.context for s in b]  # same seed, same samples
    c = passkey.make_samples(compose(*_over(cfg), "seed=1"), tok)
    assert [s.answers for s in a] != [s.answers for s in c]
    # a cell's samples do not depend on the rest of the grid
    d = passkey.make_samples(compose(*_over(cfg), "task.lengths=[480]"), tok)
    assert [s.context for s in d] == [s.context for s in a if s.length == 480]


def _over(cfg) -> list[str]:
    return [
        "experiment=smoke",
        "task=passkey",
        f"task.lengths=[{','.join(str(x) for x in cfg.task.lengths)}]",
        f"task.depths=[{','.join(str(x) for x in cfg.task.depths)}]",
    ]


def test_needle_variants_and_corpus_haystack(compose, tiny_model, corpus_file):
    _, tok = tiny_model
    cfg = compose(
        "experiment=smoke",
        "task=needle",
        f"data.path={corpus_file}",
        "task.lengths=[900]",
        "task.depths=[0.25]",
        "task.samples=2",
        "task.num_keys=3",
        "task.num_values=1",
        "task.num_queries=2",
        "task.key_type=numbers",
    )
    samples, source = needle.make_samples(cfg, tok)
    assert source.startswith("file:")
    for s in samples:
        assert _total(tok, s) == 900
        text = tok.decode(s.context)
        assert text.count("special magic numbers for") == 3  # 3 keys x 1 value
        assert len(s.answers) == 2 and all(a in text for a in s.answers)
        assert "committee" in text  # the haystack is the corpus
        q = tok.decode(s.question)
        assert " and " in q and "What are all" in q
    # several values of one key: all of them are the answer
    multi = compose(*_needle(corpus_file), "task.num_values=2", "task.key_type=numbers")
    for s in needle.make_samples(multi, tok)[0]:
        text = tok.decode(s.context)
        assert text.count("special magic numbers for") == 2 and len(s.answers) == 2
        assert all(f"is: {a}." in text for a in s.answers)
    with pytest.raises(LessctlError, match="num_queries <= num_keys"):
        needle.make_samples(compose(*_needle(corpus_file), "task.num_queries=2"), tok)


def _needle(path) -> list[str]:
    return ["experiment=smoke", "task=needle", f"data.path={path}", "task.lengths=[900]"]


def test_variable_tracking_chain(compose, tiny_model):
    _, tok = tiny_model
    cfg = compose("experiment=smoke", "task=variable_tracking", "task.lengths=[480]")
    for s in variable_tracking.make_samples(cfg, tok):
        text = tok.decode(s.context)
        names = s.answers
        assert len(names) == int(cfg.task.hops) + 1
        # the chain appears in order: each VAR assigned from the one before
        pos = [text.index(f"VAR {n} =") for n in names]
        assert pos == sorted(pos)
        assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(names, names[1:], strict=False))


def test_common_words_counts(compose, tiny_model, corpus_file):
    from lessctl.tasks import common_words

    _, tok = tiny_model
    cfg = compose(
        "experiment=smoke",
        "task=common_words",
        f"data.path={corpus_file}",
        "task.lengths=[480]",
        "task.common=3",
        "task.common_freq=4",
        "task.uncommon_freq=1",
    )
    samples, _ = common_words.make_samples(cfg, tok)
    for s in samples:
        assert _total(tok, s) <= 480
        text = tok.decode(s.context).split("\n", 1)[1]
        listed = text.split()[1::2]
        assert all(listed.count(w) == 4 for w in s.answers)
        assert max(listed.count(w) for w in set(listed) - set(s.answers)) == 1


def test_haystack_cut_is_exact_and_wraps(tiny_model):
    import random

    _, tok = tiny_model
    hay = haystack.noise(tok)
    ids, starts = hay.cut(5 * len(hay.ids) + 3, random.Random(0))
    assert len(ids) == 5 * len(hay.ids) + 3 and starts[0] == 0 and len(starts) > 5


def test_lengths_past_the_model_are_refused(compose):
    from lessctl.tasks import get_task

    cfg = compose("experiment=smoke", "task=passkey", "task.lengths=[600]")
    with pytest.raises(LessctlError, match="max_position_embeddings=512"):
        get_task("passkey").context_tokens(cfg, 512)


def _run_cli(*args):
    from typer.testing import CliRunner

    from lessctl.cli import app

    return CliRunner().invoke(app, ["eval", "experiment=smoke", *args])


def test_longctx_file_end_to_end_on_tiny_model(tmp_path, monkeypatch):
    """An external-format JSONL through data.path: rows per (sub-task, length), per-sample
    scores in the run folder, too-long examples skipped and counted."""
    from lessctl.runs import list_runs

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    rows = [
        {
            "context": "The secret code is 4417. " + "Filler text here. " * 5,
            "question": "\nWhat is the secret code?",
            "answer_prefix": "\nThe secret code is",
            "answer": "4417",
            "max_new_tokens": 4,
            "task": "code",
            "length": 128,
        },
        {
            "context": "Apples and pears. " * 4,
            "question": "\nName two fruits.",
            "answer_prefix": " Fruits:",
            "answer": ["apples", "pears"],
            "max_new_tokens": 3,
            "task": "fruit",
            "length": 128,
        },
        {
            "context": "x" * 600,
            "question": "?",
            "answer_prefix": "",
            "answer": "y",
            "max_new_tokens": 2,
        },  # fmt: skip
    ]
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = _run_cli(
        "task=longctx",
        f"data.path={path}",
        "policy.budget.size=24",
        "eval.batch_size=2",
        "eval.methods=[full,baseline]",
    )
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    got = run.rows()
    assert {(r["method"], r["subtask"], r["metric"]) for r in got} == {
        (m, t, k)
        for m in ("full", "baseline")
        for t in ("code", "fruit")
        for k in ("contains", "exact")
    }
    assert all(r["skipped"] == 1 and r["samples"] == 1 and r["length"] == 128 for r in got)
    assert all(r["source"] == f"file:{path}" and r["git"] and r["v_torch"] for r in got)
    assert all(0.0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1.0 for r in got)
    preds = run.path / "predictions"
    full = [json.loads(x) for x in (preds / "longctx-full-None.jsonl").read_text().splitlines()]
    assert [p["answers"] for p in full] == [["4417"], ["apples", "pears"]]
    assert all(set(p) >= {"prediction", "contains", "exact", "tokens"} for p in full)


def test_longctx_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a", "answer": "b"}))
    res = _run_cli("task=longctx", f"data.path={bad}", "eval.methods=[full]")
    assert res.exit_code == 2 and "lacks column(s) question" in res.output
    res = _run_cli("task=longctx", "eval.methods=[full]")
    assert res.exit_code == 2 and "needs data.path=FILE" in res.output


def test_passkey_end_to_end_full_equals_huge_budget(tmp_path, monkeypatch):
    """Through the CLI on tiny-random: a budget that evicts nothing (304 = 300 + 4 new tokens)
    answers like full (the evicting cache and the library cache agree, suffix fed the same way);
    rows per (length, depth, method)."""
    from lessctl.runs import list_runs

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    res = _run_cli(
        "task=passkey",
        "task.lengths=[300]",
        "task.depths=[0,1]",
        "task.samples=1",
        "task.max_new_tokens=4",
        "policy=h2o",
        "policy.budget.size=304",
        "eval.methods=[full,baseline]",
        "eval.batch_size=2",
    )
    assert res.exit_code == 0, res.output
    [run] = list_runs("results", "eval")
    got = run.rows()
    assert {(r["method"], r["length"], r["depth"]) for r in got} == {
        (m, 300, d) for m in ("full", "baseline") for d in (0.0, 1.0)
    }
    preds = run.path / "predictions"
    full = (preds / "passkey-full-None.jsonl").read_text()
    [base] = list(preds.glob("passkey-baseline-*.jsonl"))
    strip = lambda t: [{k: v for k, v in json.loads(x).items()} for x in t.splitlines()]  # noqa: E731
    assert [p["prediction"] for p in strip(full)] == [
        p["prediction"] for p in strip(base.read_text())
    ]


def test_predictions_are_read_back_from_an_earlier_run(tmp_path, monkeypatch):
    """eval.reuse_predictions: a method whose predictions of the very same samples exist in an
    earlier run folder is read back (rows equal, `reused_from` set, nothing generated); other
    samples (another seed) are generated anew."""
    from lessctl.runs import list_runs
    from lessctl.tasks import longcontext

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    args = ["task=passkey", "task.lengths=[300]", "task.depths=[0,1]", "task.samples=1"]
    args += ["task.max_new_tokens=3", "policy.budget.size=24", "eval.methods=[full,baseline]"]
    assert _run_cli(*args).exit_code == 0
    [first] = list_runs("results", "eval")

    def no_generation(*a, **k):
        raise AssertionError("generated although the predictions exist")

    monkeypatch.setattr(longcontext, "answer", no_generation)
    res = _run_cli(*args, f"eval.reuse_predictions=[{first.path}]")
    assert res.exit_code == 0, res.output
    second = next(r for r in list_runs("results", "eval") if r.path != first.path)
    key = lambda r: (r["method"], r["depth"], r["metric"])  # noqa: E731
    want = {key(r): r["value"] for r in first.rows()}
    assert {key(r): r["value"] for r in second.rows()} == want
    assert {r["reused_from"] for r in second.rows()} == {str(first.path)}
    res = _run_cli(*args, "seed=1", f"eval.reuse_predictions=[{first.path}]")
    assert res.exit_code == 1 and "generated although" in str(res.exception)


def test_an_interrupted_run_resumes_from_its_finished_batches(tmp_path, monkeypatch):
    """Each finished batch is saved (predictions/<file>.partial); a run stopped half-way is
    resumed by eval.reuse_predictions=[its folder]: only the missing samples are generated and
    the rows equal those of an uninterrupted run."""
    from lessctl.runs import list_runs
    from lessctl.tasks import longcontext

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    args = ["task=passkey", "task.lengths=[300]", "task.depths=[0,0.5,1]", "task.samples=1"]
    args += ["task.max_new_tokens=3", "policy.budget.size=24", "eval.methods=[baseline]"]
    args += ["eval.batch_size=1"]
    real, calls = longcontext.answer, []

    def stops_at_the_third(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(longcontext, "answer", stops_at_the_third)
    assert _run_cli(*args).exit_code != 0
    [stopped] = list_runs("results", "eval")
    [partial] = (stopped.path / "predictions").glob("*.partial")
    assert len(partial.read_text().splitlines()) == 2
    calls.clear()
    monkeypatch.setattr(longcontext, "answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _run_cli(*args, f"eval.reuse_predictions=[{stopped.path}]").exit_code == 0
    assert calls == [1]  # the third sample alone
    assert _run_cli(*args).exit_code == 0
    resumed, scratch = sorted(
        (r for r in list_runs("results", "eval") if r.path != stopped.path), key=lambda r: r.path
    )
    key = lambda r: (r["depth"], r["metric"], r["value"])  # noqa: E731
    assert sorted(map(key, resumed.rows())) == sorted(map(key, scratch.rows()))
    assert {r["reused"] for r in resumed.rows()} == {2}
    assert not list((resumed.path / "predictions").glob("*.partial"))


def test_predictions_of_another_policy_or_budget_are_not_read_back(tmp_path, monkeypatch):
    """The input digest holds the method's policy and budget: lambda's predictions are not
    h2o's, nor are those at another budget."""
    from lessctl.runs import list_runs
    from lessctl.tasks import longcontext

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    args = ["task=passkey", "task.lengths=[300]", "task.depths=[0]", "task.samples=1"]
    args += ["task.max_new_tokens=3", "eval.methods=[baseline]"]
    assert _run_cli(*args, "policy=lambda", "policy.budget.size=24").exit_code == 0
    [first] = list_runs("results", "eval")
    calls = []
    real = longcontext.answer
    monkeypatch.setattr(longcontext, "answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    reuse = f"eval.reuse_predictions=[{first.path}]"
    for other in (
        ["policy=h2o", "policy.budget.size=24"],
        ["policy=lambda", "policy.budget.size=20"],
    ):
        assert _run_cli(*args, *other, reuse).exit_code == 0
    assert calls == [1, 1]
    assert _run_cli(*args, "policy=lambda", "policy.budget.size=24", reuse).exit_code == 0
    assert calls == [1, 1]  # the same method and policy: read back


@pytest.mark.slow
def test_smollm2_full_cache_retrieves_a_short_passkey(compose, smollm2, tmp_path):
    """The embedded model can do the task (measured: 4/4 at 300 tokens, greedy), so a
    compressed cache that fails it fails for real."""
    from lessctl.methods import Method
    from lessctl.policies.budget import build_policy

    model, tok = smollm2
    cfg = compose("task=passkey", "task.lengths=[300]", "task.depths=[0.5]", "task.samples=4")
    full = Method("full", build_policy({"name": "full"}, seq_len=308, max_position_embeddings=0))
    samples = passkey.make_samples(cfg, tok)
    rows = longcontext.run_samples(
        cfg, model, tok, [full], tmp_path, samples, dataset="passkey", source="t", log=print
    )
    [acc] = [r["value"] for r in rows if r["metric"] == "contains"]
    assert acc == 1.0


def test_method_digest_holds_the_weights_not_where_they_came_from(compose):
    """Same config, other weights (another seed, a fine-tune): another digest; the same
    weights loaded again: the same digest; kernels' weights count too (Performer has no
    checkpoint)."""
    import torch

    from lessctl.less.kernels import KernelConfig, LayerKernels
    from lessctl.methods import Method
    from lessctl.models import load_model
    from lessctl.policies import get_policy

    cfg = compose("model=tiny-random")
    policy = get_policy("lambda", sink=2, recent=6)
    digest = lambda model, **kw: longcontext.method_digest(model, Method("less", policy, **kw))  # noqa: E731
    a, b, a2 = (load_model(cfg.model, "cpu", seed=s)[0] for s in (0, 1, 0))
    assert digest(a) == digest(a2) != digest(b)
    kc = KernelConfig(4, 2, 16, rank=4, hidden=8, dropout=0.0, init_scale=1.0)
    torch.manual_seed(0)
    k1 = {0: LayerKernels(kc)}
    torch.manual_seed(1)
    k2 = {0: LayerKernels(kc)}
    assert digest(a, kernels=k1) != digest(a, kernels=k2) != digest(a)
    lam = longcontext.method_digest(a, Method("baseline", get_policy("lambda", sink=2, recent=6)))
    assert lam != longcontext.method_digest(
        a, Method("baseline", get_policy("h2o", heavy=4, recent=4))
    )


def test_method_digest_holds_performer_features_and_kernel_configs(compose):
    """Performer's random features are a buffer, not a parameter: another seed or rank is
    another digest (a rerun at less.rank=16 must not read back rank 8's results)."""
    from lessctl.less.kernels import KernelConfig, LayerKernels
    from lessctl.methods import Method
    from lessctl.models import load_model
    from lessctl.policies import get_policy

    model = load_model(compose("model=tiny-random").model, "cpu", seed=0)[0]
    policy = get_policy("lambda", sink=2, recent=6)

    def digest(**kc):
        kern = {0: LayerKernels(KernelConfig(4, 2, 16, kind="performer", **kc))}
        return longcontext.method_digest(model, Method("performer", policy, kern))

    assert digest(rank=8, seed=0) == digest(rank=8, seed=0)
    assert len({digest(rank=8, seed=0), digest(rank=8, seed=1), digest(rank=16, seed=0)}) == 3


def test_task_protocol_reaches_the_cache_and_keeps_predictions_apart(tmp_path, monkeypatch):
    """task.protocol=streaming is what generation runs (not the default prompt protocol), the
    rows record it, predictions under one protocol are not read back for the other, and a
    protocol that is not one is refused in one line."""
    from lessctl.runs import list_runs
    from lessctl.tasks import longcontext

    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    seen = []
    real = longcontext.generate
    monkeypatch.setattr(
        longcontext, "generate", lambda *a, **k: seen.append(k["protocol"]) or real(*a, **k)
    )
    args = ["task=passkey", "task.lengths=[300]", "task.depths=[0]", "task.samples=1"]
    args += ["task.max_new_tokens=3", "eval.methods=[baseline]", "policy.budget.size=24"]
    assert _run_cli(*args).exit_code == 0
    [first] = list_runs("results", "eval")
    reuse = f"eval.reuse_predictions=[{first.path}]"
    assert _run_cli(*args, "task.protocol=streaming", reuse).exit_code == 0
    assert seen == ["prompt", "streaming"]  # the streaming run generated: nothing read back
    second = next(r for r in list_runs("results", "eval") if r.path != first.path)
    assert {r["protocol"] for r in first.rows()} == {"prompt"}
    assert {r["protocol"] for r in second.rows()} == {"streaming"}
    bad = _run_cli(*args, "task.protocol=stream")
    assert bad.exit_code == 2 and "task.protocol" in bad.output and "streaming" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
