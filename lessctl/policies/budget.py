"""Budgets: build a policy from its config (``conf/policy/<name>.yaml``) and Baseline+.

Config schema (a mapping)::

    name: h2o                       # one of POLICIES
    budget:
      size: 0.05                    # int >= 1: tokens; float in (0, 1): fraction of `of`
      of: max_position_embeddings   # or: sequence (the evaluated sequence length)
    heavy_ratio: 0.5                # h2o: share of the budget for heavy hitters (rest recent)
    sink: 4                         # lambda: sink tokens (rest recent)
    seed: 0                         # random
    window: 0.5                     # snapkv: window tokens (int) or share of the budget (float)
    kernel: 5                       # snapkv: pooling kernel (odd)
    pooling: avg                    # snapkv: avg or max
    pool_across_window: false       # snapkv: true = lessctl's earlier variant
    per_head: false                 # tova: true = one choice per KV head, not per layer
    recent_ratio: 0.5               # composite: share of budget - sink for the recent window
    weights: {h2o: 1.0, tova: 1.0}  # composite: the score ensemble's weights
    base: h2o                       # recall: the underlying policy (h2o, tova, composite)
    pool: 4                         # recall: candidates the base would evict first

Fractions follow the official LESS code: ``int(size * ref)``; for h2o each part separately,
``heavy = int(size * heavy_ratio * ref)``, ``recent = int(size * (1 - heavy_ratio) * ref)``
(Llama 2 7B "5% H2O" = 102 heavy + 102 recent). Integer sizes split as
``heavy = int(size * heavy_ratio)``, ``recent = size - heavy``. ``full`` takes no budget.
For snapkv the budget splits into ``window`` (an int: tokens; a float in (0, 1):
``max(1, int(window * total))``), the decoded token and ``heavy = total - window - 1``, so
``window <= total - 1``; with ``pool_across_window`` the window counts the decoded token:
``heavy = total - window``, ``window <= total``.
The budget (``size``, ``of``) is resolved here into a :class:`~lessctl.policies.base.Budget`;
each policy class owns the rest (``budget_tokens``: the tokens it keeps, h2o's parts resolved
separately; ``from_config``: its own keys), so a new policy needs no branch here.
Bad values raise a one-line InputError (a LessctlError and a ValueError) naming the value
and what is allowed. The keys' types and ranges are also checked when the config is loaded
(:func:`config_keys`: ``BUDGET_KEYS`` plus the policy class's own ``config_keys``); what depends
on the resolved budget (``sink < budget``, ``window <= budget``) is checked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from lessctl.errors import InputError
from lessctl.policies.base import POLICIES, Budget, Policy
from lessctl.schema import Rule, any_of, int_at_least, number, one_of

REFERENCES = ("max_position_embeddings", "sequence")
BUDGET_KEYS: dict[str, Rule] = {
    "budget.size": any_of(
        (int_at_least(1)[0], "an int >= 1 (tokens)"),
        (number(0.0, 1.0, True, True)[0], "a float in (0, 1) (fraction of budget.of)"),
    ),
    "budget.of": one_of(*REFERENCES),
}


def config_keys(name: Any) -> dict[str, Rule]:
    """The keys of policy ``name``'s config and their rules (``lessctl.schema``): ``name``, the
    budget (every policy but ``full``) and the class's own ``config_keys``."""
    keys: dict[str, Rule] = {"name": one_of(*sorted(POLICIES))}
    if name not in POLICIES:
        return keys
    if POLICIES[name].has_budget:
        keys.update(BUDGET_KEYS)
    return {**keys, **POLICIES[name].config_keys}


def _fraction_or_tokens(size: Any) -> None:
    ok_int = isinstance(size, int) and not isinstance(size, bool) and size >= 1
    ok_float = isinstance(size, float) and 0.0 < size < 1.0
    if not (ok_int or ok_float):
        raise InputError(
            f"policy budget.size={size!r} is invalid; allowed: an int >= 1 (tokens) "
            "or a float in (0, 1) (fraction of budget.of)"
        )


def build_policy(cfg: Mapping[str, Any], *, seq_len: int, max_position_embeddings: int) -> Policy:
    """Resolve a policy config to a policy with integer budgets (see module doc): the budget
    here, the policy's own keys by its class (``budget_tokens``, ``from_config``)."""
    name = cfg.get("name")
    if name not in POLICIES:
        raise InputError(f"unknown policy name {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    if not cls.has_budget:
        return cls.from_config(cfg, Budget(0, 0, seq_len), 0)
    b = cfg.get("budget")
    if not isinstance(b, Mapping) or "size" not in b:
        raise InputError(f"policy {name!r} needs budget.size (an int >= 1 or a float in (0, 1))")
    size, of = b["size"], b.get("of", "max_position_embeddings")
    _fraction_or_tokens(size)
    if of not in REFERENCES:
        raise InputError(f"policy budget.of={of!r} is invalid; allowed: {', '.join(REFERENCES)}")
    ref = max_position_embeddings if of == "max_position_embeddings" else seq_len
    budget = Budget(size, ref, seq_len)
    total = cls.budget_tokens(cfg, budget)
    if total < 1:
        raise InputError(f"policy budget {size!r} of {of} ({ref}) gives {total} tokens; need >= 1")
    if total > seq_len:
        raise InputError(
            f"policy budget of {total} tokens exceeds the context of {seq_len} tokens; "
            f"allowed: 1..{seq_len}"
        )
    return cls.from_config(cfg, budget, total)


STATE_BYTES = 4  # the LESS state (lessctl.less.state) is always float32


def state_tokens(
    rank: int | Sequence[int], head_dim: int, kv_bytes: int, state_bytes: int = STATE_BYTES
) -> int:
    """Tokens whose K and V (``kv_bytes`` per element) hold as many bytes as a rank-``rank``
    state per KV head (``rank * head_dim + rank`` elements of ``state_bytes``):
    ``round((rank * head_dim + rank) * state_bytes / (2 * head_dim * kv_bytes))``.
    R=8, d=128: 4 with fp32 K/V, 8 with bf16/fp16 K/V (the state stays fp32). ``rank`` a list
    of each layer's rank: the mean state's bytes over the layers (every layer keeps the same
    extra tokens, so the total bytes equal the states' total), in exact arithmetic."""
    ranks = [rank] if isinstance(rank, int) else list(rank)
    num = sum(ranks) * (head_dim + 1) * state_bytes
    return round(Fraction(num, len(ranks) * 2 * head_dim * kv_bytes))


def baseline_plus(
    policy: Policy,
    rank: int | Sequence[int],
    head_dim: int,
    kv_bytes: int,
    state_bytes: int = STATE_BYTES,
) -> Policy:
    """Baseline+: ``policy`` with ``state_tokens(rank, head_dim, kv_bytes, state_bytes)`` more
    tokens (h2o half heavy half recent, lambda to recent, snapkv to heavy, others to budget;
    ``full`` unchanged); ``rank``: an int or each layer's (:func:`state_tokens`)."""
    return policy.with_extra(state_tokens(rank, head_dim, kv_bytes, state_bytes))
