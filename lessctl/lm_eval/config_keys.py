"""The keys of the root config's `lm_eval:` block (`lessctl eval task=lm_eval`) and their rules
(`lessctl.schema`), checked when the config is loaded; `lessctl.lm_eval.task` reads them."""

from __future__ import annotations

from lessctl.schema import (
    MAPPING,
    PATH,
    STR,
    Rule,
    any_of,
    int_at_least,
    list_of,
    number,
    optional,
)

CONFIG_KEYS: dict[str, Rule] = {
    "tasks": list_of(STR),
    # lm-eval's own meaning: an int is documents per task, a float below 1 a share of them
    "limit": optional(any_of(int_at_least(1), number(0.0, 1.0, lo_open=True, hi_open=True))),
    "num_fewshot": optional(int_at_least(0)),
    "batch_size": int_at_least(1),
    "bootstrap_iters": int_at_least(0),
    "include_path": optional(PATH),
    "metadata": MAPPING,
}
