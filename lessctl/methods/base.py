"""What the compared methods share (each method is one file beside this one, registered in
:mod:`lessctl.methods.registry`): the ``Method`` record, LESS checkpoints, and the
teacher-forced attention that applies a method to an unmodified model.

A method is a sparse policy plus, optionally, φ/ψ kernels per layer.
`ParallelAttention(policy, kernels)` is the registered attention function for teacher-forced
evaluation: per layer it computes the policy's `evict_at` and the LESS attention in parallel
form over the whole window (less-method.md §1, §5); Performer kernels go through the log-feature
path (their exp features over/underflow fp32 for real models' queries and keys).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lessctl.errors import LessctlError
from lessctl.hooks import refuse_unknown_kwargs
from lessctl.less.attention import parallel_attention
from lessctl.less.kernels import LayerKernels, layer_ranks, rank_list
from lessctl.less.states import STATE_DEFAULTS, state_label
from lessctl.methods.registry import MethodContext
from lessctl.policies.base import Policy, layer_evict_at
from lessctl.policies.budget import build_policy


@dataclass
class Method:
    name: str
    policy: Policy
    kernels: dict[int, LayerKernels] | None = None
    checkpoint: str | None = None
    trained_budget: int | None = None  # less: the budget its kernels were trained at
    transfer: bool | None = None  # less: trained at another budget/split (less.transfer=true)
    extra_tokens: int | None = None  # baseline_plus: tokens added for the state's bytes
    trained_on: dict[str, Any] | None = None  # less: the kernels' text (TRAINED_ON_KEYS)
    state_ranks: list[int] | None = None  # baseline_plus: the per-layer ranks it is worth

    def columns(self) -> dict[str, Any]:
        """What every result row of this method records beside the evaluated budget;
        ``state_ranks``: each layer's state rank (its kernels', or the ranks whose mean state
        bytes Baseline+'s extra tokens hold), None for a method with no state;
        ``state_variant``: its kernels' ``less.state`` (e.g. ``sum``, ``multi x2``) and
        ``kernel_kind`` their family (``less.kind``), None without kernels."""
        ranks = self.state_ranks
        variant = kind = None
        if self.kernels:
            ranks = ranks or [self.kernels[i].cfg.rank for i in sorted(self.kernels)]
            kc = next(iter(self.kernels.values())).cfg
            variant, kind = state_label(kc.state, kc.states), kc.kind
        return {
            "trained_budget": self.trained_budget,
            "transfer": self.transfer,
            "extra_tokens": self.extra_tokens,
            "state_ranks": ranks,
            "state_variant": variant,
            "kernel_kind": kind,
            **{k: (self.trained_on or {}).get(k) for k in TRAINED_ON_KEYS},
        }


# what a LESS row records of its kernels' training text: its tokens (training + validation
# windows), the text's source (hub:/embedded:/file:) and train.source (shards | online)
TRAINED_ON_KEYS = ("kernel_tokens", "kernel_text_source", "kernel_train_source")


def trained_on(man: dict[str, Any]) -> dict[str, Any]:
    """TRAINED_ON_KEYS of a checkpoint manifest (older shards checkpoints: their tokens from the
    extraction's manifest where it is still there)."""
    data = man.get("data", {})
    tokens = data.get("tokens")
    if tokens is None and man.get("activations"):
        acts = Path(str(man["activations"])) / "manifest.json"
        try:
            tokens = json.loads(acts.read_text()).get("tokens")
        except (OSError, ValueError):
            tokens = None
    return {
        "kernel_tokens": tokens,
        "kernel_text_source": data.get("source", man.get("source")),
        "kernel_train_source": data.get("train_source", "shards"),
    }


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
        kern = None
        if self.kernels is not None:
            kern = self.kernels[module.layer_idx].to(query.device)  # follows the layer's device
        ev = layer_evict_at(
            self.policy, query, key, scaling, sliding_window, softcap, v=value, kernels=kern
        )
        features = {}
        if kern is not None:
            if kern.log_features:  # Performer: exp(features) over/underflows fp32
                features = {"log_phi_q": kern.log_phi(query), "log_psi_k": kern.log_psi(key)}
            else:
                features = {"phi_q": kern.phi(query.float()), "psi_k": kern.psi(key.float())}
        out = parallel_attention(
            query, key, value, ev, scale=scaling, window=sliding_window, softcap=softcap, **features
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
    if man.get("data", {}).get("train_source") == "online":  # no extraction: the text's hash
        from lessctl.extract import extraction_spec
        from lessctl.shards import config_hash

        return man["data"].get("activations") == config_hash(extraction_spec(cfg))
    acts = Path(str(man.get("activations", ""))) / "manifest.json"
    if not acts.exists():
        return False
    extract = json.loads(acts.read_text()).get("spec", {})
    return all(extract.get(k) == int(cfg.extract[k]) for k in ("tokens", "seq_len"))


CHECKPOINT_FORMAT = 2  # manifests with `format`, `split` (policy_spec) and `data`
KERNEL_KEYS = ("rank", "hidden", "kind", "state", "states")  # what an evaluation needs of them


class CheckpointNotFound(LessctlError):
    """No checkpoint of this model, policy and kernel shape at all (bench falls back)."""


def policy_spec(policy: Policy) -> dict[str, Any]:
    """The resolved policy with its split, e.g. {name: lambda, sink: 4, recent: 28} (a policy
    inside a policy, recall's base, as its own spec)."""
    fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}  # type: ignore[arg-type]
    return {
        "name": policy.name,
        **{k: policy_spec(v) if isinstance(v, Policy) else v for k, v in fields.items()},
    }


def _fmt_spec(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "unrecorded"
    return " ".join(f"{k}={v}" for k, v in spec.items() if k != "name")


def checkpoint_differences(man: dict[str, Any], cfg: DictConfig, policy: Policy) -> list[str]:
    """What differs between a checkpoint manifest and this evaluation (empty: it matches).
    Entries start with `budget` when only the policy's budget/split differs (transferable)."""
    diffs = []
    if man.get("model") != cfg.model.name:
        diffs.append(f"model={man.get('model')} (evaluating model={cfg.model.name})")
    if man.get("policy") != policy.name:
        diffs.append(f"policy={man.get('policy')} (evaluating policy={policy.name})")
    kern = man.get("kernel", {})
    for k in KERNEL_KEYS:
        default = STATE_DEFAULTS.get(k)  # what a checkpoint older than the key holds
        if k == "rank":  # an int or each layer's (an int checkpoint: every layer's rank)
            n = man.get("geometry", {}).get("num_layers", 1)
            same = _ranks(kern.get(k), n) == _ranks(cfg.less.rank, n)
            want = rank_list(cfg.less.rank) or int(cfg.less.rank)
        else:
            want = cfg.less.get(k, default)
            want = str(want) if k in ("kind", "state") else int(want)
            same = kern.get(k, default) == want
        if not same:
            diffs.append(f"less.{k}={kern.get(k, default)} (evaluating less.{k}={want})")
    if diffs:
        return diffs
    want = policy_spec(policy)
    if man.get("format", 1) < CHECKPOINT_FORMAT or "split" not in man:
        return [
            f"budget/split unrecorded (old checkpoint format; trained at budget "
            f"{man.get('budget')}, evaluating {_fmt_spec(want)}): retrain with `lessctl train`"
        ]
    if man["split"] != want:
        return [
            f"budget {man.get('budget')} with {_fmt_spec(man['split'])} "
            f"(evaluating budget {policy.budget} with {_fmt_spec(want)})"
        ]
    return []


def _ranks(rank: Any, num_layers: int) -> list[int] | None:
    """Each layer's rank of an int or a list (a list of another length: as it is)."""
    if rank is None:
        return None
    ranks = rank_list(rank)
    return [int(rank)] * num_layers if ranks is None else ranks


def _is_transfer(diffs: list[str]) -> bool:
    return bool(diffs) and all(d.startswith("budget") for d in diffs)


def _complete(path: Path, num_layers: int) -> bool:
    """Every layer finished (its status: training/checkpoints.py); the chosen checkpoint's
    files are hashed when they are loaded, not every candidate's during the search."""
    from lessctl.training.checkpoints import layer_problem

    return all(layer_problem(path, i, check_hash=False) is None for i in range(num_layers))


def find_checkpoint(cfg: DictConfig, num_layers: int, policy: Policy) -> Path:
    """`less.ckpt`, or the newest complete checkpoint under `train.dir` trained for this model,
    policy (budget and split included) and kernel shape (preferring one trained with this
    config's `train.*` and `extract.tokens`/`seq_len`); with `less.transfer=true` one of
    another budget when none matches. Otherwise one line that says what is missing."""
    if cfg.less.get("ckpt"):
        return Path(cfg.less.ckpt).expanduser()
    from lessctl.runs import warn
    from lessctl.training.checkpoints import read_manifest

    exact, transferable = [], []
    for man_path in sorted(Path(cfg.train.dir).expanduser().glob("*/manifest.json")):
        path = man_path.parent
        try:
            man = read_manifest(path)
        except LessctlError as err:  # one bad candidate never breaks the search
            warn(f"skipped a LESS checkpoint: {err}")
            continue
        if not _complete(path, num_layers):
            continue
        diffs = checkpoint_differences(man, cfg, policy)
        newest = max(p.stat().st_mtime for p in path.glob("layer_*.safetensors"))
        # among matches: the one trained with this config's train.* and extraction size first
        # (a sweep such as experiment=study evaluates each point with its own kernels)
        key = (_same_training(cfg, man), newest)
        if not diffs:
            exact.append((key, path))
        elif _is_transfer(diffs):
            transferable.append((key, path, man.get("budget")))
    if exact:
        return max(exact)[1]
    what = (
        f"model={cfg.model.name} policy={policy.name} {_fmt_spec(policy_spec(policy))} "
        f"(budget {policy.budget}) less.rank={cfg.less.rank} less.hidden={cfg.less.hidden}"
    )
    if not transferable:
        raise CheckpointNotFound(
            f"no trained LESS checkpoint for {what} under {cfg.train.dir}; run `lessctl train` "
            f"with the same policy first or pass less.ckpt=PATH"
        )
    if cfg.less.get("transfer"):
        return max(transferable)[1]
    budgets = sorted({str(b) for *_, b in transferable})
    raise LessctlError(
        f"no LESS checkpoint trained for {what} under {cfg.train.dir}; found only ones trained "
        f"at budget {', '.join(budgets)}: train at this budget, or pass less.transfer=true to "
        f"evaluate kernels trained at another budget"
    )


@dataclass(frozen=True)
class Checkpoint:
    """Loaded kernels with where they came from and how they were trained."""

    kernels: dict[int, LayerKernels]
    path: str
    trained_budget: int | None
    transfer: bool
    trained_on: dict[str, Any] | None = None


def load_less(cfg: DictConfig, geo: dict[str, int], device, policy: Policy) -> Checkpoint:
    """Trained kernels for every layer. A checkpoint of another model, policy or kernel shape is
    refused; one of another budget/split (or an old one that does not record it) too, unless
    `less.transfer=true` (then `transfer` is True and `trained_budget` says where it was
    trained)."""
    path = find_checkpoint(cfg, geo["num_layers"], policy)
    if not (path / "manifest.json").exists():
        raise LessctlError(f"less.ckpt={str(path)!r} is not a LESS checkpoint (no manifest.json)")
    from lessctl.training.checkpoints import layer_problem, read_manifest, verified_kernels

    man = read_manifest(path)  # a truncated or garbled one: one line naming it
    diffs = checkpoint_differences(man, cfg, policy)
    if diffs and not (_is_transfer(diffs) and cfg.less.get("transfer")):
        hint = "; pass less.transfer=true to evaluate it anyway" if _is_transfer(diffs) else ""
        raise LessctlError(f"LESS checkpoint {path} was trained for {diffs[0]}{hint}")
    kernels = {}
    for i in range(geo["num_layers"]):
        p = path / f"layer_{i:03d}.safetensors"
        if not p.exists() and "was not trained" not in (layer_problem(path, i) or ""):
            raise LessctlError(f"LESS checkpoint {path} lacks layer {i} ({p.name})")
        # status and sha256 checked: a layer that was not trained is refused, naming it
        kernels[i] = verified_kernels(path, i, device).eval()
    ranks = layer_ranks(cfg.less.rank, geo["num_layers"])
    bad = [i for i in kernels if kernels[i].cfg.rank != ranks[i]]
    if bad:  # the layer files hold their configs: a manifest that says otherwise is refused
        i = bad[0]
        raise LessctlError(
            f"LESS checkpoint {path}: layer {i} has rank {kernels[i].cfg.rank}; "
            f"evaluating less.rank={ranks[i]} at layer {i}"
        )
    return Checkpoint(kernels, str(path), man.get("budget"), bool(diffs), trained_on(man))


def build_methods(
    cfg: DictConfig, geo: dict[str, int], seq_len: int, device, kv_dtype: torch.dtype
) -> list[Method]:
    """The methods named in `eval.methods` for this policy and a context of `seq_len` tokens,
    each built by its registered builder (lessctl.methods.registry); `kv_dtype`: the dtype of
    the cached K/V (Baseline+ adds the tokens worth the state's bytes)."""
    from lessctl.methods.registry import REGISTRY, method_names  # filled by the package

    names = list(cfg.eval.methods)
    bad = [n for n in names if n not in REGISTRY]
    if bad:
        allowed = ", ".join(method_names())
        raise LessctlError(f"unknown eval.methods entry {bad[0]!r}; allowed: {allowed}")
    layer_ranks(cfg.less.rank, geo["num_layers"])  # a per-layer list: one rank a layer
    policy = build_policy(
        cfg.policy, seq_len=seq_len, max_position_embeddings=geo["max_position_embeddings"]
    )
    full = build_policy({"name": "full"}, seq_len=seq_len, max_position_embeddings=0)
    ctx = MethodContext(cfg, geo, seq_len, device, kv_dtype, policy, full)
    return [REGISTRY[n].build(ctx) for n in names]
