"""eval.mode=streaming: rows mirror perplexity.run; per window it equals the parallel form."""

from __future__ import annotations

import pytest

from lessctl.methods import Method
from lessctl.policies import get_policy
from lessctl.tasks import perplexity, streaming

TEXT = "The cat sat on the mat. " * 40 + "A quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture
def cfg(compose, tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return compose("model=tiny-random", f"data.path={p}", "eval.window=64", "eval.windows=3")


def test_streaming_rows_mirror_parallel_and_match_it(cfg, tiny_model):
    model, tok = tiny_model
    methods = [
        Method("full", get_policy("full")),
        Method("baseline", get_policy("h2o", heavy=8, recent=8)),
    ]
    par = perplexity.run(cfg, model, tok, methods, log=lambda s: None)
    stream = streaming.run(cfg, model, tok, methods, log=lambda s: None)
    assert len(par) == len(stream) == 4
    for p, s in zip(par, stream, strict=True):
        assert list(p) == list(s)  # same columns, same order
        assert s["task"] == "perplexity_streaming"
        for k in p:
            if k not in ("task", "value", "window_nll"):
                assert p[k] == s[k], k
        assert s["window_nll"] == pytest.approx(p["window_nll"], rel=1e-4)  # per window too
        # eviction from the first token of each window is the parallel form, row by row
        assert s["value"] == pytest.approx(p["value"], rel=1e-4)
    assert stream[0]["tokens"] == 3 * 63 and stream[2]["budget"] == 16
