"""Several trainings from one pass over the text: ``train.policies`` × ``train.budgets``.

Each (policy, budget) is a *target*: the run's config with that policy and budget, composed
exactly as ``lessctl train … policy=P policy.budget.size=B`` would compose it, so its kernels land
in the folder that such a run (and ``lessctl eval policy=P policy.budget.size=B``) names. The
targets share the text, the model, the layers and the training hyperparameters (so one batch
order serves them all); online, one forward pass feeds every target's layers
(:mod:`lessctl.training.sources.online`); from shards, the targets train one after another.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from lessctl.config import ConfigError, group_options, load_config

# overrides that a target replaces (its policy) or must not inherit (the lists); its budget too
# where train.budgets lists them
_REPLACED = re.compile(r"^\+{0,2}(policy|train\.policies|train\.budgets)=")
_BUDGET = re.compile(r"^\+{0,2}policy\.budget\.size=")


def listed(cfg: DictConfig) -> bool:
    """Whether ``cfg`` asks for several trainings (``train.policies`` or ``train.budgets``)."""
    t = cfg.train
    return bool(t.get("policies")) or bool(t.get("budgets"))


def target_configs(cfg: DictConfig, overrides: list[str] | None) -> list[DictConfig]:
    """One config per (policy, budget) of ``train.policies`` × ``train.budgets`` (either list
    unset: the run's own policy or budget); ``[cfg]`` when neither is set. ``overrides`` are
    the run's own (the targets are composed from them)."""
    if not listed(cfg):
        return [cfg]
    if overrides is None:
        raise ConfigError(
            "train.policies / train.budgets need the run's overrides to compose each target "
            "(lessctl train passes them; from Python: run_all(cfg, overrides=[...]))"
        )
    t = cfg.train
    names = [str(p) for p in (t.get("policies") or [cfg.policy.name])]
    allowed = group_options("policy")
    for n in names:
        if n not in allowed:
            raise ConfigError(
                f"train.policies: {n!r} is not a policy; allowed: {', '.join(allowed)}"
            )
    budgets = list(t.get("budgets") or [None])
    keep = [o for o in overrides if not _REPLACED.match(o)]
    if budgets != [None]:
        keep = [o for o in keep if not _BUDGET.match(o)]
    out, seen = [], set()
    for name in names:
        for b in budgets:
            key = (name, b)
            if key in seen:
                raise ConfigError(f"train.policies × train.budgets lists ({name}, {b}) twice")
            seen.add(key)
            extra = [f"policy={name}"] + ([] if b is None else [f"policy.budget.size={b}"])
            out.append(load_config([*keep, *extra]))
    return out
