"""The compared methods and the teacher-forced attention that applies them to an unmodified model.

A method is a sparse policy plus, optionally, φ/ψ kernels per layer:

- `full`: nothing evicted (transformers' own SDPA path, the reference);
- `baseline`: the policy; `baseline_plus`: the policy with the tokens that equal the state's
  memory; `less`: the policy plus trained kernels (`less.ckpt=` or the latest matching
  checkpoint); `performer`: the policy plus untrained random-feature kernels.

`ParallelAttention(policy, kernels)` is the registered attention function for teacher-forced
evaluation: per layer it computes the policy's `evict_at` and the LESS attention in parallel
form over the whole window (less-method.md §1, §5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.hooks import refuse_unknown_kwargs
from lessctl.less.attention import parallel_attention
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies.base import Policy, layer_evict_at
from lessctl.policies.budget import baseline_plus, build_policy

METHODS = ("full", "baseline", "baseline_plus", "less", "performer")


@dataclass
class Method:
    name: str
    policy: Policy
    kernels: dict[int, LayerKernels] | None = None
    checkpoint: str | None = None


class ParallelAttention:
    """Attention function: policy evictions + (optional) low-rank state, all rows at once."""

    def __init__(self, policy: Policy, kernels: dict[int, LayerKernels] | None = None):
        self.policy, self.kernels = policy, kernels

    def __call__(
        self,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        sliding_window=None,
        softcap=None,
        **kw,
    ):
        refuse_unknown_kwargs(module, kw)
        ev = layer_evict_at(self.policy, query, key, scaling, sliding_window, softcap)
        phi = psi = None
        if self.kernels is not None:
            kern = self.kernels[module.layer_idx].to(query.device)  # follows the layer's device
            phi, psi = kern.phi(query.float()), kern.psi(key.float())
        out = parallel_attention(
            query, key, value, ev, phi, psi, scale=scaling, window=sliding_window, softcap=softcap
        )
        return out.transpose(1, 2).contiguous(), None


def _same_training(cfg: DictConfig, man: dict) -> bool:
    """Whether checkpoint manifest `man` was trained with this config's `train.*` settings on an
    extraction of `extract.tokens` x `extract.seq_len` (how a sweep over them, e.g.
    experiment=study, evaluates each point with its own kernels)."""
    spec = man.get("spec", {})
    trained = spec.get("train", {})
    if any(trained.get(k) != cfg.train.get(k) for k in trained):
        return False
    acts = Path(str(man.get("activations", ""))) / "manifest.json"
    if not acts.exists():
        return False
    extract = json.loads(acts.read_text()).get("spec", {})
    return all(extract.get(k) == int(cfg.extract[k]) for k in ("tokens", "seq_len"))


def find_checkpoint(cfg: DictConfig, num_layers: int, budget: int | None = None) -> Path:
    """`less.ckpt`, or a complete checkpoint under `train.dir` for this model, policy and rank:
    one trained at `budget` and with this `less` config first, then one trained with this
    config's `train.*` and `extract.tokens`/`seq_len`, then the newest."""
    if cfg.less.get("ckpt"):
        return Path(cfg.less.ckpt).expanduser()
    want_kernel = {k: cfg.less[k] for k in ("hidden", "kind")}
    cands = []
    for man_path in Path(cfg.train.dir).expanduser().glob("*/manifest.json"):
        man = json.loads(man_path.read_text())
        complete = all(
            (man_path.parent / f"layer_{i:03d}.safetensors").exists() for i in range(num_layers)
        )
        if (
            man["model"] == cfg.model.name
            and man["policy"] == cfg.policy.name
            and man["kernel"]["rank"] == int(cfg.less.rank)
            and complete
        ):
            same_kernel = all(man["kernel"].get(k) == v for k, v in want_kernel.items())
            newest = max(p.stat().st_mtime for p in man_path.parent.glob("layer_*.safetensors"))
            key = (man.get("budget") == budget, same_kernel, _same_training(cfg, man), newest)
            cands.append((key, man_path.parent))
    if not cands:
        raise LessctlError(
            f"no trained LESS checkpoint for model={cfg.model.name} policy={cfg.policy.name} "
            f"less.rank={cfg.less.rank} under {cfg.train.dir}; run `lessctl train` first or "
            f"pass less.ckpt=PATH"
        )
    return max(cands, key=lambda c: c[0])[1]


def load_less(
    cfg: DictConfig, geo: dict[str, int], device, budget: int | None = None
) -> tuple[dict[int, LayerKernels], str]:
    """Trained kernels for every layer; refuses a checkpoint of another model, policy or rank."""
    path = find_checkpoint(cfg, geo["num_layers"], budget)
    if not (path / "manifest.json").exists():
        raise LessctlError(f"less.ckpt={str(path)!r} is not a LESS checkpoint (no manifest.json)")
    man = json.loads((path / "manifest.json").read_text())
    want = {"model": cfg.model.name, "policy": cfg.policy.name, "rank": int(cfg.less.rank)}
    got = {"model": man["model"], "policy": man["policy"], "rank": man["kernel"]["rank"]}
    for key in want:
        if want[key] != got[key]:
            raise LessctlError(
                f"LESS checkpoint {path} was trained for {key}={got[key]}, not {key}={want[key]}"
            )
    kernels = {}
    for i in range(geo["num_layers"]):
        p = path / f"layer_{i:03d}.safetensors"
        if not p.exists():
            raise LessctlError(f"LESS checkpoint {path} lacks layer {i} ({p.name})")
        kernels[i] = LayerKernels.load(p, device).eval()
    return kernels, str(path)


def performer(cfg: DictConfig, geo: dict[str, int], device) -> dict[int, LayerKernels]:
    """Untrained random-feature kernels (the paper's ablation), seeded per layer."""
    return {
        i: LayerKernels(
            KernelConfig(
                num_heads=geo["num_heads"],
                num_kv_heads=geo["num_kv_heads"],
                head_dim=geo["head_dim"],
                rank=int(cfg.less.rank),
                kind="performer",
                seed=int(cfg.less.seed) * 1000 + i,
            )
        )
        .to(device)
        .eval()
        for i in range(geo["num_layers"])
    }


def build_methods(cfg: DictConfig, geo: dict[str, int], seq_len: int, device) -> list[Method]:
    """The methods named in `eval.methods` for this policy and a context of `seq_len` tokens."""
    names = list(cfg.eval.methods)
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise LessctlError(f"unknown eval.methods entry {bad[0]!r}; allowed: {', '.join(METHODS)}")
    policy = build_policy(
        cfg.policy, seq_len=seq_len, max_position_embeddings=geo["max_position_embeddings"]
    )
    full = build_policy({"name": "full"}, seq_len=seq_len, max_position_embeddings=0)
    out = []
    for n in names:
        if n == "full":
            out.append(Method(n, full))
        elif n == "baseline":
            out.append(Method(n, policy))
        elif n == "baseline_plus":
            out.append(Method(n, baseline_plus(policy, int(cfg.less.rank), geo["head_dim"])))
        elif n == "less":
            kernels, ckpt = load_less(cfg, geo, device, policy.budget)
            out.append(Method(n, policy, kernels, ckpt))
        else:
            out.append(Method(n, policy, performer(cfg, geo, device)))
    return out
