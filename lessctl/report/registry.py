"""The report's section registry: each section is a function registered with
``@register_section(name, order)`` that turns the saved rows into Markdown lines (and writes
its figures under ``fig_dir``); `lessctl report` writes them in ascending ``order``. A task or
study brings its own section by registering one in a module of this package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class ReportContext:
    """What a section gets: every saved row of the finished runs (`rows`), the newest row per
    key (`latest`, see lessctl.report.run) and the figure folder."""

    rows: pd.DataFrame
    latest: pd.DataFrame
    fig_dir: Path


Render = Callable[[ReportContext], list[str]]


@dataclass(frozen=True)
class Section:
    name: str
    order: int
    render: Render


SECTIONS: dict[str, Section] = {}


def register_section(name: str, order: int) -> Callable[[Render], Render]:
    """Decorator: register ``render(ctx) -> Markdown lines`` as the section ``name``."""

    def wrap(render: Render) -> Render:
        if name in SECTIONS and SECTIONS[name].render is not render:
            raise ValueError(f"report section {name!r} registered twice")
        SECTIONS[name] = Section(name, order, render)
        return render

    return wrap


def sections() -> list[Section]:
    """The registered sections in the order the report writes them."""
    return sorted(SECTIONS.values(), key=lambda s: (s.order, s.name))


def task_rows(latest: pd.DataFrame, column: str, value: str) -> pd.DataFrame:
    """The rows whose `column` is `value` (none when no row has the column)."""
    return latest[latest.get(column) == value] if column in latest else latest[:0]
