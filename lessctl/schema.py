"""The typed schema of the composed config: every value a user can set is checked once, where it
enters (`lessctl.config.load_config`), and a bad one gets one line naming the key, the value and
what is allowed. Keys not listed here are free (groups such as `model`, `data` and `policy` are
validated by their own builders: `build_policy`, `load_model`, `load_texts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lessctl.errors import LessctlError


class SchemaError(LessctlError):
    """A config value outside what is allowed (one line)."""


@dataclass(frozen=True)
class Field:
    """One config key: `check(value) -> bool` and the words for what is allowed."""

    key: str
    check: Callable[[Any], bool]
    allowed: str


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _int(v) and v >= lo), f"an int >= {lo}"


def optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    check, words = rule
    return (lambda v: v is None or check(v)), f"null or {words}"


def one_of(*options: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), ", ".join(str(o) for o in options)


def list_of(
    rule: tuple[Callable[[Any], bool], str], empty: bool = False
) -> tuple[Callable[[Any], bool], str]:
    check, words = rule
    least = 0 if empty else 1
    return (lambda v: isinstance(v, list) and len(v) >= least and all(check(x) for x in v)), (
        f"a {'' if empty else 'non-empty '}list, each {words}"
    )


def number(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v: Any) -> bool:
        if not _num(v):
            return False
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = hi is None or (v < hi if hi_open else v <= hi)
        return ok_lo and ok_hi

    left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
    return check, f"a number in {left}{lo}, {'inf' if hi is None else hi}{right}"


BOOL = ((lambda v: isinstance(v, bool)), "true or false")
DEVICE = (
    (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None),
    "auto, cpu, cuda, cuda:N, mps",
)
STORAGE_DTYPES = one_of("float16", "bfloat16", "float32")

SCHEMA: tuple[Field, ...] = tuple(
    Field(key, *rule)
    for key, rule in (
        ("seed", int_at_least(0)),
        ("device", DEVICE),
        ("threads", optional(int_at_least(1))),
        ("native_step", one_of("auto", "always", "never")),
        ("dtype", one_of("auto", "float32", "bfloat16", "float16")),
        ("extract.tokens", int_at_least(1)),
        ("extract.seq_len", int_at_least(2)),
        ("extract.batch_size", int_at_least(1)),
        ("extract.dtype", STORAGE_DTYPES),
        ("train.epochs", int_at_least(1)),
        ("train.batch_size", int_at_least(1)),
        ("train.lr", number(0.0)),
        ("train.step_size", int_at_least(1)),
        ("train.gamma", number(0.0, lo_open=True)),
        ("train.val_fraction", number(0.0, 1.0, lo_open=True, hi_open=True)),
        ("train.max_train_sequences", optional(int_at_least(1))),
        ("train.source", one_of("shards", "online")),
        ("train.save_every", optional(int_at_least(1))),
        ("eval.mode", one_of("parallel", "streaming")),
        ("eval.window", optional(int_at_least(2))),
        ("eval.windows", optional(int_at_least(1))),
        ("eval.samples", int_at_least(1)),
        ("eval.shots", int_at_least(0)),
        ("eval.max_new_tokens", int_at_least(1)),
        ("eval.sampling", BOOL),
        ("eval.temperature", number(0.0, lo_open=True)),
        ("eval.max_prompt_tokens", optional(int_at_least(1))),
        ("eval.batch_size", int_at_least(1)),
        (
            "eval.reuse_predictions",
            list_of((lambda v: isinstance(v, str) and bool(v), "a run folder path"), empty=True),
        ),
        ("bench.contexts", list_of(int_at_least(2))),
        ("bench.batch_sizes", list_of(int_at_least(1))),
        ("bench.warmup", int_at_least(0)),
        ("bench.steps", int_at_least(1)),
        ("bench.isolate", BOOL),
        ("bench.full_max_context", int_at_least(1)),
        ("bench.prefill_chunk", int_at_least(1)),
        ("bench.prefill_contexts", list_of(int_at_least(2), empty=True)),
        ("bench.throughput_contexts", list_of(int_at_least(2), empty=True)),
        ("bench.paired_contexts", list_of(int_at_least(2), empty=True)),
        ("bench.memory_cap_mb", number(0, lo_open=True)),
        ("bench.max_batch", int_at_least(1)),
        ("bench.breakdown", BOOL),
        ("less.kind", one_of("learned", "performer")),
        ("less.rank", int_at_least(1)),
        ("less.hidden", int_at_least(1)),
        ("less.dropout", number(0.0, 1.0, hi_open=True)),
        ("less.init_scale", number(0.0)),
        ("less.transfer", BOOL),
    )
)


def validate(cfg: DictConfig) -> None:
    """Raise SchemaError (one line) for the first value outside the schema."""
    for f in SCHEMA:
        value = OmegaConf.select(cfg, f.key, default=_MISSING)
        if value is _MISSING:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not f.check(value):
            raise SchemaError(f"{f.key}={value!r} is invalid; allowed: {f.allowed}")


_MISSING = object()
