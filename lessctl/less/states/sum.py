"""The paper's state: one rank-R sum per KV head, ``H = sum psi(k)^T v``, ``z = sum psi(k)``
over the evicted keys, read by ``phi(q)`` (less-method.md §1). ``less.state=sum`` (the default)
maps the kernels' features to themselves."""

from __future__ import annotations

from typing import Any

from lessctl.less.states.base import StateVariant, register_state


@register_state("sum")
class SumState(StateVariant):
    """Every map the identity (StateVariant's)."""

    @classmethod
    def config_problem(cls, less: Any) -> str | None:
        states = int(less.get("states", 1))
        if states != 1:
            return f"less.states={states} with less.state=sum; allowed: 1 (one state per KV head)"
        return None
