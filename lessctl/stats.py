"""Bootstrap intervals for every figure and comparison in the report (scipy.stats.bootstrap).

A method's result on a task is a set of *units* (perplexity: windows; summarisation: examples),
each with a numerator and a denominator; its figure is ``link(Σ num / Σ den)``:

- perplexity: num = Σ NLL of the window, den = its tokens (or words), link = exp; a ratio
  statistic, so windows are resampled whole (num and den together), never tokens;
- ROUGE: num = the example's F-measure, den = 1, link = identity (the mean over examples).

Comparisons resample the *same* units for every method at once (paired bootstrap): a window
that is hard for Baseline+ is hard for LESS too, and pairing removes that shared spread. An
interval is the percentile interval of the seeded bootstrap distribution (95% by default); a
difference whose interval contains 0 is "not significant".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

CONFIDENCE = 0.95
RESAMPLES = 9999


@dataclass(frozen=True)
class Samples:
    """Per-unit values of one method. ``num``, ``den``: [U]; ``ids``: [U] unit ids (window index
    or example id) that pair units across methods; ``exp``: figure = exp(Σnum/Σden) if True."""

    num: np.ndarray
    den: np.ndarray
    ids: tuple = ()
    exp: bool = False

    def __post_init__(self) -> None:
        num, den = np.asarray(self.num, float), np.asarray(self.den, float)
        if num.ndim != 1 or num.shape != den.shape or len(num) == 0:
            raise ValueError(
                f"samples need equal non-empty 1-D num/den; got {num.shape}, {den.shape}"
            )
        ids = tuple(self.ids) if len(self.ids) else tuple(range(len(num)))
        if len(ids) != len(num):
            raise ValueError(f"samples: {len(ids)} ids for {len(num)} units")
        object.__setattr__(self, "num", num)
        object.__setattr__(self, "den", den)
        object.__setattr__(self, "ids", ids)

    def figure(self) -> float:
        return float(_figure(self.num, self.den, self.exp))

    def take(self, ids: Sequence) -> Samples:
        """The units with these ids, in this order."""
        pos = {u: i for i, u in enumerate(self.ids)}
        idx = [pos[u] for u in ids]
        return Samples(self.num[idx], self.den[idx], tuple(ids), self.exp)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval [low, high]."""

    value: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (for differences)."""
        return bool(self.low > 0 or self.high < 0)


def _figure(num: np.ndarray, den: np.ndarray, exp: bool, axis: int = -1) -> np.ndarray:
    ratio = np.sum(num, axis=axis) / np.sum(den, axis=axis)
    return np.exp(ratio) if exp else ratio


def paired(samples: Sequence[Samples]) -> list[Samples]:
    """The methods restricted to the units they all have (in the first one's order)."""
    common = set(samples[0].ids)
    for s in samples[1:]:
        common &= set(s.ids)
    if not common:
        raise ValueError("the methods share no windows or examples to pair")
    order = [u for u in samples[0].ids if u in common]
    return [s.take(order) for s in samples]


def estimate(
    samples: Sequence[Samples],
    combine: Callable[..., np.ndarray],
    *,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
) -> Estimate:
    """``combine(*figures)`` of the methods' figures with a paired bootstrap interval.

    Units are paired by id (only shared ones are used) and resampled together for all methods.
    """
    s = paired(samples)
    exps = [x.exp for x in s]
    point = float(combine(*[x.figure() for x in s]))
    if len(s[0].ids) < 2:
        return Estimate(point, float("nan"), float("nan"))
    data = [a for x in s for a in (x.num, x.den)]

    def statistic(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        figs = [
            _figure(arrays[2 * i], arrays[2 * i + 1], exps[i], axis=axis) for i in range(len(s))
        ]
        with np.errstate(divide="ignore", invalid="ignore"):
            return combine(*figs)

    res = bootstrap(
        data,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Estimate(point, float(ci.low), float(ci.high))


def figure(s: Samples, **kw) -> Estimate:
    """A method's figure (perplexity or mean ROUGE) with its interval."""
    return estimate([s], lambda a: a, **kw)


def difference(a: Samples, b: Samples, **kw) -> Estimate:
    """Paired difference figure(a) − figure(b) with its interval."""
    return estimate([a, b], lambda x, y: x - y, **kw)


def _gap(f, p, le):
    """(plus − less) / (plus − full) of the figures (arrays or floats)."""
    return (p - le) / (p - f)


def gap_closed(full: Samples, plus: Samples, less: Samples, **kw) -> Estimate:
    """Share of the Baseline+→Full gap that LESS closes, (plus − less) / (plus − full), with its
    paired interval. The same formula holds for lower- and higher-is-better figures."""
    return estimate([full, plus, less], _gap, **kw)


def gap_closed_change(a: Sequence[Samples], b: Sequence[Samples], **kw) -> Estimate:
    """gap closed(b) − gap closed(a), each a (Full, Baseline+, LESS) triple, with its interval
    paired over the units all six share (two study points evaluated on the same windows)."""
    return estimate(
        [*a, *b], lambda fa, pa, la, fb, pb, lb: _gap(fb, pb, lb) - _gap(fa, pa, la), **kw
    )


def verdict(d: Estimate, lower_is_better: bool) -> str:
    """Words for a difference (first − second): "better", "worse" or "not significant"."""
    if not d.significant:
        return "not significant"
    return "better" if (d.value < 0) == lower_is_better else "worse"
