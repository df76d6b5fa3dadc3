"""One layer's phi/psi (less-method.md §2): the config, the kernel-family registry and the module
that builds a registered family by name (``less.kind``).

A family is one file in this folder: an ``nn.Module`` class registered with
``@register_kernel(name)``, built from a :class:`KernelConfig`, with

- ``phi(q)`` [B,H,S,d] -> [B,H,S,R] >= 0 (per query head) and ``psi(k)`` [B,Hkv,S,d] ->
  [B,Hkv,S,R] >= 0 (per KV head, shared by its group);
- optionally ``log_phi`` / ``log_psi`` (a family whose features over/underflow fp32 attends
  through the log-feature path: Performer);
- optionally ``fold()`` (the paper's two-layer GELU MLPs: the weights of the decode-time fast
  path, lessctl.less.frozen, and the C++ step);
- optionally ``config_problem(cfg) -> str | None`` (a classmethod): what is wrong with the
  less.* values for this family, checked when the config is composed (lessctl.schema).

Every registered family is held by the shared conformance test (tests/less/test_kernel_families.py):
the cache's recurrent step equals the parallel form, a state with nothing folded is the plain
policy, and the state's bytes are what the cache holds, under every state variant. The state
itself is the same rank-R sum ``H = sum psi(k)^T v``, ``z = sum psi(k)`` for every family; a
state variant (``less.state``, lessctl.less.states) maps the family's features before the sum.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lessctl.errors import InputError


@dataclass(frozen=True)
class KernelConfig:
    """Shapes and hyper-parameters of one layer's phi/psi."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int = 8
    hidden: int = 512
    dropout: float = 0.3
    init_scale: float = 1e-4
    kind: str = "learned"  # a registered family (KERNELS): learned, performer, light, hedgehog
    seed: int = 0
    state: str = "sum"  # a registered state variant (lessctl.less.states): sum, multi
    states: int = 1  # M states per KV head (less.state=multi), rank/M rows each


def rank_list(rank: Any) -> list[int] | None:
    """``less.rank`` as the list it is (a list or an OmegaConf ListConfig), or None for an int."""
    if isinstance(rank, str | bytes) or not isinstance(rank, Sequence):
        return None
    return [int(r) for r in rank]


def layer_ranks(rank: Any, num_layers: int) -> list[int]:
    """Each of the ``num_layers`` layers' rank from ``less.rank``: an int (every layer) or a
    list of one int per layer; a list of another length is refused in one line."""
    ranks = rank_list(rank)
    if ranks is None:
        return [int(rank)] * num_layers
    if len(ranks) != num_layers:
        raise InputError(
            f"less.rank={ranks} has {len(ranks)} entries; allowed: an int >= 1 or a list of "
            f"{num_layers} ints >= 1 (one per layer of the model)"
        )
    return ranks


def kernel_config(
    cfg: Any, geo: dict[str, int], layer: int | None = None, **overrides: Any
) -> KernelConfig:
    """Layer ``layer``'s kernels' config for a model of attention geometry ``geo`` (num_heads,
    num_kv_heads, head_dim, num_layers) from the composed config's ``less.*`` (rank: the
    layer's entry of a per-layer list, :func:`layer_ranks`; hidden, dropout, init_scale, kind,
    seed), with ``overrides`` replacing fields (e.g. ``dropout=0.0``, ``kind="performer"``).
    ``layer`` may be left out only when ``less.rank`` is an int. The one place a KernelConfig
    is built from a config."""
    lc = cfg.less
    if rank_list(lc.rank) is None:
        rank = int(lc.rank)
    elif layer is None:
        raise InputError(f"less.rank={rank_list(lc.rank)} is per layer: name the layer")
    else:
        rank = layer_ranks(lc.rank, geo["num_layers"])[layer]
    kc = KernelConfig(
        num_heads=geo["num_heads"],
        num_kv_heads=geo["num_kv_heads"],
        head_dim=geo["head_dim"],
        rank=rank,
        hidden=int(lc.hidden),
        dropout=float(lc.dropout),
        init_scale=float(lc.init_scale),
        kind=str(lc.kind),
        seed=int(lc.seed),
        state=str(lc.get("state", "sum")),
        states=int(lc.get("states", 1)),
    )
    return replace(kc, **overrides)


def uniform(*shape: int) -> nn.Parameter:
    """Glorot-uniform weight [heads, fan_in, fan_out]."""
    bound = math.sqrt(6.0 / (shape[-2] + shape[-1]))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout of x (any shape). On CPU the mask comes from 16-bit random integers, three
    per 64-bit draw (each element dropped with probability round(p * 2^16) / 2^16, within 2^-17
    of p): torch's per-element Bernoulli draw took 16% of a training step there
    (``benchmarks/bench_train.py``). Elsewhere: :func:`torch.nn.functional.dropout`."""
    if not training or p == 0.0:
        return x
    dropped = round(p * 65536)  # of the 2^16 values a word takes
    if x.device.type != "cpu" or not 0 < dropped < 65536 or sys.byteorder != "little":
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.empty((n + 2) // 3, dtype=torch.int64).random_()  # 63 random bits each
    draws = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]  # the 3 full 16-bit words
    keep = draws.view(x.shape) >= dropped - 32768
    return x * (keep * (1.0 / (1.0 - p))).to(x.dtype)


KERNELS: dict[str, type[nn.Module]] = {}


def register_kernel(name: str):
    """Class decorator: register a kernel family under ``name`` (``less.kind=<name>``)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in KERNELS and KERNELS[name] is not cls:
            raise ValueError(f"kernel family {name!r} registered twice")
        KERNELS[name] = cls
        return cls

    return wrap


class LayerKernels(nn.Module):
    """One layer's phi/psi built from a :class:`KernelConfig`: the kernel family's features
    (``net``) through the state variant's write and read maps (``state_map``, lessctl.less.states;
    the identity for the paper's sum state); save/load with safetensors."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        from lessctl.less.states import STATES  # the variants import this module

        if cfg.kind not in KERNELS:
            raise ValueError(f"unknown kernel kind {cfg.kind!r}; allowed: {', '.join(KERNELS)}")
        if cfg.state not in STATES:
            raise ValueError(f"unknown state {cfg.state!r}; allowed: {', '.join(STATES)}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads={cfg.num_heads} not a multiple of {cfg.num_kv_heads}")
        self.cfg = cfg
        self.net = KERNELS[cfg.kind](cfg)
        self.state_map = STATES[cfg.state](cfg)

    @property
    def plain_features(self) -> bool:
        """Whether the state variant maps the family's features to themselves (the sum state):
        then the family's folded fast path (lessctl.less.frozen) is its features."""
        return bool(self.state_map.identity)

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R]."""
        return self.state_map.read(self.net.phi(q))

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R]."""
        return self.state_map.write(self.net.psi(k))

    @property
    def log_features(self) -> bool:
        """Whether the net computes log phi/psi itself (Performer): then attend in log space
        (``parallel_attention(log_phi_q=, log_psi_k=)``), finite where phi/psi over/underflow."""
        return hasattr(self.net, "log_phi")

    def log_phi(self, q: Tensor) -> Tensor:
        """log phi(q) [B,H,S,R] (-inf for a zero feature), computed in fp32."""
        q = q.float()
        lp = self.net.log_phi(q) if self.log_features else torch.log(self.net.phi(q))
        return self.state_map.log_read(lp)

    def log_psi(self, k: Tensor) -> Tensor:
        """log psi(k) [B,Hkv,S,R] (-inf for a zero feature), computed in fp32."""
        k = k.float()
        lp = self.net.log_psi(k) if self.log_features else torch.log(self.net.psi(k))
        return self.state_map.log_write(lp)

    def safetensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, metadata) of the .safetensors form: the weights and buffers (CPU) and the
        config as JSON metadata "config"."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        return tensors, {"config": json.dumps(asdict(self.cfg))}

    def save(self, path: str | Path) -> None:
        """Write :meth:`safetensors` to ``path`` (checkpoints write it atomically with its
        sha256: lessctl.training.checkpoints.save_layer)."""
        tensors, meta = self.safetensors()
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LayerKernels:
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            cfg = KernelConfig(**json.loads(f.metadata()["config"]))
        module = cls(cfg)
        module.load_state_dict(load_file(str(path), device=str(device)))
        return module.to(device)
