"""State variants (``less.state``): the registry and the protocol of one variant.

The paper's state is one rank-R sum per KV head, ``H = sum psi(k)^T v`` [R,d] and ``z = sum
psi(k)`` [R] over the evicted keys, read by ``phi(q)``. A variant registered here changes what
is written and read while keeping the state a sum of the *features it maps*: it takes the
kernel family's ``phi(q)``, ``psi(k)`` (rank R, ``less.rank``) and returns rank-R features
``phi~(q)``, ``psi~(k)`` (a variant may read its own ``phi(q)`` and ``psi(k)`` too, e.g. a
router). Then

- its parallel form (training, perplexity) is :func:`lessctl.less.attention.parallel_attention`
  over ``phi~``, ``psi~``, and its recurrent step (the cache) is
  :class:`lessctl.less.state.LowRankState` over the same features: the two are equal because
  they are the sum state's two forms;
- its bytes are the sum state's, R d + R fp32 per KV head and layer (``less.rank`` is the
  state's total rank: ``less.state=multi less.states=2 less.rank=8`` holds two states of rank
  4, the bytes of ``less.rank=8``), so Baseline+ is given the same extra tokens.

Every registered variant is held by the shared conformance test
(tests/less/test_kernel_families.py, with every kernel family): the recurrent step equals the
parallel form, an empty state is the plain policy, the bytes are what the cache holds, save and
load give the same features.

A variant whose update is not a sum of per-key features (the delta rule, whose write depends on
what the state already holds; segments merged by age) does not fit this protocol: it needs its
own parallel form and cache step, and is not registered (README, "State variants").

A variant is a :class:`StateVariant` subclass registered with ``@register_state(name)``,
built from a :class:`~lessctl.less.kernels.base.KernelConfig` (``cfg.state``, ``cfg.states``),
with

- ``write(psi_k) -> psi~(k)`` [B,Hkv,S,R] and ``log_write(log_psi_k) -> log psi~(k)`` (log
  features, ``-inf`` = 0): the same map on either side of the log;
- ``read(phi_q) -> phi~(q)`` [B,H,S,R] and ``log_read(log_phi_q)``;
- ``identity`` (class attribute): True when both maps are the identity (the sum state), which
  lets the learned kernels' folded decode path (lessctl.less.frozen) skip them;
- optionally ``config_problem(less) -> str | None`` (a classmethod): what is wrong with the
  less.* values for this variant, checked when the config is composed (lessctl.schema).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

STATES: dict[str, type[nn.Module]] = {}
# the paper's state: what a config or checkpoint older than ``less.state`` holds, and what the
# training spec leaves out so that the folders trained before state variants keep their names
STATE_DEFAULTS = {"state": "sum", "states": 1}


class StateVariant(nn.Module):
    """The protocol's maps, each the identity (the sum state's); a variant overrides those it
    changes and sets ``identity = False``."""

    identity = True

    def __init__(self, cfg: Any) -> None:
        super().__init__()

    def write(self, psi_k: Tensor) -> Tensor:
        return psi_k

    def log_write(self, log_psi_k: Tensor) -> Tensor:
        return log_psi_k

    def read(self, phi_q: Tensor) -> Tensor:
        return phi_q

    def log_read(self, log_phi_q: Tensor) -> Tensor:
        return log_phi_q


def register_state(name: str):
    """Class decorator: register a state variant under ``name`` (``less.state=<name>``)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in STATES and STATES[name] is not cls:
            raise ValueError(f"state variant {name!r} registered twice")
        STATES[name] = cls
        return cls

    return wrap


def state_label(state: str, states: int) -> str:
    """A row's name for a variant: ``sum``, or ``multi x2`` for M states."""
    return state if states == 1 else f"{state} x{states}"


def state_problem(less: Any) -> str | None:
    """What is wrong with ``less.state`` / ``less.states`` (None: nothing): an unknown variant,
    or the variant's own rule (``config_problem``)."""
    name = less.get("state", "sum")
    if name not in STATES:
        return f"less.state={name!r} is invalid; allowed: {', '.join(sorted(STATES))}"
    problem = getattr(STATES[name], "config_problem", None)
    return None if problem is None else problem(less)
