"""The typed schema of the composed config: every value a user can set is checked once, where it
enters (`lessctl.config.load_config`), and a bad one gets one line naming the key, the value and
what is allowed.

The root keys are listed here (`SCHEMA`; ``less.kind`` against the kernel registry and
``less.state`` against the state variants',
``eval.methods`` / ``bench.methods`` against the method registry); the groups
whose keys depend on the option chosen are checked against their owners' declarations, each a
mapping key -> `Rule` kept next to the code that reads the keys:

- `policy.*`: `lessctl.policies.budget.config_keys(name)` (the budget keys plus the policy
  class's own `config_keys`);
- `task.*`: the `keys` its task registered with (`lessctl.tasks.base.register`);
- `lm_eval.*`: `lessctl.lm_eval.config_keys.CONFIG_KEYS`.

A key such a declaration does not name is refused (add `+policy.x=...` only for keys the owner
reads). `model` and `data` are validated by their loaders (`load_model`, `load_texts`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lessctl.errors import LessctlError


class SchemaError(LessctlError):
    """A config value outside what is allowed (one line)."""


Rule = tuple[Callable[[Any], bool], str]
"""`(check(value) -> bool, the words for what is allowed)`."""


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
    return (lambda v: isinstance(v, str | int) and v in options), ", ".join(str(o) for o in options)


def names(*options: str) -> Rule:
    """One of `options`, in words that read inside a list rule ("each one of a, b")."""
    return one_of(*options)[0], f"one of {', '.join(options)}"


def any_of(*rules: Rule) -> Rule:
    """A value any of `rules` allows."""
    return (lambda v: any(check(v) for check, _ in rules)), " or ".join(w for _, w in rules)


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


def odd_int() -> Rule:
    return (lambda v: _int(v) and v >= 1 and v % 2 == 1), "an odd int >= 1"


BOOL = ((lambda v: isinstance(v, bool)), "true or false")
STR = ((lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
PATH = ((lambda v: isinstance(v, str) and bool(v)), "a path")
# Hydra reads run_name=2024 as an int: a name may be either
NAME = ((lambda v: (isinstance(v, str) and bool(v)) or _int(v)), "a non-empty name")
MAPPING = ((lambda v: isinstance(v, dict)), "a mapping (key: value)")
DEVICE = (
    (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None),
    "auto, cpu, cuda, cuda:N, mps",
)
STORAGE_DTYPES = one_of("float16", "bfloat16", "float32")

SCHEMA: tuple[Field, ...] = tuple(
    Field(key, *rule)
    for key, rule in (
        ("seed", int_at_least(0)),
        ("cache_dir", PATH),
        ("results_dir", PATH),
        ("run_name", optional(NAME)),
        ("device", DEVICE),
        ("threads", optional(int_at_least(1))),
        ("native_step", one_of("auto", "always", "never")),
        ("triton_step", one_of("auto", "always", "never")),
        ("dtype", one_of("auto", "float32", "bfloat16", "float16")),
        ("extract.tokens", int_at_least(1)),
        ("extract.seq_len", int_at_least(2)),
        ("extract.batch_size", int_at_least(1)),
        ("extract.dtype", STORAGE_DTYPES),
        ("extract.verify", BOOL),
        ("extract.dir", PATH),
        ("train.epochs", int_at_least(1)),
        ("train.batch_size", int_at_least(1)),
        ("train.lr", number(0.0)),
        ("train.step_size", int_at_least(1)),
        ("train.gamma", number(0.0, lo_open=True)),
        ("train.val_fraction", number(0.0, 1.0, lo_open=True, hi_open=True)),
        ("train.max_train_sequences", optional(int_at_least(1))),
        ("train.memory_gb", optional(number(0.0))),  # 0: always streamed from disk
        ("train.layers", optional(any_of(int_at_least(0), list_of(int_at_least(0))))),
        ("train.activations", optional(PATH)),
        ("train.dir", PATH),
        ("train.source", one_of("shards", "online")),
        ("train.save_every", optional(int_at_least(1))),
        ("train.policies", optional(list_of(NAME))),
        ("train.budgets", optional(list_of(number(0.0, lo_open=True)))),
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
        # one rank for every layer, or one per layer (its length: checked with the model)
        ("less.rank", any_of(int_at_least(1), list_of(int_at_least(1)))),
        ("less.hidden", int_at_least(1)),
        ("less.states", int_at_least(1)),
        ("less.dropout", number(0.0, 1.0, hi_open=True)),
        ("less.init_scale", number(0.0)),
        ("less.seed", int_at_least(0)),
        ("less.ckpt", optional(PATH)),
        ("less.transfer", BOOL),
    )
)


# Keys of one policy only (conf/policy/<name>.yaml), checked when `policy.name` is that policy;
# its other keys are checked by `build_policy`.
def check(key: str, value: Any, rule: Rule) -> None:
    """Raise SchemaError (one line) unless `rule` allows `value` at `key`."""
    ok, allowed = rule
    if not ok(value):
        raise SchemaError(f"{key}={value!r} is invalid; allowed: {allowed}")


def check_group(prefix: str, values: Mapping[str, Any], keys: Mapping[str, Rule], owner: str):
    """Check a group's plain `values` against its owner's `keys` (dotted for nested ones, e.g.
    `budget.size`); a key the owner does not declare is refused, naming the ones it has."""
    for name, value in values.items():
        if name in keys:
            check(f"{prefix}.{name}", value, keys[name])
            continue
        nested = {k.split(".", 1)[1]: r for k, r in keys.items() if k.startswith(f"{name}.")}
        if nested and isinstance(value, dict):
            check_group(f"{prefix}.{name}", value, nested, owner)
            continue
        raise SchemaError(
            f"{prefix}.{name} is not a key of {owner}; its keys: {', '.join(sorted(keys))}"
        )


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _owned_groups(cfg: DictConfig) -> None:
    """`policy`, `task` and `lm_eval` against their owners' declarations (module doc)."""
    policy = _plain(cfg, "policy")
    if isinstance(policy, dict):
        from lessctl.policies.budget import config_keys

        keys = config_keys(policy.get("name"))
        check("policy.name", policy.get("name"), keys["name"])
        check_group("policy", policy, keys, f"policy {policy['name']}")
    task = _plain(cfg, "task")
    if isinstance(task, dict):
        from lessctl.tasks.base import get_task  # imports every task (only when one is chosen)

        check("task.name", task.get("name"), STR)
        keys = {"name": STR, **get_task(task["name"]).keys}
        check_group("task", task, keys, f"task {task['name']}")
    lm_eval = _plain(cfg, "lm_eval")
    if isinstance(lm_eval, dict):
        from lessctl.lm_eval.config_keys import CONFIG_KEYS

        check_group("lm_eval", lm_eval, CONFIG_KEYS, "lm_eval")


def validate(cfg: DictConfig) -> None:
    """Raise SchemaError (one line) for the first value outside the schema."""
    for f in SCHEMA:
        value = _plain(cfg, f.key)
        if value is _MISSING:
            continue
        check(f.key, value, (f.check, f.allowed))
    _owned_groups(cfg)
    _kernel_family(cfg)
    _methods(cfg)


def _methods(cfg: DictConfig) -> None:
    """``eval.methods`` and ``bench.methods`` name registered methods (lessctl.methods.registry;
    bench: those it measures). Imported here, not at the top, as the kernels are."""
    from lessctl.methods import method_names

    for key, allowed in (
        ("eval.methods", method_names()),
        ("bench.methods", method_names(bench=True)),
    ):
        value = _plain(cfg, key)
        if value is not _MISSING:
            check(key, value, list_of(names(*allowed)))


def _kernel_family(cfg: DictConfig) -> None:
    """``less.kind`` names a registered kernel family, and the family's own rules for the less.*
    values hold (``config_problem``, e.g. hedgehog's even rank). Imported here, not at the top:
    the kernels import the policies, which import this module."""
    less = cfg.get("less")
    if less is None or less.get("kind") is None:
        return
    from lessctl.less.kernels import KERNELS

    check(
        "less.kind",
        less.kind,
        (lambda v: v in KERNELS, "a kernel family: " + ", ".join(sorted(KERNELS))),
    )
    problem = getattr(KERNELS[less.kind], "config_problem", None)
    if problem is not None and (words := problem(less)):
        raise SchemaError(words)
    from lessctl.less.states import state_problem  # less.state and its variant's own rules

    if words := state_problem(less):
        raise SchemaError(words)


_MISSING = object()
