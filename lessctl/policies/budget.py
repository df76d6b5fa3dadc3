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
Bad values raise a one-line InputError (a LessctlError and a ValueError) naming the value
and what is allowed. The keys' types and ranges are also checked when the config is loaded
(:func:`config_keys`: ``BUDGET_KEYS`` plus the policy class's own ``config_keys``); what depends
on the resolved budget (``sink < budget``, ``window <= budget``) is checked here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lessctl.errors import InputError
from lessctl.policies.base import POLICIES, Policy, get_policy
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
    if name != "full":
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


def _resolve(size: int | float, ref: int, share: float = 1.0) -> int:
    """Tokens for ``share`` of a budget: int sizes are tokens, floats fractions of ``ref``."""
    return int(size * share) if isinstance(size, int) else int(size * share * ref)


def build_policy(cfg: Mapping[str, Any], *, seq_len: int, max_position_embeddings: int) -> Policy:
    """Resolve a policy config to a policy with integer budgets (see module doc)."""
    name = cfg.get("name")
    if name not in POLICIES:
        raise InputError(f"unknown policy name {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    if name == "recall":
        return _recall(cfg, seq_len, max_position_embeddings)
    if name == "full":
        return get_policy("full")
    b = cfg.get("budget")
    if not isinstance(b, Mapping) or "size" not in b:
        raise InputError(f"policy {name!r} needs budget.size (an int >= 1 or a float in (0, 1))")
    size, of = b["size"], b.get("of", "max_position_embeddings")
    _fraction_or_tokens(size)
    if of not in REFERENCES:
        raise InputError(f"policy budget.of={of!r} is invalid; allowed: {', '.join(REFERENCES)}")
    ref = max_position_embeddings if of == "max_position_embeddings" else seq_len
    total = _resolve(size, ref)
    if name == "h2o":
        r = cfg.get("heavy_ratio", 0.5)
        if not 0.0 <= r <= 1.0:
            raise InputError(f"policy heavy_ratio={r!r} is invalid; allowed: a float in [0, 1]")
        heavy = _resolve(size, ref, r)
        recent = total - heavy if isinstance(size, int) else _resolve(size, ref, 1.0 - r)
        total = heavy + recent
    if total < 1:
        raise InputError(f"policy budget {size!r} of {of} ({ref}) gives {total} tokens; need >= 1")
    if total > seq_len:
        raise InputError(
            f"policy budget of {total} tokens exceeds the context of {seq_len} tokens; "
            f"allowed: 1..{seq_len}"
        )
    if name == "h2o":
        return get_policy("h2o", heavy=heavy, recent=recent)
    if name == "lambda":
        sink = cfg.get("sink", 4)
        if not isinstance(sink, int) or not 0 <= sink < total:
            raise InputError(f"policy sink={sink!r} is invalid; allowed: an int in [0, {total})")
        return get_policy("lambda", sink=sink, recent=total - sink)
    if name == "random":
        return get_policy("random", budget=total, seed=int(cfg.get("seed", 0)))
    if name == "composite":
        return _composite(cfg, total)
    if name == "snapkv":
        return _snapkv(cfg, total)
    if name == "tova":
        return get_policy("tova", budget=total, per_head=_flag(cfg, "per_head"))
    return get_policy(name, budget=total)


def _composite(cfg: Mapping[str, Any], total: int) -> Policy:
    """sink, then ``recent = max(1, int((total - sink) * recent_ratio))``, the rest heavy;
    ``weights``: {h2o, tova} (numbers >= 0)."""
    sink, ratio = cfg.get("sink", 4), cfg.get("recent_ratio", 0.5)
    if not isinstance(sink, int) or not 0 <= sink < total:
        raise InputError(f"policy sink={sink!r} is invalid; allowed: an int in [0, {total})")
    if not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
        raise InputError(f"policy recent_ratio={ratio!r} is invalid; allowed: a number in [0, 1]")
    recent = max(1, int((total - sink) * ratio))
    w = dict(cfg.get("weights") or {})
    for key in w:
        if key not in ("h2o", "tova"):
            raise InputError(f"policy weights.{key} is not a score; allowed: h2o, tova")
    return get_policy(
        "composite",
        sink=sink,
        heavy=total - sink - recent,
        recent=recent,
        w_h2o=float(w.get("h2o", 1.0)),
        w_tova=float(w.get("tova", 1.0)),
    )


def _recall(cfg: Mapping[str, Any], seq_len: int, max_position_embeddings: int) -> Policy:
    """recall: the ``base`` policy built from the same config (its own keys and the budget),
    and ``pool`` (an int >= 1)."""
    from lessctl.policies.recall import BASES

    base, pool = cfg.get("base", "h2o"), cfg.get("pool", 4)
    if base not in BASES:
        raise InputError(f"policy base={base!r} is invalid; allowed: {', '.join(BASES)}")
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise InputError(f"policy pool={pool!r} is invalid; allowed: an int >= 1")
    rest = {k: v for k, v in cfg.items() if k not in ("name", "base", "pool")}
    inner = build_policy(
        {**rest, "name": base}, seq_len=seq_len, max_position_embeddings=max_position_embeddings
    )
    return get_policy("recall", base=inner, pool=pool)


def _flag(cfg: Mapping[str, Any], key: str) -> bool:
    """A boolean policy key (default false)."""
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise InputError(f"policy {key}={v!r} is invalid; allowed: true or false")
    return v


def _snapkv(cfg: Mapping[str, Any], total: int) -> Policy:
    """snapkv: ``window`` tokens of the budget for the window, one for the decoded token (unless
    ``pool_across_window``), the rest kept by score."""
    across = _flag(cfg, "pool_across_window")
    top = total if across else total - 1  # the most window tokens the budget holds
    w = cfg.get("window", 0.5)
    ok_int = isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= top
    if not (ok_int or (isinstance(w, float) and 0.0 < w < 1.0)):
        why = "" if across else " (the decoded token takes one token of the budget)"
        raise InputError(
            f"policy window={w!r} is invalid for a budget of {total} tokens; allowed: an int in "
            f"[1, {top}] (tokens of the budget{why}) or a float in (0, 1) (share of the budget)"
        )
    if isinstance(w, float):
        w = max(1, int(w * total))
        if w > top:
            raise InputError(
                f"policy budget of {total} token(s) leaves no room for snapkv's window beside "
                "the decoded token; allowed: a budget of >= 2 tokens, or pool_across_window=true"
            )
    kernel, pooling = cfg.get("kernel", 5), cfg.get("pooling", "avg")
    return get_policy(
        "snapkv",
        heavy=top - w,
        window=w,
        kernel=kernel,
        pooling=pooling,
        pool_across_window=across,
    )


STATE_BYTES = 4  # the LESS state (lessctl.less.state) is always float32


def state_tokens(rank: int, head_dim: int, kv_bytes: int, state_bytes: int = STATE_BYTES) -> int:
    """Tokens whose K and V (``kv_bytes`` per element) hold as many bytes as a rank-``rank``
    state per KV head (``rank * head_dim + rank`` elements of ``state_bytes``):
    ``round((rank * head_dim + rank) * state_bytes / (2 * head_dim * kv_bytes))``.
    R=8, d=128: 4 with fp32 K/V, 8 with bf16/fp16 K/V (the state stays fp32)."""
    return round((rank * head_dim + rank) * state_bytes / (2 * head_dim * kv_bytes))


def baseline_plus(
    policy: Policy, rank: int, head_dim: int, kv_bytes: int, state_bytes: int = STATE_BYTES
) -> Policy:
    """Baseline+: ``policy`` with ``state_tokens(rank, head_dim, kv_bytes, state_bytes)`` more
    tokens (h2o half heavy half recent, lambda to recent, snapkv to heavy, others to budget;
    ``full`` unchanged)."""
    return policy.with_extra(state_tokens(rank, head_dim, kv_bytes, state_bytes))
