"""`lessctl train`: fit φ/ψ of every layer independently on that layer's activation shards.

Per layer (less-method.md §4): target = o_proj(full causal attention) from the stored q, k, v
(fp32); prediction = o_proj(LESS attention) with the policy's evictions; MSE over rows t >=
budget. The policy's `evict_at` and the sparse part (normalised output + log-sum-exp) do not
depend on φ/ψ: they are computed once per chunk, written next to the checkpoint folder, and
streamed back every epoch with q, k, v, so a step costs the kernels plus the O(S·R·d) state.

Checkpoints: `<train.dir>/<hash>/layer_<i>.safetensors` (kernels + config) and
`layer_<i>.json` (metrics); a layer with both is finished and skipped on a re-run, so an
interrupted run resumes at the first unfinished layer, and Hydra multirun jobs over
`train.layers` never write the same file.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from lessctl.config import resolve_device, resolve_dtype
from lessctl.errors import LessctlError
from lessctl.extract import extraction_dir
from lessctl.less.attention import (
    combine,
    low_rank_attention,
    max_evicted_per_chunk,
    sparse_attention,
)
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import CHECKPOINT_FORMAT, policy_spec
from lessctl.policies.base import expire, layer_evict_at, never_evicted
from lessctl.policies.budget import baseline_plus, build_policy
from lessctl.shards import ShardError, ShardStore, config_hash, save_atomic, write_json_atomic

EVAL_ONLY_LESS_KEYS = ("ckpt", "transfer")  # choose a checkpoint; not part of what is trained


def kernel_config(cfg: DictConfig, geo: dict[str, int]) -> KernelConfig:
    lc = cfg.less
    return KernelConfig(
        num_heads=geo["num_heads"],
        num_kv_heads=geo["num_kv_heads"],
        head_dim=geo["head_dim"],
        rank=int(lc.rank),
        hidden=int(lc.hidden),
        dropout=float(lc.dropout),
        init_scale=float(lc.init_scale),
        kind=str(lc.kind),
        seed=int(lc.seed),
    )


def activations(cfg: DictConfig) -> ShardStore:
    """The extraction that `cfg` names (train.activations, or the extraction hash of cfg)."""
    root = Path(cfg.train.activations).expanduser() if cfg.train.activations else None
    store = ShardStore(root or extraction_dir(cfg))
    if not store.manifest_path.exists():
        raise ShardError(
            f"no activations at {store.root} for model={cfg.model.name} data={cfg.data.name} "
            f"extract.tokens={cfg.extract.tokens} extract.seq_len={cfg.extract.seq_len}: "
            f"run `lessctl extract` with the same overrides first"
        )
    man = store.manifest()
    if man["model"] != cfg.model.name:
        raise ShardError(
            f"activations at {store.root} come from model {man['model']!r}, not "
            f"model={cfg.model.name}; extract for this model or point train.activations elsewhere"
        )
    if root is None and man["hash"] != store.root.name:
        raise ShardError(f"manifest hash {man['hash']} does not match folder {store.root}")
    if "layers" not in man:
        raise ShardError(
            f"extraction at {store.root} predates per-layer attention views (scaling, sliding "
            f"window, soft-capping), so its targets would ignore them: delete it and run "
            f"`lessctl extract` again"
        )
    done = len(store.done_chunks())
    if done != man["chunks"]:
        raise ShardError(
            f"extraction at {store.root} is incomplete ({done}/{man['chunks']} chunks); "
            f"run `lessctl extract` again with the same overrides to finish it"
        )
    return store


def train_spec(cfg: DictConfig, man: dict[str, Any]) -> dict[str, Any]:
    t = cfg.train
    hyper = {
        k: t[k]
        for k in (
            "epochs",
            "batch_size",
            "lr",
            "step_size",
            "gamma",
            "val_fraction",
            "max_train_sequences",
        )
    }
    return {
        "activations": man["hash"],
        "policy": OmegaConf.to_container(cfg.policy, resolve=True),
        "less": {
            k: v
            for k, v in OmegaConf.to_container(cfg.less, resolve=True).items()
            if k not in EVAL_ONLY_LESS_KEYS
        },
        "train": hyper,
        "seed": int(cfg.seed),
    }


def _layers(cfg: DictConfig, n_layers: int) -> list[int]:
    sel = cfg.train.layers
    if sel is None:
        return list(range(n_layers))
    sel = [int(sel)] if isinstance(sel, int | str) else [int(x) for x in sel]
    bad = [i for i in sel if not 0 <= i < n_layers]
    if bad:
        raise LessctlError(f"train.layers has {bad[0]}; allowed: 0..{n_layers - 1}")
    return sel


def _o_proj(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, H, S, d] attention output -> [n, S, hidden] through the frozen o_proj."""
    n, h, s, d = x.shape
    return F.linear(x.transpose(1, 2).reshape(n, s, h * d), w["weight"], w.get("bias"))


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The layer's own attention (the training target) in fp32, GQA-aware: [n,H,S,d]. Causal
    softmax, with the layer's sliding ``window`` and logit ``softcap`` where it has them."""
    if window is not None or softcap is not None:
        ev = expire(never_evicted(k), window)
        return sparse_attention(q, k, v, ev, scale, softcap=softcap)[0]
    if q.device.type == "cpu":  # each KV head serves its group without a copy: 1.5x faster
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # on CUDA, fp32 GQA would fall back to the S x S math kernel; repeated K/V keep O(S) memory
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class LayerData:
    """One layer's training tensors: q, k, v from the shards and what does not depend on φ/ψ
    (target, evict_at, sparse out/lse; for validation chunks also the Baseline and Baseline+
    outputs after o_proj), computed once per layer by :meth:`prepare`.

    Held on the training device when they fit in `memory_bytes` (read once per layer, not per
    epoch); otherwise written per chunk next to the checkpoint folder and streamed back every
    epoch. Precomputed tensors are stored in the activations' dtype (the precision of q, k, v)
    except ``sparse_lse`` (fp32) and ``evict_at`` (long); the loss is computed in fp32.
    """

    FLOAT_KEYS = ("target", "sparse_out", "baseline", "plus")
    GROUP_BYTES = 512 * 2**20  # fp32 q and k of the chunks whose decisions are made at once

    def __init__(
        self,
        store: ShardStore,
        layer: int,
        policy,
        plus,
        scale: float,
        device,
        cache_dir: Path,
        memory_bytes: float = float("inf"),
    ):
        self.store, self.layer, self.scale, self.device = store, layer, scale, device
        self.policy, self.plus, self.cache = policy, plus, cache_dir
        self.memory_bytes = memory_bytes
        self.w = {k: v.to(device) for k, v in store.o_proj(layer).items()}
        view = store.manifest()["layers"][layer]  # `activations` refuses extractions without
        self.window, self.softcap = view.get("window"), view.get("softcap")
        self.scale = scale if view.get("scaling") is None else view["scaling"]
        if not self.w:
            raise ShardError(f"o_proj weights of layer {layer} missing in {store.root}")
        self.resident: dict[int, dict[str, torch.Tensor]] | None = None
        self.max_evicted: int | None = None  # the most keys a 128-row chunk evicts (static shapes)

    def _pre_path(self, chunk: int) -> Path:
        return self.cache / f"chunk_{chunk:05d}.safetensors"

    def _raw(self, chunk: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.store.read(self.layer, chunk).items()}

    def _evict_at(self, policy, raws: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The policy's decisions for several chunks in one call: a sequential policy's
        per-token loop (H2O, TOVA) costs about the same for 4 sequences as for 200, so one call
        over many chunks instead of one per chunk (exactly the same decisions, per sequence)."""
        q = torch.cat([r["q"] for r in raws]).to(torch.float32)
        k = torch.cat([r["k"] for r in raws]).to(torch.float32)
        ev = layer_evict_at(policy, q, k, self.scale, self.window, self.softcap)
        return list(ev.split([r["q"].shape[0] for r in raws]))

    def _precompute(
        self,
        raw: dict[str, torch.Tensor],
        validation: bool,
        ev: torch.Tensor | None = None,
        ev_plus: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Target, evict_at, sparse part (and for validation Baseline, Baseline+) of one chunk;
        ``ev`` / ``ev_plus``: the policy's / Baseline+'s decisions when already known."""
        dt = raw["q"].dtype
        q, k, v = (raw[n].to(torch.float32) for n in ("q", "k", "v"))
        sc, w, cap = self.scale, self.window, self.softcap
        if ev is None:
            ev = layer_evict_at(self.policy, q, k, sc, w, cap)
        out, lse = sparse_attention(q, k, v, ev, sc, softcap=cap)
        pre = {
            "target": _o_proj(full_attention(q, k, v, sc, w, cap), self.w),
            "evict_at": ev,
            "sparse_out": out,
            "sparse_lse": lse,
        }
        if validation:
            pre["baseline"] = _o_proj(out, self.w)
            if ev_plus is None:
                ev_plus = layer_evict_at(self.plus, q, k, sc, w, cap)
            pre["plus"] = _o_proj(sparse_attention(q, k, v, ev_plus, sc, softcap=cap)[0], self.w)
        return {n: t.to(dt) if n in self.FLOAT_KEYS else t for n, t in pre.items()}

    def load(self, chunk: int, validation: bool = False) -> dict[str, torch.Tensor]:
        """q, k, v (activations' dtype) + the precomputed tensors of one chunk."""
        if self.resident is not None and chunk in self.resident:
            return self.resident[chunk]
        raw = self._raw(chunk)
        p = self._pre_path(chunk)
        if p.exists():
            pre = {k: v.to(self.device) for k, v in load_file(p).items()}
        else:
            pre = self._precompute(raw, validation)
            self._save_pre(chunk, pre)
        return {**raw, **pre}

    def _save_pre(self, chunk: int, d: dict[str, torch.Tensor]) -> None:
        pre = {k: t.cpu() for k, t in d.items() if k not in ("q", "k", "v")}
        save_atomic(pre, self._pre_path(chunk))

    def prepare(self, train_chunks: list[int], val_chunks: list[int]) -> str:
        """Precompute every chunk once; keep them all in memory if they fit, else on disk.
        Returns "memory" or "stream"."""
        roles = [(c, False) for c in train_chunks] + [(c, True) for c in val_chunks]
        held: dict[int, dict[str, torch.Tensor]] = {}
        used, bound, mode = 0, torch.zeros((), dtype=torch.long, device=self.device), "memory"
        for c, validation, raw, ev, ev_plus in self._decided(roles):
            d = {**raw, **self._precompute(raw, validation, ev, ev_plus)}
            bound = torch.maximum(bound, max_evicted_per_chunk(d["evict_at"]))
            used += sum(t.numel() * t.element_size() for t in d.values())
            if mode == "memory" and used <= self.memory_bytes:
                held[c] = d
                continue
            if mode == "memory":  # does not fit: write what is held so far, stream from now on
                mode = "stream"
                for hc, hd in held.items():
                    self._save_pre(hc, hd)
                held = {}
            self._save_pre(c, d)
        self.resident = held if mode == "memory" else None
        self.max_evicted = int(bound)  # one host sync per layer
        return mode

    def _decided(self, roles: list[tuple[int, bool]]):
        """(chunk, validation, raw, evict_at, Baseline+'s evict_at or None) per role, the
        decisions made for groups of chunks of up to ``GROUP_BYTES`` of fp32 q and k at once."""
        group: list[tuple[int, bool, dict[str, torch.Tensor]]] = []
        size = 0

        def flush(group: list[tuple[int, bool, dict[str, torch.Tensor]]]):
            raws = [r for _, _, r in group]
            evs = self._evict_at(self.policy, raws)
            val = [i for i, (_, v, _) in enumerate(group) if v]
            plus_evs = self._evict_at(self.plus, [raws[i] for i in val]) if val else []
            plus = dict(zip(val, plus_evs, strict=True))
            for i, (c, v, r) in enumerate(group):
                yield c, v, r, evs[i], plus.get(i)

        for c, validation in roles:
            raw = self._raw(c)
            n = raw["q"].numel() + raw["k"].numel()
            if group and (size + n) * 4 > self.GROUP_BYTES:
                yield from flush(group)
                group, size = [], 0
            group.append((c, validation, raw))
            size += n
        if group:
            yield from flush(group)


def _rows_mse(pred: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
    return F.mse_loss(pred[:, start:], target[:, start:].to(pred.dtype))


def train_layer(
    cfg: DictConfig, store: ShardStore, layer: int, out_dir: Path, log=print
) -> dict[str, Any]:
    """Train one layer's kernels; returns its metrics (also written to layer_<i>.json)."""
    t = cfg.train
    man = store.manifest()
    geo = man["geometry"]
    device = resolve_device(cfg.device)
    policy = build_policy(
        cfg.policy, seq_len=man["seq_len"], max_position_embeddings=geo["max_position_embeddings"]
    )
    budget = policy.budget
    if budget is None:
        raise LessctlError("policy=full evicts nothing: there is nothing for LESS to learn")
    kv_bytes = torch.empty((), dtype=resolve_dtype(cfg.dtype, device)).element_size()
    plus = baseline_plus(policy, int(cfg.less.rank), geo["head_dim"], kv_bytes)
    kcfg = kernel_config(cfg, geo)
    seed = int(cfg.seed) * 1000 + layer
    torch.manual_seed(seed)
    kern = LayerKernels(kcfg).to(device)
    memory_gb = t.memory_gb
    data = LayerData(
        store,
        layer,
        policy,
        plus,
        man["scaling"],
        device,
        out_dir / "precomputed" / f"layer_{layer:03d}",
        float("inf") if memory_gb is None else float(memory_gb) * 2**30,
    )

    # (chunk, row) pairs; the last val_fraction of chunks validate (whole chunks, so a chunk's
    # precomputed tensors serve one role)
    chunks = store.done_chunks()
    if len(chunks) < 2:
        raise LessctlError(f"{store.root} holds {len(chunks)} chunk(s); training needs >= 2")
    n_val = min(max(1, math.ceil(len(chunks) * float(t.val_fraction))), len(chunks) - 1)

    def pairs(cs: list[int]) -> list[tuple[int, int]]:
        return [
            (c, i) for c in cs for i in range(json.loads(store.marker(c).read_text())["sequences"])
        ]

    train_seqs, val_seqs = pairs(chunks[:-n_val]), pairs(chunks[-n_val:])
    if t.max_train_sequences:
        train_seqs = train_seqs[: int(t.max_train_sequences)]
    train_chunks = sorted({c for c, _ in train_seqs})
    mode = data.prepare(train_chunks, chunks[-n_val:])

    def batches(items: list, shuffle: bool, rng: random.Random):
        by_chunk: dict[int, list[int]] = {}
        for c, i in items:
            by_chunk.setdefault(c, []).append(i)
        order = list(by_chunk)
        if shuffle:
            rng.shuffle(order)
        for c in order:
            rows = by_chunk[c]
            if shuffle:
                rng.shuffle(rows)
            d = data.load(c, validation=not shuffle)
            n_chunk = d["q"].shape[0]
            for a in range(0, len(rows), int(t.batch_size)):
                sel = rows[a : a + int(t.batch_size)]
                if sel == list(range(sel[0], sel[0] + len(sel))):  # contiguous rows: a view
                    yield {k: v[sel[0] : sel[0] + len(sel)] for k, v in d.items()}
                    continue
                if sorted(sel) == list(range(n_chunk)):  # the whole chunk in another order
                    yield d
                    continue
                idx = torch.tensor(sel, device=device)
                yield {k: v.index_select(0, idx) for k, v in d.items()}

    def predict(b: dict[str, torch.Tensor]) -> torch.Tensor:
        q, k, v = (b[n].to(torch.float32) for n in ("q", "k", "v"))
        phi, psi = kern.phi(q), kern.psi(k)
        num, den = low_rank_attention(
            phi, psi, v, b["evict_at"], window=data.window, max_evicted=data.max_evicted
        )
        sparse_out = b["sparse_out"].to(torch.float32)
        return _o_proj(combine(sparse_out, b["sparse_lse"], num, den), data.w)

    def validate() -> dict[str, float]:
        """Mean per-sequence MSE of LESS, Baseline, Baseline+ over the validation sequences
        (summed on the device; one host sync)."""
        kern.eval()
        sums = torch.zeros(3, device=device)
        n = 0
        with torch.no_grad():
            for b in batches(val_seqs, False, random.Random(0)):
                k = b["q"].shape[0]
                pred = predict(b)
                sums += k * torch.stack(
                    [
                        _rows_mse(pred, b["target"], budget),
                        _rows_mse(b["baseline"].to(pred.dtype), b["target"], budget),
                        _rows_mse(b["plus"].to(pred.dtype), b["target"], budget),
                    ]
                )
                n += k
        kern.train()
        less, base, base_plus = (sums / n).tolist()
        return {"less": less, "baseline": base, "baseline_plus": base_plus}

    opt = torch.optim.Adam(kern.parameters(), lr=float(t.lr))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(t.step_size), gamma=float(t.gamma))
    rng = random.Random(seed)
    first = validate()
    best = {"val_mse": first["less"], "epoch": 0}
    best_state = {k: v.detach().clone() for k, v in kern.state_dict().items()}
    history, tok, t0, status = [], 0, time.perf_counter(), "finished"
    for epoch in range(1, int(t.epochs) + 1):
        losses = []  # on the device: one host sync per epoch, not per step
        for b in batches(train_seqs, True, rng):
            loss = _rows_mse(predict(b), b["target"], budget)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            tok += b["q"].shape[0] * b["q"].shape[2]
        epoch_losses = torch.stack(losses) if losses else torch.zeros(1, device=device)
        if not bool(torch.isfinite(epoch_losses).all()):
            status = f"stopped: non-finite loss at epoch {epoch}"
            log(f"layer {layer}: {status}; keeping the best checkpoint so far")
            break
        sched.step()
        val = validate()
        rate = tok / (time.perf_counter() - t0)
        history.append(
            {
                "epoch": epoch,
                "train_mse": float(epoch_losses.mean()),
                "val_mse": val["less"],
                "val_baseline_mse": val["baseline"],
                "val_baseline_plus_mse": val["baseline_plus"],
            }
        )
        log(
            f"layer {layer:3d} epoch {epoch:3d}  train {history[-1]['train_mse']:.4e}  "
            f"val LESS {val['less']:.4e}  Baseline {val['baseline']:.4e}  "
            f"Baseline+ {val['baseline_plus']:.4e}  {rate:,.0f} tok/s ({mode})"
        )
        if val["less"] < best["val_mse"]:
            best = {"val_mse": val["less"], "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in kern.state_dict().items()}
    kern.load_state_dict(best_state)
    kern.save(out_dir / f"layer_{layer:03d}.safetensors")
    metrics = {
        "layer": layer,
        "status": status,
        "policy": policy.name,
        "budget": budget,
        "budget_plus": plus.budget,
        "best_epoch": best["epoch"],
        "val_less_mse": best["val_mse"],
        "val_baseline_mse": first["baseline"],
        "val_baseline_plus_mse": first["baseline_plus"],
        "val_untrained_mse": first["less"],
        "train_sequences": len(train_seqs),
        "val_sequences": len(val_seqs),
        "data_in": mode,
        "tokens_per_s": tok / max(time.perf_counter() - t0, 1e-9),
        "history": history,
    }
    write_json_atomic(out_dir / f"layer_{layer:03d}.json", metrics)
    shutil.rmtree(out_dir / "precomputed" / f"layer_{layer:03d}", ignore_errors=True)
    return metrics


def checkpoint_dir(cfg: DictConfig, man: dict[str, Any]) -> Path:
    return Path(cfg.train.dir).expanduser() / config_hash(train_spec(cfg, man))


def run(cfg: DictConfig, log=print) -> tuple[Path, list[dict[str, Any]]]:
    """Train every selected layer (skipping finished ones); returns (checkpoint dir, metrics)."""
    store = activations(cfg)
    man = store.manifest()
    geo = man["geometry"]
    # validate the policy against the extracted context before any work
    policy = build_policy(
        cfg.policy, seq_len=man["seq_len"], max_position_embeddings=geo["max_position_embeddings"]
    )
    out = checkpoint_dir(cfg, man)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").exists():  # same hash, same content: written once
        write_json_atomic(
            out / "manifest.json",
            {
                "format": CHECKPOINT_FORMAT,
                "spec": train_spec(cfg, man),
                "model": man["model"],
                "dataset": man["dataset"],
                "source": man["source"],
                "activations": str(store.root),
                "policy": policy.name,
                "budget": policy.budget,
                "split": policy_spec(policy),
                "data": {
                    "dataset": man["dataset"],
                    "source": man["source"],
                    "activations": man["hash"],
                    "seq_len": man["seq_len"],
                },
                "seq_len": man["seq_len"],
                "geometry": geo,
                "kernel": asdict(kernel_config(cfg, geo)),
            },
        )
    results = []
    for layer in _layers(cfg, geo["num_layers"]):
        done = out / f"layer_{layer:03d}.json"
        if done.exists() and (out / f"layer_{layer:03d}.safetensors").exists():
            log(f"layer {layer}: already trained, skipping")
            results.append(json.loads(done.read_text()))
            continue
        results.append(train_layer(cfg, store, layer, out, log))
    return out, results


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[int, LayerKernels]]:
    """A checkpoint folder's manifest and its trained layers' kernels."""
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise LessctlError(f"no LESS checkpoint at {path} (manifest.json missing)")
    man = json.loads((path / "manifest.json").read_text())
    kernels = {
        int(p.stem.split("_")[1]): LayerKernels.load(p)
        for p in sorted(path.glob("layer_*.safetensors"))
    }
    return man, kernels
