"""The paper's state: one rank-R sum per KV head, ``H = sum psi(k)^T v``, ``z = sum psi(k)``
over the evicted keys, read by ``phi(q)`` (less-method.md §1). ``less.state=sum`` (the default)
maps the kernels' features to themselves."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lessctl.less.kernels.base import KernelConfig
from lessctl.less.states.base import register_state


@register_state("sum")
class SumState(nn.Module):
    identity = True

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()

    def write(self, psi_k: Tensor) -> Tensor:
        return psi_k

    def log_write(self, log_psi_k: Tensor) -> Tensor:
        return log_psi_k

    def read(self, phi_q: Tensor) -> Tensor:
        return phi_q

    def log_read(self, log_phi_q: Tensor) -> Tensor:
        return log_phi_q

    @classmethod
    def config_problem(cls, less: Any) -> str | None:
        states = int(less.get("states", 1))
        if states != 1:
            return f"less.states={states} with less.state=sum; allowed: 1 (one state per KV head)"
        return None
