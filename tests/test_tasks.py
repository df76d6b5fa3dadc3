"""The task registry: every task module registers itself; eval chooses by name."""

import pytest

from lessctl.errors import LessctlError
from lessctl.tasks import TASKS, get_task, task_name


def test_every_conf_task_is_registered_and_back():
    from lessctl.config import group_options

    assert set(group_options("task")) == set(TASKS)


def test_unknown_task_is_one_line_listing_allowed():
    with pytest.raises(LessctlError) as err:
        get_task("nope")
    msg = str(err.value)
    assert "'nope'" in msg and "allowed:" in msg and "perplexity" in msg and "\n" not in msg


def test_task_by_name_or_by_data_kind(compose):
    assert task_name(compose("experiment=smoke")) == "perplexity"
    assert task_name(compose("experiment=smoke", "eval.mode=streaming")) == "perplexity_streaming"
    assert task_name(compose("experiment=smoke", "data=xsum")) == "summarization"
    assert task_name(compose("experiment=smoke", "task=summarization")) == "summarization"
    with pytest.raises(LessctlError, match="allowed: parallel, streaming"):
        task_name(compose("experiment=smoke", "eval.mode=nope"))


def test_cli_task_is_a_task_or_short_for_data():
    from lessctl.cli import task_overrides

    assert task_overrides(["task=wikitext2", "task=perplexity", "x=1"]) == [
        "data=wikitext2",
        "task=perplexity",
        "x=1",
    ]
