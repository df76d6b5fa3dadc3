"""The perplexity figures (lessctl.report.perplexity): one evaluated budget draws each method's
figure with its 95% interval as an error bar; several draw a curve per method over the budget
with its interval as a band. Checked on the drawn artists, against lessctl.stats' intervals."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from lessctl import stats  # noqa: E402
from lessctl.report import LABEL, ORDER, method_table  # noqa: E402
from lessctl.report.perplexity import _draw_curves, _draw_points, _ppl_figures  # noqa: E402
from lessctl.stats import Samples  # noqa: E402

SCALE = {"full": 2.0, "baseline": 3.0, "baseline_plus": 2.8, "less": 2.5, "performer": 2.9}


def _rows(budgets, methods=ORDER):
    rng = np.random.default_rng(0)
    rows = []
    for budget in budgets:
        for m in methods:
            nll = (SCALE[m] + 0.01 * budget + rng.normal(0, 0.3, 6)) * 40  # 6 windows of 40
            rows.append(
                {
                    "task": "perplexity",
                    "model": "m",
                    "dataset": "d",
                    "source": "s",
                    "window": 64,
                    "policy": "lambda",
                    "method": m,
                    "budget": None if m == "full" else budget,
                    "metric": "ppl_token",
                    "value": float(np.exp(nll.sum() / 240)),
                    "window_nll": nll.tolist(),
                    "window_count": [40] * 6,
                    "_run": f"r{budget}",
                }
            )
    return pd.DataFrame(rows)


def _interval(nll) -> stats.Estimate:
    return stats.figure(Samples(np.array(nll), np.full(len(nll), 40), exp=True))


def test_one_budget_draws_each_method_with_its_interval():
    df = _rows([16], methods=("full", "baseline", "baseline_plus", "less"))
    t = method_table(df, "ppl_token", lower_is_better=True)
    fig, ax = plt.subplots()
    _draw_points(ax, t)
    shown = ["Full", "Baseline", "Baseline+", "LESS"]  # Performer was not evaluated
    assert [x.get_text() for x in ax.get_xticklabels()] == shown
    [bars] = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    y = bars.lines[0].get_ydata()
    segs = bars.lines[2][0].get_segments()
    methods = ("full", "baseline", "baseline_plus", "less")
    for lab, m, yy, seg in zip(shown, methods, y, segs, strict=True):
        e = _interval(df[df.method == m].iloc[0].window_nll)
        assert yy == pytest.approx(e.value, rel=1e-9), lab
        assert sorted(p[1] for p in seg) == pytest.approx([e.low, e.high], rel=1e-9), lab
        assert e.low < e.value < e.high
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no bands
    plt.close(fig)


def test_several_budgets_draw_curves_with_interval_bands():
    df = _rows([8, 16, 32])
    t = method_table(df, "ppl_token", lower_is_better=True)
    fig, ax = plt.subplots()
    _draw_curves(ax, t)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == set(LABEL.values())
    less = df[df.method == "less"].sort_values("budget")
    assert list(lines["LESS"].get_xdata()) == [8, 16, 32]
    est = [_interval(n) for n in less.window_nll]
    assert list(lines["LESS"].get_ydata()) == pytest.approx([e.value for e in est], rel=1e-9)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(ORDER)  # one band per method, Full's included
    i = list(lines).index("LESS")
    ys = bands[i].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(min(e.low for e in est), rel=1e-9)
    assert ys.max() == pytest.approx(max(e.high for e in est), rel=1e-9)
    plt.close(fig)


def test_figure_files_are_written_per_model_dataset_policy(tmp_path):
    t = method_table(_rows([16]), "ppl_token", lower_is_better=True)
    assert _ppl_figures(t, tmp_path, "perplexity-ppl_token") == [
        "perplexity-ppl_token-m-d-lambda.png"
    ]
    assert (tmp_path / "perplexity-ppl_token-m-d-lambda.png").stat().st_size > 0
