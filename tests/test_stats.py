import math

import numpy as np
import pytest

from lessctl.stats import Samples, difference, figure, gap_closed, verdict

KW = {"resamples": 2000}


def _ppl(nll, tokens=511):
    nll = np.asarray(nll, float)
    return Samples(nll, np.full(len(nll), tokens), exp=True)


def test_perplexity_is_a_ratio_over_windows_and_interval_covers_it():
    rng = np.random.default_rng(1)
    nll = rng.normal(1500, 200, 40)
    tokens = rng.integers(300, 512, 40)
    s = Samples(nll, tokens, exp=True)
    e = figure(s, **KW)
    assert e.value == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert e.value != pytest.approx(np.exp(nll / tokens).mean())  # not a mean of ratios
    assert e.low < e.value < e.high
    assert e.high - e.low > 0


def test_seeded_and_deterministic():
    s = _ppl(np.random.default_rng(2).normal(1500, 200, 32))
    assert figure(s, seed=3, **KW) == figure(s, seed=3, **KW)
    assert figure(s, seed=3, **KW) != figure(s, seed=4, **KW)


def test_clear_difference_is_significant_identical_is_not():
    rng = np.random.default_rng(3)
    base = rng.normal(1500, 100, 32)
    worse = _ppl(base + 150 + rng.normal(0, 10, 32))
    better = _ppl(base)
    d = difference(better, worse, **KW)
    assert d.value < 0 and d.significant
    assert verdict(d, lower_is_better=True) == "better"
    assert verdict(difference(worse, better, **KW), lower_is_better=True) == "worse"
    same = difference(better, better, **KW)
    assert same.value == 0 and not same.significant
    assert verdict(same, lower_is_better=True) == "not significant"
    # noise only: a difference of pure noise is not significant
    noisy = _ppl(base + rng.normal(0, 30, 32))
    assert not difference(noisy, better, **KW).significant


def test_pairing_matters():
    """Windows differ a lot in difficulty; LESS is a little better on every one of them: each
    method's own interval overlaps the other's, the paired difference excludes 0."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(1500, 300, 32)
    plus, less = _ppl(difficulty + 20), _ppl(difficulty)
    fp, fl = figure(plus, **KW), figure(less, **KW)
    assert fl.high > fp.low  # the unpaired intervals overlap
    d = difference(less, plus, **KW)
    assert d.significant and d.high < 0
    # shuffling LESS's windows breaks the pairing: the same figures, no longer significant
    shuffled = Samples(less.num[rng.permutation(32)], less.den, exp=True)
    assert shuffled.figure() == pytest.approx(less.figure())
    assert not difference(shuffled, plus, **KW).significant


def test_units_are_paired_by_id():
    a = Samples([1.0, 2.0, 3.0], [1, 1, 1], ids=(10, 11, 12))
    b = Samples([3.0, 1.0], [1, 1], ids=(12, 10))
    d = difference(a, b, **KW)
    assert d.value == pytest.approx(0.0)  # only ids 10 and 12, matched: (1+3)/2 - (1+3)/2
    with pytest.raises(ValueError, match="share no"):
        difference(a, Samples([1.0], [1], ids=(99,)))


def test_gap_closed_with_interval():
    rng = np.random.default_rng(5)
    d = rng.normal(1500, 200, 32)
    full, plus = _ppl(d), _ppl(d + 100)
    less = _ppl(d + 50 + rng.normal(0, 5, 32))
    g = gap_closed(full, plus, less, **KW)
    p, le, f = plus.figure(), less.figure(), full.figure()
    assert g.value == pytest.approx((p - le) / (p - f))
    assert 0.4 < g.value < 0.6 and g.low < g.value < g.high and g.low > 0.3 and g.high < 0.7
    # higher-is-better (ROUGE means) with the same formula
    r_full, r_plus = Samples(d / 1e4 + 0.1, np.ones(32)), Samples(d / 1e4, np.ones(32))
    r_less = Samples(d / 1e4 + 0.025, np.ones(32))
    assert gap_closed(r_full, r_plus, r_less, **KW).value == pytest.approx(0.25)


def test_bad_samples_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        Samples([], [])
    with pytest.raises(ValueError, match="ids"):
        Samples([1.0, 2.0], [1, 1], ids=(1,))
