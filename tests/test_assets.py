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
    splits = {json.loads(x)["split"] for x in open(A.corpus_path("xsum"))}
    assert splits == {"train", "test"}
