"""`lessctl train`: fit φ/ψ of every selected layer, independently, from the source that
``train.source`` names: ``shards`` (an extraction on disk, layer after layer; this module) or
``online`` (the frozen model's forward pass, every layer at once: sources/online.py).

Checkpoints: :mod:`lessctl.training.checkpoints` (finished layers are skipped on a re-run,
locked ones left to the run that holds them).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lessctl.config import resolve_device, resolve_dtype
from lessctl.errors import LessctlError
from lessctl.less.kernels import layer_ranks, rank_list
from lessctl.methods import CHECKPOINT_FORMAT, policy_spec
from lessctl.policies.budget import baseline_plus, build_policy
from lessctl.shards import ShardStore
from lessctl.training.checkpoints import (
    LayerLock,
    checkpoint_dir,
    finished_metrics,
    save_layer,
    write_manifest,
)
from lessctl.training.loop import LayerTrainer, batch_plan, split_sequences, take
from lessctl.training.sources.shards import LayerData, activations, chunk_sizes
from lessctl.training.spec import kernel_config, select_layers, train_spec

SOURCES = ("shards", "online")


def policies(cfg: DictConfig, seq_len: int, geo: dict[str, int], device):
    """(policy, Baseline+ policy) for training on ``seq_len``-token sequences."""
    policy = build_policy(
        cfg.policy, seq_len=seq_len, max_position_embeddings=geo["max_position_embeddings"]
    )
    if policy.budget is None:
        raise LessctlError("policy=full evicts nothing: there is nothing for LESS to learn")
    kv_bytes = torch.empty((), dtype=resolve_dtype(cfg.dtype, device)).element_size()
    # a rank per layer: Baseline+ of the mean state's bytes, as evaluated (methods/baseline_plus)
    ranks = layer_ranks(cfg.less.rank, geo["num_layers"])
    return policy, baseline_plus(policy, ranks, geo["head_dim"], kv_bytes)


def checkpoint_manifest(
    cfg: DictConfig, man: dict[str, Any], policy, activations_path: str | None
) -> dict[str, Any]:
    """The checkpoint folder's manifest from the activations' manifest ``man``."""
    geo = man["geometry"]
    source = man.get("train_source", "shards")
    return {
        "format": CHECKPOINT_FORMAT,
        "spec": train_spec(cfg, man),
        "model": man["model"],
        "dataset": man["dataset"],
        "source": man["source"],
        "activations": activations_path,
        "policy": policy.name,
        "budget": policy.budget,
        "split": policy_spec(policy),
        "data": {
            "dataset": man["dataset"],
            "source": man["source"],
            "activations": man["hash"],
            "seq_len": man["seq_len"],
            "tokens": man.get("tokens"),
            "train_source": source,
        },
        "seq_len": man["seq_len"],
        "geometry": geo,
        "kernel": kernel_record(cfg, geo),
    }


def kernel_record(cfg: DictConfig, geo: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``kernel``: the kernels' config with ``rank`` as configured, an int or the
    list of each layer's (every layer's file holds its own config too)."""
    ranks = layer_ranks(cfg.less.rank, geo["num_layers"])
    record = asdict(kernel_config(cfg, geo, 0))
    return {**record, "rank": ranks if rank_list(cfg.less.rank) is not None else ranks[0]}


def layer_metrics(trainer: LayerTrainer, policy, plus, **extra: Any) -> dict[str, Any]:
    m = trainer.finish()
    head = {"layer": m.pop("layer"), "status": m.pop("status"), "policy": policy.name}
    return {**head, "budget": policy.budget, "budget_plus": plus.budget, **m, **extra}


def train_layer(
    cfg: DictConfig, store: ShardStore, layer: int, out_dir: Path, log=print
) -> dict[str, Any]:
    """Train one layer's kernels from the shards; returns its metrics (also in layer_<i>.json)."""
    t = cfg.train
    man = store.manifest()
    geo = man["geometry"]
    device = resolve_device(cfg.device)
    policy, plus = policies(cfg, man["seq_len"], geo, device)
    trainer = LayerTrainer(
        kernel_config(cfg, geo, layer), layer, int(cfg.seed), t, policy.budget, device
    )
    memory_gb = t.memory_gb
    pre_dir = out_dir / "precomputed" / f"layer_{layer:03d}"
    data = LayerData(
        store,
        layer,
        policy,
        plus,
        man["scaling"],
        device,
        pre_dir,
        float("inf") if memory_gb is None else float(memory_gb) * 2**30,
    )
    chunks = store.done_chunks()
    if len(chunks) < 2:
        raise LessctlError(f"{store.root} holds {len(chunks)} chunk(s); training needs >= 2")
    train_seqs, val_seqs = split_sequences(
        chunks, chunk_sizes(store), t.val_fraction, t.max_train_sequences
    )
    roles = sorted({c for c, _ in train_seqs}), sorted({c for c, _ in val_seqs})
    mode = data.prepare(*roles)
    state_aware = getattr(policy, "state_aware", False)  # recall: decisions follow the kernels
    bs = int(t.batch_size)

    def validate() -> dict[str, float]:
        trainer.val_begin()
        for c, sels in batch_plan(val_seqs, bs, None):
            d = data.load(c, validation=True)
            for sel in sels:
                trainer.val_add(take(d, sel), data.w, data.window, data.max_evicted)
        return trainer.val_end()

    rng = random.Random(int(cfg.seed))  # the order every layer (and online) sees
    trainer.record(0, validate())
    t0 = time.perf_counter()
    for epoch in range(1, int(t.epochs) + 1):
        for c, sels in batch_plan(train_seqs, bs, rng):
            d = data.load(c)
            for sel in sels:
                trainer.step(take(d, sel), data.w, data.window, data.max_evicted)
        if not trainer.end_epoch(epoch):
            log(f"layer {layer}: {trainer.status}; not marked finished (a re-run retrains it)")
            break
        if state_aware:  # epoch e + 1 trains on, and epoch e validates, these kernels' decisions
            mode = data.redecide(trainer.kern, *roles)
        trainer.record(epoch, validate())
        log(trainer.log_line(trainer.tok / (time.perf_counter() - t0), mode))
    metrics = layer_metrics(
        trainer,
        policy,
        plus,
        train_sequences=len(train_seqs),
        val_sequences=len(val_seqs),
        data_in=mode,
        tokens_per_s=trainer.tok / max(time.perf_counter() - t0, 1e-9),
    )
    metrics = save_layer(out_dir, trainer.kern, metrics)
    shutil.rmtree(pre_dir, ignore_errors=True)
    return metrics


def _source(cfg: DictConfig) -> str:
    source = str(cfg.train.get("source") or "shards")
    if source not in SOURCES:
        raise LessctlError(f"train.source={source!r} is invalid; allowed: {', '.join(SOURCES)}")
    return source


def _online_allowed(cfg: DictConfig) -> None:
    """Refuse, in one line, a policy whose decisions follow the kernels (online has no epoch
    boundary at which to remake them)."""
    from lessctl.policies import POLICIES

    name = cfg.policy.get("name")
    if getattr(POLICIES.get(name), "state_aware", False):
        raise LessctlError(
            f"policy={name} (decisions that follow the kernels) trains with "
            "train.source=shards only; allowed with online: the other policies"
        )


def run_all(
    cfg: DictConfig, log=print, overrides: list[str] | None = None
) -> list[tuple[DictConfig, Path, list[dict[str, Any]]]]:
    """Every training that ``cfg`` asks for: one per (policy, budget) of ``train.policies`` ×
    ``train.budgets`` (:mod:`lessctl.training.targets`; just ``cfg``'s own when neither is
    set). Online, one forward pass per batch feeds them all; from shards, they train one after
    another. Per target: (its config, checkpoint dir, metrics)."""
    from lessctl.training.targets import target_configs

    cfgs = target_configs(cfg, overrides)
    if _source(cfg) == "online":
        from lessctl.training.sources.online import run_targets

        for c in cfgs:
            _online_allowed(c)
        done = run_targets(cfgs, log)
    else:
        done = [run(c, log) for c in cfgs]
    return [(c, out, metrics) for c, (out, metrics) in zip(cfgs, done, strict=True)]


def run(cfg: DictConfig, log=print) -> tuple[Path, list[dict[str, Any]]]:
    """Train every selected layer of ``cfg``'s own policy (skipping finished and locked ones);
    returns (checkpoint dir, metrics of the layers this run trained or found finished)."""
    if _source(cfg) == "online":
        from lessctl.training.sources.online import run as run_online

        _online_allowed(cfg)
        return run_online(cfg, log)
    store = activations(cfg)
    man = store.manifest()
    geo = man["geometry"]
    # validate the policy against the extracted context before any work
    policy, _ = policies(cfg, man["seq_len"], geo, resolve_device(cfg.device))
    out = checkpoint_dir(cfg, man)
    write_manifest(out, checkpoint_manifest(cfg, man, policy, str(store.root)))
    results = []
    for layer in select_layers(cfg, geo["num_layers"]):
        done = finished_metrics(out, layer)
        if done is not None:
            log(f"layer {layer}: already trained, skipping")
            results.append(done)
            continue
        lock = LayerLock(out, layer)
        if not lock.acquire():
            log(f"layer {layer}: being trained by another run ({lock.path.name}), skipping")
            continue
        try:
            done = finished_metrics(out, layer)  # finished while we looked at other layers
            results.append(done if done is not None else train_layer(cfg, store, layer, out, log))
        finally:
            lock.release()
    return out, results
