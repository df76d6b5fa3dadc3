"""Feature maps phi (per query head) and psi (per KV head, shared by its group) of LESS (§2).

Learned (paper architecture, no biases, batched per head with einsum)::

    phi(q)  = | GELU( GELU( q W1q ) W2q ) |                  W1q [H,d,hid], W2q [H,hid,R]
    psi0(k) = |s1| * GELU( GELU( k W1k ) W2k )               W1k [Hkv,d,hid], W2k [Hkv,hid,R]
    psi(k)  = | psi0 + (psi0 W_int) * s2 |                   W_int [Hkv,R,R], s1, s2 [Hkv,R]

Dropout on the first layer's pre-activation (training only); weights uniform
+-sqrt(6 / (fan_in + fan_out)); s1 = s2 = ``init_scale`` so an untrained module makes LESS ~ the
plain sparse policy.

Performer (positive random features, no training)::

    phi(x) = psi(x) = exp(x w d^-1/4 - |x|^2 / (2 sqrt d)) / sqrt(R)

with a seeded Gaussian ``w [Hkv,d,R]`` per KV head shared by its group, so that
``phi(q) . psi(k) ~ exp(q . k / sqrt d)`` in expectation. The exponent is its log feature
(``log_phi``/``log_psi``, no exp): for real models' |q|, |k| (tens) exp overflows or
underflows fp32, so the Performer attends through the log-feature path
(:attr:`LayerKernels.log_features`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


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
    kind: str = "learned"  # learned | performer
    seed: int = 0


def _uniform(*shape: int) -> nn.Parameter:
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


class LearnedKernels(nn.Module):
    """The paper's two-layer GELU kernels."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        h, hkv, d, hid, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden, cfg.rank
        self.W1q, self.W2q = _uniform(h, d, hid), _uniform(h, hid, r)
        self.W1k, self.W2k = _uniform(hkv, d, hid), _uniform(hkv, hid, r)
        self.W_int = _uniform(hkv, r, r)
        self.s1 = nn.Parameter(torch.full((hkv, r), cfg.init_scale))
        self.s2 = nn.Parameter(torch.full((hkv, r), cfg.init_scale))
        self.p_drop = cfg.dropout

    def _mlp(self, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """x [B,h,S,d] -> GELU(GELU(dropout(x W1)) W2) [B,h,S,R]."""
        x = F.gelu(dropout(torch.einsum("bhsd,hdk->bhsk", x, w1), self.p_drop, self.training))
        return F.gelu(torch.einsum("bhsk,hkr->bhsr", x, w2))

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] >= 0."""
        return self._mlp(q, self.W1q, self.W2q).abs()

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R] >= 0."""
        p0 = self.s1.abs()[:, None] * self._mlp(k, self.W1k, self.W2k)
        return (p0 + torch.einsum("bhsr,hrt->bhst", p0, self.W_int) * self.s2[:, None]).abs()


class PerformerKernels(nn.Module):
    """Positive random features approximating exp(q . k / sqrt d); nothing to train."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.num_kv_heads, cfg.head_dim, cfg.rank, generator=gen)
        self.register_buffer("omega", w)
        self.group = cfg.num_heads // cfg.num_kv_heads

    def _log_features(self, x: Tensor, omega: Tensor) -> Tensor:
        """x [B,h,S,d], omega [h,d,R] -> log features [B,h,S,R] (finite for any finite x)."""
        d, r = x.shape[-1], omega.shape[-1]
        x = x * d**-0.25
        proj = torch.einsum("bhsd,hdr->bhsr", x, omega)
        return proj - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(r)

    def log_phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> log phi [B,H,S,R] (head h uses KV head h // g's features)."""
        return self._log_features(q, self.omega.repeat_interleave(self.group, 0))

    def log_psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> log psi [B,Hkv,S,R]."""
        return self._log_features(k, self.omega)

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R] (exp of :meth:`log_phi`: over/underflows for large |q|)."""
        return torch.exp(self.log_phi(q))

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R]."""
        return torch.exp(self.log_psi(k))


KERNELS: dict[str, type[nn.Module]] = {"learned": LearnedKernels, "performer": PerformerKernels}


class LayerKernels(nn.Module):
    """One layer's phi/psi built from a :class:`KernelConfig`; save/load with safetensors."""

    def __init__(self, cfg: KernelConfig) -> None:
        super().__init__()
        if cfg.kind not in KERNELS:
            raise ValueError(f"unknown kernel kind {cfg.kind!r}; allowed: {', '.join(KERNELS)}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"num_heads={cfg.num_heads} not a multiple of {cfg.num_kv_heads}")
        self.cfg = cfg
        self.net = KERNELS[cfg.kind](cfg)

    def phi(self, q: Tensor) -> Tensor:
        """q [B,H,S,d] -> [B,H,S,R]."""
        return self.net.phi(q)

    def psi(self, k: Tensor) -> Tensor:
        """k [B,Hkv,S,d] -> [B,Hkv,S,R]."""
        return self.net.psi(k)

    @property
    def log_features(self) -> bool:
        """Whether the net computes log phi/psi itself (Performer): then attend in log space
        (``parallel_attention(log_phi_q=, log_psi_k=)``), finite where phi/psi over/underflow."""
        return hasattr(self.net, "log_phi")

    def log_phi(self, q: Tensor) -> Tensor:
        """log phi(q) [B,H,S,R] (-inf for a zero feature), computed in fp32."""
        q = q.float()
        return self.net.log_phi(q) if self.log_features else torch.log(self.net.phi(q))

    def log_psi(self, k: Tensor) -> Tensor:
        """log psi(k) [B,Hkv,S,R] (-inf for a zero feature), computed in fp32."""
        k = k.float()
        return self.net.log_psi(k) if self.log_features else torch.log(self.net.psi(k))

    def save(self, path: str | Path) -> None:
        """Write weights and the config (JSON metadata "config") to a .safetensors file."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.cfg))})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LayerKernels:
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            cfg = KernelConfig(**json.loads(f.metadata()["config"]))
        module = cls(cfg)
        module.load_state_dict(load_file(str(path), device=str(device)))
        return module.to(device)
