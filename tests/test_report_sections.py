"""The report's section registry (lessctl.report.registry): the sections the report writes,
their order, and a newly registered section reaching REPORT.md."""

import pytest

from lessctl.report import SECTIONS, register_section, sections
from lessctl.report import run as write_report
from lessctl.runs import start_run

from .test_report import _rows

BUILTIN = [
    "perplexity",
    "summarization",
    "lm_eval",
    "training",
    "longctx",
    "retrieval",
    "bench",
    "study",
]


def test_builtin_sections_in_report_order():
    assert [s.name for s in sections()][: len(BUILTIN)] == BUILTIN


def test_a_registered_section_reaches_the_report(compose, tmp_path, monkeypatch):
    monkeypatch.setattr("lessctl.report.registry.SECTIONS", dict(SECTIONS))
    seen = []

    @register_section("zz_extra", 65)  # between bench and study
    def extra(ctx):
        seen.append(len(ctx.rows))
        return ["## Extra section", ""]

    run = start_run(compose(f"results_dir={tmp_path}"), "eval", [])
    run.add_rows(_rows(32, [10.0, 30.0, 20.0, 15.0, 25.0]))
    run.finish()
    text = write_report(tmp_path).read_text()
    assert "## Extra section" in text and seen and seen[0] > 0
    assert text.index("## Extra section") < text.index("## Runs")
    assert "## Perplexity" in text and text.index("## Perplexity") < text.index("## Extra")


def test_a_taken_section_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_section("perplexity", 0)(lambda ctx: [])
